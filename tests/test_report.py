from rpe.report import rollout_report
from rpe.records import SCHEMA_VERSION, Step, Trajectory, write_trajectories


def _traj(i, completion, reward):
    return Trajectory(SCHEMA_VERSION, f"t{i}", f"p{i}", "chain_sum", 0, "prompt", completion,
                      [Step(completion, 0, len(completion), 0, 1)], None, "1", reward, [1], [2], "eos", False, False,
                      {"name": "m"}, {"temperature": 0.7}, 0)


def test_report_escapes_model_text_and_embeds_plots(tmp_path):
    import json

    hostile = '<script>alert(1)</script><img src=x onerror="alert(2)">'
    write_trajectories(tmp_path / "trajectories.parquet", [_traj(0, hostile, 0.0), _traj(1, "Answer: 1", 1.0)])
    manifest = {"model": {"name": "m"}, "task": {"name": "chain_sum"}, "n_trajectories": 2, "n_problems": 2,
                "accuracy": 0.5, "accuracy_ci95": [0.1, 0.9], "mean_steps": 1.0, "truncated_fraction": 0.0,
                "sampling": {"temperature": 0.7}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    page = rollout_report(tmp_path).read_text()
    assert "<script>" not in page and "<img src=x" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert page.count("data:image/png;base64,") == 1
