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


def test_the_device_guard_fails_on_a_mix_up_and_allows_what_cuda_allows(tiny_llama):
    """The test double works: the old tracker's span division (a host (N, 1) tensor into the model's activations)
    fails under it, as it failed on CUDA; the fixed one, host scalars and host index tensors pass."""
    from device_guard import DeviceMixError, VirtualAccelerator

    model, _ = tiny_llama
    with VirtualAccelerator(model) as guard:
        h = model.model.embed_tokens(torch.tensor([[1, 2, 3]], device=next(model.parameters()).device))  # (1, 3, d)
        csum = h.cumsum(1)
        starts, ends = torch.tensor([0]), torch.tensor([2])  # host tensors, as select() makes them
        with pytest.raises(DeviceMixError, match=r"mixes the model's device and the host: \(1, 64\) on model, \(1, 1\) on host"):
            csum[0, ends] / (ends - starts).unsqueeze(1).float()  # the code before the fix
        ok = csum[0, ends] / (ends - starts).unsqueeze(1).to(csum.device).float()  # after: on the block's device
        assert ok.shape == (1, 64) and (h * torch.tensor(2.0)).shape == h.shape and h[0, starts].shape == (1, 64)
        with pytest.raises(DeviceMixError):
            model.lm_head(h.cpu())  # activations brought to the host, then fed to the model's weights
        assert guard.ops > 5


def test_every_stage_is_device_correct_under_the_device_guard(tiny_llama, monkeypatch):
    """Generation (both engines, shared-prefix attention on its non-CPU path, capture), state capture (step ends
    and step spans, prefix reuse), the signal read, ablation hooks, Wanda scores and the episode policy run with
    no op mixing the model's device and the host."""
    import rpe.prefix_attention as prefix_attention
    from device_guard import VirtualAccelerator
    from test_probe import _synthetic_trajectories

    from rpe.bundle import random_bundle
    from rpe.controls import wanda_scores
    from rpe.envs import LLMPolicy
    from rpe.generation import generate_from_ids
    from rpe.interventions import NeuronAblation
    from rpe.sampling import SamplingConfig
    from rpe.signals import SignalReader
    from rpe.store import capture_states
    from rpe.tracker import ActivationTracker

    model, tok = tiny_llama
    bundle = random_bundle(model, tok, layer=2, k=4, seed=0)
    prefix = tok("Examples: 1 + 2 = 3. 4 + 4 = 8. 5 - 3 = 2.\n", add_special_tokens=False)["input_ids"]
    prompts = [prefix + tok(f"Q: {i} + 1 =", add_special_tokens=False)["input_ids"] for i in range(3)]
    trajs = _synthetic_trajectories(tok, n_problems=3, samples=2)
    for t in trajs:
        t.prompt_token_ids = prefix + list(t.prompt_token_ids)
    sampled = SamplingConfig(temperature=1.0, max_new_tokens=6)
    monkeypatch.setattr(prefix_attention, "_fused_cpu_attention", lambda: None)  # the path GPUs take
    with VirtualAccelerator(model) as guard:
        cont = generate_from_ids(model, tok, prompts, sampled, engine="continuous", record_layers=[1, 2])
        plain = generate_from_ids(model, tok, prompts, sampled, engine="generate")
        assert len(cont.completion_ids) == len(plain.completion_ids) == 3
        for mode in ("ends", "steps"):
            states = capture_states(model, trajs, [1, 2], batch_size=4, mode=mode, min_prefix=8)
            assert states.acts[1].shape[0] == 4 * len(trajs)
        read = SignalReader(bundle, model, tok).read([t.prompt_token_ids for t in trajs[:2]],
                                                     [t.completion_token_ids for t in trajs[:2]])
        assert len(read) == 2 and len(read[0].values) >= 2
        ids = torch.tensor([prompts[0]], device=next(model.parameters()).device)
        for mode, kw in (("zero", {}), ("mean", {"means": {1: torch.zeros(3)}})):
            with NeuronAblation(model, {1: [0, 5, 9]}, mode=mode, **kw), torch.no_grad():
                model(input_ids=ids)
        with ActivationTracker(model, [1], record_all=True) as tr:
            tr.forward(input_ids=ids)
            host_acts = tr.take_last()[1][0]  # (T, d) on the host, as capture keeps them
        assert wanda_scores(model, 1, host_acts).shape == (64,)
        policy = LLMPolicy(model, tok, sampling=sampled, max_step_tokens=6)
        policy.record(2, bundle.value_neurons)
        steps = policy([tok.decode(p) for p in prompts])
        assert len(steps) == 3 and policy.stats["shared_prefix_tokens"] > 0
    assert guard.ops > 10_000
