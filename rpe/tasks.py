"""Verifiable reasoning tasks behind one interface: ``problems()`` and ``score()``.

Four sources:
- any reasoning-gym task by name, with its difficulty options (``load_task("rg:leg_counting", ...)``);
- calibrated presets for the offline models (``load_task("chain_sum")``, the default);
- a JSONL task file (``load_task("path/to/tasks.jsonl")``) with ``prompt``, ``answer`` and an optional
  ``verifier`` (``exact``, ``numeric`` or ``math``; math answers are checked with math-verify);
- a Hugging Face dataset (``load_task("hf:DIR_OR_ID", split="test")``): GSM8K, MATH and datasets shaped like
  them, see :class:`HFDatasetTask`.

Completions are scored by extracting the final answer (``Answer: X``, ``#### X``, ``\\boxed{X}``, "the answer
is X"; the last one wins) and passing it to the task's own verifier. Empty or garbage completions score 0.

Example:
    >>> task = load_task("chain_sum")
    >>> problem = next(iter(task.problems(1, seed=0)))
    >>> task.score(problem, f"Answer: {problem.answer}")
    1.0
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rpe.answers import MAX_ANSWER_CHARS, VERIFIERS, extract_answer, verify

logger = logging.getLogger(__name__)



@dataclass(frozen=True)
class Problem:
    """One verifiable problem.

    Attributes:
        id: stable identifier, unique within a task (used to split train/test by problem).
        prompt: the question text shown to the model (before any prompt template).
        answer: the reference answer as text.
        meta: JSON-serialisable task metadata (reasoning-gym metadata, the verifier name, ...).
    """

    id: str
    prompt: str
    answer: str
    meta: dict[str, Any] = field(default_factory=dict)


class TaskFileError(ValueError):
    """A malformed task file; the message names the file and line."""


class UnknownTaskError(ValueError):
    """A task name that is neither a preset, a reasoning-gym task, nor an existing JSONL file."""


# --------------------------------------------------------------------------------------------------------
# tasks


class Task:
    """A verifiable task. Subclasses implement :meth:`problems` and :meth:`score`.

    Attributes:
        name: how the task is named in records and manifests.
        answer_hint: what the final line should look like, used in the prompt instruction.
    """

    name: str = "task"
    answer_hint: str = "Answer: <answer>"

    def problems(self, n: int, seed: int = 0) -> Iterator[Problem]:
        """Yield ``n`` problems, deterministic for ``seed``."""
        raise NotImplementedError

    def score(self, problem: Problem, completion: str) -> float:
        """Score a completion: 1.0 if the verifier accepts its final answer, else 0.0. Never raises on
        model output."""
        raise NotImplementedError

    def worked_solution(self, problem: Problem) -> str:
        """A step-by-step solution (paragraph per step, ending ``Answer: X``), used for few-shot prompts.

        The default has no reasoning steps, only the answer line; tasks that can derive the steps override it.
        """
        return f"Answer: {problem.answer}"

    def spec(self) -> dict[str, Any]:
        """A JSON-serialisable description that :func:`load_task` turns back into this task."""
        raise NotImplementedError

    def example_task(self) -> Task:
        """The task worked examples are drawn from (:class:`rpe.prompts.PromptBuilder`): itself, unless its
        question space is so small that a run asks every question (then examples come from a disjoint one)."""
        return self

    def difficulty(self, problem: Problem) -> dict[str, float]:
        """The problem's own difficulty features (e.g. ``{"num_terms": 3}``), empty when the task has none.

        reasoning-gym problems name their difficulty parameters in ``meta["difficulty"]`` and carry each
        problem's value under the same key; JSONL problems may give a ``difficulty`` object of numbers.
        """
        named = problem.meta.get("difficulty")
        if not isinstance(named, dict):
            return {}
        out = {}
        for key, value in named.items():
            own = problem.meta.get(key, value)  # reasoning-gym: the per-problem value sits beside the ranges
            if isinstance(own, (int, float)) and not isinstance(own, bool):
                out[key] = float(own)
        return out


class ReasoningGymTask(Task):
    """Any reasoning-gym task, scored by its own ``score_answer``.

    Args:
        rg_name: the reasoning-gym dataset name (``reasoning_gym.factory.DATASETS``).
        config: difficulty options passed to ``reasoning_gym.create_dataset``.
        name: the name used in records (defaults to ``rg_name``).
        partial_credit: keep reasoning-gym's fractional scores (some tasks give 0.5 for near misses, e.g.
            ``1000`` for ``10``). Default False: the reward is binary, 1.0 only for full credit (PAPER.md).
    """

    def __init__(
        self, rg_name: str, config: dict[str, Any] | None = None, name: str | None = None, partial_credit: bool = False
    ):
        import reasoning_gym

        if rg_name not in reasoning_gym.factory.DATASETS:
            raise UnknownTaskError(
                f"unknown reasoning-gym task {rg_name!r}; valid names: {', '.join(sorted(reasoning_gym.factory.DATASETS))}"
            )
        self.rg_name = rg_name
        self.config = dict(config or {})
        self.name = name or rg_name
        self.partial_credit = partial_credit
        try:
            self._scorer = reasoning_gym.create_dataset(rg_name, size=1, seed=0, **self.config)
        except (TypeError, AssertionError, ValueError) as err:
            raise ValueError(f"invalid options {self.config} for reasoning-gym task {rg_name!r}: {err}") from err

    def problems(self, n: int, seed: int = 0) -> Iterator[Problem]:
        import reasoning_gym

        if n <= 0:
            return
        dataset = reasoning_gym.create_dataset(self.rg_name, size=n, seed=seed, **self.config)
        for i, entry in enumerate(dataset):
            yield Problem(
                id=f"{self.name}/s{seed}/{i}",
                prompt=entry["question"],
                answer=str(entry["answer"]),
                meta=_jsonable(entry.get("metadata", {})),
            )

    def score(self, problem: Problem, completion: str) -> float:
        predicted = extract_answer(completion)
        if predicted is None or len(predicted) > MAX_ANSWER_CHARS:
            return 0.0
        entry = {"question": problem.prompt, "answer": problem.answer, "metadata": problem.meta}
        try:
            score = float(self._scorer.score_answer(predicted, entry))
        except Exception as err:  # a verifier bug on hostile text must not kill a long run
            logger.warning("reasoning-gym %s verifier raised on %r: %s; scored 0", self.rg_name, predicted[:80], err)
            return 0.0
        if not math.isfinite(score):
            return 0.0
        return score if self.partial_credit else float(score >= 1.0)

    def spec(self) -> dict[str, Any]:
        return {
            "kind": "reasoning_gym",
            "rg_name": self.rg_name,
            "config": self.config,
            "name": self.name,
            "partial_credit": self.partial_credit,
        }


class ChainSumTask(ReasoningGymTask):
    """reasoning-gym ``chain_sum`` with worked solutions that add one term per step (for few-shot)."""

    def __init__(self, config: dict[str, Any] | None = None, name: str = "chain_sum", partial_credit: bool = False):
        super().__init__("chain_sum", config, name=name, partial_credit=partial_credit)

    def worked_solution(self, problem: Problem) -> str:
        tokens = problem.meta.get("expression", "").split()
        if len(tokens) < 3:
            return super().worked_solution(problem)
        total = int(tokens[0])
        steps = []
        for k, (op, term) in enumerate(zip(tokens[1::2], tokens[2::2]), start=1):
            new = total + int(term) if op == "+" else total - int(term)
            steps.append(f"Step {k}: {total} {op} {term} = {new}.")
            total = new
        return "\n\n".join(steps + [f"Answer: {total}"])


class CountBitsTask(ReasoningGymTask):
    """reasoning-gym ``count_bits`` with two-step worked solutions (write the number in binary, count the ones)."""

    def __init__(self, config: dict[str, Any] | None = None, name: str = "count_bits", partial_credit: bool = False):
        super().__init__("count_bits", config, name=name, partial_credit=partial_credit)

    def example_task(self) -> Task:
        """Numbers just above the asked range (16-31 for the preset's 1-15): a run of 150 problems asks all 15
        questions, so no example could be an unasked one; the worked solutions have the same two steps."""
        hi = int(self.config.get("max_n", 2**31 - 1))
        return CountBitsTask({**self.config, "min_n": hi + 1, "max_n": 2 * hi + 1}, name=f"{self.name}-examples")

    def worked_solution(self, problem: Problem) -> str:
        import re

        match = re.search(r"number (\d+)", problem.prompt)
        if not match:
            return super().worked_solution(problem)
        n = int(match.group(1))
        bits = format(n, "b")
        ones = " + ".join(bits)
        return f"Step 1: {n} in binary is {bits}.\n\nStep 2: the digits add up to {ones} = {bits.count('1')}.\n\nAnswer: {bits.count('1')}"


class ListedTask(Task):
    """A task over a fixed list of problems (a file, a dataset split) in ``self._problems``."""

    _problems: list[Problem]

    def problems(self, n: int, seed: int = 0) -> Iterator[Problem]:
        """The first ``n`` problems in a seed-dependent order (their listed order for seed 0)."""
        import random

        order = list(range(len(self._problems)))
        if seed:
            random.Random(seed).shuffle(order)
        for i in order[:n]:
            yield self._problems[i]


class JsonlTask(ListedTask):
    """Problems from a JSONL file: one object per line with ``prompt`` and ``answer``; optional ``id`` and
    ``verifier`` (``exact``, ``numeric``, ``math``; default ``exact``) and ``solution`` (for few-shot).

    Raises:
        TaskFileError: on a malformed line, naming the file and line number.
    """

    def __init__(self, path: str | Path, name: str | None = None):
        self.path = Path(path)
        self.name = name or self.path.stem
        self._problems = self._read()

    def _read(self) -> list[Problem]:
        if not self.path.is_file():
            raise TaskFileError(f"task file {self.path} does not exist")
        from rpe.jsonl import iter_jsonl_objects

        problems, seen = [], set()
        for where, row in iter_jsonl_objects(self.path, TaskFileError):
            missing = [k for k in ("prompt", "answer") if k not in row]
            if missing:
                raise TaskFileError(f"{where}: missing field(s) {missing}; each line needs 'prompt' and 'answer'")
            verifier = row.get("verifier", "exact")
            if verifier not in VERIFIERS:
                raise TaskFileError(f"{where}: unknown verifier {verifier!r}; choose one of {', '.join(VERIFIERS)}")
            pid = str(row.get("id", f"{self.name}/{where.rsplit(':', 1)[1]}"))
            if pid in seen:
                raise TaskFileError(f"{where}: duplicate id {pid!r}")
            seen.add(pid)
            meta = {"verifier": verifier}
            if "solution" in row:
                meta["solution"] = str(row["solution"])
            if isinstance(row.get("difficulty"), dict):
                meta["difficulty"] = row["difficulty"]
            problems.append(Problem(id=pid, prompt=str(row["prompt"]), answer=str(row["answer"]), meta=meta))
        if not problems:
            raise TaskFileError(f"{self.path}: no problems (the file is empty)")
        return problems

    def score(self, problem: Problem, completion: str) -> float:
        return verify(extract_answer(completion), problem.answer, problem.meta.get("verifier", "exact"))

    def worked_solution(self, problem: Problem) -> str:
        return problem.meta.get("solution") or super().worked_solution(problem)

    def spec(self) -> dict[str, Any]:
        return {"kind": "jsonl", "path": str(self.path), "name": self.name}


# --------------------------------------------------------------------------------------------------------
# Hugging Face datasets (hf:PATH_OR_ID; reading them: rpe.hf_data)

class HFDatasetTask(ListedTask):
    """Problems from one split of a Hugging Face dataset: ``hf:PATH_OR_ID``.

    ``PATH_OR_ID`` is a folder written by ``datasets.save_to_disk`` (works offline) or a hub id (needs the hub).
    Options (``--task-option KEY=VALUE``, or ``load_task("hf:...", **options)``):

    - ``split`` (default ``test``) and ``config`` (the dataset's configuration, e.g. GSM8K's ``main``);
    - ``question``, ``answer``, ``solution``: column names; by default the first present of
      ``question``/``problem``/``prompt``, of ``answer``/``solution``, and ``solution`` (the worked solution used in
      few-shot prompts, when the dataset has one);
    - ``verifier``: ``math`` (default: math-verify's symbolic equivalence; a numeric reference also matches
      numerically, so ``1,234`` equals ``1234``), ``numeric`` or ``exact``.

    The reference answer is read from the answer column as a model's answer is: GSM8K's ``#### 72`` gives ``72``,
    MATH's ``\\boxed{\\frac{1}{2}}`` gives ``\\frac{1}{2}``, a bare answer (MATH-500's ``answer``) is taken as it is.
    A ``level`` column (``3`` or ``Level 3``) becomes the difficulty feature ``level`` (the difficulty control of
    ``rpe fit``). A column mapping that names a column the dataset lacks fails with the columns it has.
    """

    def __init__(self, path: str, *, split: str = "test", config: str | None = None, question: str | None = None,
                 answer: str | None = None, solution: str | None = None, verifier: str = "math",
                 name: str | None = None):
        if verifier not in VERIFIERS:
            raise ValueError(f"unknown verifier {verifier!r}; choose one of {', '.join(VERIFIERS)}")
        self.path, self.split, self.config, self.verifier = str(path), split, config, verifier
        self.name = name or f"{Path(self.path).name}-{split}"
        from rpe.hf_data import ANSWER_COLUMNS, QUESTION_COLUMNS, load_split, pick_column

        rows = load_split(self.path, split, config)
        where = f"dataset {self.path!r} ({split})"
        columns = list(rows.column_names)
        self.question = pick_column(columns, question, QUESTION_COLUMNS, "question", where)
        self.answer = pick_column(columns, answer, ANSWER_COLUMNS, "answer", where)
        self.solution = solution if solution is not None else ("solution" if "solution" in columns else None)
        if self.solution is not None:
            pick_column(columns, self.solution, (), "solution", where)
        self._problems = [self._problem(i, row) for i, row in enumerate(rows)]
        if not self._problems:
            raise TaskFileError(f"{where} has no rows")

    def _problem(self, index: int, row: dict[str, Any]) -> Problem:
        from rpe.hf_data import level_of, reference_answer

        meta: dict[str, Any] = {}
        if self.solution is not None and row.get(self.solution):
            meta["solution"] = str(row[self.solution])
        elif "####" in str(row[self.answer]):  # GSM8K: the reasoning sits before the answer
            meta["solution"] = str(row[self.answer])
        if "level" in row and level_of(row["level"]) is not None:
            meta["level"] = level_of(row["level"])
            meta["difficulty"] = {"level": meta["level"]}
        return Problem(id=f"{self.name}/{index}", prompt=str(row[self.question]),
                       answer=reference_answer(str(row[self.answer])), meta=meta)

    def score(self, problem: Problem, completion: str) -> float:
        predicted = extract_answer(completion)
        if verify(predicted, problem.answer, "numeric"):
            return 1.0
        try:
            return verify(predicted, problem.answer, self.verifier)  # type: ignore[arg-type]
        except Exception:  # math-verify on hostile text: a wrong answer, not a crashed run
            return 0.0

    def worked_solution(self, problem: Problem) -> str:
        """The dataset's solution as paragraphs (GSM8K: one per line, calculator annotations removed), ending
        with ``Answer: X``; only the answer line when the dataset has no solution."""
        from rpe.hf_data import solution_paragraphs

        text = problem.meta.get("solution")
        return solution_paragraphs(text, problem.answer) if text else super().worked_solution(problem)

    def spec(self) -> dict[str, Any]:
        return {"kind": "hf", "path": self.path, "split": self.split, "config": self.config, "question": self.question,
                "answer": self.answer, "solution": self.solution, "verifier": self.verifier, "name": self.name}


def load_hf_task(spec_or_name: str | dict[str, Any], **options: Any) -> HFDatasetTask:
    """``hf:PATH_OR_ID`` with options, or a :meth:`HFDatasetTask.spec` dictionary."""
    if isinstance(spec_or_name, dict):
        return HFDatasetTask(**{k: v for k, v in spec_or_name.items() if k != "kind"})
    unknown = sorted(set(options) - {"split", "config", "question", "answer", "solution", "verifier", "name"})
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for an hf: task; valid: split, config, question, answer, "
                         "solution, verifier, name")
    return HFDatasetTask(spec_or_name.removeprefix("hf:"), **options)



def _jsonable(value: Any) -> Any:
    """Round-trip through JSON so metadata stored in records equals what the verifier later receives."""
    return json.loads(json.dumps(value, default=str))


# --------------------------------------------------------------------------------------------------------
# presets and loading

#: Calibrated presets: name -> (reasoning-gym task, options). See docs/results.md "Calibrated default task" for the measurements.
PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "chain_sum": ("chain_sum", {"min_terms": 3, "max_terms": 3, "min_digits": 1, "max_digits": 1}),
    "chain_sum_2": ("chain_sum", {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}),
    "chain_sum_4": ("chain_sum", {"min_terms": 4, "max_terms": 4, "min_digits": 1, "max_digits": 1}),
    "chain_sum_mix": ("chain_sum", {"min_terms": 2, "max_terms": 4, "min_digits": 1, "max_digits": 1}),
    "count_bits": ("count_bits", {"min_n": 1, "max_n": 15}),
}
DEFAULT_TASK = "chain_sum_mix"
"""The default: 2-4 one-digit terms, a natural difficulty spread (26.1% accuracy for SmolLM2 on 1,600 trajectories, docs/results.md)."""


def question_key(problem: Problem) -> str:
    """A short stable key of a problem's question text (16 hex digits of its SHA-1): the same question under
    another id or seed (a shuffled JSONL file, a reasoning-gym expression drawn again) has the same key."""
    import hashlib

    return hashlib.sha1(" ".join(problem.prompt.split()).encode()).hexdigest()[:16]


def _outside(task: Task, n: int, seed: int, skip: set[str]) -> list[Problem]:
    """The first ``n`` problems of ``task``'s stream for ``seed`` whose question is not in ``skip``. The window
    starts at ``n + len(skip)`` draws and doubles (up to 16 times that) while too few are found: reasoning-gym
    builds item ``i`` of seed ``s`` from seed ``s + i``, so the first items of seed 1 are the fitting run's items
    1, 2, ... of seed 0, and a window of that size alone can hold almost nothing new."""
    window = n + len(skip)
    while True:
        kept = [p for p in task.problems(window, seed=seed) if question_key(p) not in skip][:n]
        if len(kept) >= n or window >= 16 * (n + len(skip)):
            return kept
        window *= 2


def draw_problems(task: Task, n: int, seed: int, exclude: Sequence[str] | None = None) -> list[Problem]:
    """``n`` problems of ``task`` for ``seed``, skipping those whose :func:`question_key` is in ``exclude``
    (a held-out evaluation passes its fitting run's keys). Without ``exclude``: ``task.problems(n, seed)``.

    Raises:
        ValueError: fewer than ``n`` problems remain outside ``exclude``.
    """
    if not exclude:
        return list(task.problems(n, seed=seed))
    skip = set(exclude)
    kept = _outside(task, n, seed, skip)
    if len(kept) < n:
        raise ValueError(f"task {task.name!r} has only {len(kept)} problems whose questions are not among the "
                         f"{len(skip)} excluded (the fitting run's); ask for at most {len(kept)}, or evaluate on another "
                         "split or task")
    return kept


def held_out_count(task: Task, n: int, seed: int, exclude: Sequence[str]) -> int:
    """The most problems, up to ``n``, that :func:`draw_problems` can draw for ``seed`` outside ``exclude``
    (a fixed dataset runs out)."""
    skip = set(exclude)
    return len(_outside(task, n, seed, skip)) if skip else n


def parse_task_options(pairs: Sequence[str]) -> dict[str, Any]:
    """``["KEY=VALUE", ...]`` (``--task-option``) as ``load_task`` keyword arguments, values read as JSON where
    they parse (numbers, booleans), else kept as strings. Raises ValueError for a pair without ``=``."""
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--task-option takes KEY=VALUE, got {pair!r}")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def available_tasks() -> list[str]:
    """Preset names followed by ``rg:NAME`` for every reasoning-gym task."""
    import reasoning_gym

    return list(PRESETS) + [f"rg:{n}" for n in sorted(reasoning_gym.factory.DATASETS)]


def load_task(name_or_spec: str | dict[str, Any], **options: Any) -> Task:
    """Build a task from a preset name, ``rg:NAME`` (or a bare reasoning-gym name), a JSONL path, or a
    :meth:`Task.spec` dictionary. ``options`` override difficulty options of reasoning-gym tasks.

    Raises:
        UnknownTaskError: listing the valid names.
    """
    if isinstance(name_or_spec, dict):
        spec = name_or_spec
        if spec.get("kind") == "jsonl":
            return JsonlTask(spec["path"], name=spec.get("name"))
        if spec.get("kind") == "reasoning_gym":
            config = {**spec.get("config", {}), **options}
            partial = bool(spec.get("partial_credit", False))
            if spec["rg_name"] == "chain_sum":
                return ChainSumTask(config, name=spec.get("name", "chain_sum"), partial_credit=partial)
            if spec["rg_name"] == "count_bits":
                return CountBitsTask(config, name=spec.get("name", "count_bits"), partial_credit=partial)
            return ReasoningGymTask(spec["rg_name"], config, name=spec.get("name"), partial_credit=partial)
        if spec.get("kind") == "hf":
            return load_hf_task(spec)
        raise UnknownTaskError(f"unknown task spec {spec!r}: 'kind' must be 'jsonl', 'reasoning_gym' or 'hf'")
    name = name_or_spec
    if name.startswith("hf:"):
        return load_hf_task(name, **options)
    if name in PRESETS:
        rg_name, config = PRESETS[name]
        return load_task({"kind": "reasoning_gym", "rg_name": rg_name, "config": config, "name": name}, **options)
    if name.endswith(".jsonl") or Path(name).is_file():
        return JsonlTask(name)
    import reasoning_gym

    rg_name = name.removeprefix("rg:")
    if rg_name in reasoning_gym.factory.DATASETS:
        return load_task({"kind": "reasoning_gym", "rg_name": rg_name, "config": {}, "name": rg_name}, **options)
    raise UnknownTaskError(
        f"unknown task {name!r}. Valid: presets {', '.join(PRESETS)}; any reasoning-gym task as rg:NAME "
        f"({', '.join(sorted(reasoning_gym.factory.DATASETS))}); a path to a .jsonl task file; or hf:PATH_OR_ID for a "
        "Hugging Face dataset (GSM8K, MATH)"
    )
