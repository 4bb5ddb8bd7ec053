import subprocess
import sys


def test_core_import_does_not_import_trl():
    code = (
        "import sys, rpe, rpe.models, rpe.tasks, rpe.envs, rpe.rollouts, rpe.tracker, rpe.probe, rpe.bundle, "
        "rpe.dopamine, rpe.fit, rpe.cli; print('trl' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_subpackages_map_to_folders():
    import rpe.envs
    import rpe.trainers

    assert rpe.envs.__file__.replace("\\", "/").endswith("envs/__init__.py")
    assert rpe.trainers.__file__.replace("\\", "/").endswith("trainers/__init__.py")
