"""Step-level search guided by internal value (``rpe search``).

Step-level best-of-n: at each reasoning step, sample ``n`` candidate next steps (each ends at a blank line, the
step separator), keep one, append it, continue until a candidate ends the completion (EOS or an answer line)
or ``max_steps``. The kept candidate is chosen by:

- ``value``: the internal value V at the candidate's last token (equivalently its internal RPE, since the
  current state's value is shared by all candidates);
- ``dopamine``: the signed activity of the dopamine neurons over the candidate's tokens;
- ``logprob``: the candidate's mean token log-probability (a baseline);
- ``random``: a uniformly random candidate (a baseline);
- ``greedy``: one greedy step, no sampling (a baseline; n is ignored).

``majority`` is the equal-budget baseline at the level of whole answers: ``n`` full samples and a vote over
their final answers. Every method reports accuracy with a Wilson interval and the tokens it generated per
problem. Activations for the internal scorers are recorded during candidate generation (no extra forward).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from rpe.rollouts import SamplingConfig, generate_from_ids, wilson_interval
from rpe.tasks import extract_answer

logger = logging.getLogger(__name__)

METHODS: tuple[str, ...] = ("value", "dopamine", "logprob", "random", "greedy", "majority")
STEP_STOP = "\n\n"


@dataclass
class SearchConfig:
    """Options of ``rpe search``."""

    n: int = 4
    """Candidates per step (and samples for ``majority``)."""
    max_steps: int = 6
    max_step_tokens: int = 48
    max_new_tokens: int = 128
    """Token budget of one full sample (``majority``) and of a whole searched completion."""
    temperature: float = 0.7
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n < 1 or self.max_steps < 1 or self.max_step_tokens < 1:
            raise ValueError("n, max_steps and max_step_tokens must be >= 1")


def _candidate_logprobs(model, prefix: list[int], cands: list[list[int]]) -> np.ndarray:
    """Mean log-probability of each candidate given the prefix (one batched forward)."""
    from rpe.store import right_pad

    seqs = [prefix + c for c in cands]
    ids, mask = right_pad(seqs, 0)
    device = next(model.parameters()).device
    with torch.inference_mode():
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
    logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None].to(device)).squeeze(-1).cpu()
    out = []
    for r, c in enumerate(cands):
        n = len(prefix)
        out.append(float(logp[r, n - 1 : n - 1 + len(c)].mean()) if c else -np.inf)
    return np.array(out)


def search_one(model, tok, reader, prompt_ids: list[int], method: str, cfg: SearchConfig, rng: np.random.Generator,
               seed: int) -> tuple[str, int]:
    """One problem: the searched completion text and the tokens generated to find it."""
    from rpe.tracker import ActivationTracker

    completion: list[int] = []
    spent = 0
    for step in range(cfg.max_steps):
        prefix = prompt_ids + completion
        greedy = method == "greedy"
        n = 1 if greedy else cfg.n
        sampling = SamplingConfig(temperature=0.0 if greedy else cfg.temperature,
                                  max_new_tokens=min(cfg.max_step_tokens, cfg.max_new_tokens - len(completion)))
        if sampling.max_new_tokens < 1:
            break
        use_acts = method in ("value", "dopamine")
        if use_acts:
            with ActivationTracker(reader.model, [reader.bundle.layer], neurons=reader.columns, record_all=True) as tr:
                gen = generate_from_ids(model, tok, [prefix] * n, sampling, stop_strings=[STEP_STOP],
                                        seed=seed + step, reuse_prefix=False)
            recorded = tr.generated()[reader.bundle.layer]
        else:
            gen = generate_from_ids(model, tok, [prefix] * n, sampling, stop_strings=[STEP_STOP], seed=seed + step,
                                    reuse_prefix=False)
        cands = gen.completion_ids
        spent += sum(len(c) for c in cands)
        if method == "value" or method == "dopamine":
            spans = [[(0, len(c))] if c else [] for c in cands]
            sigs = []
            for i, c in enumerate(cands):
                if not c:
                    sigs.append(None)
                    continue
                pos = len(prefix) - 1 + len(c)  # the candidate's last token (prompts are unpadded and equal)
                if pos < recorded.shape[1]:
                    row = recorded[i].float()
                    point = row[[len(prefix) - 1, pos]]
                    mean = row[len(prefix) : len(prefix) + len(c)].mean(0, keepdim=True)
                    sigs.append(reader._signals(point, mean, spans[i]))
                else:  # the last token was never fed back: one forward for this candidate
                    sigs.append(reader.read([prefix], [c], spans=[spans[i]])[0])
            if method == "value":
                scores = np.array([s.values[-1] if s is not None else -np.inf for s in sigs])
            else:
                scores = np.array([s.dopamine.mean() if s is not None and s.dopamine.size else -np.inf for s in sigs])
        elif method == "logprob":
            scores = _candidate_logprobs(model, prefix, cands)
        else:
            scores = rng.random(len(cands))
        best = int(np.argmax(scores))
        chosen = cands[best]
        stop_ids = tok(STEP_STOP, add_special_tokens=False)["input_ids"] if gen.finish_reasons[best] == "stop" else []
        completion = completion + chosen + stop_ids
        if gen.finish_reasons[best] != "stop" or extract_answer(gen.texts[best]) is not None:
            break
    return tok.decode(completion, skip_special_tokens=True), spent


def majority_one(model, tok, prompt_ids: list[int], cfg: SearchConfig, seed: int) -> tuple[str, int]:
    """``n`` full samples; the completion whose answer is the most common (ties: first seen)."""
    gen = generate_from_ids(model, tok, [prompt_ids] * cfg.n,
                            SamplingConfig(temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens), seed=seed,
                            reuse_prefix=False)
    answers = [extract_answer(t) for t in gen.texts]
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return gen.texts[0], sum(len(c) for c in gen.completion_ids)
    top = counts.most_common(1)[0][0]
    return gen.texts[answers.index(top)], sum(len(c) for c in gen.completion_ids)


def run_search(model, tok, bundle, task, builder, methods: list[str], n_problems: int, cfg: SearchConfig, *,
               problem_seed: int = 1, progress: Callable[[str, int, int], None] | None = None) -> dict[str, Any]:
    """Accuracy and tokens per problem of each method on the same problems."""
    from rpe.signals import SignalReader

    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise ValueError(f"unknown search methods {bad}; choose from {', '.join(METHODS)}")
    needs_bundle = {"value", "dopamine"} & set(methods)
    reader = SignalReader(bundle, model, tok) if bundle is not None else None
    if needs_bundle and reader is None:
        raise ValueError(f"methods {sorted(needs_bundle)} need a bundle")
    if "dopamine" in methods and bundle.dopamine_neurons.numel() == 0:
        raise ValueError("method 'dopamine' needs dopamine neurons in the bundle; run `rpe dopamine` first")
    problems = list(task.problems(n_problems, seed=problem_seed))
    prompts = [tok(builder(p), add_special_tokens=False)["input_ids"] for p in problems]
    results: dict[str, Any] = {"config": asdict(cfg), "n_problems": n_problems, "methods": {}}
    for method in methods:
        rng = np.random.default_rng(cfg.seed)
        correct, tokens = [], []
        for i, (p, ids) in enumerate(zip(problems, prompts)):
            seed = cfg.seed + 1000 * i
            if method == "majority":
                text, spent = majority_one(model, tok, ids, cfg, seed)
            else:
                text, spent = search_one(model, tok, reader, ids, method, cfg, rng, seed)
            correct.append(task.score(p, text))
            tokens.append(spent)
            if progress:
                progress(method, i + 1, len(problems))
        k = float(np.sum(correct))
        lo, hi = wilson_interval(k, len(correct))
        acc = k / len(correct)
        results["methods"][method] = {"accuracy": acc, "ci95": [lo, hi], "tokens_per_problem": float(np.mean(tokens)),
                                      "accuracy_per_1k_tokens": 1000 * acc / max(float(np.mean(tokens)), 1e-9)}
    return results


__all__ = ["METHODS", "SearchConfig", "majority_one", "run_search", "search_one"]
