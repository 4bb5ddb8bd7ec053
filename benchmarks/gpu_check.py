"""The prepared GPU check: rpe's pipeline at our users' shapes in bf16, random-initialised (no weights travel).

    python benchmarks/gpu_check.py                  # one GPU, at most 8 minutes: Qwen2.5-1.5B and Llama-3-8B shapes
    python benchmarks/gpu_check.py --tiny           # the same stages on a tiny config on the CPU (in make test)

Per shape, every number beside its baseline from the same run:
- rollouts with capture of 4 layers (rpe's default engine) vs plain ``model.generate`` on the same prompts:
  useful (generated) tokens per second;
- the default engine with capture vs without: time and peak memory;
- GRPO-style groups (Qwen2.5-1.5B shape): ``--group`` completions of each prompt sampled together by rpe's engine
  with the prompt shared (one copy of its keys and values, :mod:`rpe.prefix_attention`) vs copied into every
  row vs ``model.generate(num_return_sequences=...)``: useful tokens per second and peak memory;
- ``fit`` (linear probe, 5 folds, 4 layers) on the captured states, labels synthetic (a random model solves
  nothing);
- one GRPO step with ``RPECallback`` vs stock GRPO (LoRA), when TRL is importable;
- peak GPU memory of each stage (``torch.cuda.max_memory_allocated``), or the process's peak RSS on a CPU.

The tokenizer is SmolLM2's when it is fetched (``rpe models fetch``), else the tiny char tokenizer; the task is a
JSONL file of two-step sums written here (reasoning-gym need not be installed). The last line is one JSON
object, also written to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

SHAPES = {  # published configs of the models our users bring (no weights: random initialisation)
    "qwen2.5-1.5b": ("Qwen2Config", dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                                         num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True,
                                         rope_theta=1e6)),
    "llama-3-8b": ("LlamaConfig", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                       num_attention_heads=32, num_key_value_heads=8, rope_theta=5e5)),
}
GROUP_SHAPES = ("qwen2.5-1.5b", "tiny-llama")
"""Shapes that run the GRPO-group stage (the issue's 1.5B shape with 16 completions per prompt)."""
TINY = {"tiny-llama": ("LlamaConfig", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                           num_attention_heads=4, num_key_value_heads=2))}


def tokenizer():
    from rpe.models import DEFAULT_MODEL, is_fetched, model_dir, prepare_tokenizer

    if is_fetched(DEFAULT_MODEL):
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model_dir(DEFAULT_MODEL))
        prepare_tokenizer(tok)
        return tok, DEFAULT_MODEL
    from rpe.tiny import tiny_tokenizer

    return tiny_tokenizer(), "tiny-char"


def random_model(shape: tuple[str, dict], tok, device: torch.device, dtype: torch.dtype):
    import transformers
    from transformers import AutoModelForCausalLM

    cls, sizes = shape
    cfg = getattr(transformers, cls)(vocab_size=len(tok), max_position_embeddings=4096, pad_token_id=tok.pad_token_id,
                                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **sizes)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.generation_config.eos_token_id = None  # a random model: every row runs its whole budget
    return model.eval()


class Peak:
    """Peak memory of one stage: GPU bytes allocated, or the process's peak RSS (MiB) on a CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
        self.seconds = time.perf_counter() - self.start
        self.peak_mib = (torch.cuda.max_memory_allocated() if self.cuda
                         else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**20


def task_file(folder: Path, n: int) -> Path:
    """``n`` distinct two-step sums (the checks ask for fewer: the worked examples come from the rest)."""
    path = folder / "sums.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"What is {i % 9 + 1} + {i % 7 + 2} + {i % 5}?",
                                        "answer": str(i % 9 + 1 + i % 7 + 2 + i % 5), "verifier": "numeric"}) + "\n"
                            for i in range(n)))
    return path


def check_shape(name: str, shape, tok, tok_name: str, device: torch.device, args, work: Path) -> dict:
    from rpe.fit import FitConfig, fit_bundle
    from rpe.prompts import PromptBuilder, PromptConfig
    from rpe.records import read_trajectories
    from rpe.rollouts import STATES_FILE, RolloutConfig, collect_rollouts
    from rpe.sampling import SamplingConfig
    from rpe.store import StateSet
    from rpe.tasks import load_task
    from rpe.tracker import decoder_layers

    dtype = torch.bfloat16 if device.type == "cuda" or args.tiny else torch.float32
    model = random_model(shape, tok, device, dtype)
    n_layers = len(decoder_layers(model))
    layers = sorted({0, n_layers // 3, 2 * n_layers // 3, n_layers - 1})
    out: dict = {"shape": name, "params_b": sum(p.numel() for p in model.parameters()) / 1e9, "dtype": str(dtype),
                 "tokenizer": tok_name, "capture_layers": layers}
    task = load_task(str(task_file(work, args.problems + 8)))
    sampling = SamplingConfig(temperature=0.7, max_new_tokens=args.new_tokens)
    base = RolloutConfig(task=task.name, n_problems=args.problems, samples=1, batch_size=args.batch, sampling=sampling,
                         prompt=PromptConfig(shots=2))
    builder = PromptBuilder(task, tok, base.prompt)
    prompts = [builder(p) for p in task.problems(args.problems)]

    def plain_generate():
        for start in range(0, len(prompts), args.batch):
            enc = tok(prompts[start : start + args.batch], return_tensors="pt", padding=True, add_special_tokens=False)
            with torch.inference_mode():
                model.generate(**enc.to(device), do_sample=True, temperature=0.7, top_k=50,
                               max_new_tokens=args.new_tokens, pad_token_id=tok.pad_token_id)

    stages = {}
    for label, fn in (("generate", plain_generate),
                      ("rollouts_no_capture", lambda: collect_rollouts(model, tok, base, work / f"{name}-plain", task=task,
                                                                        model_name=name, overwrite=True)),
                      ("rollouts_capture", lambda: collect_rollouts(model, tok, replace(base, capture_layers=layers),
                                                                     work / f"{name}-cap", task=task, model_name=name,
                                                                     overwrite=True))):
        with Peak(device) as peak:
            fn()
        stages[label] = {"seconds": round(peak.seconds, 3), "peak_mib": round(peak.peak_mib, 1)}
    trajs = read_trajectories(work / f"{name}-cap")
    useful = sum(len(t.completion_token_ids) for t in trajs)
    for label in stages:
        stages[label]["useful_tokens_per_s"] = round(useful / stages[label]["seconds"], 1)
    out["stages"] = stages
    out["capture_vs_generate_tokens_per_s"] = round(stages["rollouts_capture"]["useful_tokens_per_s"]
                                                    / stages["generate"]["useful_tokens_per_s"], 3)
    out["capture_vs_no_capture_time"] = round(stages["rollouts_capture"]["seconds"]
                                              / stages["rollouts_no_capture"]["seconds"], 3)

    if name in GROUP_SHAPES:
        out["groups"] = group_sampling(model, tok, prompts[: args.group_prompts], device, args)

    # fit on the captured states with synthetic labels (half the problems 'correct')
    states = StateSet.load(work / f"{name}-cap" / STATES_FILE)
    labels = {t.trajectory_id: float(int(t.problem_id.rsplit("/", 1)[-1]) % 2) for t in trajs}
    trajs = [replace(t, reward=labels[t.trajectory_id]) for t in trajs]
    states = replace(states, rewards=torch.tensor([labels[i] for i in states.trajectory_ids]))
    from rpe.probe import ProbeConfig

    with Peak(device) as peak:
        bundle, _ = fit_bundle(model, tok, trajs, FitConfig(probe=ProbeConfig(family="linear"), n_boot=100),
                               model_name=name, states=states)
    out["fit"] = {"seconds": round(peak.seconds, 3), "peak_mib": round(peak.peak_mib, 1), "best_layer": bundle.layer,
                  "n_states": states.n_states}
    out["grpo"] = grpo_steps(model, tok, bundle, task, builder, device, args, work / name)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def group_sampling(model, tok, prompts: list[str], device: torch.device, args) -> dict:
    """``args.group`` completions of each prompt (a GRPO group), one prompt at a time: rpe's engine with the prompt
    shared by the group's rows, the same with it copied into every row, and ``model.generate`` with
    ``num_return_sequences``."""
    from rpe.generation import generate_from_ids
    from rpe.sampling import SamplingConfig

    sampling = SamplingConfig(temperature=0.7, max_new_tokens=args.new_tokens)
    encoded = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    useful: dict[str, int] = {}

    def engine(share: bool):
        def run():
            useful[f"share_{share}"] = sum(
                sum(len(c) for c in generate_from_ids(model, tok, [ids] * args.group, sampling, seed=i,
                                                      share_prefix=share, min_prefix=1).completion_ids)
                for i, ids in enumerate(encoded))
        return run

    def plain():
        total = 0
        for ids in encoded:
            with torch.inference_mode():
                gen = model.generate(input_ids=torch.tensor([ids], device=device), do_sample=True, temperature=0.7,
                                     top_k=50, max_new_tokens=args.new_tokens, num_return_sequences=args.group,
                                     pad_token_id=tok.pad_token_id)
            total += (gen.shape[1] - len(ids)) * args.group
        useful["generate"] = total

    arms = {}
    for label, fn, key in (("generate", plain, "generate"), ("prompt_copied", engine(False), "share_False"),
                           ("prompt_shared", engine(True), "share_True")):
        with Peak(device) as peak:
            fn()
        arms[label] = {"seconds": round(peak.seconds, 3), "peak_mib": round(peak.peak_mib, 1),
                       "useful_tokens_per_s": round(useful[key] / peak.seconds, 1)}
    return {"prompts": len(prompts), "completions_per_prompt": args.group, "arms": arms,
            "shared_vs_copied_tokens_per_s": round(arms["prompt_shared"]["useful_tokens_per_s"]
                                                   / arms["prompt_copied"]["useful_tokens_per_s"], 3),
            "shared_vs_generate_tokens_per_s": round(arms["prompt_shared"]["useful_tokens_per_s"]
                                                     / arms["generate"]["useful_tokens_per_s"], 3)}


def grpo_steps(model, tok, bundle, task, builder, device, args, work: Path) -> dict:
    """One GRPO step with RPECallback against one stock step, LoRA on the attention projections."""
    try:
        from peft import LoraConfig, get_peft_model
        from trl import GRPOConfig, GRPOTrainer
    except ImportError as err:
        return {"skipped": f"TRL or PEFT not importable here ({err}); carry their wheels to run this stage"}
    from rpe.trainers import RPECallback
    from rpe.trainers.recipes import DEFAULT_LORA_TARGETS, build_dataset
    from rpe.trainers.rewards import correctness_reward

    dataset, problems = build_dataset(task, builder, 8, 0, chat=builder.style == "chat")
    out = {}
    for arm in ("stock", "rpe_callback"):
        policy = get_peft_model(model, LoraConfig(r=8, target_modules=DEFAULT_LORA_TARGETS, task_type="CAUSAL_LM"))
        cfg = GRPOConfig(output_dir=str(work / arm), max_steps=2, per_device_train_batch_size=8, num_generations=4,
                         max_completion_length=min(args.new_tokens, 64), report_to="none", save_strategy="no",
                         logging_steps=1, bf16=device.type == "cuda", use_cpu=device.type != "cuda")
        callbacks = [RPECallback(bundle)] if arm == "rpe_callback" else []
        trainer = GRPOTrainer(model=policy, processing_class=tok, reward_funcs=[correctness_reward(task, problems)],
                              args=cfg, train_dataset=dataset, callbacks=callbacks)
        with Peak(device) as peak:
            trainer.train()
        out[arm] = {"seconds_for_2_steps": round(peak.seconds, 3), "peak_mib": round(peak.peak_mib, 1)}
        if callbacks:
            logged = [h for h in trainer.state.log_history if "rpe/value_s0" in h]
            out[arm]["rpe_keys_logged"] = len(logged)
        model = policy.unload()
    out["callback_vs_stock_time"] = round(out["rpe_callback"]["seconds_for_2_steps"] / out["stock"]["seconds_for_2_steps"], 3)
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="a tiny config on the CPU (seconds; make test runs it)")
    ap.add_argument("--shapes", default=None, help=f"comma-separated, of {', '.join(SHAPES)}")
    ap.add_argument("--problems", type=int, default=None, help="problems per rollout run (default 64; tiny 16)")
    ap.add_argument("--batch", type=int, default=None, help="rows per batch (default 32; tiny 6)")
    ap.add_argument("--new-tokens", type=int, default=None, help="tokens per completion (default 256; tiny 16)")
    ap.add_argument("--group", type=int, default=None, help="completions per prompt in the group stage (default 16; tiny 4)")
    ap.add_argument("--group-prompts", type=int, default=None, help="prompts in the group stage (default 4; tiny 2)")
    ap.add_argument("--work", type=Path, default=Path("runs/gpu_check"))
    ap.add_argument("--out", type=Path, default=None, help="JSON result (default WORK/gpu_check.json)")
    args = ap.parse_args(argv)
    args.problems = args.problems or (16 if args.tiny else 64)
    args.batch = args.batch or (6 if args.tiny else 32)
    args.new_tokens = args.new_tokens or (16 if args.tiny else 256)
    args.group = args.group or (4 if args.tiny else 16)
    args.group_prompts = args.group_prompts or (2 if args.tiny else 4)
    logging.basicConfig(level=logging.WARNING)
    from rpe.bench.machine import machine_info

    device = torch.device("cpu" if args.tiny else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no GPU here: run with --tiny for the CPU version")
    shapes = TINY if args.tiny else {k: SHAPES[k] for k in (args.shapes.split(",") if args.shapes else SHAPES)}
    tok, tok_name = tokenizer()
    args.work.mkdir(parents=True, exist_ok=True)
    result = {"machine": machine_info(), "device": str(device), "settings": {k: v for k, v in vars(args).items()
                                                                                if k not in ("work", "out")},
              "shapes": [check_shape(name, shape, tok, tok_name, device, args, args.work) for name, shape in shapes.items()]}
    path = args.out or args.work / "gpu_check.json"
    path.write_text(json.dumps(result, indent=2))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
