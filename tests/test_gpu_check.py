"""The prepared GPU check runs end to end in its --tiny form on the CPU (the GPU form is the same code)."""

import importlib.util
import json
from pathlib import Path

import pytest


def test_gpu_check_tiny_runs_every_stage(tmp_path):
    pytest.importorskip("trl")
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.main(["--tiny", "--work", str(tmp_path)])
    assert json.loads((tmp_path / "gpu_check.json").read_text()) == result
    (shape,) = result["shapes"]
    assert shape["dtype"] == "torch.bfloat16" and result["machine"]["torch"]
    stages = shape["stages"]
    assert set(stages) == {"generate", "rollouts_no_capture", "rollouts_capture"}
    assert all(s["seconds"] > 0 and s["useful_tokens_per_s"] > 0 and s["peak_mib"] > 0 for s in stages.values())
    assert shape["capture_vs_no_capture_time"] > 0 and shape["fit"]["n_states"] >= 32
    groups = shape["groups"]
    assert groups["completions_per_prompt"] == 4 and set(groups["arms"]) == {"generate", "prompt_copied", "prompt_shared"}
    assert all(a["useful_tokens_per_s"] > 0 for a in groups["arms"].values()) and groups["shared_vs_copied_tokens_per_s"] > 0
    grpo = shape["grpo"]
    assert grpo["rpe_callback"]["rpe_keys_logged"] == 2 and grpo["callback_vs_stock_time"] > 0
