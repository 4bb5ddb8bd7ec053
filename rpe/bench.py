"""Benchmarks that report ratios against a baseline measured in the same run (never absolute timings as
pass/fail). Each returns a JSON-serialisable dict; the CLI prints it as the last line.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from rpe.prompts import PromptBuilder, PromptConfig
from rpe.rollouts import SamplingConfig, generate_batch
from rpe.tasks import load_task


@dataclass
class RolloutBenchConfig:
    """Sizes of ``rpe bench rollouts``."""

    model: str = "smollm2-135m-instruct"
    task: str = "chain_sum"
    n_problems: int = 16
    batch_size: int = 16
    max_new_tokens: int = 64
    max_step_tokens: int = 32
    """Per-step token budget of the naive loop (it generates one step at a time)."""
    max_steps: int = 6
    seed: int = 0

    @classmethod
    def quick(cls, model: str = "smollm2-135m-instruct") -> RolloutBenchConfig:
        return cls(model=model, n_problems=8, batch_size=8, max_new_tokens=48, max_steps=4)


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


def bench_rollouts(cfg: RolloutBenchConfig) -> dict[str, Any]:
    """Tokens/s of batched collection vs the naive environment loop, same model, problems and sampling."""
    from rpe.models import load_model

    model, tokenizer = load_model(cfg.model)
    task = load_task(cfg.task)
    builder = PromptBuilder(task, tokenizer, PromptConfig(), seed=cfg.seed)
    problems = list(task.problems(cfg.n_problems, seed=cfg.seed))
    sampling = SamplingConfig(temperature=0.7, max_new_tokens=cfg.max_new_tokens)
    # warm-up so neither arm pays one-off costs
    generate_batch(model, tokenizer, [builder(problems[0])], SamplingConfig(max_new_tokens=4), seed=0)

    naive_tokens, naive_s = naive_env_loop(model, tokenizer, builder, problems, sampling, cfg)
    batched_tokens, start = 0, time.perf_counter()
    for i in range(0, len(problems), cfg.batch_size):
        chunk = problems[i : i + cfg.batch_size]
        gen = generate_batch(model, tokenizer, [builder(p) for p in chunk], sampling, seed=cfg.seed + i)
        batched_tokens += sum(max(1, len(ids)) for ids in gen.completion_ids)
    batched_s = time.perf_counter() - start
    naive_tps, batched_tps = naive_tokens / naive_s, batched_tokens / batched_s
    return {
        "bench": "rollouts",
        "model": cfg.model,
        "n_problems": cfg.n_problems,
        "naive_tokens_per_s": round(naive_tps, 2),
        "batched_tokens_per_s": round(batched_tps, 2),
        "ratio": round(batched_tps / naive_tps, 3),
        "goal": ">= 5",
    }
