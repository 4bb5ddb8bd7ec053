"""Early stopping of hopeless samples: best-of-n that stops a sample once the model's own value says it will fail.

``n`` samples of each problem advance one reasoning step at a time (each step ends at a blank line, as in
:mod:`rpe.search`). From step ``after_step`` on, after every step the internal value V of each running sample's
state is read at the step's last token, as the bundle's states are (one hooked forward of the batch,
:class:`rpe.signals.SignalReader`); a sample whose V is below
``threshold`` is stopped there: none of its later tokens are generated. The answer of a problem is the majority
vote over the samples that finished (ties: the first finished); with ``keep_one`` the problem's highest-valued
sample is never stopped, so every problem gets an answer.

Every sample draws from its own stream, named by (seed, problem, sample, step) (:func:`rpe.sampling.stream_seed`):
a sample's tokens do not depend on which other samples run beside it, so a stopped run generates exactly the
samples of the unstopped run, cut where they were stopped. The tokens saved are therefore exact (the unstopped
run's tokens minus the stopped run's, same problems), and the accuracy lost is paired by problem.

The control (:func:`run_early_stop`): the same rule driven by a random probe (random neurons and weights of the
same layer and size, :func:`rpe.bundle.random_bundle`) that stops, at each step of each problem, as many samples
as the value rule stopped there, its lowest-valued ones. Equal stopping, so any difference in accuracy is the
probe's choice of which samples to stop.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from rpe.answers import extract_answer
from rpe.generation import generate_from_ids
from rpe.metrics import paired_difference, wilson_interval
from rpe.sampling import SamplingConfig, stream_seed
from rpe.search import StepBudget, majority_index

logger = logging.getLogger(__name__)

STEP_STOP = "\n\n"


@dataclass
class EarlyStopConfig(StepBudget):
    """Options of early stopping (``rpe early-stop``; steps, tokens and sampling as :class:`StepBudget`)."""

    n: int = 4
    """Samples per problem."""
    threshold: float = 0.1
    """A running sample whose internal value is below this after a step is stopped."""
    after_step: int = 1
    """The first step after which samples may be stopped (1 = after the first step)."""
    keep_one: bool = True
    """Never stop a problem's highest-valued running sample (every problem gets an answer)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if min(self.n, self.after_step) < 1:
            raise ValueError("n and after_step must be >= 1")
        if self.temperature <= 0:
            raise ValueError(f"early stopping samples best-of-n: temperature must be > 0 (got {self.temperature}; "
                             "greedy decoding gives n identical samples)")


@dataclass
class SampleRun:
    """One sample of one problem: its tokens, whether it finished or was stopped, and where."""

    completion_ids: list[int] = field(default_factory=list)
    finished: bool = False
    stopped_at: int | None = None
    """The step after which it was stopped (None: never stopped)."""
    values: list[float] = field(default_factory=list)
    """V after each step at which it was judged."""
    step_end: int = 0
    """Tokens up to the end of its last step's text (the blank line after it excluded): where its state is read,
    as the bundle's states were (a step's last token, not the separator)."""


StopRule = Callable[[int, int, np.ndarray, list[int]], list[int]]
"""``(problem, step, values of the running samples, their sample indices) -> sample indices to stop``."""


def threshold_rule(threshold: float, keep_one: bool) -> StopRule:
    """Stop the running samples whose value is below ``threshold`` (with ``keep_one``, never the highest)."""

    def rule(problem: int, step: int, values: np.ndarray, samples: list[int]) -> list[int]:
        stop = [s for s, v in zip(samples, values) if v < threshold]
        if keep_one and len(stop) == len(samples):
            stop.remove(samples[int(np.argmax(values))])
        return stop

    return rule


def matched_rule(counts: dict[tuple[int, int], int]) -> StopRule:
    """Stop, at each (problem, step), ``counts[(problem, step)]`` running samples: the lowest-valued ones (the
    control: the stop rate of another run, the choice of this probe)."""

    def rule(problem: int, step: int, values: np.ndarray, samples: list[int]) -> list[int]:
        k = min(counts.get((problem, step), 0), len(samples))
        return [samples[i] for i in np.argsort(values, kind="stable")[:k]]

    return rule


def sample_with_early_stop(model, tok, reader, prompts: Sequence[list[int]], cfg: EarlyStopConfig,
                           rule: StopRule | None, *, problem_keys: Sequence[object] | None = None,
                           first_problem: int = 0) -> list[list[SampleRun]]:
    """``cfg.n`` samples of each prompt, step by step, stopped by ``rule`` from step ``cfg.after_step`` on
    (``rule=None``: never stopped, no value read).

    Args:
        reader: a :class:`rpe.signals.SignalReader` for the probe that judges (unused when ``rule`` is None).
        problem_keys: names of the problems in the sampling streams (default: their index from
            ``first_problem``); the same key, seed, sample and step give the same tokens in any batch.
        first_problem: index of ``prompts[0]`` in the rule's ``problem`` argument.

    Returns:
        Per prompt, its ``cfg.n`` :class:`SampleRun`.
    """
    keys = list(problem_keys) if problem_keys is not None else list(range(first_problem, first_problem + len(prompts)))
    runs = [[SampleRun() for _ in range(cfg.n)] for _ in prompts]
    sampling = SamplingConfig(temperature=cfg.temperature, max_new_tokens=cfg.max_step_tokens)
    for step in range(1, cfg.max_steps + 1):
        rows = [(p, s) for p in range(len(prompts)) for s in range(cfg.n)
                if not runs[p][s].finished and runs[p][s].stopped_at is None
                and len(runs[p][s].completion_ids) < cfg.max_new_tokens]
        if not rows:
            break
        prefixes = [list(prompts[p]) + runs[p][s].completion_ids for p, s in rows]
        gen = generate_from_ids(model, tok, prefixes, sampling, stop_strings=[STEP_STOP],
                                row_seeds=[stream_seed(cfg.seed, keys[p], s, step) for p, s in rows])
        grew = set()  # samples whose step wrote text (a bare blank line is no step: nothing new to judge)
        for r, (p, s) in enumerate(rows):
            run = runs[p][s]
            left = cfg.max_new_tokens - len(run.completion_ids)
            new = list(gen.completion_ids[r][:left])
            ended_step = gen.finish_reasons[r] == "stop" and len(new) == len(gen.completion_ids[r])
            if tok.decode(new, skip_special_tokens=True).strip():
                grew.add((p, s))
                run.step_end = len(run.completion_ids) + len(new)
            run.completion_ids += new + (list(gen.stop_ids[r]) if ended_step else [])
            text = tok.decode(run.completion_ids, skip_special_tokens=True)
            if not ended_step or extract_answer(text) is not None or len(run.completion_ids) >= cfg.max_new_tokens:
                run.finished = True
        if rule is None or step < cfg.after_step:
            continue
        judged = [(p, s) for p, s in rows if not runs[p][s].finished and (p, s) in grew]
        if not judged:
            continue
        sigs = reader.read([list(prompts[p]) for p, _ in judged],
                           [runs[p][s].completion_ids[: runs[p][s].step_end] for p, s in judged],
                           spans=[[(0, runs[p][s].step_end)] for p, s in judged])
        by_problem: dict[int, list[tuple[int, float]]] = {}
        for (p, s), sig in zip(judged, sigs):
            v = float(sig.values[-1])  # V at the state after this step
            runs[p][s].values.append(v)
            by_problem.setdefault(p, []).append((s, v))
        for p, items in by_problem.items():
            samples, values = [s for s, _ in items], np.array([v for _, v in items])
            for s in rule(first_problem + p, step, values, samples):
                runs[p][s].stopped_at = step
    return runs


def vote(runs: list[SampleRun], tok) -> str | None:
    """The completion text whose answer is the most common among the finished samples (None: none finished)."""
    texts = [tok.decode(r.completion_ids, skip_special_tokens=True) for r in runs if r.finished and r.stopped_at is None]
    return texts[majority_index(texts)] if texts else None


def _arm_summary(correct: list[float], tokens: list[int], runs: list[list[SampleRun]]) -> dict[str, Any]:
    k = float(np.sum(correct))
    lo, hi = wilson_interval(k, len(correct))
    stopped = [r.stopped_at is not None for rs in runs for r in rs]
    return {"accuracy": k / len(correct), "ci95": [lo, hi], "tokens_per_problem": float(np.mean(tokens)),
            "stopped_share": float(np.mean(stopped)), "correct": [float(c) for c in correct],
            "tokens": [int(t) for t in tokens]}


def run_early_stop(model, tok, bundle, task, builder, n_problems: int, cfg: EarlyStopConfig, *,
                   problem_seed: int = 1, exclude_questions: Sequence[str] | None = None, control_seed: int = 0,
                   progress: Callable[[str, int, int], None] | None = None) -> dict[str, Any]:
    """Best-of-``n`` on the same problems three ways: no stopping, stopped by the bundle's value
    (``threshold``), and the random-probe control stopping as many samples at each step of each problem.

    Returns:
        ``{"config", "n_problems", "arms": {"none", "value", "random_probe": {"accuracy", "ci95",
        "tokens_per_problem", "stopped_share", "correct", "tokens"}}, "value": {"tokens_saved",
        "accuracy_lost": {"diff", "low", "high"}}, "random_probe": {...}}``: tokens saved as a share of the
        unstopped run's, accuracy lost as none minus the arm, paired by problem with a 95% bootstrap interval.
    """
    from rpe.bundle import random_bundle
    from rpe.signals import SignalReader
    from rpe.tasks import draw_problems

    problems = draw_problems(task, n_problems, seed=problem_seed, exclude=exclude_questions)
    prompts = [builder.encode(builder(p)) for p in problems]
    keys = [p.id for p in problems]
    stop_counts: dict[tuple[int, int], int] = {}
    control = random_bundle(model, tok, layer=bundle.layer, k=int(bundle.value_neurons.numel()),
                            hidden=bundle.probe_state.hidden, seed=control_seed)
    readers = {"value": SignalReader(bundle, model, tok), "random_probe": SignalReader(control, model, tok, check=False)}
    out: dict[str, Any] = {"config": asdict(cfg), "n_problems": len(problems), "problem_seed": problem_seed,
                           "control_seed": control_seed, "arms": {}}
    for arm in ("none", "value", "random_probe"):
        rule = (None if arm == "none" else threshold_rule(cfg.threshold, cfg.keep_one) if arm == "value"
                else matched_rule(stop_counts))
        correct: list[float] = []
        tokens: list[int] = []
        all_runs: list[list[SampleRun]] = []
        for start in range(0, len(prompts), cfg.batch_problems):
            chunk = slice(start, start + cfg.batch_problems)
            runs = sample_with_early_stop(model, tok, readers.get(arm), prompts[chunk], cfg, rule,
                                          problem_keys=keys[chunk], first_problem=start)
            for j, (problem, rs) in enumerate(zip(problems[chunk], runs)):
                text = vote(rs, tok)
                correct.append(float(task.score(problem, text)) if text is not None else 0.0)
                tokens.append(sum(len(r.completion_ids) for r in rs))
                if arm == "value":
                    for r in rs:
                        if r.stopped_at is not None:
                            key = (start + j, r.stopped_at)
                            stop_counts[key] = stop_counts.get(key, 0) + 1
            all_runs += runs
            if progress:
                progress(arm, len(correct), len(problems))
        out["arms"][arm] = _arm_summary(correct, tokens, all_runs)
    base = out["arms"]["none"]
    for arm in ("value", "random_probe"):
        got = out["arms"][arm]
        diff, lo, hi = paired_difference(base["correct"], got["correct"], seed=cfg.seed)
        out[arm] = {"tokens_saved": 1.0 - sum(got["tokens"]) / max(sum(base["tokens"]), 1),
                    "accuracy_lost": {"diff": diff, "low": lo, "high": hi}}
    return out


__all__ = ["EarlyStopConfig", "SampleRun", "matched_rule", "run_early_stop", "sample_with_early_stop",
           "threshold_rule", "vote"]
