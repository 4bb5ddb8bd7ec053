"""Every command on a model folder of each tiny architecture (Gemma-3 with a window shorter than its prompts).

The model is :func:`rpe.tiny.tiny_answering_model` of that architecture: its layers are the architecture's own
(fused projections, sliding windows, q/k norms), scaled down so that it answers the parity task right about half
the time, so that ``rpe fit`` and ``rpe dopamine`` (which need both outcomes) run too. ``rpe reproduce --budget
smoke`` runs every command in order: rollouts with capture, fit, ablate, dopamine, search, analyze. Llama runs the
same command in tests/test_reproduce.py. Nothing here is a finding: the answer ignores the question.
"""

import json

import pytest
from typer.testing import CliRunner

from rpe.cli import app
from rpe.reproduce import STAGES
from rpe.tiny import TINY_ARCHITECTURES, tiny_answering_model, tiny_parity_task

runner = CliRunner()


@pytest.mark.parametrize("arch", [a for a in TINY_ARCHITECTURES if a != "llama"])
def test_every_command_runs_on_every_architecture(arch, tmp_path):
    model, tok = tiny_answering_model(architecture=arch, sliding_window=16 if arch == "gemma3" else None)
    folder = tmp_path / arch
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    task = tiny_parity_task(tmp_path / "parity.jsonl")
    out = tmp_path / "run"
    r = runner.invoke(app, ["reproduce", "--model", str(folder), "--task", task, "--budget", "smoke", "--out", str(out),
                            "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert set(json.loads((out / "reproduce.json").read_text())["stages"]) == set(STAGES)
    manifest = json.loads((out / "rollouts" / "manifest.json").read_text())
    assert manifest["model"]["architecture"] == type(model).__name__ and (out / "rollouts" / "states.safetensors").exists()
    bundle = json.loads((out / "bundle" / "bundle.json").read_text())
    assert 0.2 < bundle["metrics"]["accuracy"] < 0.8  # both outcomes: fit had something to fit
    assert "dopamine" in bundle["metrics"] and bundle["n_dopamine_neurons"] >= 1
    arms = json.loads((out / "ablation" / "results.json").read_text())["layers"][str(bundle["layer"])]["arms"]
    assert set(arms) == {"value", "random_matched/0"}
    assert {"greedy", "value"} <= set(json.loads((out / "search.json").read_text())["methods"])
    assert (out / "report" / "report.html").stat().st_size > 1000
