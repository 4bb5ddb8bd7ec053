"""``rpe bench rollouts``: useful tokens per second of every generation path on the prompts users run (the default
6-shot chat prompts), Monte-Carlo states valued per second under each engine, and the decode bound, in fp32 and
in bf16.

Arms, all in one run on the same problems, per dtype: plain ``model.generate`` on left-padded prompts (what users
write), rpe with the ``generate`` engine (shared few-shot prefix encoded once, copied into every row), rpe's
``continuous`` engine (finished rows leave the batch) with the prefix copied into every row (the engine before
shared-prefix attention) and with one shared copy (:mod:`rpe.prefix_attention`, the default), the latter with 4
layers captured; then Monte-Carlo continuations of the resulting states under each; then the time of one decode
step of a full batch with the prefix copied and shared, and the bytes each must read. The naive environment loop
(re-encodes the transcript every step) runs in the first dtype only.
"""

from __future__ import annotations

import contextlib
import copy
import time
from dataclasses import dataclass
from typing import Any

from rpe.bench.machine import timeit
from rpe.dopamine import states_per_call
from rpe.generation import generate_batch, generate_from_ids
from rpe.sampling import SamplingConfig
from rpe.seeding import seeded
from rpe.prompts import PromptBuilder, PromptConfig
from rpe.tasks import DEFAULT_TASK, load_task


@dataclass
class RolloutBenchConfig:
    """Sizes of ``rpe bench rollouts``."""

    model: str = "smollm2-135m-instruct"
    task: str = DEFAULT_TASK
    n_problems: int = 32
    batch_size: int = 32
    max_new_tokens: int = 128
    max_step_tokens: int = 32
    """Per-step token budget of the naive loop (it generates one step at a time)."""
    max_steps: int = 6
    naive_problems: int = 8
    """Problems through the naive loop (it is slow; its rate is per token, so fewer problems suffice)."""
    mc_states: int = 24
    """States valued by Monte-Carlo continuations in the MC arms."""
    n_continuations: int = 4
    seed: int = 0
    dtypes: tuple[str, ...] = ("float32", "bfloat16")
    """Model dtypes benchmarked, one after the other (bf16 skipped on a CPU without bf16 kernels)."""

    @classmethod
    def quick(cls, model: str = "smollm2-135m-instruct") -> RolloutBenchConfig:
        return cls(model=model, n_problems=8, batch_size=8, max_new_tokens=48, max_steps=4, naive_problems=4,
                   mc_states=8)


def naive_env_loop(model, tokenizer, builder: PromptBuilder, problems, sampling: SamplingConfig, cfg) -> tuple[int, float]:
    """Baseline: one problem at a time through :class:`rpe.envs.ReasoningEnv`, each step generated from the
    re-encoded transcript (no cache across steps). Returns (generated tokens, seconds)."""
    from rpe.envs import ReasoningEnv

    env = ReasoningEnv(builder.task, n_problems=len(problems), problem_seed=cfg.seed, prompt_fn=builder, max_steps=cfg.max_steps)
    step_sampling = SamplingConfig(sampling.temperature, sampling.top_p, sampling.top_k, cfg.max_step_tokens)
    tokens, start = 0, time.perf_counter()
    for i in range(len(problems)):
        obs, _ = env.reset(seed=cfg.seed + i, options={"problem_index": i})
        done, spent = False, 0
        while not done and spent < cfg.max_new_tokens:
            gen = generate_batch(model, tokenizer, [obs], step_sampling, stop_strings=["\n\n"], seed=cfg.seed + i)
            n = len(tokenizer(gen.texts[0], add_special_tokens=False)["input_ids"]) if gen.texts[0] else 1
            tokens += n
            spent += n
            obs, _, terminated, truncated, _ = env.step(gen.texts[0])
            done = terminated or truncated or gen.finish_reasons[0] == "eos"
    return tokens, time.perf_counter() - start


def _setup(cfg: RolloutBenchConfig, dtype: str = "auto"):
    """Model (in ``dtype``), tokenizer, task, prompt builder, problems and sampling of a run, after a warm-up
    generation so no arm pays one-off costs."""
    from rpe.models import load_model

    model, tokenizer = load_model(cfg.model, dtype=dtype)
    task = load_task(cfg.task)
    builder = PromptBuilder(task, tokenizer, PromptConfig(), seed=cfg.seed)
    problems = list(task.problems(cfg.n_problems, seed=cfg.seed))
    generate_batch(model, tokenizer, [builder(problems[0])], SamplingConfig(max_new_tokens=4), seed=0)
    return model, tokenizer, task, builder, problems, SamplingConfig(temperature=0.7, max_new_tokens=cfg.max_new_tokens)


def dtype_refusal(dtype: str) -> str | None:
    """Why ``dtype`` is not benchmarked on this machine (bf16 on a CPU without bf16 kernels), or None."""
    import torch

    from rpe.models import cpu_has_bf16

    if dtype in ("bfloat16", "bf16") and not torch.cuda.is_available() and not cpu_has_bf16():
        return "this CPU has no bf16 kernels (AVX512-BF16 / AMX): its matmuls would fall back to a slow reference GEMM"
    return None


def decode_traffic(model, prefix_len: int, rows: int) -> dict[str, int]:
    """Bytes one decode step of ``rows`` rows must read after a ``prefix_len``-token shared prefix: the weights
    once, plus the prefix's keys and values once per row (copied into every row) or once in all (shared)."""
    from transformers import DynamicCache

    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    cfg = model.config.get_text_config()
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    n_layers = len(DynamicCache(config=model.config).layers)
    element = next(model.parameters()).element_size()
    prefix = 2 * n_layers * cfg.num_key_value_heads * head_dim * prefix_len * element
    return {"weights_bytes": weights, "prefix_kv_bytes_per_copy": prefix,
            "copied_prefix_bytes_per_step": weights + rows * prefix, "shared_prefix_bytes_per_step": weights + prefix}


def _bench_dtype(cfg: RolloutBenchConfig, dtype: str, with_naive: bool) -> dict[str, Any]:
    """Every arm of :func:`bench_rollouts` with the model in ``dtype``."""
    from rpe.rollouts import make_steps

    model, tokenizer, task, builder, problems, sampling = _setup(cfg, dtype)

    import torch

    from rpe.sampling import eos_ids
    from rpe.tracker import ActivationTracker, decoder_layers

    n_layers = len(decoder_layers(model))
    capture = sorted({2, n_layers // 3, 2 * n_layers // 3, n_layers - 2})  # 4 layers, as in the goal
    eos = eos_ids(model, tokenizer)
    kept: dict[str, list] = {}

    def rpe_arm(name: str, engine: str, with_capture: bool, share_prefix: bool = True) -> tuple[int, float]:
        tokens, start, gens = 0, time.perf_counter(), []
        for i in range(0, len(problems), cfg.batch_size):
            prompts = [builder(p) for p in problems[i : i + cfg.batch_size]]
            tracked = with_capture and engine == "generate"
            hooks = ActivationTracker(model, capture, record_all=True) if tracked else contextlib.nullcontext()
            with hooks as tracker:
                gen = generate_batch(model, tokenizer, prompts, sampling, stop_strings=builder.stop_strings,
                                     seed=cfg.seed + i, engine=engine, share_prefix=share_prefix,
                                     record_layers=capture if with_capture and engine == "continuous" else None)
            if tracked:
                tracker.generated(drop_prefix=True)  # the join is part of the cost being measured
            tokens += sum(max(1, len(ids)) for ids in gen.completion_ids)
            gens.append(gen)
        kept[name] = gens
        return tokens, time.perf_counter() - start

    def plain_generate() -> tuple[int, float]:
        """What users write: left-padded prompts through ``model.generate``, no shared-prefix reuse."""
        tokens, start = 0, time.perf_counter()
        for i in range(0, len(problems), cfg.batch_size):
            enc = tokenizer([builder(p) for p in problems[i : i + cfg.batch_size]], return_tensors="pt", padding=True,
                            add_special_tokens=False).to(model.device)
            kw = {"stop_strings": list(builder.stop_strings), "tokenizer": tokenizer} if builder.stop_strings else {}
            with seeded(cfg.seed + i, model.device), torch.inference_mode():
                out = model.generate(**enc, pad_token_id=tokenizer.pad_token_id, **sampling.generate_kwargs(), **kw)
            for row in out[:, enc["input_ids"].shape[1]:].tolist():
                tokens += max(1, next((j for j, t in enumerate(row) if t in eos), len(row)))
        return tokens, time.perf_counter() - start

    arms = {"plain_generate": plain_generate(),
            "rpe_generate_engine": rpe_arm("generate", "generate", False),
            "rpe_copied_prefix": rpe_arm("copied", "continuous", False, share_prefix=False),
            "rpe": rpe_arm("continuous", "continuous", False),
            "rpe_capture_4_layers": rpe_arm("capture", "continuous", True)}
    tps = {k: t / s for k, (t, s) in arms.items()}
    if with_naive:
        naive_tokens, naive_s = naive_env_loop(model, tokenizer, builder, problems[: cfg.naive_problems], sampling, cfg)
        tps = {"naive_env_loop": naive_tokens / naive_s, **tps}

    # Monte-Carlo values: the states of the continuous arm's completions, N continuations each, every engine
    states = []
    for gen in kept["continuous"]:
        for p_ids, c_ids, text in zip(gen.prompt_ids, gen.completion_ids, gen.texts):
            steps = make_steps(tokenizer, c_ids, text, "paragraph", None)
            states += [p_ids] + [p_ids + c_ids[: s.token_end] for s in steps[:-1]]
    states = states[: cfg.mc_states]
    mc_sampling = SamplingConfig(temperature=0.7, max_new_tokens=96)

    def mc_arm(engine: str, share_prefix: bool = True) -> tuple[float, float]:
        """(states valued per second, useful continuation tokens per second)."""
        per_call = states_per_call(cfg.batch_size, cfg.n_continuations, engine)  # as `rpe dopamine` does
        start, tokens = time.perf_counter(), 0
        for i in range(0, len(states), per_call):
            rows = [s for s in states[i : i + per_call] for _ in range(cfg.n_continuations)]
            gen = generate_from_ids(model, tokenizer, rows, mc_sampling, stop_strings=builder.stop_strings, seed=i,
                                    engine=engine, max_rows=cfg.batch_size, share_prefix=share_prefix)
            tokens += sum(max(1, len(c)) for c in gen.completion_ids)
        seconds = time.perf_counter() - start
        return len(states) / seconds, tokens / seconds

    mc_runs = {"generate": mc_arm("generate"), "continuous_copied_prefix": mc_arm("continuous", share_prefix=False),
               "continuous": mc_arm("continuous")}
    mc = {k: v[0] for k, v in mc_runs.items()}

    # decode bound: one decode step of a full batch after the prompt, its prefix copied into every row or shared
    from transformers import DynamicCache

    from rpe.kvcache import cache_kwarg, crop_cache, prefix_cache
    from rpe.prefix_attention import SharedPrefix, prefix_attention

    ids = tokenizer(builder(problems[0]), add_special_tokens=False)["input_ids"]
    device = next(model.parameters()).device
    cache = prefix_cache(model, ids, device)
    shared = SharedPrefix.from_cache(cache)
    copied = copy.deepcopy(cache)
    copied.batch_repeat_interleave(cfg.batch_size)
    step = torch.full((cfg.batch_size, 1), ids[-1], device=device)
    position = torch.full((cfg.batch_size, 1), len(ids), device=device)
    kw = cache_kwarg(model)
    def copied_step() -> None:  # the step appends to the cache (a copy of it, as in the engine); crop it back after
        model(input_ids=step, attention_mask=torch.ones(cfg.batch_size, len(ids) + 1, dtype=torch.long, device=device),
              position_ids=position, use_cache=True, logits_to_keep=1, **{kw: copied})
        crop_cache(copied, len(ids))

    with torch.inference_mode():
        copied_s = timeit(copied_step, repeats=5)
        with prefix_attention(model):
            shared_s = timeit(lambda: model(input_ids=step, attention_mask=torch.ones(cfg.batch_size, 1, dtype=torch.long,
                                            device=device), position_ids=position, use_cache=True, logits_to_keep=1,
                                            shared_prefix=shared, **{kw: DynamicCache(config=model.config)}), repeats=5)
    bound = cfg.batch_size / copied_s
    bound_shared = cfg.batch_size / shared_s
    return {
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "capture_layers": capture,
        "prompt_tokens": len(ids),
        "useful_tokens_per_s": {k: round(v, 2) for k, v in tps.items()},
        "ratio_rpe_vs_plain_generate": round(tps["rpe"] / tps["plain_generate"], 3),
        "ratio_shared_vs_copied_prefix": round(tps["rpe"] / tps["rpe_copied_prefix"], 3),
        "ratio_copied_prefix_vs_plain_generate": round(tps["rpe_copied_prefix"] / tps["plain_generate"], 3),
        "ratio_continuous_vs_generate_engine": round(tps["rpe"] / tps["rpe_generate_engine"], 3),
        "ratio_capture_vs_no_capture": round(tps["rpe_capture_4_layers"] / tps["rpe"], 3),
        **({"ratio": round(tps["rpe"] / tps["naive_env_loop"], 3)} if with_naive else {}),
        "mc_states_per_s": {k: round(v, 3) for k, v in mc.items()},
        "ratio_mc_continuous_vs_generate_engine": round(mc["continuous"] / mc["generate"], 3),
        "ratio_mc_shared_vs_copied_prefix": round(mc["continuous"] / mc["continuous_copied_prefix"], 3),
        "mc_useful_tokens_per_s": {k: round(v[1], 2) for k, v in mc_runs.items()},
        "decode_step_s_full_batch": round(copied_s, 4),
        "decode_step_s_full_batch_shared_prefix": round(shared_s, 4),
        "decode_traffic": decode_traffic(model, len(ids), cfg.batch_size),
        "compute_bound_tokens_per_s": round(bound, 1),
        "compute_bound_tokens_per_s_shared_prefix": round(bound_shared, 1),
        "rpe_share_of_compute_bound": round(tps["rpe"] / bound_shared, 3),
    }


def bench_rollouts(cfg: RolloutBenchConfig) -> dict[str, Any]:
    """Useful tokens/s of every generation path on the same prompts (the default 6-shot chat prompts), Monte-Carlo
    states valued per second under each engine, and the decode bound, in each of ``cfg.dtypes`` (ratios within
    one dtype; bf16 is skipped, with the reason, on a CPU without bf16 kernels). The top-level numbers are the
    first dtype's; ``by_dtype`` holds each, and ``ratio_bf16_vs_fp32`` compares the dtypes arm by arm."""
    runs: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    for dtype in cfg.dtypes:
        reason = dtype_refusal(dtype)
        if reason is not None:
            skipped[dtype] = reason
            continue
        runs[dtype] = _bench_dtype(cfg, dtype, with_naive=not runs)
    if not runs:
        raise ValueError(f"no dtype of {list(cfg.dtypes)} can run here: {skipped}")
    first = runs[next(iter(runs))]
    out = {"bench": "rollouts", "model": cfg.model, "task": cfg.task, "n_problems": cfg.n_problems,
           "batch_size": cfg.batch_size, "max_new_tokens": cfg.max_new_tokens, **first,
           "by_dtype": runs, "dtypes_skipped": skipped}
    if "float32" in runs and "bfloat16" in runs:
        fp32, bf16 = runs["float32"], runs["bfloat16"]
        out["ratio_bf16_vs_fp32"] = {k: round(bf16["useful_tokens_per_s"][k] / v, 3)
                                     for k, v in fp32["useful_tokens_per_s"].items() if k in bf16["useful_tokens_per_s"]}
    out["goal"] = ("rpe >= 6x plain generate; MC states/s >= 3x the generate engine; capture >= 0.95x of no capture "
                   "(issue #31; each ratio within one dtype)")
    return out


def bench_env(cfg: RolloutBenchConfig, bundle_dir: str | None = None) -> dict[str, Any]:
    """Useful tokens/s of N episodes stepped together (``LLMPolicy`` + ``InternalRPE`` on each of N environments,
    in lockstep like a vector environment) vs ``rpe rollouts``' batched generation on the same problems and
    prompts. The bundle only sets what is read (random probe weights cost the same); default: a random one."""
    from rpe.bundle import SubsystemBundle, random_bundle
    from rpe.envs import InternalRPE, LLMPolicy, ReasoningEnv

    model, tokenizer, task, builder, problems, sampling = _setup(cfg)
    bundle = (SubsystemBundle.load(bundle_dir, model=model, tokenizer=tokenizer) if bundle_dir
              else random_bundle(model, tokenizer, layer=len(model.model.layers) - 2, k=6, m=6, hidden=32))

    start, tokens = time.perf_counter(), 0
    for i in range(0, len(problems), cfg.batch_size):
        gen = generate_batch(model, tokenizer, [builder(p) for p in problems[i : i + cfg.batch_size]], sampling,
                             stop_strings=builder.stop_strings, seed=cfg.seed + i)
        tokens += sum(max(1, len(c)) for c in gen.completion_ids)
    rollouts_tps = tokens / (time.perf_counter() - start)

    def episodes(share_prefix: bool) -> tuple[float, int, dict]:
        """Useful tokens/s of every problem's episode, the environment steps taken, the policy's stats."""
        start, steps_taken = time.perf_counter(), 0
        policy = LLMPolicy(model, tokenizer, sampling=sampling, max_step_tokens=cfg.max_step_tokens, seed=cfg.seed,
                           share_prefix=share_prefix)
        for i in range(0, len(problems), cfg.batch_size):
            envs = [InternalRPE(ReasoningEnv(task, n_problems=len(problems), problem_seed=cfg.seed, prompt_fn=builder,
                                             max_steps=cfg.max_steps), bundle, policy)
                    for _ in problems[i : i + cfg.batch_size]]
            obs = [env.reset(seed=cfg.seed, options={"problem_index": i + j})[0] for j, env in enumerate(envs)]
            active = list(range(len(envs)))
            while active:
                steps = policy([obs[j] for j in active])
                still = []
                for j, step in zip(active, steps):
                    obs[j], _, terminated, truncated, _ = envs[j].step(step)
                    steps_taken += 1
                    if not (terminated or truncated):
                        still.append(j)
                active = still
        return policy.stats["generated_tokens"] / (time.perf_counter() - start), steps_taken, policy.stats

    copied_tps, _, copied_stats = episodes(share_prefix=False)
    env_tps, steps_taken, stats = episodes(share_prefix=True)
    return {
        "bench": "env",
        "model": cfg.model,
        "task": cfg.task,
        "n_episodes": len(problems),
        "batch_size": cfg.batch_size,
        "useful_tokens_per_s": {"rpe_rollouts": round(rollouts_tps, 2), "llm_policy_internal_rpe": round(env_tps, 2),
                                "llm_policy_copied_prefix": round(copied_tps, 2)},
        "env_steps": steps_taken,
        "policy_stats": stats,
        "same_generated_tokens": stats["generated_tokens"] == copied_stats["generated_tokens"],
        "ratio": round(env_tps / rollouts_tps, 3),
        "ratio_shared_vs_copied_prefix": round(env_tps / copied_tps, 3),
        "goal": "episodes through LLMPolicy + InternalRPE >= 0.8x rpe rollouts (issue #15); the shared prefix "
                "(issue #31) faster than the copied one",
    }


__all__ = ["RolloutBenchConfig", "bench_env", "bench_rollouts", "naive_env_loop"]
