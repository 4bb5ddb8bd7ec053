"""Commands that use a bundle: ``rpe train``, ``rpe analyze``, ``rpe search``, ``rpe ablate``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from rpe.cli.common import (
    ATTN_OPTION, DEVICE_MAP_OPTION, DEVICE_OPTION, DTYPE_OPTION, app, console, fail, load_cli_model,
    parse_floats, parse_layers, progress_bar, rollout_model_name,
)
from rpe.models import DEFAULT_MODEL
from rpe.tasks import DEFAULT_TASK


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
        fail(f"recipe {config} does not exist (see recipes/ for examples)")
    try:
        recipe = parse_recipe(config, list(ctx.args))
    except (RecipeError, ValueError) as err:
        fail(str(err))
    summary = run_recipe(*recipe).summary
    from rpe.distributed import current_ranks

    if not current_ranks().is_main:  # launched: the main rank reports
        return
    table = Table(title=f"rpe train: {config.name} ({summary['steps']} steps)")
    table.add_column("held-out accuracy")
    table.add_column("value")
    for key in ("eval_before", "eval_after"):
        if key in summary:
            e = summary[key]
            table.add_row(key, f"{e['accuracy']:.3f} [{e['ci95'][0]:.3f}, {e['ci95'][1]:.3f}] (n={e['n']})")
    console.print(table)
    console.print(f"log: {Path(recipe.trainer.output_dir) / 'log_history.json'}")


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
    title: Optional[str] = typer.Option(None, help="The report's title (default: the model and the rollouts' folder)."),
    device: str = DEVICE_OPTION,
    dtype: str = DTYPE_OPTION,
    device_map: Optional[str] = DEVICE_MAP_OPTION,
    attn_implementation: Optional[str] = ATTN_OPTION,
) -> None:
    """Per-step internal value, RPE and dopamine activity of rollouts; confidence AUROCs; an HTML report."""
    from rpe.analyze import RolloutImportError, analyze_rollouts
    from rpe.bundle import BundleFormatError, BundleMismatchError, SubsystemBundle

    try:
        b = SubsystemBundle.load(bundle)
    except BundleFormatError as err:
        fail(str(err))
    if not rollouts.exists():
        fail(f"{rollouts} does not exist")
    if rollouts.is_dir() and not (rollouts / "manifest.json").exists():
        fail(f"{rollouts} is not a finished rollout folder (no manifest.json); run or resume `rpe rollouts`")
    name = model or (rollout_model_name(rollouts, None) if rollouts.is_dir() else b.model.name)
    lm, tok = load_cli_model(name, device, dtype, device_map, attn_implementation)
    extra = []
    card_results = {}
    if ablation is not None:
        from rpe.report import ablation_section

        if not (ablation / "results.json").is_file():
            fail(f"{ablation} holds no results.json; run `rpe ablate` first or drop --ablation")
        extra.append(ablation_section(ablation))
        card_results["ablation"] = json.loads((ablation / "results.json").read_text())
    from rpe.report import search_section, transfer_section

    for given, flag, make in ((transfer, "--transfer", transfer_section), (search_results, "--search", search_section)):
        if given is None:
            continue
        if not given.is_file():
            fail(f"{given} does not exist; produce it first or drop {flag}")
        try:
            extra.append(make(given))
            if flag == "--search":
                card_results["search"] = json.loads(given.read_text())
        except (ValueError, KeyError, TypeError) as err:
            fail(f"{given} is not a {flag.lstrip('-')} result ({type(err).__name__}: {err})")
    with progress_bar() as bar:
        job = bar.add_task("internal signals", total=None)
        try:
            res = analyze_rollouts(lm, tok, b, rollouts, out, reward_column=reward_column, bundle_dir=bundle,
                                   extra_sections=extra, progress=lambda a, t: bar.update(job, completed=a, total=t),
                                   title=title, card_results=card_results)
        except (RolloutImportError, BundleMismatchError, ValueError) as err:
            fail(str(err))
    from rpe.metrics import chance_verdict

    table = Table(title=f"confidence before answering ({res['n_trajectories']} trajectories; in-sample if these "
                        "rollouts fitted the bundle)")
    for col in ("signal at s_0", "AUROC [95% CI]", "reading"):
        table.add_column(col)
    for k, v in res["confidence"].items():
        table.add_row(k, f"{v['auroc']:.3f} [{v['low']:.3f}, {v['high']:.3f}]", chance_verdict(v["low"], v["high"]))
    console.print(table)
    console.print(f"report: {Path(res['report']).resolve()}\nper-step table: {res['steps']}")


@app.command("search")
def search(
    bundle: Optional[Path] = typer.Option(None, help="Bundle folder (needed by the value and dopamine methods)."),
    rollouts: Optional[Path] = typer.Option(None, help="Rollout folder whose model, task, prompt and completion "
                                            "budget the search uses (explicit options override it); its "
                                            "questions are never searched."),
    model: Optional[str] = typer.Option(None, help="Model (default: the rollouts', else smollm2-135m-instruct)."),
    task: Optional[str] = typer.Option(None, help=f"Task (default: the rollouts', else {DEFAULT_TASK})."),
    n_problems: int = typer.Option(200, "--n-problems", help="Problems (same for every method)."),
    methods: str = typer.Option("value,dopamine,logprob,random,greedy,majority", help="Comma-separated methods."),
    candidates: int = typer.Option(4, "--candidates", help="Candidates per step (samples for majority)."),
    max_new_tokens: Optional[int] = typer.Option(None, help="Token budget of one completion (default: the "
                                                 "rollouts', else 128)."),
    max_step_tokens: int = typer.Option(48, help="Token budget of one candidate step."),
    batch_problems: int = typer.Option(8, help="Problems searched together (rows per generate: this x candidates)."),
    out: Path = typer.Option(Path("runs/search.json"), help="Results JSON (saved after each method; a rerun with the "
                                                            "same options keeps the finished methods)."),
    seed: int = typer.Option(0, help="Sampling seed."),
    device: str = DEVICE_OPTION,
    dtype: str = DTYPE_OPTION,
    device_map: Optional[str] = DEVICE_MAP_OPTION,
    attn_implementation: Optional[str] = ATTN_OPTION,
) -> None:
    """Step-level best-of-n guided by internal value vs baselines and majority vote at equal n."""
    from rpe.bundle import BundleFormatError, BundleMismatchError, SubsystemBundle
    from rpe.prompts import PromptBuilder, PromptConfig
    from rpe.records import atomic_write_json
    from rpe.rollouts import rollout_settings
    from rpe.search import SearchConfig, paired_counts, run_search
    from rpe.tasks import UnknownTaskError, load_task

    settings = rollout_settings(rollouts) if rollouts is not None else None
    if rollouts is not None and settings is None:
        fail(f"{rollouts} is not a finished rollout folder (no manifest.json)")
    model = model or (settings.model_name if settings else DEFAULT_MODEL)
    lm, tok = load_cli_model(model, device, dtype, device_map, attn_implementation)
    try:
        b = SubsystemBundle.load(bundle, model=lm, tokenizer=tok) if bundle else None
        t = load_task(task) if task else (settings.task() if settings else load_task(DEFAULT_TASK))
        budget = max_new_tokens or (settings.config.sampling.max_new_tokens if settings else 128)
        cfg = SearchConfig(n=candidates, seed=seed, max_new_tokens=budget, max_step_tokens=max_step_tokens,
                           batch_problems=batch_problems)
        done = json.loads(out.read_text()) if out.exists() else None
    except (BundleFormatError, BundleMismatchError, UnknownTaskError, ValueError) as err:
        fail(str(err))
    asked = settings.question_keys() if settings else None  # the fitting questions: never searched or shown
    builder = PromptBuilder(t, tok, settings.config.prompt if settings else PromptConfig(), exclude_questions=asked)
    meta = {"model": model, "task": t.name, "bundle": str(bundle) if bundle else None}
    if done and any(done.get(k) != v for k, v in meta.items()):
        done = None  # another model, task or bundle: start over
    stop = builder.stop_strings
    if stop:
        fail("rpe search supports chat-style models (steps end at blank lines); completion-style prompts are not supported yet")
    with progress_bar() as bar:
        job = bar.add_task("search", total=n_problems)
        try:
            res = run_search(lm, tok, b, t, builder, [m.strip() for m in methods.split(",") if m.strip()], n_problems, cfg,
                             progress=lambda m, a, total: bar.update(job, description=m, completed=a, total=total),
                             done=done, on_method=lambda r: atomic_write_json(out, {**meta, **r}),
                             exclude_questions=asked)
        except ValueError as err:
            fail(str(err))
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


@app.command("early-stop")
def early_stop(
    bundle: Path = typer.Option(..., help="Bundle folder from `rpe fit` (its value judges the samples)."),
    rollouts: Path = typer.Option(..., help="The bundle's fitting rollouts: model, task, prompt and completion "
                                  "budget come from them, and their questions are left out."),
    n_problems: int = typer.Option(100, "--n-problems", help="Held-out problems (the same for every arm)."),
    samples: int = typer.Option(4, help="Samples per problem (best-of-n with a majority vote)."),
    threshold: float = typer.Option(0.1, help="Stop a running sample whose internal value after a step is below this."),
    after_step: int = typer.Option(1, help="The first step after which samples may be stopped."),
    max_step_tokens: int = typer.Option(48, help="Token budget of one step."),
    batch_problems: int = typer.Option(8, help="Problems advanced together (rows per generate: this x samples)."),
    out: Path = typer.Option(Path("runs/early_stop.json"), help="Results JSON."),
    seed: int = typer.Option(0, help="Sampling seed."),
    problem_seed: int = typer.Option(1, help="Seed of the held-out problems."),
    on_rollouts: Optional[Path] = typer.Option(
        None, "--on-rollouts", help="Measure stopping inside rollouts instead of best-of-n, with no generation: an "
        "unstopped `rpe rollouts --capture-layers LAYER --held-out-from ROLLOUTS` folder (the bundle's layer, every "
        "neuron). What `rpe rollouts --stop-bundle` would save, for each threshold, against random probes."),
    thresholds: Optional[str] = typer.Option(None, help="--on-rollouts: comma-separated thresholds (default: "
                                             "--threshold)."),
    controls: int = typer.Option(20, help="--on-rollouts: random probes in the control."),
    same_questions: bool = typer.Option(
        False, "--same-questions", help="--on-rollouts: allow new samples of the bundle's fitting questions (a "
        "task with fewer distinct questions than a run asks, such as count_bits' 15); the results record how many "
        "are shared, and the measurement is held out in samples only, not in questions."),
    device: str = DEVICE_OPTION,
    dtype: str = DTYPE_OPTION,
    device_map: Optional[str] = DEVICE_MAP_OPTION,
    attn_implementation: Optional[str] = ATTN_OPTION,
) -> None:
    """Early stopping of hopeless samples: best-of-n where a sample stops once its internal value falls below a
    threshold, against no stopping and a random probe stopping as many samples (tokens saved, accuracy lost);
    with --on-rollouts, the same rule inside rollouts, measured on an unstopped run."""
    from rpe.bundle import BundleFormatError, BundleMismatchError, SubsystemBundle
    from rpe.early_stop import EarlyStopConfig, run_early_stop
    from rpe.prompts import PromptBuilder
    from rpe.records import atomic_write_json
    from rpe.rollouts import rollout_settings

    settings = rollout_settings(rollouts)
    if settings is None:
        fail(f"{rollouts} is not a finished rollout folder (no manifest.json)")
    if on_rollouts is not None:
        levels = [threshold] if thresholds is None else parse_floats(thresholds, "--thresholds")
        _stop_savings_command(bundle, rollouts, on_rollouts, levels, after_step, controls, seed, out,
                              (device, dtype, device_map, attn_implementation), same_questions=same_questions)
        return
    lm, tok = load_cli_model(settings.model_name, device, dtype, device_map, attn_implementation)
    try:
        b = SubsystemBundle.load(bundle, model=lm, tokenizer=tok)
        task = settings.task()
        cfg = EarlyStopConfig(n=samples, threshold=threshold, after_step=after_step, seed=seed,
                              max_new_tokens=settings.config.sampling.max_new_tokens, max_step_tokens=max_step_tokens,
                              batch_problems=batch_problems, temperature=settings.config.sampling.temperature)
    except (BundleFormatError, BundleMismatchError, ValueError) as err:
        fail(str(err))
    builder = PromptBuilder(task, tok, settings.config.prompt, exclude_questions=settings.question_keys())
    if builder.stop_strings:
        fail("rpe early-stop supports chat-style models (steps end at blank lines); completion-style prompts are "
             "not supported yet")
    with progress_bar() as bar:
        job = bar.add_task("early stop", total=n_problems)
        try:
            res = run_early_stop(lm, tok, b, task, builder, n_problems, cfg, problem_seed=problem_seed,
                                 exclude_questions=settings.question_keys(),
                                 progress=lambda arm, a, total: bar.update(job, description=arm, completed=a, total=total))
        except ValueError as err:
            fail(str(err))
    res = {"model": settings.model_name, "task": task.name, "bundle": str(bundle), **res}
    atomic_write_json(out, res)
    table = Table(title=f"early stopping, best-of-{samples}, {res['n_problems']} held-out problems, stop below "
                        f"V = {threshold:g} from step {after_step}")
    for col in ("arm", "accuracy [95% CI]", "tokens / problem", "samples stopped", "tokens saved",
                "accuracy lost vs none [95% paired]"):
        table.add_column(col)
    for arm, r in res["arms"].items():
        extra = res.get(arm)
        lost = (f"{extra['accuracy_lost']['diff']:+.3f} [{extra['accuracy_lost']['low']:+.3f}, "
                f"{extra['accuracy_lost']['high']:+.3f}]") if extra else "-"
        table.add_row(arm, f"{r['accuracy']:.3f} [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}]", f"{r['tokens_per_problem']:.0f}",
                      f"{r['stopped_share']:.0%}", f"{extra['tokens_saved']:.0%}" if extra else "-", lost)
    console.print(table)
    console.print(f"results: {out}")


def _stop_savings_command(bundle: Path, rollouts: Path, on_rollouts: Path, levels: list[float], after_step: int,
                          controls: int, seed: int, out: Path, model_options: tuple, *,
                          same_questions: bool = False) -> None:
    """``rpe early-stop --on-rollouts``: :func:`rpe.rollout_stop.stop_savings` on a held-out rollout folder
    (``same_questions``: new samples of the fitting questions allowed, and counted in the results)."""
    from rpe.bundle import BundleFormatError, BundleMismatchError, SubsystemBundle
    from rpe.records import atomic_write_json
    from rpe.rollout_stop import stop_savings
    from rpe.rollouts import rollout_settings

    fitted, held = rollout_settings(rollouts), rollout_settings(on_rollouts)
    if held is None:
        fail(f"--on-rollouts {on_rollouts} is not a finished rollout folder (no manifest.json)")
    held_questions = set(held.question_keys())
    shared = set(fitted.question_keys()) & held_questions
    if shared and not same_questions:
        fail(f"{len(shared)} questions of --on-rollouts {on_rollouts} are among the bundle's fitting questions "
             f"({rollouts}): collect it with `rpe rollouts --held-out-from {rollouts}` so the probe is not judged "
             "on what it was fitted on (or pass --same-questions for a task with too few distinct questions, and "
             "report the result as held out in samples only)")
    if shared:
        console.print(f"[yellow]{len(shared)} of the {len(held_questions)} questions of {on_rollouts} are fitting "
                      "questions: held out in samples only[/yellow]")
    difficulty = _held_difficulty(rollouts, on_rollouts)
    lm, tok = load_cli_model(held.model_name, *model_options)
    try:
        b = SubsystemBundle.load(bundle, model=lm, tokenizer=tok)
        res = stop_savings(on_rollouts, b, tok, lm, thresholds=levels, after_step=after_step, n_controls=controls,
                           seed=seed, difficulty=difficulty)
    except (BundleFormatError, BundleMismatchError, ValueError) as err:
        fail(str(err))
    res = {"model": held.model_name, "bundle": str(bundle), "questions": len(held_questions),
           "questions_shared_with_fit": len(shared), **res}
    atomic_write_json(out, res)
    table = Table(title=f"early stopping inside rollouts: {res['n_trajectories']} held-out samples "
                        f"(accuracy {res['accuracy']:.3f}), stopped from step {after_step}, "
                        f"against {controls} random probes stopping as many")
    columns = ["stop below V", "samples stopped", "tokens saved (value / random)",
               "accuracy lost (value / random [range])", "value minus random [95% CI]"]
    if difficulty is not None:
        columns += ["accuracy lost, hardest questions first", "value minus difficulty [95% CI]"]
    for col in columns:
        table.add_column(col)
    for level, r in res["thresholds"].items():
        v, c, d = r["value"], r["random_probe"], r["value_minus_control_lost"]
        row = [level, f"{v['stopped_share']:.0%}", f"{v['tokens_saved']:.1%} / {c['tokens_saved']:.1%}",
               f"{v['accuracy_lost']:.3f} / {c['accuracy_lost']:.3f} [{c['accuracy_lost_range'][0]:.3f}, "
               f"{c['accuracy_lost_range'][1]:.3f}]", f"{d['diff']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]"]
        if difficulty is not None:
            dd = r["value_minus_difficulty_lost"]
            row += [f"{r['difficulty']['accuracy_lost']:.3f}", f"{dd['diff']:+.3f} [{dd['low']:+.3f}, {dd['high']:+.3f}]"]
        table.add_row(*row)
    console.print(table)
    if difficulty is None:
        console.print("no difficulty control: the task gives no difficulty features")
    console.print(f"results: {out}")


def _held_difficulty(rollouts: Path, on_rollouts: Path) -> dict[str, float] | None:
    """P(correct) of each sample of ``on_rollouts`` from its question's difficulty alone, fitted on the bundle's
    fitting ``rollouts`` (:func:`rpe.difficulty.difficulty_scores`); None when the task has no difficulty
    features."""
    from rpe.difficulty import difficulty_from_run, difficulty_scores
    from rpe.records import read_trajectories

    fitted, held = read_trajectories(rollouts), read_trajectories(on_rollouts)
    fitted_d, held_d = difficulty_from_run(rollouts, fitted), difficulty_from_run(on_rollouts, held)
    if fitted_d is None or held_d is None:
        return None
    try:
        return difficulty_scores(fitted, fitted_d, held, held_d)
    except ValueError as err:
        console.print(f"[yellow]no difficulty control: {err}[/yellow]")
        return None


@app.command("ablate")
def ablate(
    bundle: Path = typer.Option(..., help="Bundle folder from `rpe fit`."),
    rollouts: Path = typer.Option(..., help="The rollouts the bundle was fitted on (activation statistics for the controls)."),
    out: Path = typer.Option(..., help="Output folder: results.json, ablation.png, one rollout folder per arm."),
    task: Optional[str] = typer.Option(None, help="Task of the held-out evaluation (default: the rollouts'; prompt "
                                       "and sampling always come from the rollouts)."),
    n_problems: int = typer.Option(200, "--n-problems", help="Held-out problems per arm."),
    layers: Optional[str] = typer.Option(None, help="Comma-separated layers (default: the bundle's layer)."),
    controls: str = typer.Option(",".join(["value", "random", "random_matched", "top_magnitude", "next_token", "wanda", "mc_probe"]),
                                 help="Comma-separated neuron sources."),
    seeds: int = typer.Option(3, help="Seeds per random control."),
    seed: int = typer.Option(1, help="Seed of the held-out problems and sampling (fitting rollouts use 0)."),
    share: Optional[float] = typer.Option(None, help="Neurons per set as a share of d_model (e.g. 0.1); default: "
                                           "the bundle's value-neuron count (1%)."),
    engine: str = typer.Option("continuous", help="Generation engine of the arms (generate: resume arms made "
                               "before the continuous engine existed)."),
    causal: bool = typer.Option(False, help="Also run the causal RPE check (needs `rpe dopamine` first)."),
    device: str = DEVICE_OPTION,
    dtype: str = DTYPE_OPTION,
    device_map: Optional[str] = DEVICE_MAP_OPTION,
    attn_implementation: Optional[str] = ATTN_OPTION,
) -> None:
    """Accuracy with value neurons ablated vs controls of the same size; optional causal RPE check."""
    from rpe.ablate import AblateConfig, rpe_causal_check, run_ablation
    from rpe.bundle import BundleFormatError, BundleMismatchError, SubsystemBundle

    try:
        cfg = AblateConfig(task=task, n_problems=n_problems, seed=seed, layers=parse_layers(layers),
                           sources=[s.strip() for s in controls.split(",") if s.strip()], random_seeds=seeds,
                           share=share, engine=engine)
        b = SubsystemBundle.load(bundle)
    except (ValueError, BundleFormatError) as err:
        fail(str(err))
    name = rollout_model_name(rollouts, None)
    lm, tok = load_cli_model(name, device, dtype, device_map, attn_implementation)
    try:
        b.check_model(lm, tok)
        if cfg.layers:
            from rpe.tracker import check_layers

            check_layers(lm, cfg.layers)
    except (BundleMismatchError, ValueError) as err:
        fail(str(err))
    with progress_bar() as bar:
        job = bar.add_task("arms", total=None)
        try:
            res = run_ablation(lm, tok, b, rollouts, cfg, out, model_name=name,
                               progress=lambda arm, a, t: bar.update(job, description=arm, completed=a, total=t))
        except ValueError as err:  # e.g. fewer held-out questions than asked
            fail(str(err))
    table = Table(title=f"ablating {res['n_neurons']} neurons, {n_problems} held-out problems per arm "
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


@app.command("simulate")
def simulate(
    rollouts: Path = typer.Option(..., help="Rollout folder (with mc_values.json from `rpe dopamine` for the MC RPE)."),
    bundle: Path = typer.Option(..., help="Bundle folder from `rpe fit`."),
    out: Path = typer.Option(..., help="Output folder: simulation.json, simulation.png."),
    max_trajectories: Optional[int] = typer.Option(None, help="Use only the first N trajectories."),
    device: str = DEVICE_OPTION,
    dtype: str = DTYPE_OPTION,
    device_map: Optional[str] = DEVICE_MAP_OPTION,
    attn_implementation: Optional[str] = ATTN_OPTION,
) -> None:
    """The model's internal RPE beside a TD(lambda) learner's RPE and the Monte-Carlo RPE on the same steps."""
    from rpe.bundle import BundleFormatError, BundleMismatchError, SubsystemBundle
    from rpe.simulation import simulate_rollouts

    try:
        b = SubsystemBundle.load(bundle)
    except BundleFormatError as err:
        fail(str(err))
    lm, tok = load_cli_model(rollout_model_name(rollouts, None), device, dtype, device_map, attn_implementation)
    try:
        b.check_model(lm, tok)
        with console.status("internal RPE, TD(lambda) learner, Monte-Carlo RPE"):
            res = simulate_rollouts(lm, tok, b, rollouts, out, max_trajectories=max_trajectories)
    except (BundleMismatchError, ValueError) as err:
        fail(str(err))
    table = Table(title=f"Spearman of per-step RPE ({res['n_steps']} steps, {res['n_trajectories']} trajectories)")
    for col in ("pair", "all steps [95% CI]", "steps before the last [95% CI]", "by step position"):
        table.add_column(col)
    for pair, r in res["pairs"].items():
        by = "; ".join(f"{k}: {v['spearman']:.2f}" for k, v in res["by_step"].get(pair, {}).items())
        mid = res["nonterminal"].get(pair)
        table.add_row(pair, f"{r['spearman']:.3f} [{r['low']:.3f}, {r['high']:.3f}]",
                      f"{mid['spearman']:.3f} [{mid['low']:.3f}, {mid['high']:.3f}]" if mid else "-", by)
    console.print(table)
    console.print(f"learner weights: {', '.join(f'{k} {v:+.2f}' for k, v in res['weights'].items())}")
    console.print(f"wrote {out / 'simulation.json'} and {out / 'simulation.png'}")
