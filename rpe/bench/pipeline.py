"""Benchmarks of the pipeline's parts (tracker, probe, ablation, memory, training, analysis), each a ratio against
a baseline measured in the same run (never an absolute timing as pass/fail). Each returns a JSON-serialisable
dict; the CLI prints it as the last line.
"""

from __future__ import annotations

import time
from typing import Any

from rpe.bench.machine import timeit
from rpe.generation import generate_batch
from rpe.prompts import PromptBuilder, PromptConfig
from rpe.sampling import SamplingConfig
from rpe.tasks import DEFAULT_TASK, load_task


def bench_tracker(model_name: str = "smollm2-135m-instruct", quick: bool = False) -> dict[str, Any]:
    """Tracker overhead on one batch: plain forward vs hooks capturing value neurons at step ends vs
    ``output_hidden_states=True``; then generation alone vs generation with capture vs generation followed by
    a separate capture pass. Time ratios and the ratio of bytes kept."""
    import torch

    from rpe.models import load_model
    from rpe.kvcache import right_pad
    from rpe.tracker import ActivationTracker, decoder_layers

    model, tok = load_model(model_name)
    task = load_task(DEFAULT_TASK)  # the prompts users run: default task, 6 worked examples (shared prefix)
    builder = PromptBuilder(task, tok, PromptConfig())
    batch = 4 if quick else 8
    prompts = [builder(p) + "Step 1: 1 + 2 = 3.\n\nStep 2: 3 + 4 = 7.\n\nAnswer: 7" for p in task.problems(batch)]
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    n_layers = len(decoder_layers(model))
    layer = n_layers // 2
    d = model.config.hidden_size
    neurons = torch.arange(0, d, 100)  # about 1% of d
    t_len = enc.input_ids.shape[1]
    ends = [t_len - 1, t_len - 5, t_len - 20]  # three "step ends" per row
    rows = [r for r in range(batch) for _ in ends]
    starts = [e for _ in range(batch) for e in ends]
    repeats = 3 if quick else 7

    def plain():
        with torch.inference_mode():
            model(**enc, use_cache=False)

    kept: dict[str, int] = {}

    def tracked(stop_early: bool):
        def run():
            with ActivationTracker(model, [layer], neurons=neurons, stop_early=stop_early) as tr:
                tr.select(rows, starts)
                out = tr.forward(**enc)
            kept["tracker"] = sum(v.numel() * v.element_size() for v in out.values())
        return run

    def hidden_states():
        with torch.inference_mode():
            out = model(**enc, use_cache=False, output_hidden_states=True)  # the baseline this bench compares against
        kept["hidden_states"] = sum(h.numel() * h.element_size() for h in out.hidden_states)

    t_plain = timeit(plain, repeats)
    t_tracker = timeit(tracked(False), repeats)
    t_tracker_stop = timeit(tracked(True), repeats)
    t_hidden = timeit(hidden_states, repeats)

    # generation: alone, with capture of the chosen neurons at every token, and followed by a capture pass
    sampling = SamplingConfig(temperature=0.0, max_new_tokens=16 if quick else 48)
    gen_prompts = [builder(p) for p in task.problems(batch)]

    def gen_alone():
        generate_batch(model, tok, gen_prompts, sampling)

    def gen_capture():
        with ActivationTracker(model, [layer], neurons=neurons, record_all=True) as tr:
            generate_batch(model, tok, gen_prompts, sampling)
        tr.generated()

    def gen_then_pass():
        g = generate_batch(model, tok, gen_prompts, sampling)
        seqs = [p + c for p, c in zip(g.prompt_ids, g.completion_ids)]
        ids, mask = right_pad(seqs, tok.pad_token_id)
        with ActivationTracker(model, [layer], neurons=neurons, stop_early=False) as tr:
            tr.select(list(range(len(seqs))), [len(s) - 1 for s in seqs])
            tr.forward(input_ids=ids, attention_mask=mask)

    g_repeats = 2 if quick else 3
    t_gen = timeit(gen_alone, g_repeats)
    t_gen_cap = timeit(gen_capture, g_repeats)
    t_gen_pass = timeit(gen_then_pass, g_repeats)
    return {
        "bench": "tracker",
        "model": model_name,
        "batch": batch,
        "tokens": t_len,
        "layer": layer,
        "neurons": int(neurons.numel()),
        "forward_tracker_vs_plain": round(t_tracker / t_plain, 3),
        "forward_tracker_stop_early_vs_plain": round(t_tracker_stop / t_plain, 3),
        "forward_hidden_states_vs_plain": round(t_hidden / t_plain, 3),
        "bytes_kept_tracker_vs_hidden_states": kept["tracker"] / kept["hidden_states"],
        "generate_capture_vs_alone": round(t_gen_cap / t_gen, 3),
        "generate_then_pass_vs_alone": round(t_gen_pass / t_gen, 3),
        "goal": "tracker <= 1.05x plain; capture during generation <= 1.03x",
    }


def bench_probe(quick: bool = False, d: int = 576, epochs: int = 5) -> dict[str, Any]:
    """Probe fit time vs number of synthetic states (1k, 10k, 100k; quick: 1k, 10k), fixed epochs.
    Reports seconds per epoch and the scaling exponent (1.0 = linear in states)."""
    import math

    import torch

    from rpe.probe import ProbeConfig, ValueProbe
    from rpe.store import StateSet

    sizes = [1_000, 10_000] if quick else [1_000, 10_000, 100_000]
    out: dict[str, Any] = {"bench": "probe", "d": d, "epochs": epochs, "seconds_per_epoch": {}}
    gen = torch.Generator().manual_seed(0)
    for n in sizes:
        n_traj = n // 4
        traj = torch.arange(n_traj).repeat_interleave(4)
        rewards = (torch.rand(n_traj, generator=gen) < 0.4).float()
        acts = torch.randn(n, d, generator=gen)
        acts[:, :5] += rewards[traj, None]
        states = StateSet({0: acts}, traj, torch.arange(4).repeat(n_traj), [f"t{i}" for i in range(n_traj)],
                          [f"p{i // 2}" for i in range(n_traj)], rewards)
        start = time.perf_counter()
        ValueProbe(ProbeConfig(target="td0", epochs=epochs, patience=epochs)).fit(states, 0)
        out["seconds_per_epoch"][str(n)] = round((time.perf_counter() - start) / epochs, 4)
    t = out["seconds_per_epoch"]
    out["scaling_exponent"] = round(math.log(t[str(sizes[-1])] / t[str(sizes[0])]) / math.log(sizes[-1] / sizes[0]), 3)
    return out


def bench_ablate(model_name: str = "smollm2-135m-instruct", quick: bool = False, n_neurons: int = 6) -> dict[str, Any]:
    """Generation tokens/s with and without a zero-ablation hook on ``n_neurons`` neurons of the middle
    layer; same prompts and seeds, runs interleaved, median of repeats. Goal: ratio >= 0.95."""
    import torch

    from rpe.interventions import NeuronAblation
    from rpe.models import load_model
    from rpe.tracker import decoder_layers

    model, tok = load_model(model_name)
    task = load_task(DEFAULT_TASK)  # the prompts users run: default task, 6 worked examples (shared prefix)
    builder = PromptBuilder(task, tok, PromptConfig())
    n = 4 if quick else 8
    prompts = [builder(p) for p in task.problems(n, seed=0)]
    sampling = SamplingConfig(temperature=0.7, max_new_tokens=32 if quick else 64)
    layer = len(decoder_layers(model)) // 2
    neurons = torch.randperm(model.config.hidden_size, generator=torch.Generator().manual_seed(0))[:n_neurons]

    def plain():
        return generate_batch(model, tok, prompts, sampling, seed=0)

    def ablated():
        with NeuronAblation(model, {layer: neurons}):
            return generate_batch(model, tok, prompts, sampling, seed=0)

    repeats = 2 if quick else 3
    tokens = {"plain": sum(len(c) for c in plain().completion_ids), "ablated": sum(len(c) for c in ablated().completion_ids)}
    times: dict[str, list[float]] = {"plain": [], "ablated": []}
    for _ in range(repeats):  # interleaved so drifts in machine load hit both arms alike
        for name, fn in (("plain", plain), ("ablated", ablated)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    import statistics

    tps = {k: tokens[k] / statistics.median(v) for k, v in times.items()}
    return {
        "bench": "ablate", "model": model_name, "layer": layer, "n_neurons": n_neurons, "batch": n,
        "plain_tokens_per_s": round(tps["plain"], 2), "ablated_tokens_per_s": round(tps["ablated"], 2),
        "ratio": round(tps["ablated"] / tps["plain"], 3), "goal": ">= 0.95",
        "note": "ablated and plain generate different tokens; tokens/s normalises for length",
    }


_MEMORY_CHILD = """
import json, resource, sys, tempfile
from rpe.analyze import analyze_rollouts
from rpe.bundle import random_bundle
from rpe.tiny import tiny_model
from rpe.prompts import PromptConfig
from rpe.sampling import SamplingConfig
from rpe.rollouts import RolloutConfig, collect_rollouts
n, out = int(sys.argv[1]), sys.argv[2]
model, tok = tiny_model()
cfg = RolloutConfig(task="chain_sum_2", n_problems=n, samples=1, batch_size=64, prompt=PromptConfig(shots=0),
                    sampling=SamplingConfig(max_new_tokens=8))
collect_rollouts(model, tok, cfg, out + "/rollouts", model_name="tiny")
after_collect = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
analyze_rollouts(model, tok, random_bundle(model, tok), out + "/rollouts", out + "/analysis")
print(json.dumps({"collect_kib": after_collect, "total_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def bench_memory(quick: bool = False) -> dict[str, Any]:
    """Peak RSS of collecting and analysing N trajectories with a tiny model, N = 1k vs 10k (quick) or 2k vs
    20k, each in a fresh process. Goal: ratio < 1.3 (records stream to disk in parts)."""
    import json
    import subprocess
    import sys
    import tempfile

    sizes = (1000, 10000) if quick else (2000, 20000)
    peaks = {}
    for n in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            res = subprocess.run([sys.executable, "-c", _MEMORY_CHILD, str(n), tmp], capture_output=True, text=True, check=True)
            peaks[n] = json.loads(res.stdout.strip().splitlines()[-1])
    small, big = sizes
    return {
        "bench": "memory", "sizes": list(sizes),
        "peak_rss_mib": {str(n): round(p["total_kib"] / 1024, 1) for n, p in peaks.items()},
        "collect_peak_rss_mib": {str(n): round(p["collect_kib"] / 1024, 1) for n, p in peaks.items()},
        "ratio": round(peaks[big]["total_kib"] / peaks[small]["total_kib"], 3), "goal": "< 1.3",
    }


_TRAIN_CHILD = """
import json, resource, statistics, sys, tempfile
arm, model_name, bundle, steps = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
from rpe.trainers.recipes import RPEArguments, train
from trl import GRPOConfig
with tempfile.TemporaryDirectory() as out:
    rpe_args = RPEArguments(model=model_name, task="chain_sum", trainer="internal_critic" if arm == "critic" else "grpo",
                            bundle=None if arm == "stock" else bundle, rpe_callback=arm != "stock",
                            internal_rewards=["rpe_sum"] if arm == "rpe" else [], internal_reward_weights=[0.1] if arm == "rpe" else [],
                            shots=2, n_train_problems=64, eval_before_after=False)
    args = GRPOConfig(output_dir=out, max_steps=steps, per_device_train_batch_size=8, num_generations=8,
                      max_completion_length=48, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True,
                      gradient_checkpointing=False, learning_rate=1e-6, beta=0.0, seed=0,
                      bf16=False, fp16=False)  # TRL defaults to bf16: on a CPU without bf16 kernels 10x+ slower
    train(rpe_args, args)
    hist = json.load(open(out + "/log_history.json"))
times = [h["step_time"] for h in hist if "step_time" in h][1:]  # the first step pays one-off costs
print(json.dumps({"step_s": statistics.median(times), "peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  "bf16": bool(args.bf16)}))
"""


def bench_train(model_name: str = "smollm2-135m-instruct", bundle: str = "runs/demo/bundle", quick: bool = False) -> dict[str, Any]:
    """Seconds per GRPO step (median, first step excluded) and peak RSS of: stock GRPO; GRPO + RPECallback +
    one internal reward (``rpe_sum``); internal-critic PPO. Same model, data, seed and sizes (8 completions x 48
    tokens), each arm in a fresh process. Goal: GRPO + rpe at most 1.03x stock."""
    import json
    import subprocess
    import sys

    steps = 4 if quick else 8
    arms = {}
    for arm in ("stock", "rpe", "critic"):
        res = subprocess.run([sys.executable, "-c", _TRAIN_CHILD, arm, model_name, str(bundle), str(steps)],
                             capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"bench train arm {arm} failed:\n{res.stderr[-3000:]}")
        arms[arm] = json.loads(res.stdout.strip().splitlines()[-1])
    base = arms["stock"]
    return {
        "bench": "train", "model": model_name, "steps": steps,
        "step_s": {k: round(v["step_s"], 2) for k, v in arms.items()},
        "bf16": {k: v["bf16"] for k, v in arms.items()},
        "peak_rss_mib": {k: round(v["peak_rss_kib"] / 1024, 1) for k, v in arms.items()},
        "time_ratio_rpe_vs_stock": round(arms["rpe"]["step_s"] / base["step_s"], 3),
        "memory_ratio_rpe_vs_stock": round(arms["rpe"]["peak_rss_kib"] / base["peak_rss_kib"], 3),
        "time_ratio_critic_vs_stock": round(arms["critic"]["step_s"] / base["step_s"], 3),
        "memory_ratio_critic_vs_stock": round(arms["critic"]["peak_rss_kib"] / base["peak_rss_kib"], 3),
        "goal": "time_ratio_rpe_vs_stock <= 1.03",
    }


def bench_analyze(rollouts: str = "runs/demo/rollouts", bundle: str = "runs/demo/bundle", quick: bool = False) -> dict[str, Any]:
    """States analysed per second by :func:`rpe.analyze.step_table` vs the same sequences through plain full
    forward passes (same batches, same shared-prefix cache): the cost of the analysis beyond the forwards.
    Ratio = analysis time / forward time (the analysis stops after the bundle's layer, so it can be < 1)."""
    import torch

    from rpe.analyze import step_table
    from rpe.bundle import SubsystemBundle
    from rpe.models import load_model
    from rpe.records import read_trajectories
    from rpe.signals import SignalReader
    from rpe.kvcache import batched_cache_kwargs, prefix_cache, right_pad, shared_prefix_len

    b = SubsystemBundle.load(bundle)
    model, tok = load_model(b.model.name)
    trajs = [t for t in read_trajectories(rollouts)][: 32 if quick else 128]
    reader = SignalReader(b, model, tok, check=True)
    device = next(model.parameters()).device

    def forwards():
        for i in range(0, len(trajs), 16):
            batch = trajs[i : i + 16]
            prompts = [t.prompt_token_ids for t in batch]
            pre = shared_prefix_len(prompts, 32) if len(batch) > 1 else 0
            cache = prefix_cache(model, prompts[0][:pre], device) if pre else None
            ids, mask = right_pad([(t.prompt_token_ids + t.completion_token_ids)[pre:] for t in batch], tok.pad_token_id or 0, pre)
            kwargs = batched_cache_kwargs(model, cache, len(batch)) if cache is not None else {}
            with torch.inference_mode():
                model(input_ids=ids, attention_mask=mask, **kwargs)

    def analysis():
        return step_table(model, tok, b, trajs, reader=reader)

    t_fwd = timeit(forwards, 1 if quick else 2)
    t_an = timeit(analysis, 1 if quick else 2)
    n_states = sum(len(t.steps) + 1 for t in trajs)
    return {"bench": "analyze", "trajectories": len(trajs), "states": n_states,
            "states_per_s_analysis": round(n_states / t_an, 1), "states_per_s_forward_only": round(n_states / t_fwd, 1),
            "ratio_analysis_vs_forward": round(t_an / t_fwd, 3), "goal": "close to 1 (little beyond the forwards)"}
__all__ = ["bench_ablate", "bench_analyze", "bench_memory", "bench_probe", "bench_tracker", "bench_train"]
