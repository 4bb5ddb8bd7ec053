"""The paper's protocol as one resumable pipeline in one folder (``rpe reproduce``).

Stages, each an ``rpe`` command whose exact line is written to ``OUT/commands.sh`` (the seven-command sequence
stays possible, and any stage can be re-run by hand):

=========== ============================================== =================================================
stage       command                                        complete when
=========== ============================================== =================================================
rollouts    ``rpe rollouts`` with a layer sweep captured   ``rollouts/manifest.json`` (written last)
fit         ``rpe fit`` (every control, sparsity control)  ``bundle/`` loads and holds cross-validated metrics
ablate      ``rpe ablate`` at the best (and early) layers  ``ablation/results.json`` holds every planned layer
dopamine    ``rpe dopamine`` (Monte-Carlo values, RPE)     the bundle holds dopamine metrics
search      ``rpe search`` (value vs random vs greedy)     ``search.json`` holds every planned method
report      ``rpe analyze`` with the results above         ``report/report.html``
=========== ============================================== =================================================

A stage is skipped when ``OUT/reproduce.json`` records it finished *and* its outputs are still complete; a stage
that runs again invalidates every later one (their outputs are derived from it). Inside a stage the command's own
resume applies (rollouts and ablation arms continue their part files, dopamine its Monte-Carlo cache, search its
finished methods), so a killed run continues where it stopped. A folder made with other settings is refused.

Budgets (:data:`BUDGETS`): ``smoke`` runs every stage on a handful of problems (tests; it measures nothing),
``small`` is sized for about 10 minutes on 2 CPU cores with SmolLM2-135M, ``paper`` for intervals of about
+-0.03 at s_0 (>= 1,500 trajectories, >= 500 problems per ablation arm, >= 300 surprising steps).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rpe.models import DEFAULT_MODEL
from rpe.records import atomic_write_json
from rpe.tasks import DEFAULT_TASK

STATE_FILE = "reproduce.json"
COMMANDS_FILE = "commands.sh"
STAGES: tuple[str, ...] = ("rollouts", "fit", "ablate", "dopamine", "search", "report")
SEARCH_METHODS = ("greedy", "value", "random")


@dataclass(frozen=True)
class Budget:
    """How much of each stage a budget runs."""

    name: str
    purpose: str
    n_problems: int
    """Problems of the fitting rollouts."""
    samples: int
    """Completions per problem (trajectories = n_problems x samples)."""
    max_new_tokens: int
    batch_size: int
    sweep_layers: int
    """Layers captured for the layer sweep, spread evenly over the depth (all layers when the model has fewer)."""
    sparsity_draws: int
    compare_probes: bool
    epochs: int
    """MLP probe epochs (early stopping on validation)."""
    n_boot: int
    """Bootstrap resamples of every interval."""
    ablation_problems: int
    """Held-out problems per ablation arm."""
    ablation_early_layers: bool
    """Also ablate at the paper's early layers (2 and 5 of 28, scaled to the model's depth)."""
    ablation_controls: tuple[str, ...]
    ablation_seeds: int
    dopamine_trajectories: int
    """Trajectories whose states get Monte-Carlo values in the dopamine stage; 0 leaves the stage out."""
    n_continuations: int
    dopamine_threshold: float
    """|RPE| above which a step counts as surprising (``rpe dopamine --threshold``)."""
    search_problems: int
    """Problems of the search stage; 0 leaves the stage out at this budget."""
    search_candidates: int
    search_step_tokens: int

    @property
    def n_trajectories(self) -> int:
        return self.n_problems * self.samples


BUDGETS: dict[str, Budget] = {
    "smoke": Budget("smoke", "every stage on a handful of problems: checks that the pipeline runs, measures nothing",
                    n_problems=16, samples=2, max_new_tokens=48, batch_size=16, sweep_layers=2, sparsity_draws=2,
                    compare_probes=False, epochs=10, n_boot=200, ablation_problems=6, ablation_early_layers=False,
                    ablation_controls=("value", "random_matched"), ablation_seeds=1, dopamine_trajectories=32,
                    n_continuations=2, dopamine_threshold=0.05, search_problems=3, search_candidates=2, search_step_tokens=16),
    "small": Budget("small", "about 10 minutes on 2 CPU cores with SmolLM2-135M: the value rows have power, the "
                    "interventions are too small to decide (search is left out: a few dozen problems cannot decide it)",
                    n_problems=150, samples=2, max_new_tokens=128, batch_size=32, sweep_layers=4, sparsity_draws=5,
                    compare_probes=False, epochs=100, n_boot=1000, ablation_problems=64, ablation_early_layers=False,
                    ablation_controls=("value", "random_matched"), ablation_seeds=1, dopamine_trajectories=0,
                    n_continuations=4, dopamine_threshold=0.2, search_problems=0, search_candidates=4, search_step_tokens=32),
    "paper": Budget("paper", "the paper's protocol with power: intervals of about +-0.03 at s_0, >= 500 problems "
                    "per ablation arm, >= 300 surprising steps",
                    n_problems=800, samples=2, max_new_tokens=128, batch_size=32, sweep_layers=18, sparsity_draws=20,
                    compare_probes=True, epochs=100, n_boot=1000, ablation_problems=500, ablation_early_layers=True,
                    ablation_controls=("value", "random", "random_matched"), ablation_seeds=3,
                    dopamine_trajectories=1100, n_continuations=4, dopamine_threshold=0.2, search_problems=200, search_candidates=4,
                    search_step_tokens=32),
}


@dataclass
class ReproduceConfig:
    """Options of ``rpe reproduce`` (the folder's ``reproduce.json`` keeps them; a rerun must match)."""

    model: str = DEFAULT_MODEL
    task: str = DEFAULT_TASK
    budget: str = "small"
    """A key of :data:`BUDGETS`: smoke, small or paper."""
    task_options: tuple[str, ...] = ()
    """``KEY=VALUE`` task options, as ``rpe rollouts --task-option`` takes them (an hf: task's split, config,
    column mapping; a reasoning-gym task's difficulty)."""
    seed: int = 0
    """Seed of the fitting rollouts, folds and probes (held-out ablation and search problems use seed + 1)."""
    skip: tuple[str, ...] = ()
    """Stages left out (any of ablate, dopamine, search); the report says which."""
    device: str = "auto"
    dtype: str = "auto"
    device_map: str | None = None
    attn_implementation: str | None = None

    def __post_init__(self) -> None:
        if self.budget not in BUDGETS:
            raise ValueError(f"unknown budget {self.budget!r}; choose one of {', '.join(BUDGETS)}")
        self.skip = tuple(self.skip)
        self.task_options = tuple(self.task_options)
        self.task_kwargs()  # a malformed option is refused here, before any model loads
        optional = ("ablate", "dopamine", "search")
        bad = [s for s in self.skip if s not in optional]
        if bad:
            raise ValueError(f"cannot skip {', '.join(bad)}: only {', '.join(optional)} are optional stages")

    @property
    def spec(self) -> Budget:
        return BUDGETS[self.budget]

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "skip": list(self.skip), "task_options": list(self.task_options)}

    def task_kwargs(self) -> dict[str, Any]:
        """:attr:`task_options` as ``load_task`` keyword arguments (:func:`rpe.tasks.parse_task_options`)."""
        from rpe.tasks import parse_task_options

        return parse_task_options(self.task_options)


def sweep_layers(n_layers: int, count: int) -> list[int]:
    """``count`` layers spread evenly over ``0..n_layers-1`` (first and last included); all when fewer."""
    if count >= n_layers or count < 2:
        return list(range(n_layers)) if count >= n_layers else [n_layers - 1]
    return sorted({round(i * (n_layers - 1) / (count - 1)) for i in range(count)})


def early_layers(n_layers: int) -> list[int]:
    """The paper's early ablation layers (2 and 5 of Qwen's 28), scaled to ``n_layers``."""
    return sorted({min(n_layers - 1, max(1, round(f * n_layers))) for f in (2 / 28, 5 / 28)})


@dataclass
class Stage:
    """One step of the pipeline: the ``rpe`` command it runs and how to tell that it finished."""

    name: str
    what: str
    argv: Callable[[], list[str]]
    """The command's arguments (after ``rpe``); called when the stage runs (ablate needs the fitted layer)."""
    complete: Callable[[], bool]
    outputs: tuple[Path, ...]
    """What this stage alone writes (removed when an earlier stage runs again)."""
    skipped: str = ""
    """Why the stage does not run, or empty."""


@dataclass
class Estimate:
    """Seconds each stage should take on this machine, from a short measured warm-up."""

    seconds: dict[str, float]

    @property
    def total(self) -> float:
        return sum(self.seconds.values())


def _device_args(cfg: ReproduceConfig) -> list[str]:
    args = ["--device", cfg.device, "--dtype", cfg.dtype]
    if cfg.device_map:
        args += ["--device-map", cfg.device_map]
    if cfg.attn_implementation:
        args += ["--attn-implementation", cfg.attn_implementation]
    return args


def _bundle_metrics(bundle: Path) -> dict[str, Any] | None:
    try:
        return json.loads((bundle / "bundle.json").read_text())["metrics"]
    except (OSError, ValueError, KeyError):
        return None


def _json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def load_state(cfg: ReproduceConfig, out: str | Path) -> dict[str, Any]:
    """The record of the run in ``out`` (``reproduce.json``), or a new one. Raises ValueError when the folder
    holds a run with other settings (where it runs, device and dtype, may change between resumes)."""
    path = Path(out) / STATE_FILE
    state = _json(path) if path.exists() else None
    if state is None and path.exists():
        raise ValueError(f"{path} is not valid JSON; move it away to start this folder over")
    if state is not None:
        mine, theirs = cfg.to_dict(), state.get("config", {})
        keep = ("device", "dtype", "device_map", "attn_implementation")
        default = ReproduceConfig().to_dict()  # a key the folder's record predates reads as its default
        differ = [k for k in mine if k not in keep and theirs.get(k, default[k]) != mine[k]]
        if differ:
            raise ValueError(f"{out} holds a run with other settings ({', '.join(f'{k}: {theirs.get(k)!r}' for k in differ)}); "
                             "give another --out, or the same settings to continue it")
    return state or {"config": cfg.to_dict(), "stages": {}}


class Pipeline:
    """The stages of one ``rpe reproduce`` folder and their state.

    Args:
        cfg: the options.
        out: the folder (created).
        n_layers: the model's decoder layers (the layer sweep and the early ablation layers are spread over them).
        completion_prompts: the model takes plain completion prompts (no chat template): ``rpe search`` does not
            support them yet, so its stage is skipped with that reason.
    """

    def __init__(self, cfg: ReproduceConfig, out: str | Path, *, n_layers: int, completion_prompts: bool = False):
        self.cfg, self.out, self.n_layers = cfg, Path(out), n_layers
        b = cfg.spec
        self.capture = sweep_layers(n_layers, b.sweep_layers)
        self.rollouts, self.bundle = self.out / "rollouts", self.out / "bundle"
        self.ablation, self.search_json, self.report = self.out / "ablation", self.out / "search.json", self.out / "report"
        dev = _device_args(cfg)
        held_out_seed = str(cfg.seed + 1)
        ro, bu = str(self.rollouts), str(self.bundle)

        counted: dict[int, int] = {}  # the rollouts do not change once they exist: count once

        def held_out(n: int) -> int:
            """``n``, or fewer when the task has fewer questions outside the fitting run's."""
            from rpe.rollouts import rollout_settings
            from rpe.tasks import held_out_count

            if n in counted:
                return counted[n]
            settings = rollout_settings(self.rollouts)
            if settings is None:  # before the rollouts exist (the plan): the budget's number
                return n
            counted[n] = held_out_count(settings.task(), n, cfg.seed + 1, settings.question_keys())
            return counted[n]

        def ablate_layers() -> list[int]:
            layer = json.loads((self.bundle / "bundle.json").read_text())["layer"]
            return sorted(set(early_layers(n_layers) if b.ablation_early_layers else []) | {int(layer)})

        def ablation_done() -> bool:
            res = _json(self.ablation / "results.json")
            return bool(res) and (self.ablation / "ablation.png").is_file() and \
                {str(x) for x in ablate_layers()} <= set(res.get("layers", {}))

        def search_done() -> bool:
            res = _json(self.search_json)
            return bool(res) and set(SEARCH_METHODS) <= set(res.get("methods", {})) and \
                res.get("n_problems") == b.search_problems

        self.stages = [
            Stage("rollouts", f"{b.n_trajectories} trajectories ({b.n_problems} problems x {b.samples}), activations "
                  f"captured at layers {','.join(map(str, self.capture))}",
                  lambda: ["rollouts", "--model", cfg.model, "--task", cfg.task,
                           *[x for o in cfg.task_options for x in ("--task-option", o)], "--n-problems", str(b.n_problems),
                           "--samples", str(b.samples), "--batch-size", str(b.batch_size), "--max-new-tokens",
                           str(b.max_new_tokens), "--capture-layers", ",".join(map(str, self.capture)), "--seed",
                           str(cfg.seed), "--out", ro, *dev],
                  lambda: (self.rollouts / "manifest.json").is_file() and (self.rollouts / "trajectories.parquet").is_file(),
                  (self.rollouts,)),
            Stage("fit", f"cross-validated layer sweep, value neurons with every control, sparsity control "
                  f"({b.sparsity_draws} random sets per fraction)" + (", every probe family x target" if b.compare_probes else ""),
                  lambda: ["fit", "--rollouts", ro, "--out", bu, "--sparsity-draws", str(b.sparsity_draws), "--epochs",
                           str(b.epochs), "--n-boot", str(b.n_boot), "--seed", str(cfg.seed), *(["--compare-probes"] if b.compare_probes else []), *dev],
                  lambda: "headline_cv" in (_bundle_metrics(self.bundle) or {}) and (self.bundle / "weights.safetensors").is_file(),
                  (self.bundle,)),
            Stage("ablate", f"accuracy with the value neurons zeroed vs {', '.join(b.ablation_controls[1:])} sets of the same "
                  f"size, {b.ablation_problems} held-out problems per arm, at the best layer"
                  + (f" and layers {','.join(map(str, early_layers(n_layers)))}" if b.ablation_early_layers else ""),
                  lambda: ["ablate", "--bundle", bu, "--rollouts", ro, "--out", str(self.ablation), "--n-problems",
                           str(held_out(b.ablation_problems)), "--layers", ",".join(map(str, ablate_layers())), "--controls",
                           ",".join(b.ablation_controls), "--seeds", str(b.ablation_seeds), "--seed", held_out_seed, *dev],
                  ablation_done, (self.ablation,)),
            Stage("dopamine", f"Monte-Carlo values of the states of {b.dopamine_trajectories} trajectories "
                  f"({b.n_continuations} continuations each), TD errors, dopamine neurons vs random sets",
                  lambda: ["dopamine", "--rollouts", ro, "--bundle", bu, "--n-continuations", str(b.n_continuations),
                           "--max-trajectories", str(b.dopamine_trajectories), "--threshold", str(b.dopamine_threshold), "--seed",
                           str(cfg.seed), *dev],
                  lambda: "dopamine" in (_bundle_metrics(self.bundle) or {}), (),
                  skipped="not at this budget (a few dozen trajectories give ~15 surprising steps, >= 300 decide it); "
                          "--budget paper runs it" if not b.dopamine_trajectories else ""),
            Stage("search", f"step-level search on {b.search_problems} held-out problems, {b.search_candidates} candidates "
                  f"per step: {', '.join(SEARCH_METHODS)}",
                  lambda: ["search", "--bundle", bu, "--rollouts", ro, "--n-problems", str(b.search_problems),
                           "--methods", ",".join(SEARCH_METHODS), "--candidates", str(b.search_candidates),
                           "--max-step-tokens", str(b.search_step_tokens), "--seed", held_out_seed, "--out",
                           str(self.search_json), *dev],
                  search_done, (self.search_json,),
                  skipped="rpe search supports chat-style models only" if completion_prompts else
                  "not at this budget (too few problems to decide it); --budget paper runs it" if not b.search_problems else ""),
            Stage("report", "the HTML report, the report card first",
                  lambda: ["analyze", "--rollouts", ro, "--bundle", bu, "--out", str(self.report), "--title",
                           f"rpe reproduce: {cfg.model} on {cfg.task} ({cfg.budget} budget)",
                           *(["--ablation", str(self.ablation)] if self.ran("ablate") else []),
                           *(["--search", str(self.search_json)] if self.ran("search") else []), *dev],
                  lambda: (self.report / "report.html").is_file(), (self.report,)),
        ]
        for s in self.stages:
            if s.name in cfg.skip:
                s.skipped = "left out with --skip"
        self.state = load_state(cfg, self.out)

    # -- state --------------------------------------------------------------------------------------------------

    def save_state(self) -> None:
        self.state["config"] = self.cfg.to_dict()
        atomic_write_json(self.out / STATE_FILE, self.state)

    def ran(self, name: str) -> bool:
        """The stage finished in this folder (recorded and its outputs complete)."""
        stage = self.stage(name)
        return not stage.skipped and bool(self.state["stages"].get(name, {}).get("done")) and stage.complete()

    def stage(self, name: str) -> Stage:
        return next(s for s in self.stages if s.name == name)

    def pending(self) -> list[Stage]:
        """The stages that will run, in order (the first one not finished and everything after it)."""
        todo = [s for s in self.stages if not s.skipped]
        for i, s in enumerate(todo):
            if not self.ran(s.name):
                return todo[i:]
        return []

    def write_commands(self) -> None:
        """``OUT/commands.sh``: the stages as ``rpe`` command lines (ablate's layer is known after fit)."""
        import shlex

        lines = ["#!/bin/sh", f"# rpe reproduce --model {self.cfg.model} --task {self.cfg.task} --budget {self.cfg.budget}",
                 "set -e"]
        for s in self.stages:
            if s.skipped:
                lines.append(f"# {s.name}: skipped ({s.skipped})")
                continue
            try:
                lines.append("rpe " + shlex.join(s.argv()))
            except (OSError, KeyError, ValueError):
                lines.append(f"# {s.name}: its command is known once the bundle is fitted")
        (self.out / COMMANDS_FILE).write_text("\n".join(lines) + "\n")

    # -- running ------------------------------------------------------------------------------------------------

    def run(self, run_command: Callable[[list[str]], int], *, on_stage: Callable[[Stage, str], None] | None = None,
            stop_after: str | None = None) -> list[str]:
        """Run the pending stages with ``run_command`` (``rpe`` arguments -> exit code); returns the names of the
        stages that ran. Raises :class:`StageFailed` naming the stage and its command when one fails; what the
        earlier stages wrote stays, and the next call continues from the failed stage. ``stop_after``: end after
        that stage (the tests' stand-in for a kill at a stage boundary)."""
        self.out.mkdir(parents=True, exist_ok=True)
        self.save_state()
        ran: list[str] = []
        pending = self.pending()
        for i, stage in enumerate(pending):
            if i == 0:
                self._invalidate_after(stage)
            if on_stage:
                on_stage(stage, "start")
            argv = stage.argv()
            self.write_commands()
            t0 = time.perf_counter()
            rc = run_command(argv)
            if rc != 0 or not stage.complete():
                raise StageFailed(stage.name, argv, rc)
            self.state["stages"][stage.name] = {"done": True, "seconds": round(time.perf_counter() - t0, 1),
                                                "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
            self.save_state()
            ran.append(stage.name)
            if on_stage:
                on_stage(stage, "done")
            if stage.name == stop_after:
                break
        self.write_commands()
        return ran

    def _invalidate_after(self, first: Stage) -> None:
        """``first`` runs again: every later stage's record and outputs go (they were derived from its old output)."""
        later = self.stages[self.stages.index(first) + 1:]
        for s in later:
            self.state["stages"].pop(s.name, None)
            for path in s.outputs:
                if path.is_dir():
                    shutil.rmtree(path)
                elif path.exists():
                    path.unlink()

    # -- estimate -----------------------------------------------------------------------------------------------

    def estimate(self, batch_s: float, probe_fit_s: float) -> Estimate:
        """Seconds per pending stage from two measured costs (:func:`warm_up`): one batch of the rollouts
        (``batch_s``) and one linear-probe fit at this model's width (``probe_fit_s``). Rough, within a factor of
        about 2: completion lengths and step counts are guessed (3 steps, continuations half a completion, a
        search step a quarter of the budget), and the constants were calibrated on SmolLM2-135M on 2 CPU cores
        (400 trajectories: rollouts 3.1 min, fit 3.1 min, report 2.7 min; 1,600 trajectories with 18 layers: fit
        11 min)."""
        b = self.cfg.spec
        steps = 3.0

        batch_s = 0.6 * batch_s  # the timed batch is the process's first: later ones ran 0.6x its time

        def batches(rows: float) -> float:
            return math.ceil(rows / b.batch_size)

        early = len(early_layers(self.n_layers)) if b.ablation_early_layers else 0
        arms = 1 + (1 + (len(b.ablation_controls) - 1) * b.ablation_seeds) * (1 + early)
        n = b.n_trajectories
        step_share = b.search_step_tokens / b.max_new_tokens
        seconds = {
            "rollouts": batches(n) * batch_s,
            "fit": 3 * probe_fit_s * n * (4 + len(self.capture) / 3 + b.sparsity_draws / 2),
            "ablate": arms * batches(b.ablation_problems) * batch_s,
            "dopamine": batches(min(n, b.dopamine_trajectories) * steps * b.n_continuations) * batch_s * 0.5,
            "search": len(SEARCH_METHODS) * batches(b.search_problems * b.search_candidates) * (steps + 1)
            * step_share * batch_s,
            "report": 0.8 * n / b.batch_size * batch_s,  # a forward over every trajectory, plus the baselines
        }
        names = {s.name for s in self.pending()}
        return Estimate({k: v for k, v in seconds.items() if k in names})


class StageFailed(RuntimeError):
    """A stage's command failed; what earlier stages wrote stays, and a rerun continues from this stage."""

    def __init__(self, stage: str, argv: Sequence[str], code: int):
        import shlex

        self.stage, self.argv, self.code = stage, list(argv), code
        super().__init__(f"stage {stage} failed (exit {code}): rpe {shlex.join(argv)}")


@dataclass
class Warmup:
    """What the warm-up measured on this machine (seconds)."""

    batch_s: float
    """One batch of the budget's rollouts (``batch_size`` rows, ``max_new_tokens``), sampled as they will be."""
    probe_fit_s: float
    """One L2-logistic probe fit on 400 random states of the model's width."""
    n_layers: int
    completion_prompts: bool
    extra: dict[str, Any] = field(default_factory=dict)


def warm_up(model, tokenizer, cfg: ReproduceConfig) -> Warmup:
    """Time one batch of the budget's rollouts on held-aside problems of the task (rpe's engine, the budget's
    batch size and completion length) and one linear probe fit on random states of the model's width: the
    inputs of :meth:`Pipeline.estimate`. Takes about one rollout batch (20 s for SmolLM2 on 2 CPU cores)."""
    import torch

    from rpe.generation import generate_batch
    from rpe.logistic import fit_logistic
    from rpe.models import prompt_style_of
    from rpe.prompts import PromptBuilder
    from rpe.sampling import SamplingConfig
    from rpe.tasks import draw_problems, load_task
    from rpe.tracker import decoder_layers, hidden_size_of

    b = cfg.spec
    task = load_task(cfg.task, **cfg.task_kwargs())
    problems = draw_problems(task, b.batch_size, seed=cfg.seed + 1000)
    builder = PromptBuilder(task, tokenizer, seed=cfg.seed)
    prompts = [builder(p) for p in problems]
    if not prompts:
        raise ValueError(f"task {cfg.task!r} produced no problems; check the task file or options")
    prompts = (prompts * math.ceil(b.batch_size / len(prompts)))[: b.batch_size]  # a small file: repeat it

    t0 = time.perf_counter()  # one batch of the rollouts as they will run: rpe's engine, the budget's length
    with torch.inference_mode():
        generate_batch(model, tokenizer, prompts, SamplingConfig(max_new_tokens=b.max_new_tokens), seed=0,
                       stop_strings=builder.stop_strings, add_special_tokens=builder.add_special_tokens)
    batch = time.perf_counter() - t0
    d = hidden_size_of(model)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(400, d, generator=gen)
    y = (x[:, 0] + torch.randn(400, generator=gen) > 0).float()
    t0 = time.perf_counter()
    fit_logistic(torch.nn.Linear(d, 1), x, y, l2=1.0)
    probe = time.perf_counter() - t0
    path = getattr(model, "name_or_path", cfg.model)
    return Warmup(batch, probe, len(decoder_layers(model)), prompt_style_of(path, tokenizer) == "completion")


def card(out: str | Path) -> list:
    """The report card rows of a finished (or partial) ``rpe reproduce`` folder, from its result files."""
    from rpe.report_card import card_rows

    out = Path(out)
    metrics = _bundle_metrics(out / "bundle") or {}
    ablation = _json(out / "ablation" / "results.json")
    search = _json(out / "search.json")
    return card_rows(metrics, ablation=ablation, search=search)


__all__ = ["BUDGETS", "Budget", "Estimate", "Pipeline", "ReproduceConfig", "STAGES", "Stage", "StageFailed", "Warmup",
           "card", "early_layers", "load_state", "sweep_layers", "warm_up"]
