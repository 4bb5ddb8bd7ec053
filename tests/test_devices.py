"""Device and dtype: every command chooses them, sampling streams live on the logits' device, and a bundle records
the dtype it was fitted in. No GPU here: a device mix-up is provoked with the ``meta`` device, and bf16 runs on the
CPU."""

import json
import logging

import pytest
import torch
from typer.testing import CliRunner

from rpe.cli import app

runner = CliRunner()


def test_resolve_device_and_dtype_defaults_and_errors():
    from rpe.models import resolve_device, resolve_dtype

    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_dtype("auto", "cuda") == torch.bfloat16  # bf16 on GPUs
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("bf16", "cpu") == torch.bfloat16 and resolve_dtype("float16") == torch.float16
    with pytest.raises(ValueError, match="choose auto, bf16, bfloat16"):
        resolve_dtype("int8")
    with pytest.raises(ValueError, match="unknown device 'gpu0'"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU.*--device cpu"):
            resolve_device("cuda")


def test_sampling_streams_live_on_the_logits_device(tiny_llama):
    """Before: row generators were always CPU ones, and ``torch.multinomial`` refuses them for CUDA logits (the
    default engine crashed at its first sampled token on a GPU). A CPU generator for logits elsewhere (here the
    ``meta`` device) is now refused by rpe with the fix in the message."""
    from rpe.sampling import SamplingConfig, logits_device, next_tokens, row_generator

    model, _ = tiny_llama
    assert logits_device(model) == torch.device("cpu")
    assert row_generator(0, 1, "cpu").device == torch.device("cpu")
    sampling = SamplingConfig(temperature=0.7)
    logits = torch.randn(2, 50, generator=torch.Generator().manual_seed(0))
    a = next_tokens(logits, sampling, [row_generator(3, i) for i in range(2)])
    assert a == next_tokens(logits, sampling, [row_generator(3, i) for i in range(2)])  # one stream per (seed, row)
    with pytest.raises(ValueError, match=r"generators on cpu for logits on meta.*device=logits.device"):
        next_tokens(logits.to("meta"), sampling, [row_generator(3, i) for i in range(2)])


def test_rollouts_and_fit_in_bf16_on_cpu_record_the_dtype(tiny_llama, tmp_path, caplog):
    """`rpe rollouts --device cpu --dtype bfloat16` and `rpe fit` run end to end on a model folder; the manifest and
    the bundle record bfloat16; the bundle read on the float32 model gives one notice, not an error."""
    from rpe.bundle import SubsystemBundle
    from rpe.models import load_model

    model, tok = tiny_llama
    folder = tmp_path / "tiny"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    out = tmp_path / "run"
    r = runner.invoke(app, ["rollouts", "--model", str(folder), "--task", "chain_sum_2", "--n-problems", "4", "--samples", "1",
                            "--shots", "1", "--max-new-tokens", "8", "--device", "cpu", "--dtype", "bfloat16",
                            "--capture-layers", "1", "--out", str(out)])
    assert r.exit_code == 0, r.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"]["dtype"] == "bfloat16" and manifest["n_trajectories"] == 4
    bad = runner.invoke(app, ["rollouts", "--model", str(folder), "--n-problems", "1", "--dtype", "int4", "--out",
                              str(tmp_path / "bad")])
    assert bad.exit_code == 2 and "unknown dtype 'int4'" in bad.output and not (tmp_path / "bad").exists()

    fp32, ftok = load_model(str(folder), device="cpu", dtype="float32")
    bf16, _ = load_model(str(folder), device="cpu", dtype="bfloat16")
    assert next(fp32.parameters()).dtype == torch.float32 and next(bf16.parameters()).dtype == torch.bfloat16
    from rpe.bundle import random_bundle

    bundle = random_bundle(bf16, ftok, layer=1, k=4, seed=0)
    assert bundle.model.dtype == "bfloat16"
    saved = SubsystemBundle.load(bundle.save(tmp_path / "bundle"))
    assert saved.model.dtype == "bfloat16"
    with caplog.at_level(logging.WARNING, logger="rpe.bundle"):
        saved.check_model(fp32, ftok)
    assert "fitted on bfloat16 activations, read on float32" in caplog.text
