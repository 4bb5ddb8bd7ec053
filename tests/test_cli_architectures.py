"""The commands on a model folder of each tiny architecture (Gemma-3 with a window shorter than its prompts).

A random model never answers correctly, so ``rpe fit`` and ``rpe dopamine`` (which need both outcomes) run on
each architecture in tests/test_architectures.py with synthetic labels; the commands here use a random bundle.
"""

import json

import pytest
from typer.testing import CliRunner

from rpe.cli import app
from rpe.tiny import TINY_ARCHITECTURES, TinyModelConfig, tiny_model

runner = CliRunner()


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_commands_run_on_every_architecture(arch, tmp_path):
    from rpe.bundle import random_bundle

    model, tok = tiny_model(TinyModelConfig(architecture=arch, sliding_window=16 if arch == "gemma3" else None))
    folder = tmp_path / arch
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    runs = tmp_path / "runs"
    r = runner.invoke(app, ["rollouts", "--model", str(folder), "--task", "chain_sum_2", "--n-problems", "4", "--shots", "1",
                            "--max-new-tokens", "12", "--capture-layers", "1,2", "--out", str(runs), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    manifest = json.loads((runs / "manifest.json").read_text())
    assert manifest["model"]["architecture"] == type(model).__name__ and (runs / "states.safetensors").exists()
    random_bundle(model, tok, layer=1, k=4, seed=0).save(tmp_path / "bundle")
    bundle = str(tmp_path / "bundle")
    commands = {
        "analyze": ["analyze", "--rollouts", str(runs), "--bundle", bundle, "--out", str(tmp_path / "analysis")],
        "ablate": ["ablate", "--bundle", bundle, "--rollouts", str(runs), "--out", str(tmp_path / "ablate"), "--n-problems", "2",
                   "--controls", "value,random", "--seeds", "1"],
        "search": ["search", "--rollouts", str(runs), "--bundle", bundle, "--n-problems", "2", "--methods", "greedy,value",
                   "--candidates", "2", "--max-step-tokens", "6", "--out", str(tmp_path / "search.json")],
    }
    for name, args in commands.items():
        r = runner.invoke(app, args)
        assert r.exit_code == 0, (name, r.output)
    assert (tmp_path / "analysis" / "report.html").stat().st_size > 1000
    arms = json.loads((tmp_path / "ablate" / "results.json").read_text())["layers"]["1"]["arms"]
    assert set(arms) == {"value", "random/0"}
    assert set(json.loads((tmp_path / "search.json").read_text())["methods"]) == {"greedy", "value"}
