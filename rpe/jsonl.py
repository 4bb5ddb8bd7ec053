"""JSON Lines input shared by task files and imported rollouts: one object per line, errors name the line."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any


def iter_jsonl_objects(path: Path, error: type[Exception]) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(where, object)`` for each non-blank line of ``path``; ``where`` is ``"path:line"``.

    Raises:
        error: a line that is not valid JSON, or not a JSON object (the message names the line).
    """
    import json

    with Path(path).open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise error(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from err
            if not isinstance(obj, dict):
                raise error(f"{where}: expected a JSON object, got {type(obj).__name__}")
            yield where, obj
