"""Reading Hugging Face datasets as tasks: splits, column mapping, reference answers (:class:`rpe.tasks.HFDatasetTask`).

A folder written by ``datasets.save_to_disk`` works offline; a hub id needs the hub.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from rpe.answers import extract_answer


class DatasetTaskError(ValueError):
    """A dataset that cannot serve as a task: no such split or column, or it cannot be loaded."""


QUESTION_COLUMNS = ("question", "problem", "prompt")
ANSWER_COLUMNS = ("answer", "solution")
_GROUPED_NUMBER = re.compile(r"[-+]?\d{1,3}(,\d{3})+(\.\d+)?")
_CALCULATOR = re.compile(r"<<[^>]*>>")  # GSM8K's calculator annotations: 48/2=<<48/2=24>>24


def load_split(path_or_id: str, split: str, config: str | None = None):
    """The ``split`` of a dataset folder (``save_to_disk``) or hub id, as a ``datasets.Dataset``.

    Raises:
        DatasetTaskError: the folder has no such split (naming those it has), or the hub dataset cannot be loaded.
    """
    import datasets

    local = Path(path_or_id)
    if local.exists():
        loaded = datasets.load_from_disk(str(local))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise DatasetTaskError(f"{local} has splits {sorted(loaded)}, not {split!r}; pass --task-option split=NAME")
            return loaded[split]
        return loaded
    try:
        return datasets.load_dataset(path_or_id, config, split=split)
    except Exception as err:  # offline, unknown id, unknown config: say what to do
        raise DatasetTaskError(
            f"could not load the Hugging Face dataset {path_or_id!r} (config {config!r}, split {split!r}): {err}. "
            "Without a hub connection save it once elsewhere (datasets.load_dataset(...).save_to_disk(DIR)) and use "
            "hf:DIR") from err


def pick_column(columns: list[str], given: str | None, candidates: tuple[str, ...], role: str, where: str) -> str:
    """``given`` when the dataset has it, else the first of ``candidates`` it has.

    Raises:
        DatasetTaskError: naming the columns the dataset has and the option that picks one.
    """
    if given is not None:
        if given not in columns:
            raise DatasetTaskError(f"{where} has no column {given!r} for the {role}; its columns are {columns}")
        return given
    for name in candidates:
        if name in columns:
            return name
    raise DatasetTaskError(f"{where} has none of {list(candidates)} for the {role}; its columns are {columns}: "
                        f"name one with --task-option {role}=COLUMN")


def reference_answer(text: str) -> str:
    """The reference answer in a dataset's answer text (``#### X``, ``\\boxed{X}``, or the text itself); digit
    grouping commas are dropped from a number."""
    found = extract_answer(text)
    answer = (found if found is not None else text.strip()).replace("\n", " ")
    return answer.replace(",", "") if _GROUPED_NUMBER.fullmatch(answer) else answer  # GSM8K's 2,400 -> 2400


def level_of(value: Any) -> float | None:
    """A difficulty level from ``3`` or ``"Level 3"`` (None when there is no number)."""
    match = re.search(r"\d+", str(value))
    return float(match.group()) if match else None


def solution_paragraphs(text: str, answer: str) -> str:
    """A dataset's worked solution as paragraphs (GSM8K: one per line, calculator annotations and the ``####``
    line removed), ending with ``Answer: X``."""
    body = _CALCULATOR.sub("", text.split("####")[0]).strip()
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n" if "\n\n" in body else r"\n", body) if p.strip()]
    return "\n\n".join(paragraphs + [f"Answer: {answer}"])


__all__ = ["ANSWER_COLUMNS", "DatasetTaskError", "QUESTION_COLUMNS", "level_of", "load_split", "pick_column",
           "reference_answer", "solution_paragraphs"]
