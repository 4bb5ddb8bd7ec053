"""Batched rollout collection into versioned, resumable Trajectory records: the collection loop and its manifest.

One ``model.generate`` call per batch of problems x samples (:mod:`rpe.generation`) produces whole completions;
they are split into steps (:mod:`rpe.segment`) and recorded as :class:`rpe.records.Trajectory` rows in Parquet.

On disk (``DIR``):
- ``run_config.json``: what the run was asked to do; a resumed run must ask for the same thing.
- ``parts/part-NNNNN.parquet``: one file per finished batch, each written atomically (temp file + rename).
- ``trajectories.parquet`` and ``manifest.json``: written atomically once every batch is done; the manifest
  holds the model fingerprint, task, sampling config, seed, accuracy and the sha256 of the Parquet file.

Killing a run loses at most the batch in flight: the rerun skips finished parts, and batch b is always drawn
with seed ``(seed, b)``, so the result is the same as an uninterrupted run's.

Launched on several processes (``torchrun`` / ``accelerate launch``; :mod:`rpe.distributed`), rank r takes
batches b with b % world == r, on its own device, and writes only their parts; the main rank merges them into
the same ``trajectories.parquet`` and manifest a one-process run with the same seed writes.

Example:
    >>> cfg = RolloutConfig(task="chain_sum", n_problems=8, samples=2)  # doctest: +SKIP
    >>> result = collect_rollouts(model, tokenizer, cfg, "runs/demo")  # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from rpe.decoding import BOUNDARY_SEGMENTERS
from rpe.distributed import Ranks, barrier, broadcast_object, current_ranks
from rpe.generation import generate_batch, resolve_engine
from rpe.sampling import GeneratedBatch, SamplingConfig
from rpe.metrics import wilson_interval
from rpe.models import fingerprint, unwrap_model
from rpe.prompts import PromptBuilder, PromptConfig, resolve_style
from rpe.records import (
    MANIFEST_FILE,
    SCHEMA_VERSION,
    TRAJECTORIES_FILE,
    Step,
    Trajectory,
    read_table,
    with_fixed_types,
    atomic_write_bytes,
    atomic_write_json,
    sha256_file,
    write_trajectories,
)
from rpe.segment import Segmenter, split_steps, token_char_ends, token_spans
from rpe.answers import extract_answer
from rpe.tasks import Problem, Task, draw_problems, load_task, question_key

logger = logging.getLogger(__name__)

RUN_CONFIG_FILE = "run_config.json"
PARTS_DIR = "parts"
STATES_FILE = "states.safetensors"
"""Segmenters whose step ends sit next to a newline: capture during generation keeps only those tokens."""

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase



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
    """Sequences per generation call (and per part file)."""
    engine: str = "continuous"
    """Generation engine (:mod:`rpe.generation`): ``continuous`` (finished rows leave the batch; per-row
    sampling streams) or ``generate`` (one padded ``model.generate``; the engine of runs made before it existed:
    pass it to resume one). Architectures without continuous support use ``generate``."""
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
    passes, no second pass); written to ``states.safetensors`` for ``rpe fit``. With the ``paragraph``,
    ``newline`` and ``sentence`` segmenters only the tokens at step boundaries are kept while generating
    (:class:`rpe.decoding.BoundaryKeeper`), so memory grows with steps, not tokens."""
    capture_neurons: list[int] | None = None
    """Keep only these neuron columns when capturing (default: all of d_model)."""
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    stop_bundle: str | None = None
    """Early stopping (:mod:`rpe.rollout_stop`): a bundle folder whose internal value stops a sample while it is
    generated, once its V after a step (from ``stop_after_step`` on) is below ``stop_below``; none of its later
    tokens are generated and its record says ``finish_reason="value"``. Continuous engine only."""
    stop_below: float | None = None
    """The value below which a sample is stopped (default 0.1 with ``stop_bundle``)."""
    stop_after_step: int | None = None
    """The first step after which a sample may be stopped (default 1 with ``stop_bundle``)."""
    exclude_questions: list[str] | None = None
    """Question keys (:func:`rpe.tasks.question_key`) never drawn: a held-out evaluation passes its fitting run's
    (``RolloutSettings.question_keys``), so no question is both fitted on and scored, whatever the task kind."""

    def __post_init__(self) -> None:
        if isinstance(self.sampling, dict):
            self.sampling = SamplingConfig(**self.sampling)
        if isinstance(self.prompt, dict):
            self.prompt = PromptConfig(**self.prompt)
        if self.engine not in ("continuous", "generate"):
            raise ValueError(f"engine must be continuous or generate, got {self.engine!r}")
        for name in ("n_problems", "samples", "batch_size", "max_prompt_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.segmenter == "regex" and not self.segment_pattern:
            raise ValueError("segmenter='regex' needs segment_pattern")
        if self.stop_bundle is None and (self.stop_below is not None or self.stop_after_step is not None):
            raise ValueError("stop_below / stop_after_step need stop_bundle (the bundle whose value stops samples)")
        if self.stop_bundle is not None:
            self.stop_below = 0.1 if self.stop_below is None else self.stop_below
            self.stop_after_step = 1 if self.stop_after_step is None else self.stop_after_step

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RolloutResult:
    """Summary of a finished collection."""

    out_dir: Path
    n_trajectories: int
    accuracy: float
    mean_steps: float
    manifest: dict[str, Any]


# --------------------------------------------------------------------------------------------------------
# steps


def make_steps(tokenizer, completion_ids: list[int], text: str, segmenter: Segmenter, pattern: str | None, *,
               skip_special_tokens: bool = True) -> list[Step]:
    """Split a completion into :class:`Step` records with character and token spans.

    ``text`` is ``completion_ids`` decoded with ``skip_special_tokens`` (generation's text skips them); the
    token spans come from the same decoding, so a special token inside a completion (an end-of-turn token the
    model wrote mid-way) adds no characters and shifts no span."""
    spans = split_steps(text, segmenter, pattern)
    if not spans or not completion_ids:
        return []
    tspans = token_spans(spans, token_char_ends(tokenizer, completion_ids, skip_special_tokens=skip_special_tokens))
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
        if isinstance(previous.get("rollout"), dict):  # folders made before engines existed used model.generate
            previous["rollout"].setdefault("engine", "generate")
        if _without_nones(previous) != _without_nones(config):
            diff = sorted(k for k in set(previous) | set(config) if previous.get(k) != config.get(k))
            engines = (previous.get("rollout") or {}).get("engine"), config["rollout"]["engine"]
            hint = f" The folder was generated with engine {engines[0]!r}: pass --engine {engines[0]} to resume it." \
                if engines[0] != engines[1] else ""
            raise ValueError(
                f"{out_dir} holds a run with a different configuration (differs in: {', '.join(diff)}).{hint} "
                "Use another --out folder, or pass --overwrite to discard the old run."
            )
    else:
        atomic_write_json(path, config)


def collect_rollouts(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
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
        model: a causal LM (see :func:`rpe.models.load_model`).
        tokenizer: its tokenizer (left padding).
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
    engine = resolve_engine(model, cfg.engine)
    value_stop = _value_stop(model, tokenizer, cfg, engine)
    rollout = {**cfg.to_dict(), "engine": engine}  # the engine that runs, not only the one asked for
    run_config = {"rollout": rollout, "task_spec": task.spec(), "model": fp, "schema_version": SCHEMA_VERSION}
    if resolve_style(cfg.prompt, tokenizer) == "completion":  # tokenised with the tokenizer's BOS, as TRL does
        run_config["prompt_special_tokens"] = True  # (a folder from before, without it, cannot be resumed into)
    ranks = current_ranks()
    _start_run(out_dir, run_config, overwrite, ranks)
    if (out_dir / MANIFEST_FILE).exists() and (out_dir / TRAJECTORIES_FILE).exists():
        manifest = json.loads((out_dir / MANIFEST_FILE).read_text())
        if ranks.is_main:
            shutil.rmtree(out_dir / PARTS_DIR, ignore_errors=True)
        return _result(out_dir, manifest)

    problems = draw_problems(task, cfg.n_problems, cfg.seed, cfg.exclude_questions)
    if not problems:
        raise ValueError(f"task {task.name!r} produced no problems; check the task file or options")
    # the worked examples are never questions this run asks
    builder = PromptBuilder(task, tokenizer, cfg.prompt, seed=cfg.seed, exclude_questions=[question_key(p) for p in problems])
    items = _work_items(problems, cfg.samples)
    batches = [items[i : i + cfg.batch_size] for i in range(0, len(items), cfg.batch_size)]
    own = [b for b in range(len(batches)) if ranks.owns(b)]  # every batch in one process; round-robin when launched
    total = sum(len(batches[b]) for b in own)
    done = 0
    for b in own:
        batch = batches[b]
        part = _part_path(out_dir, b)
        acts_part = _acts_path(out_dir, b)
        if part.exists() and _part_ok(part, len(batch)) and (not cfg.capture_layers or acts_part.exists()):
            done += len(batch)
            if progress:
                progress(done, total)
            continue
        prompt_texts = [builder(p) for p, _ in batch]

        neurons = torch.tensor(cfg.capture_neurons) if cfg.capture_neurons else None
        continuous = bool(cfg.capture_layers) and engine == "continuous"

        def generate() -> GeneratedBatch:
            return generate_batch(
                model,
                tokenizer,
                prompt_texts,
                cfg.sampling,
                stop_strings=builder.stop_strings,
                add_special_tokens=builder.add_special_tokens,
                max_prompt_tokens=cfg.max_prompt_tokens,
                seed=batch_seed(cfg.seed, b),
                engine=engine,
                record_layers=cfg.capture_layers if continuous else None,
                record_neurons=neurons if continuous else None,
                record_boundaries_only=cfg.segmenter if continuous and cfg.segmenter in BOUNDARY_SEGMENTERS else False,
                value_stop=value_stop,
            )

        kept = None
        if cfg.capture_layers and not continuous:
            from rpe.tracker import ActivationTracker

            with ActivationTracker(model, cfg.capture_layers, neurons=neurons, record_all=True) as tracker:
                gen = generate()
            recorded = tracker.generated(drop_prefix=True)  # states never lie inside the shared prefix
            width = max(len(ids) for ids in gen.prompt_ids) - tracker.prefix_tokens
        else:
            gen = generate()
            if continuous:  # per row: its prompt after the shared prefix, then its fed-back tokens
                recorded = gen.activations
                width = [len(ids) - gen.prefix_len for ids in gen.prompt_ids]
                kept = gen.activation_positions
        records = [
            _record(task, tokenizer, cfg, fp, problem, k, prompt_text, gen, i)
            for i, ((problem, k), prompt_text) in enumerate(zip(batch, prompt_texts))
        ]
        if cfg.capture_layers:
            from rpe.store import states_from_generation

            states = states_from_generation(model, recorded, records, width, neurons, tokenizer.pad_token_id or 0,
                                            positions=kept)
            states.save(acts_part)  # before the part: a finished part always has its activations
        write_trajectories(part, records)
        done += len(batch)
        if progress:
            progress(done, total)
    barrier()  # every rank's parts are written
    if ranks.is_main:
        result = finalize_rollouts(out_dir, run_config, len(batches))
    barrier()  # the merged files are written
    return result if ranks.is_main else _result(out_dir, json.loads((out_dir / MANIFEST_FILE).read_text()))


def _value_stop(model, tokenizer, cfg: RolloutConfig, engine: str):
    """The :class:`rpe.rollout_stop.ValueStop` of ``cfg.stop_bundle`` (checked against the model), or None."""
    if cfg.stop_bundle is None:
        return None
    from rpe.bundle import SubsystemBundle
    from rpe.rollout_stop import ValueStop

    if engine != "continuous":
        raise ValueError(f"early stopping (stop_bundle) needs the continuous engine; this run uses {engine!r}"
                         + (" (the model's cache is not plain full attention)" if cfg.engine == "continuous" else ""))
    bundle = SubsystemBundle.load(cfg.stop_bundle, model=unwrap_model(model), tokenizer=tokenizer)
    return ValueStop(bundle, cfg.stop_below, after_step=cfg.stop_after_step, segmenter=cfg.segmenter,
                     pattern=cfg.segment_pattern)


def _start_run(out_dir: Path, run_config: dict[str, Any], overwrite: bool, ranks: Ranks) -> None:
    """Create ``out_dir`` and check (or write) its run configuration: on the main rank first (which alone
    discards an old run under ``overwrite``), then on the others; a refusal is raised on every rank."""
    refusal = None
    if ranks.is_main:
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            _check_run_config(out_dir, run_config, overwrite)
        except (ValueError, OSError) as err:
            refusal = f"{type(err).__name__}: {err}" if isinstance(err, OSError) else str(err)
    refusal = broadcast_object(refusal)  # also the barrier: the others read the folder after the main rank
    if refusal is None and not ranks.is_main:
        _check_run_config(out_dir, run_config, overwrite=False)
    if refusal is not None:
        raise ValueError(refusal)


def _part_ok(path: Path, expected_rows: int) -> bool:
    """A part counts as finished only when it reads back whole with the expected row count."""
    try:
        return read_table(path).num_rows == expected_rows
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

    tables = [with_fixed_types(read_table(_part_path(out_dir, b))) for b in range(n_parts)]
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
        "completion_tokens": sum(len(ids) for ids in table.column("completion_token_ids").to_pylist()),
        "stopped_by_value": sum(r == "value" for r in table.column("finish_reason").to_pylist()),
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


@dataclass
class RolloutSettings:
    """What a finished rollout folder was collected with: its configuration (prompt, sampling, segmenter), the
    task's spec (:meth:`rpe.tasks.Task.spec`, loadable with :func:`rpe.tasks.load_task`) and the model's name."""

    config: RolloutConfig
    task_spec: dict[str, Any]
    model_name: str
    _task: Task | None = field(default=None, repr=False, compare=False)

    def task(self) -> Task:
        """The task, built again from its spec (once; later calls return the same object)."""
        if self._task is None:
            self._task = load_task(self.task_spec)
        return self._task

    def problems(self) -> list[Problem]:
        """The run's problems, drawn again (deterministic for the run's seed and exclusions)."""
        c = self.config
        return draw_problems(self.task(), c.n_problems, c.seed, c.exclude_questions)

    def question_keys(self) -> list[str]:
        """:func:`rpe.tasks.question_key` of every problem the run used, sorted."""
        return sorted({question_key(p) for p in self.problems()})


def rollout_settings(folder: str | Path) -> RolloutSettings | None:
    """The settings of the rollout folder ``folder`` from its manifest; None when it has no manifest."""
    path = Path(folder) / MANIFEST_FILE
    if not path.is_file():
        return None
    meta = json.loads(path.read_text())
    return RolloutSettings(RolloutConfig(**meta["rollout"]), meta["task"], meta["model"]["name"])


__all__ = ["RolloutConfig", "RolloutResult", "RolloutSettings", "collect_rollouts", "rollout_settings"]
