"""Split a completion into reasoning steps and map steps to token spans.

A step is the text between separators; spans exclude the separators and surrounding white space, so
``text[span.start:span.end]`` is the step's text and the steps, with the text between them, re-join to the
original. The state s_t of the method is the last token of step t (see :func:`token_spans`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

Segmenter = Literal["paragraph", "newline", "sentence", "regex"]
SEGMENTERS: tuple[str, ...] = ("paragraph", "newline", "sentence", "regex")

_SEPARATORS: dict[str, str] = {
    "paragraph": r"\n[ \t\r\f\v]*\n\s*",
    "newline": r"\n+",
    "sentence": r"(?<=[.!?])\s+",
}


@dataclass(frozen=True)
class CharSpan:
    """Half-open character span ``[start, end)`` of one step inside the completion text."""

    start: int
    end: int


def separator_pattern(method: Segmenter = "paragraph", pattern: str | None = None) -> re.Pattern[str]:
    """The compiled separator regex for a segmenter. ``regex`` needs ``pattern`` (the separator)."""
    if method == "regex":
        if not pattern:
            raise ValueError("segmenter 'regex' needs a separator pattern, e.g. pattern=r'\\n(?=Step)'")
        try:
            return re.compile(pattern)
        except re.error as err:
            raise ValueError(f"invalid step separator regex {pattern!r}: {err}") from err
    if method not in _SEPARATORS:
        raise ValueError(f"unknown segmenter {method!r}; choose one of {', '.join(SEGMENTERS)}")
    return re.compile(_SEPARATORS[method])


def split_steps(text: str, method: Segmenter = "paragraph", pattern: str | None = None) -> list[CharSpan]:
    """Character spans of the non-empty steps of ``text``, in order.

    Args:
        text: the completion (model output after the prompt).
        method: ``paragraph`` (blank line, default), ``newline``, ``sentence`` or ``regex``.
        pattern: the separator regex when ``method == "regex"``.
    """
    sep = separator_pattern(method, pattern)
    spans, cursor = [], 0
    bounds = [(m.start(), m.end()) for m in sep.finditer(text)] + [(len(text), len(text))]
    for sep_start, sep_end in bounds:
        piece = text[cursor:sep_start]
        stripped = piece.strip()
        if stripped:
            start = cursor + (len(piece) - len(piece.lstrip()))
            spans.append(CharSpan(start, start + len(stripped)))
        cursor = sep_end
    return spans


class StepEnds:
    """The steps of a completion that end as its tokens arrive one at a time (early stopping during generation).

    A step counts as ended once the separator after it has arrived: a blank line (``paragraph``), a newline
    (``newline``), white space after ``.``, ``!`` or ``?`` (``sentence``), or a match of the separator regex
    (``regex``). The steps are those :func:`split_steps` finds in the text so far, and the last token of step t
    is found as :func:`token_spans` finds it, so s_t here is the state a rollout record's step spans name.

    Example:
        >>> ends = StepEnds("paragraph")
        >>> [ends.fed(p) for p in ["4 + 1", " = 5.", "\\n", "\\n", "5 + 3"]]
        [[], [], [], [1], []]
    """

    def __init__(self, method: Segmenter = "paragraph", pattern: str | None = None):
        self.method, self.pattern = method, pattern
        self.separator = separator_pattern(method, pattern)
        self.text = ""
        self.char_ends: list[int] = []
        self.n_ended = 0

    def fed(self, piece: str) -> list[int]:
        """After the next token, whose text is ``piece``: the indices (0-based among the tokens fed so far) of the
        last token of each step it ended (usually none or one)."""
        import bisect

        self.text += piece
        self.char_ends.append(len(self.text))
        last = None
        for last in self.separator.finditer(self.text):
            pass
        if last is None:
            return []
        spans = split_steps(self.text[: last.start()], self.method, self.pattern)
        new = spans[self.n_ended :]
        self.n_ended = len(spans)
        return [min(bisect.bisect_left(self.char_ends, span.end), len(self.char_ends) - 1) for span in new]


def token_char_ends(tokenizer, token_ids: list[int], *, context: int = 8, check_every: int = 64,
                    skip_special_tokens: bool = False) -> list[int]:
    """For each token i, the length of the decoded text of ``token_ids[:i+1]`` (non-decreasing), decoded as the
    text the character spans index was (``skip_special_tokens``: a special token then adds no characters).

    Multi-byte characters split over tokens are attributed to the token that completes them. Linear in the
    completion's length: token i's characters are the difference between decoding the window of ``context``
    tokens before it with and without it (the window carries what a tokenizer needs to render the new token:
    SentencePiece's leading space, a partial UTF-8 sequence). Every ``check_every`` tokens and at the end the
    running length is compared with a full decode of the prefix; on any difference the exact quadratic method
    (:func:`token_char_ends_exact`, one full decode per prefix) is used instead.
    """
    skip = skip_special_tokens

    def full(i: int) -> int:
        return len(tokenizer.decode(token_ids[: i + 1], skip_special_tokens=skip))

    ends, length, prev = [], 0, 0
    for i in range(len(token_ids)):
        start = max(0, i - context)
        window = token_ids[start : i + 1]
        length += len(tokenizer.decode(window, skip_special_tokens=skip)) - len(
            tokenizer.decode(window[:-1], skip_special_tokens=skip))
        prev = max(prev, length)
        if (i + 1) % check_every == 0 or i == len(token_ids) - 1:
            exact = full(i)
            if exact != length:
                return token_char_ends_exact(tokenizer, token_ids, skip_special_tokens=skip)
        ends.append(prev)
    return ends


def token_char_ends_exact(tokenizer, token_ids: list[int], *, skip_special_tokens: bool = False) -> list[int]:
    """:func:`token_char_ends` by one full decode per prefix (quadratic in the length; the reference)."""
    ends, prev = [], 0
    for i in range(len(token_ids)):
        prev = max(prev, len(tokenizer.decode(token_ids[: i + 1], skip_special_tokens=skip_special_tokens)))
        ends.append(prev)
    return ends


def token_spans(char_spans: list[CharSpan], char_ends: list[int]) -> list[tuple[int, int]]:
    """Map character spans to half-open token spans ``[first, last + 1)`` of the tokens that cover them.

    ``char_ends`` comes from :func:`token_char_ends`. The last token of a step (index ``end - 1``) is the
    token whose decoded text first reaches the step's last character: the state s_t.
    """
    import bisect

    out = []
    for span in char_spans:
        first = bisect.bisect_right(char_ends, span.start)  # first token ending after span.start
        last = bisect.bisect_left(char_ends, span.end)  # first token whose end reaches span.end
        last = min(last, len(char_ends) - 1)
        first = min(first, last)
        out.append((first, last + 1))
    return out
