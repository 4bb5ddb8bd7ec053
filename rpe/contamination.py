"""Prefix contamination: does a step credit still tell right steps from wrong ones once an earlier step is wrong?

Hidden-state step rewards are reported to degrade after the first wrong step of a chain (PAIR, 2026: "prefix
contamination"): the model's state carries the earlier error, and the step signal tracks that state rather than
the step. Where each step is checkable (arithmetic ``a op b = c``), every step of a completion gets a label:

=============== ====================================================================
``clean``       a right step with every earlier step right
``first_wrong`` the first wrong step
``after_right`` a right step after an earlier wrong one (a contaminated prefix)
``after_wrong`` a wrong step after an earlier wrong one
``unchecked``   no arithmetic to check (e.g. the answer line)
=============== ====================================================================

and a step credit c_t (the internal TD error V(s_t) - V(s_{t-1}), dopamine activity, or a control) is read on
three questions, each an AUROC over pairs of steps at the same position in their chain (step 2 against step 2:
credits drift along a chain): does it flag the first error (``clean`` vs ``first_wrong``: above 0.5 when right
steps get more credit), does it still separate right from wrong after it (``after_right`` vs ``after_wrong``),
and does an earlier error lower the credit of a right step (``clean`` vs ``after_right``: above 0.5 when it
does, the contamination itself)? ``contamination`` is the first minus the second. Intervals are 95%
cluster-bootstrap intervals over problems (every step of a problem's completions moves together).
"""

from __future__ import annotations

import ast
import math
import operator
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from rpe.metrics import chance_verdict, cluster_resamples, difference_verdict, stratified_auroc

STEP_LABELS = ("clean", "first_wrong", "after_right", "after_wrong", "unchecked")
"""The labels of :func:`step_labels`, in order."""

_ARITHMETIC = re.compile(r"(?<![\d.])(-?\d+(?:\s*[-+*x×]\s*-?\d+)+)\s*=\s*(-?\d+)(?!\.?\d)")
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}


def _evaluate(node: ast.AST) -> int:
    if isinstance(node, ast.Constant) and isinstance(node.value, int):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -_evaluate(node.operand)
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        return _OPS[type(node.op)](_evaluate(node.left), _evaluate(node.right))
    raise ValueError("not integer arithmetic")


def arithmetic_right(text: str) -> bool | None:
    """Whether every equation ``a op b [op c ...] = r`` in ``text`` holds (integers, ``+ - * x``, the usual
    precedence: ``3 + 4 - 2 = 5`` is right); None when it has none.

    Example:
        >>> arithmetic_right("Step 2: 7 - 9 = -2."), arithmetic_right("3 + 4 - 2 = 6"), arithmetic_right("Go on.")
        (True, False, None)
    """
    found = _ARITHMETIC.findall(text)
    if not found:
        return None
    for expression, result in found:
        value = _evaluate(ast.parse(re.sub(r"[x×]", "*", expression), mode="eval").body)
        if value != int(result):
            return False
    return True


def first_wrong_step(step_texts: Sequence[str]) -> int | None:
    """Index of the first step whose arithmetic is wrong; None when every checkable step is right (steps without
    arithmetic are not checked)."""
    return next((i for i, text in enumerate(step_texts) if arithmetic_right(text) is False), None)


def step_labels(step_texts: Sequence[str]) -> list[str]:
    """One of :data:`STEP_LABELS` per step (see the module docstring)."""
    labels, wrong_before = [], False
    for text in step_texts:
        right = arithmetic_right(text)
        if right is None:
            labels.append("unchecked")
        elif wrong_before:
            labels.append("after_right" if right else "after_wrong")
        else:
            labels.append("clean" if right else "first_wrong")
        wrong_before = wrong_before or right is False
    return labels


def _auroc_of(credit: np.ndarray, labels: np.ndarray, position: np.ndarray, positive: str, negative: str) -> float:
    """AUROC of ``positive`` (1) against ``negative`` (0) steps by credit, counting only pairs of steps at the same
    position in their chain (so a credit that drifts with the step index does not pass for one that reads the
    step); NaN without such a pair."""
    keep = (labels == positive) | (labels == negative)
    return stratified_auroc(labels[keep] == positive, credit[keep], position[keep])


def prefix_contamination(credits: Sequence[np.ndarray], step_texts: Sequence[Sequence[str]],
                         groups: Sequence[str], *, n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """How a step credit separates right from wrong steps before and after the first error.

    Args:
        credits: per completion, (T_i,) credit of each step (higher = better).
        step_texts: per completion, its T_i step texts (checked with :func:`arithmetic_right`).
        groups: per completion, its problem id (the bootstrap's cluster).
        n_boot: bootstrap resamples; seed: their seed.

    Returns:
        ``counts`` per label; ``mean_credit`` per label ``[mean, low, high]``; ``flags_first_error`` and
        ``after_error`` as ``[AUROC, low, high]`` with a verdict against chance; ``contamination`` (the first
        minus the second, same resamples) with a verdict; ``right_step_after_error`` (``clean`` vs ``after_right``:
        above 0.5 when an earlier error lowers a right step's credit); ``by_position``, steps per label at each
        position; ``n_completions``, ``n_with_error``.

    Raises:
        ValueError: lengths differ between ``credits``, ``step_texts`` and ``groups``, or a completion's credits
            and steps differ in number.
    """
    if not len(credits) == len(step_texts) == len(groups):
        raise ValueError(f"{len(credits)} credit arrays, {len(step_texts)} step lists, {len(groups)} groups")
    credit, labels, group, position = [], [], [], []
    for c, texts, g in zip(credits, step_texts, groups):
        c = np.asarray(c, dtype=np.float64)
        if c.shape != (len(texts),):
            raise ValueError(f"a completion of problem {g!r} has {len(texts)} steps but {c.shape} credits")
        credit.extend(c.tolist())
        labels.extend(step_labels(texts))
        group.extend([g] * len(texts))
        position.extend(range(len(texts)))
    credit_a, labels_a, group_a, position_a = np.asarray(credit), np.asarray(labels), np.asarray(group), np.asarray(position)

    def stats(idx: np.ndarray) -> dict[str, float]:
        c, lab, pos = credit_a[idx], labels_a[idx], position_a[idx]
        out = {f"mean/{k}": float(c[lab == k].mean()) if (lab == k).any() else math.nan for k in STEP_LABELS}
        out["flags"] = _auroc_of(c, lab, pos, "clean", "first_wrong")
        out["after"] = _auroc_of(c, lab, pos, "after_right", "after_wrong")
        out["prefix"] = _auroc_of(c, lab, pos, "clean", "after_right")
        out["drop"] = out["flags"] - out["after"]
        return out

    point = stats(np.arange(len(credit_a)))
    boots = [stats(idx) for idx in cluster_resamples(group_a, n_boot, seed)] if len(credit_a) else []

    def interval(key: str) -> list[float]:
        values = [b[key] for b in boots if not math.isnan(b[key])]
        low, high = np.percentile(values, [2.5, 97.5]) if values else (math.nan, math.nan)
        return [round(point[key], 4), round(float(low), 4), round(float(high), 4)]

    flags, after, drop, prefix = interval("flags"), interval("after"), interval("drop"), interval("prefix")
    return {
        "n_completions": len(credits),
        "n_with_error": sum(first_wrong_step(t) is not None for t in step_texts),
        "counts": {k: int((labels_a == k).sum()) for k in STEP_LABELS},
        "mean_credit": {k: interval(f"mean/{k}") for k in STEP_LABELS},
        "flags_first_error": {"auroc": flags, "verdict": chance_verdict(flags[1], flags[2])},
        "after_error": {"auroc": after, "verdict": chance_verdict(after[1], after[2])},
        "contamination": {"drop": drop, "verdict": difference_verdict(drop[1], drop[2])},
        "right_step_after_error": {"auroc": prefix, "verdict": chance_verdict(prefix[1], prefix[2])},
        "by_position": {k: [int(((labels_a == k) & (position_a == p)).sum()) for p in range(int(position_a.max()) + 1)]
                        for k in STEP_LABELS} if len(position_a) else {},
    }


__all__ = ["STEP_LABELS", "arithmetic_right", "first_wrong_step", "prefix_contamination", "step_labels"]
