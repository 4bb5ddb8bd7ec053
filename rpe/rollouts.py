"""Batched rollout collection into versioned, resumable Trajectory records.

One ``model.generate`` call (KV cache) produces whole completions for a batch of problems x samples; they are
split into steps afterwards (:mod:`rpe.segment`) and recorded as :class:`Trajectory` rows in Parquet.

On disk (``DIR``):
- ``run_config.json``: what the run was asked to do; a resumed run must ask for the same thing.
- ``parts/part-NNNNN.parquet``: one file per finished batch, each written atomically (temp file + rename).
- ``trajectories.parquet`` and ``manifest.json``: written atomically once every batch is done; the manifest
  holds the model fingerprint, task, sampling config, seed, accuracy and the sha256 of the Parquet file.

Killing a run loses at most the batch in flight: the rerun skips finished parts, and batch b is always drawn
with seed ``(seed, b)``, so the result is the same as an uninterrupted run's.

Example:
    >>> cfg = RolloutConfig(task="chain_sum", n_problems=8, samples=2)  # doctest: +SKIP
    >>> result = collect_rollouts(model, tokenizer, cfg, "runs/demo")  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from rpe.metrics import wilson_interval
from rpe.models import fingerprint
from rpe.prompts import PromptBuilder, PromptConfig
from rpe.segment import Segmenter, split_steps, token_char_ends, token_spans
from rpe.tasks import Problem, Task, extract_answer, load_task

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
TRAJECTORIES_FILE = "trajectories.parquet"
MANIFEST_FILE = "manifest.json"
RUN_CONFIG_FILE = "run_config.json"
PARTS_DIR = "parts"
STATES_FILE = "states.safetensors"
#: Architectures on which generating from a shared-prefix KV cache was checked to give identical tokens
#: (tests/test_rollouts.py). Others (e.g. Gemma3's sliding-window layers) take the plain padded path.
PREFIX_REUSE_MODEL_TYPES = frozenset({"llama", "qwen2"})


@dataclass
class SamplingConfig:
    """Generation settings shared by every rollout of a run."""

    temperature: float = 0.7
    """Softmax temperature; 0 means greedy decoding."""
    top_p: float = 1.0
    """Nucleus sampling mass."""
    top_k: int = 50
    """Sample among the k most likely tokens (0 = no limit); 50 is transformers' default."""
    max_new_tokens: int = 128
    """Completion budget in tokens; a completion that hits it is marked truncated."""

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = no limit), got {self.top_k}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")

    def generate_kwargs(self) -> dict[str, Any]:
        if self.temperature == 0:
            return {"do_sample": False, "max_new_tokens": self.max_new_tokens}
        return {
            "do_sample": True,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "max_new_tokens": self.max_new_tokens,
        }


@dataclass
class RolloutConfig:
    """What ``rpe rollouts`` collects."""

    task: str = "chain_sum"
    """Task preset, ``rg:NAME`` or a JSONL path (see ``rpe tasks``)."""
    n_problems: int = 200
    """Number of distinct problems."""
    samples: int = 1
    """Completions sampled per problem."""
    batch_size: int = 16
    """Sequences per ``generate`` call."""
    seed: int = 0
    """Seeds problem drawing (``task.problems(n, seed)``) and sampling (batch b uses ``(seed, b)``)."""
    segmenter: Segmenter = "paragraph"
    """How completions are split into steps."""
    segment_pattern: str | None = None
    """Separator regex for ``segmenter='regex'``."""
    max_prompt_tokens: int = 1536
    """Prompts longer than this are cut from the left (the question stays) and flagged ``prompt_truncated``."""
    capture_layers: list[int] | None = None
    """Record activations of these decoder layers at s_0..s_T during generation (hooks on the same forward
    passes, no second pass); written to ``states.safetensors`` for ``rpe fit``."""
    capture_neurons: list[int] | None = None
    """Keep only these neuron columns when capturing (default: all of d_model)."""
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)

    def __post_init__(self) -> None:
        if isinstance(self.sampling, dict):
            self.sampling = SamplingConfig(**self.sampling)
        if isinstance(self.prompt, dict):
            self.prompt = PromptConfig(**self.prompt)
        for name in ("n_problems", "samples", "batch_size", "max_prompt_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.segmenter == "regex" and not self.segment_pattern:
            raise ValueError("segmenter='regex' needs segment_pattern")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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


@dataclass
class RolloutResult:
    """Summary of a finished collection."""

    out_dir: Path
    n_trajectories: int
    accuracy: float
    mean_steps: float
    manifest: dict[str, Any]


# --------------------------------------------------------------------------------------------------------
# atomic files


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file in the same folder and ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
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

    table = _with_fixed_types(pa.Table.from_pylist([t.to_row() for t in trajectories]))
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    atomic_write_bytes(path, sink.getvalue().to_pybytes())


def _with_fixed_types(table):
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


def _read_table(path: Path):
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
            f"`rpe rollouts --task TASK --n N --out {source}`, or point at an existing rollout folder or Parquet file"
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
    return [Trajectory.from_row(row) for row in _read_table(_checked_parquet(source)).to_pylist()]


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


# --------------------------------------------------------------------------------------------------------
# generation


@dataclass
class GeneratedBatch:
    """Raw output of one batched generation.

    Attributes:
        prompt_ids: per sequence, the prompt token ids (no padding).
        completion_ids: per sequence, generated ids up to and excluding EOS / padding, cut at a stop string.
        texts: decoded completions (special tokens removed, stop string removed).
        finish_reasons: ``eos``, ``stop`` or ``length`` per sequence.
        stop_ids: per sequence, the generated ids cut off after ``completion_ids`` up to the one that completes
            the stop string (empty unless stopped): ``completion_ids + stop_ids`` is the model's own
            tokenisation of the text through the stop string (re-tokenising the stop string can differ, e.g.
            one ``"\n\n"`` token where the model wrote two ``"\n"``).
    """

    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    texts: list[str]
    finish_reasons: list[str]
    prompt_truncated: list[bool]
    stop_ids: list[list[int]] = field(default_factory=list)
    token_logprobs: list[list[float]] = field(default_factory=list)
    """Per sequence, the log-probability of each token of ``completion_ids`` under the model's raw (untempered)
    distribution; filled only when asked for (``generate_from_ids(..., token_logprobs=True)``)."""


def generate_batch(
    model,
    tokenizer,
    prompts: Sequence[str],
    sampling: SamplingConfig,
    *,
    stop_strings: Sequence[str] = (),
    max_prompt_tokens: int = 1536,
    seed: int | None = None,
    reuse_prefix: bool = True,
) -> GeneratedBatch:
    """Generate completions for ``prompts`` in one padded ``generate`` call (KV cache on).

    Args:
        prompts: full prompt texts (templates already applied).
        stop_strings: strings that end a completion besides EOS; removed from the text.
        max_prompt_tokens: longer prompts keep their last ``max_prompt_tokens`` tokens and are flagged.
        seed: when given, ``torch.manual_seed(seed)`` right before sampling (reproducible batches).
        reuse_prefix: encode a prompt prefix shared by all rows once (see :func:`generate_from_ids`).
    """
    enc = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    truncated = [len(ids) > max_prompt_tokens for ids in enc]
    gen = generate_from_ids(
        model, tokenizer, [ids[-max_prompt_tokens:] for ids in enc], sampling, stop_strings=stop_strings, seed=seed,
        reuse_prefix=reuse_prefix,
    )
    gen.prompt_truncated = truncated
    return gen


def generate_from_ids(
    model,
    tokenizer,
    prompt_ids: Sequence[list[int]],
    sampling: SamplingConfig,
    *,
    stop_strings: Sequence[str] = (),
    seed: int | None = None,
    reuse_prefix: bool = True,
    min_prefix: int = 32,
    token_logprobs: bool = False,
) -> GeneratedBatch:
    """:func:`generate_batch` on already tokenised prompts (e.g. a prompt plus a partial completion).

    When every prompt starts with the same ``min_prefix`` or more tokens (the few-shot examples) and the
    architecture is one where this is verified to give identical outputs (:data:`PREFIX_REUSE_MODEL_TYPES`),
    the shared prefix is encoded once and its KV cache reused by every row; padding then sits between the
    prefix and each row's own tokens (positions come from the attention mask, so nothing shifts).
    ``token_logprobs`` also returns each generated token's log-probability from the logits computed while
    generating (no extra forward).
    """
    enc = [list(ids) for ids in prompt_ids]
    pad = tokenizer.pad_token_id
    device = next(model.parameters()).device
    prefix_len = 0
    if reuse_prefix and getattr(model.config, "model_type", None) in PREFIX_REUSE_MODEL_TYPES:
        from rpe.store import shared_prefix_len

        prefix_len = shared_prefix_len(enc, min_prefix)
    suffixes = [ids[prefix_len:] for ids in enc]
    ws = max(len(x) for x in suffixes)
    prefix = enc[0][:prefix_len]
    input_ids = torch.tensor([prefix + [pad] * (ws - len(x)) + x for x in suffixes])  # (B, P + ws)
    attention_mask = torch.tensor([[1] * prefix_len + [0] * (ws - len(x)) + [1] * len(x) for x in suffixes])
    width = prefix_len + ws
    extra: dict[str, Any] = {}
    if prefix_len:
        from rpe.store import batched_cache_kwargs, prefix_cache

        extra.update(batched_cache_kwargs(model, prefix_cache(model, prefix, device), len(enc), keep_original=False))
    if seed is not None:
        torch.manual_seed(seed)
    if stop_strings:
        extra.update(stop_strings=list(stop_strings), tokenizer=tokenizer)
    if token_logprobs:
        extra.update(output_logits=True, return_dict_in_generate=True)
    with torch.inference_mode():
        out = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            pad_token_id=pad,
            **sampling.generate_kwargs(),
            **extra,
        )
        logprobs: list[list[float]] = []
        if token_logprobs:
            new_tokens = out.sequences[:, width:]
            per_step = [torch.log_softmax(step.float(), -1).gather(-1, new_tokens[:, t, None]).squeeze(-1).cpu()
                        for t, step in enumerate(out.logits)]
            logprobs = torch.stack(per_step, 1).tolist() if per_step else [[] for _ in enc]
            out = out.sequences
    eos_ids = _eos_ids(model, tokenizer)
    completion_ids, texts, reasons, tails = [], [], [], []
    for row in out[:, width:].tolist():
        raw, reason = [], "length"
        for t in row:
            if t in eos_ids:
                reason = "eos"
                break
            raw.append(t)
        ids, text, stopped, tail = split_at_stop(tokenizer, raw, stop_strings)
        reason = "stop" if stopped else reason
        completion_ids.append(ids)
        texts.append(text)
        reasons.append(reason)
        tails.append(tail)
    logprobs = [lp[: len(ids)] for lp, ids in zip(logprobs, completion_ids)]
    return GeneratedBatch(enc, completion_ids, texts, reasons, [False] * len(enc), tails, logprobs)


def cut_at_stop(tokenizer, ids: list[int], stop_strings: Sequence[str]) -> tuple[list[int], str, bool]:
    """Cut a completion before the first stop string: ``(ids, text, stopped)``. Tokens whose text ends at or
    before the cut are kept (the last content token stays); a token reaching into the stop string is dropped."""
    return split_at_stop(tokenizer, ids, stop_strings)[:3]


def split_at_stop(tokenizer, ids: list[int], stop_strings: Sequence[str]) -> tuple[list[int], str, bool, list[int]]:
    """:func:`cut_at_stop` plus the cut-off ids up to the one whose text completes the stop string (empty
    unless stopped): ``kept + tail`` is the model's own tokenisation of the text through the stop string."""
    text = tokenizer.decode(ids, skip_special_tokens=True)
    hits = [(text.find(stop), stop) for stop in stop_strings if stop in text]
    if not hits:
        return ids, text, False, []
    cut, stop = min(hits)  # the earliest stop string
    ends = token_char_ends(tokenizer, ids)
    kept = next((i for i, e in enumerate(ends) if e > cut), len(ids))
    last = next((i for i, e in enumerate(ends) if e >= cut + len(stop)), len(ids) - 1)
    return ids[:kept], text[:cut], True, ids[kept : last + 1]


def _eos_ids(model, tokenizer) -> set[int]:
    ids = model.generation_config.eos_token_id
    ids = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    if tokenizer.pad_token_id is not None:
        ids.add(tokenizer.pad_token_id)
    return ids


def make_steps(tokenizer, completion_ids: list[int], text: str, segmenter: Segmenter, pattern: str | None) -> list[Step]:
    """Split a completion into :class:`Step` records with character and token spans."""
    spans = split_steps(text, segmenter, pattern)
    if not spans or not completion_ids:
        return []
    tspans = token_spans(spans, token_char_ends(tokenizer, completion_ids))
    return [Step(text[s.start : s.end], s.start, s.end, a, b) for s, (a, b) in zip(spans, tspans)]


# --------------------------------------------------------------------------------------------------------
# collection


def _work_items(problems: list[Problem], samples: int) -> list[tuple[Problem, int]]:
    return [(p, k) for p in problems for k in range(samples)]


def batch_seed(seed: int, batch_index: int) -> int:
    """The sampling seed of batch ``batch_index`` of a run seeded ``seed``."""
    return (seed * 1_000_003 + batch_index) % (2**63 - 1)


def _part_path(out_dir: Path, b: int) -> Path:
    return out_dir / PARTS_DIR / f"part-{b:05d}.parquet"


def _acts_path(out_dir: Path, b: int) -> Path:
    return out_dir / PARTS_DIR / f"acts-{b:05d}.safetensors"


def _without_nones(obj: Any) -> Any:
    """Drop None-valued keys recursively: an option added later with a None default does not make an older
    run folder look different."""
    if isinstance(obj, dict):
        return {k: _without_nones(v) for k, v in obj.items() if v is not None}
    return obj


def _check_run_config(out_dir: Path, config: dict[str, Any], overwrite: bool) -> None:
    path = out_dir / RUN_CONFIG_FILE
    if overwrite and out_dir.exists():
        for name in (TRAJECTORIES_FILE, MANIFEST_FILE, RUN_CONFIG_FILE, STATES_FILE):
            (out_dir / name).unlink(missing_ok=True)
        shutil.rmtree(out_dir / PARTS_DIR, ignore_errors=True)
    if path.exists():
        previous = json.loads(path.read_text())
        if _without_nones(previous) != _without_nones(config):
            diff = sorted(k for k in set(previous) | set(config) if previous.get(k) != config.get(k))
            raise ValueError(
                f"{out_dir} holds a run with a different configuration (differs in: {', '.join(diff)}). "
                "Use another --out folder, or pass --overwrite to discard the old run."
            )
    else:
        atomic_write_json(path, config)


def collect_rollouts(
    model,
    tokenizer,
    cfg: RolloutConfig,
    out_dir: str | Path,
    *,
    task: Task | None = None,
    model_name: str | None = None,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> RolloutResult:
    """Collect ``cfg.n_problems x cfg.samples`` trajectories into ``out_dir``, resuming finished batches.

    Args:
        model, tokenizer: a causal LM and its tokenizer (left padding; see :func:`rpe.models.load_model`).
        cfg: what to collect.
        out_dir: output folder (created).
        task: an already-built task (default: ``load_task(cfg.task)``).
        model_name: name recorded in the fingerprint (default: the model's ``name_or_path``).
        overwrite: discard a previous run in ``out_dir`` instead of resuming it.
        progress: called as ``progress(done_sequences, total_sequences)`` after each batch.

    Returns:
        A :class:`RolloutResult`; the records are in ``out_dir/trajectories.parquet``.
    """
    out_dir = Path(out_dir)
    task = task or load_task(cfg.task)
    fp = fingerprint(model, tokenizer, model_name).to_dict()
    run_config = {"rollout": cfg.to_dict(), "task_spec": task.spec(), "model": fp, "schema_version": SCHEMA_VERSION}
    out_dir.mkdir(parents=True, exist_ok=True)
    _check_run_config(out_dir, run_config, overwrite)
    if (out_dir / MANIFEST_FILE).exists() and (out_dir / TRAJECTORIES_FILE).exists():
        manifest = json.loads((out_dir / MANIFEST_FILE).read_text())
        shutil.rmtree(out_dir / PARTS_DIR, ignore_errors=True)
        return _result(out_dir, manifest)

    problems = list(task.problems(cfg.n_problems, seed=cfg.seed))
    if not problems:
        raise ValueError(f"task {task.name!r} produced no problems; check the task file or options")
    builder = PromptBuilder(task, tokenizer, cfg.prompt, seed=cfg.seed)
    items = _work_items(problems, cfg.samples)
    batches = [items[i : i + cfg.batch_size] for i in range(0, len(items), cfg.batch_size)]
    done = 0
    for b, batch in enumerate(batches):
        part = _part_path(out_dir, b)
        acts_part = _acts_path(out_dir, b)
        if part.exists() and _part_ok(part, len(batch)) and (not cfg.capture_layers or acts_part.exists()):
            done += len(batch)
            if progress:
                progress(done, len(items))
            continue
        prompt_texts = [builder(p) for p, _ in batch]

        def generate() -> GeneratedBatch:
            return generate_batch(
                model,
                tokenizer,
                prompt_texts,
                cfg.sampling,
                stop_strings=builder.stop_strings,
                max_prompt_tokens=cfg.max_prompt_tokens,
                seed=batch_seed(cfg.seed, b),
            )

        if cfg.capture_layers:
            from rpe.tracker import ActivationTracker

            neurons = torch.tensor(cfg.capture_neurons) if cfg.capture_neurons else None
            with ActivationTracker(model, cfg.capture_layers, neurons=neurons, record_all=True) as tracker:
                gen = generate()
            recorded = tracker.generated(drop_prefix=True)  # states never lie inside the shared prefix
        else:
            gen = generate()
        records = [
            _record(task, tokenizer, cfg, fp, problem, k, prompt_text, gen, i)
            for i, ((problem, k), prompt_text) in enumerate(zip(batch, prompt_texts))
        ]
        if cfg.capture_layers:
            width = max(len(ids) for ids in gen.prompt_ids) - tracker.prefix_tokens
            from rpe.store import states_from_generation

            states = states_from_generation(model, recorded, records, width, neurons, tokenizer.pad_token_id or 0)
            states.save(acts_part)  # before the part: a finished part always has its activations
        write_trajectories(part, records)
        done += len(batch)
        if progress:
            progress(done, len(items))
    return finalize_rollouts(out_dir, run_config, len(batches))


def _part_ok(path: Path, expected_rows: int) -> bool:
    """A part counts as finished only when it reads back whole with the expected row count."""
    try:
        return _read_table(path).num_rows == expected_rows
    except ValueError:
        logger.warning("ignoring damaged part %s; its batch will be regenerated", path)
        return False


def _record(task, tokenizer, cfg, fp, problem, k, prompt_text, gen: GeneratedBatch, i: int) -> Trajectory:
    text, ids = gen.texts[i], gen.completion_ids[i]
    steps = make_steps(tokenizer, ids, text, cfg.segmenter, cfg.segment_pattern)
    return Trajectory(
        schema_version=SCHEMA_VERSION,
        trajectory_id=f"{problem.id}#{k}",
        problem_id=problem.id,
        task=task.name,
        sample_index=k,
        prompt=prompt_text,
        completion=text,
        steps=steps,
        final_answer=extract_answer(text),
        reference_answer=problem.answer,
        reward=float(task.score(problem, text)),
        prompt_token_ids=gen.prompt_ids[i],
        completion_token_ids=ids,
        finish_reason=gen.finish_reasons[i],
        truncated=gen.finish_reasons[i] == "length",
        prompt_truncated=gen.prompt_truncated[i],
        model=fp,
        sampling=asdict(cfg.sampling),
        seed=cfg.seed,
    )


def finalize_rollouts(out_dir: Path, run_config: dict[str, Any], n_parts: int) -> RolloutResult:
    """Merge the parts into ``trajectories.parquet``, write the manifest, then remove the parts."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tables = [_with_fixed_types(_read_table(_part_path(out_dir, b))) for b in range(n_parts)]
    table = pa.concat_tables(tables)
    ids = table.column("trajectory_id").to_pylist()
    if len(set(ids)) != len(ids):
        raise RuntimeError(f"duplicate trajectory ids in the parts of {out_dir}; the run folder is inconsistent")
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    target = out_dir / TRAJECTORIES_FILE
    atomic_write_bytes(target, sink.getvalue().to_pybytes())
    files = {"trajectories": TRAJECTORIES_FILE}
    if run_config["rollout"].get("capture_layers"):
        from rpe.store import StateSet, merge_state_sets

        merged = merge_state_sets([StateSet.load(_acts_path(out_dir, b)) for b in range(n_parts)])
        merged.save(out_dir / STATES_FILE)
        files["states"] = STATES_FILE
    rewards = table.column("reward").to_pylist()
    n_steps = [len(s) for s in table.column("steps").to_pylist()]
    accuracy = sum(rewards) / len(rewards)
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "model": run_config["model"],
        "task": run_config["task_spec"],
        "rollout": run_config["rollout"],
        "sampling": run_config["rollout"]["sampling"],
        "seed": run_config["rollout"]["seed"],
        "n_trajectories": len(rewards),
        "n_problems": len(set(table.column("problem_id").to_pylist())),
        "accuracy": accuracy,
        "accuracy_ci95": list(wilson_interval(sum(rewards), len(rewards))),
        "mean_steps": sum(n_steps) / len(n_steps),
        "truncated_fraction": sum(table.column("truncated").to_pylist()) / len(rewards),
        "sha256": sha256_file(target),
        "files": files,
    }
    atomic_write_json(out_dir / MANIFEST_FILE, manifest)
    shutil.rmtree(out_dir / PARTS_DIR, ignore_errors=True)
    return _result(out_dir, manifest)


def _result(out_dir: Path, manifest: dict[str, Any]) -> RolloutResult:
    return RolloutResult(
        out_dir=out_dir,
        n_trajectories=manifest["n_trajectories"],
        accuracy=manifest["accuracy"],
        mean_steps=manifest["mean_steps"],
        manifest=manifest,
    )


__all__ = [
    "SCHEMA_VERSION",
    "RolloutConfig",
    "RolloutResult",
    "SamplingConfig",
    "Step",
    "Trajectory",
    "collect_rollouts",
    "generate_batch",
    "generate_from_ids",
    "read_trajectories",
    "wilson_interval",
]
