"""Step-level search guided by internal value (``rpe search``).

Step-level best-of-n: at each reasoning step, sample ``n`` candidate next steps (each ends at a blank line, the
step separator), keep one, append it, continue until a candidate ends the completion (EOS or an answer line)
or ``max_steps``. The kept candidate is chosen by:

- ``value``: the internal value V at the candidate's last token (equivalently its internal RPE, since the
  current state's value is shared by all candidates);
- ``dopamine``: the signed activity of the dopamine neurons over the candidate's tokens;
- ``logprob``: the candidate's mean token log-probability, recorded while generating it (a baseline);
- ``random``: a uniformly random candidate (a baseline);
- ``greedy``: one greedy step, no sampling (a baseline; n is ignored).

``majority`` is the equal-budget baseline at the level of whole answers: ``n`` full samples and a vote over
their final answers. Every method reports accuracy with a Wilson interval and the tokens it generated per
problem.

Problems advance in batches (``batch_problems`` problems x ``n`` candidates per ``generate`` call, the few-shot
prefix encoded once and its KV cache shared); each kept candidate is scored by one hooked forward of the
candidates (``SignalReader.read``, also with the shared prefix); log-probabilities come from the generation itself.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from rpe.generation import generate_from_ids
from rpe.sampling import SamplingConfig
from rpe.metrics import wilson_interval
from rpe.answers import extract_answer

logger = logging.getLogger(__name__)

METHODS: tuple[str, ...] = ("value", "dopamine", "logprob", "random", "greedy", "majority")
STEP_STOP = "\n\n"


@dataclass
class StepBudget:
    """How a step-by-step sampler advances: steps, tokens, sampling and batching (shared by ``rpe search`` and
    ``rpe early-stop``)."""

    max_steps: int = 6
    max_step_tokens: int = 48
    max_new_tokens: int = 128
    """Token budget of one full sample (``majority``) and of a whole searched completion."""
    temperature: float = 0.7
    seed: int = 0
    batch_problems: int = 8
    """Problems advanced together (rows per generate call: ``batch_problems x n``)."""

    def __post_init__(self) -> None:
        if min(self.max_steps, self.max_step_tokens, self.max_new_tokens, self.batch_problems) < 1:
            raise ValueError("max_steps, max_step_tokens, max_new_tokens and batch_problems must be >= 1")


@dataclass
class SearchConfig(StepBudget):
    """Options of ``rpe search``."""

    n: int = 4
    """Candidates per step (and samples for ``majority``)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n < 1:
            raise ValueError(f"n (candidates per step) must be >= 1, got {self.n}")


def _scores(method: str, reader, prefixes: list[list[int]], cands: list[list[int]], logprobs: list[list[float]],
            rng: np.random.Generator) -> np.ndarray:
    """Score of each candidate (higher is kept); empty candidates score -inf. ``logprobs``: each candidate's
    token log-probabilities, recorded while generating it."""
    if method in ("value", "dopamine"):
        rows = [i for i, c in enumerate(cands) if c]
        sigs = reader.read([prefixes[i] for i in rows], [cands[i] for i in rows],
                           spans=[[(0, len(cands[i]))] for i in rows])
        out = np.full(len(cands), -np.inf)
        for i, s in zip(rows, sigs):
            # value: V at the candidate's last token (its RPE differs by V(s_t), shared by all candidates);
            # dopamine: the dopamine neurons' signed z-scored activity over the candidate's tokens
            out[i] = s.values[-1] if method == "value" else float(s.dopamine.mean())
        return out
    if method == "logprob":
        return np.array([float(np.mean(lp[: len(c)])) if c else -np.inf for lp, c in zip(logprobs, cands)])
    return np.where([bool(c) for c in cands], rng.random(len(cands)), -np.inf)


def search_batch(model, tok, reader, prompts: Sequence[list[int]], method: str, cfg: SearchConfig,
                 rng: np.random.Generator, seed: int) -> tuple[list[str], list[int]]:
    """Step-level search on several problems at once: the searched completions' texts and the tokens
    generated for each problem (all candidates, kept or not)."""
    greedy = method == "greedy"
    n = 1 if greedy else cfg.n
    completions: list[list[int]] = [[] for _ in prompts]
    spent = [0] * len(prompts)
    active = list(range(len(prompts)))
    for step in range(cfg.max_steps):
        active = [p for p in active if len(completions[p]) < cfg.max_new_tokens]
        if not active:
            break
        left = {p: cfg.max_new_tokens - len(completions[p]) for p in active}  # each problem's token budget
        prefixes = [list(prompts[p]) + completions[p] for p in active for _ in range(n)]
        sampling = SamplingConfig(temperature=0.0 if greedy else cfg.temperature,
                                  max_new_tokens=min(cfg.max_step_tokens, max(left.values())))
        gen = generate_from_ids(model, tok, prefixes, sampling, stop_strings=[STEP_STOP], seed=seed + step,
                                token_logprobs=method == "logprob")
        cands = [c[: left[active[r // n]]] for r, c in enumerate(gen.completion_ids)]
        scores = _scores(method, reader, prefixes, cands, gen.token_logprobs, rng).reshape(len(active), n)
        still = []
        for j, p in enumerate(active):
            spent[p] += sum(len(c) for c in cands[j * n : (j + 1) * n])
            best = j * n + int(np.argmax(scores[j]))
            stopped = gen.finish_reasons[best] == "stop" and len(cands[best]) == len(gen.completion_ids[best])
            completions[p] = completions[p] + cands[best] + (gen.stop_ids[best] if stopped else [])
            if stopped and extract_answer(gen.texts[best]) is None:
                still.append(p)
        active = still
    return [tok.decode(c, skip_special_tokens=True) for c in completions], spent


def majority_index(texts: Sequence[str]) -> int:
    """Index of the text whose final answer is the most common among ``texts`` (ties: the first seen; no answer
    anywhere: 0)."""
    answers = [extract_answer(t) for t in texts]
    counts = Counter(a for a in answers if a is not None)
    return answers.index(counts.most_common(1)[0][0]) if counts else 0


def majority_batch(model, tok, prompts: Sequence[list[int]], cfg: SearchConfig, seed: int) -> tuple[list[str], list[int]]:
    """``n`` full samples per problem; the completion whose answer is the most common (ties: first seen)."""
    gen = generate_from_ids(model, tok, [list(p) for p in prompts for _ in range(cfg.n)],
                            SamplingConfig(temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens), seed=seed)
    texts, spent = [], []
    for j in range(len(prompts)):
        group = range(j * cfg.n, (j + 1) * cfg.n)
        texts.append(gen.texts[j * cfg.n + majority_index([gen.texts[r] for r in group])])
        spent.append(sum(len(gen.completion_ids[r]) for r in group))
    return texts, spent


def paired_counts(results: dict[str, Any], reference: str) -> dict[str, tuple[int, int]]:
    """Per method, ``(problems it solves and reference does not, problems reference solves and it does not)``
    (the discordant pairs of a McNemar test; every method ran on the same problems)."""
    ref = results["methods"][reference]["correct"]
    return {m: (sum(a > b for a, b in zip(r["correct"], ref)), sum(b > a for a, b in zip(r["correct"], ref)))
            for m, r in results["methods"].items() if m != reference}


def check_methods(methods: Sequence[str], bundle) -> None:
    """Refuse unknown methods, and internal methods without the bundle parts they read."""
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise ValueError(f"unknown search methods {bad}; choose from {', '.join(METHODS)}")
    needs_bundle = sorted({"value", "dopamine"} & set(methods))
    if needs_bundle and bundle is None:
        raise ValueError(f"methods {needs_bundle} need a bundle (--bundle DIR from `rpe fit`)")
    if "dopamine" in methods and bundle.dopamine_neurons.numel() == 0:
        raise ValueError("method 'dopamine' needs dopamine neurons in the bundle; run `rpe dopamine` first")


def run_search(model, tok, bundle, task, builder, methods: list[str], n_problems: int, cfg: SearchConfig, *,
               problem_seed: int = 1, progress: Callable[[str, int, int], None] | None = None,
               done: dict[str, Any] | None = None,
               on_method: Callable[[dict[str, Any]], None] | None = None,
               exclude_questions: Sequence[str] | None = None) -> dict[str, Any]:
    """Accuracy and tokens per problem of each method on the same problems.

    Args:
        exclude_questions: question keys never searched (:func:`rpe.tasks.question_key`; e.g. the bundle's
            fitting questions, so that the search is held out).
        done: an earlier result of the same call (same config and problems); its methods are kept, not rerun.
        on_method: called with the results so far after each method (e.g. to save them: a long run resumes).

    Returns:
        ``{"config", "n_problems", "problem_seed", "methods": {method: {"accuracy", "ci95", "tokens_per_problem",
        "accuracy_per_1k_tokens", "correct"}}}``; ``correct`` is the per-problem 0/1 list (paired comparisons).
    """
    from rpe.signals import SignalReader

    check_methods(methods, bundle)
    reader = SignalReader(bundle, model, tok) if bundle is not None else None
    from rpe.tasks import draw_problems

    problems = draw_problems(task, n_problems, seed=problem_seed, exclude=exclude_questions)
    prompts = [builder.encode(builder(p)) for p in problems]  # as rpe rollouts and TRL tokenise them
    results: dict[str, Any] = {"config": asdict(cfg), "n_problems": n_problems, "problem_seed": problem_seed,
                               "methods": {}}
    if done and all(done.get(k) == results[k] for k in ("config", "n_problems", "problem_seed")):
        results["methods"].update({m: r for m, r in done.get("methods", {}).items() if m in methods})
    for method in methods:
        if method in results["methods"]:
            continue
        rng = np.random.default_rng(cfg.seed)
        correct: list[float] = []
        tokens: list[int] = []
        for start in range(0, len(problems), cfg.batch_problems):
            chunk = prompts[start : start + cfg.batch_problems]
            seed = cfg.seed + 1000 * start
            if method == "majority":
                texts, spent = majority_batch(model, tok, chunk, cfg, seed)
            else:
                texts, spent = search_batch(model, tok, reader, chunk, method, cfg, rng, seed)
            correct += [task.score(p, t) for p, t in zip(problems[start : start + cfg.batch_problems], texts)]
            tokens += spent
            if progress:
                progress(method, len(correct), len(problems))
        k = float(np.sum(correct))
        lo, hi = wilson_interval(k, len(correct))
        acc = k / len(correct)
        results["methods"][method] = {"accuracy": acc, "ci95": [lo, hi], "tokens_per_problem": float(np.mean(tokens)),
                                      "accuracy_per_1k_tokens": 1000 * acc / max(float(np.mean(tokens)), 1e-9),
                                      "correct": [float(c) for c in correct]}
        if on_method:
            on_method(results)
    return results


__all__ = ["METHODS", "SearchConfig", "StepBudget", "check_methods", "majority_batch", "majority_index", "paired_counts", "run_search", "search_batch"]
