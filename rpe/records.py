"""Trajectory records: the schema of one rollout, its Parquet files, atomic writes and checksums.

A rollout folder holds ``trajectories.parquet`` (one :class:`Trajectory` per row, readable with ``datasets``) and
``manifest.json`` (the sha256 of that file among the run's facts). Every write goes through a temporary file and
``os.replace``, so a killed process never leaves a half-written file where a good one was.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
TRAJECTORIES_FILE = "trajectories.parquet"
MANIFEST_FILE = "manifest.json"


@dataclass
class Step:
    """One reasoning step of a completion.

    Attributes:
        text: the step's text (no separators).
        char_start, char_end: half-open span in the completion text.
        token_start, token_end: half-open span in the completion tokens; ``token_end - 1`` is the state s_t.
    """

    text: str
    char_start: int
    char_end: int
    token_start: int
    token_end: int


@dataclass
class Trajectory:
    """One sampled completion, split into steps, with its verified reward. One row of the Parquet file."""

    schema_version: int
    trajectory_id: str
    problem_id: str
    task: str
    sample_index: int
    prompt: str
    completion: str
    steps: list[Step]
    final_answer: str | None
    reference_answer: str
    reward: float
    prompt_token_ids: list[int]
    completion_token_ids: list[int]
    finish_reason: str
    """``eos`` (model ended), ``stop`` (stop string) or ``length`` (hit ``max_new_tokens``)."""
    truncated: bool
    prompt_truncated: bool
    model: dict[str, Any]
    sampling: dict[str, Any]
    seed: int

    def to_row(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Trajectory:
        version = row.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ValueError(
                f"trajectory {row.get('trajectory_id')!r} has schema version {version}; this rpe reads version "
                f"{SCHEMA_VERSION}. Re-collect the rollouts with this version of rpe."
            )
        data = {k: row[k] for k in cls.__dataclass_fields__}
        data["steps"] = [Step(**s) for s in row["steps"]]
        return cls(**data)

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)

    def state_positions(self) -> list[int]:
        """Absolute token positions (in prompt + completion) of s_0 (last prompt token) and each step end."""
        n = self.prompt_len
        return [n - 1] + [n + s.token_end - 1 for s in self.steps]


# --------------------------------------------------------------------------------------------------------
# atomic files and Parquet


def _file_mode() -> int:
    """0666 less the process's umask: the mode ``open(path, "w")`` gives a new file."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


_FILE_MODE = _file_mode()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file in the same folder and ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, _FILE_MODE)  # mkstemp makes it 0600: the file gets the mode open() would give it
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=2, sort_keys=True).encode())


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_trajectories(path: Path, trajectories: Sequence[Trajectory]) -> None:
    """Atomically write trajectories to a Parquet file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = with_fixed_types(pa.Table.from_pylist([t.to_row() for t in trajectories]))
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    atomic_write_bytes(path, sink.getvalue().to_pybytes())


def with_fixed_types(table):
    """Give columns that can be all-empty in one batch their real type (Arrow infers ``null`` from a batch where
    no completion has an answer, or none has a step), so the parts of a run always merge."""
    import pyarrow as pa

    fixed = {
        "final_answer": pa.string(),
        "steps": pa.list_(pa.struct([("text", pa.string()), ("char_start", pa.int64()), ("char_end", pa.int64()),
                                     ("token_start", pa.int64()), ("token_end", pa.int64())])),
        "completion_token_ids": pa.list_(pa.int64()),
    }
    for name, typ in fixed.items():
        i = table.schema.get_field_index(name)
        if i >= 0 and table.schema.field(i).type != typ:
            table = table.set_column(i, name, table.column(i).cast(typ))
    return table


def read_table(path: Path):
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path)
    except Exception as err:  # pyarrow raises several types for damaged files
        raise ValueError(f"{path} is not a readable Parquet file ({err}); delete it and re-run to regenerate") from err


def _checked_parquet(source: str | Path) -> Path:
    """The Parquet path of a rollout folder (its sha256 checked against the manifest) or a Parquet file."""
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(
            f"{source} does not exist: no rollouts there. Collect them first with "
            f"`rpe rollouts --task TASK --n-problems N --out {source}`, or point at an existing rollout folder or Parquet file"
        )
    if path.is_dir():
        manifest_path = path / MANIFEST_FILE
        path = path / TRAJECTORIES_FILE
        if not path.exists():
            raise FileNotFoundError(
                f"{source} holds no {TRAJECTORIES_FILE}; the collection is unfinished or the folder is wrong "
                "(re-run the same `rpe rollouts` command to resume)"
            )
        if manifest_path.exists():
            expected = json.loads(manifest_path.read_text()).get("sha256")
            if expected and sha256_file(path) != expected:
                raise ValueError(
                    f"{path} does not match the sha256 in {manifest_path}: the file was modified or damaged. "
                    "Re-collect the rollouts into a fresh folder."
                )
    return path


def read_trajectories(source: str | Path) -> list[Trajectory]:
    """Read trajectories from a rollout folder (its ``trajectories.parquet``) or a Parquet file.

    When the folder has a manifest, the file's sha256 is checked against it first.
    """
    return [Trajectory.from_row(row) for row in read_table(_checked_parquet(source)).to_pylist()]


def iter_trajectories(source: str | Path, batch_size: int = 256) -> Iterator[list[Trajectory]]:
    """Like :func:`read_trajectories`, in batches of ``batch_size`` records: memory stays flat in the number of
    trajectories (only one batch exists as Python objects at a time)."""
    import pyarrow.parquet as pq

    path = _checked_parquet(source)
    try:
        reader = pq.ParquetFile(path)
    except Exception as err:
        raise ValueError(f"{path} is not a readable Parquet file ({err}); delete it and re-run to regenerate") from err
    for batch in reader.iter_batches(batch_size=batch_size):
        yield [Trajectory.from_row(row) for row in batch.to_pylist()]


__all__ = ["MANIFEST_FILE", "SCHEMA_VERSION", "TRAJECTORIES_FILE", "Step", "Trajectory", "atomic_write_bytes",
           "atomic_write_json", "iter_trajectories", "read_trajectories", "sha256_file", "write_trajectories"]
