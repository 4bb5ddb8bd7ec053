"""Final answers: extracting the one a completion states, and verifying it against a reference.

Recognised: ``Answer: X``, ``#### X`` (GSM8K), ``\\boxed{X}`` (MATH) and "the answer is X"; the last one in the
text wins. Verifiers: ``exact``, ``numeric`` and ``math`` (symbolic equivalence with math-verify).
"""

from __future__ import annotations

import math
import re
from typing import Literal

Verifier = Literal["exact", "numeric", "math"]
VERIFIERS: tuple[str, ...] = ("exact", "numeric", "math")
MAX_ANSWER_CHARS = 1000  # longer extracted answers are not verified (score 0): bounds verifier cost


_ANSWER_PATTERNS = (
    re.compile(r"answer\s*(?:is)?\s*[:=]\s*(?P<a>[^\n]+)", re.IGNORECASE),
    re.compile(r"####\s*(?P<a>[^\n]+)"),
    re.compile(r"the (?:final )?answer is\s*:?\s*(?P<a>[^\n]+)", re.IGNORECASE),
)


def _boxed_answers(text: str) -> list[tuple[int, str]]:
    """Contents of every ``\\boxed{...}`` with balanced braces, as (position, content)."""
    found = []
    for m in re.finditer(r"\\boxed\s*\{", text):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            found.append((m.start(), text[m.end() : i - 1]))
    return found


def _clean(answer: str) -> str:
    """Strip markdown emphasis, surrounding ``$``, and trailing full stops until nothing changes."""
    previous = None
    while previous != answer:
        previous = answer
        answer = answer.strip().strip("*").rstrip(".").strip()
        if len(answer) > 1 and answer.startswith("$") and answer.endswith("$"):
            answer = answer[1:-1]
    return answer


def extract_answer(completion: str) -> str | None:
    """The final answer stated in ``completion``, or None when it states none.

    Recognises ``Answer: X``, ``#### X`` (GSM8K), ``\\boxed{X}`` and "the answer is X"; when several occur,
    the one that starts last in the text wins.

    Example:
        >>> extract_answer("4 + 1 = 5.\\n\\n5 + 3 = 8.\\n\\nThe answer is 8.")
        '8'
        >>> extract_answer("4 + 1 = 5.") is None
        True
    """
    if not completion:
        return None
    candidates: list[tuple[int, str]] = _boxed_answers(completion)
    for pattern in _ANSWER_PATTERNS:
        candidates += [(m.start(), m.group("a")) for m in pattern.finditer(completion)]
    candidates = [(pos, _clean(a)) for pos, a in candidates]
    candidates = [(pos, a) for pos, a in candidates if a]
    if not candidates:
        return None
    return max(candidates, key=lambda c: c[0])[1]


def has_final_answer(text: str) -> bool:
    """True when ``text`` states a final answer (used by the environment to end an episode)."""
    return extract_answer(text) is not None


_NUMBER = re.compile(r"^[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?$")


def _to_number(text: str) -> float | None:
    text = text.replace(",", "").replace(" ", "")
    if not _NUMBER.match(text):
        return None
    value = float(text)
    return value if math.isfinite(value) else None


def verify(predicted: str | None, reference: str, verifier: Verifier = "exact") -> float:
    """Score an extracted answer against the reference: 1.0 or 0.0.

    Args:
        predicted: the extracted answer, or None when the completion stated none (scores 0).
        reference: the reference answer.
        verifier: ``exact`` (whitespace- and case-normalised string match), ``numeric`` (|a - b| <= 1e-6 of
            the scale) or ``math`` (symbolic equivalence with math-verify, 5 s limit).

    Example:
        >>> verify("3.0", "3", "numeric"), verify("0.5", "1/2", "math"), verify("4", "3")
        (1.0, 1.0, 0.0)
    """
    if predicted is None or len(predicted) > MAX_ANSWER_CHARS:
        return 0.0
    if verifier == "exact":
        return float(" ".join(predicted.split()).lower() == " ".join(reference.split()).lower())
    if verifier == "numeric":
        a, b = _to_number(predicted), _to_number(reference)
        if a is None or b is None:
            return 0.0
        return float(abs(a - b) <= 1e-6 * max(1.0, abs(b)))
    if verifier == "math":
        from math_verify import parse
        from math_verify import verify as mv_verify

        gold = parse(reference if "$" in reference else f"${reference}$", parsing_timeout=5)
        pred = parse(predicted if "$" in predicted else f"${predicted}$", parsing_timeout=5)
        return float(bool(gold) and bool(pred) and mv_verify(gold, pred, timeout_seconds=5))
    raise ValueError(f"unknown verifier {verifier!r}; choose one of {', '.join(VERIFIERS)}")


__all__ = ["MAX_ANSWER_CHARS", "VERIFIERS", "Verifier", "extract_answer", "has_final_answer", "verify"]
