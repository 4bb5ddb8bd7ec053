"""``rpe reproduce``: the paper's protocol in one resumable command (:mod:`rpe.reproduce`)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from rpe.cli.common import ATTN_OPTION, DEVICE_MAP_OPTION, DEVICE_OPTION, DTYPE_OPTION, app, console, fail, load_cli_model
from rpe.models import DEFAULT_MODEL
from rpe.tasks import DEFAULT_TASK


def run_rpe(argv: list[str]) -> int:
    """Run one ``rpe`` command in this process; its exit code (a command's ``fail`` exits 2)."""
    import click
    from typer.main import get_command

    try:  # `app` holds every command once rpe.cli is imported, as it is whenever this module runs
        code = get_command(app).main(args=argv, prog_name="rpe", standalone_mode=False)
    except click.exceptions.Exit as exit_:
        return exit_.exit_code
    except click.ClickException as err:
        err.show()
        return err.exit_code
    return code if isinstance(code, int) else 0


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


@app.command("reproduce")
def reproduce(
    model: str = typer.Option(DEFAULT_MODEL, help="Registry name, local folder or Hugging Face id."),
    task: str = typer.Option(DEFAULT_TASK, help="Task preset, rg:NAME, a JSONL file or hf:DIR_OR_ID (see `rpe tasks`)."),
    budget: str = typer.Option("small", help="smoke (tests: runs, measures nothing), small (about 10 min on 2 CPU "
                               "cores with SmolLM2), paper (intervals of about +-0.03 at s_0)."),
    task_option: Optional[list[str]] = typer.Option(None, help="Task option as KEY=VALUE (repeatable), as `rpe "
                                                    "rollouts` takes it (e.g. split=test for an hf: task)."),
    out: Path = typer.Option(..., help="The run's folder; re-run the same command to continue it."),
    seed: int = typer.Option(0, help="Seed of the fitting rollouts, folds and probes (held-out problems: seed + 1)."),
    skip: str = typer.Option("", help="Comma-separated stages to leave out: ablate, dopamine, search."),
    estimate_only: bool = typer.Option(False, "--estimate-only", help="Print the plan and the time estimate, run nothing."),
    device: str = DEVICE_OPTION,
    dtype: str = DTYPE_OPTION,
    device_map: Optional[str] = DEVICE_MAP_OPTION,
    attn_implementation: Optional[str] = ATTN_OPTION,
) -> None:
    """The paper's protocol end to end in one folder: rollouts with a layer sweep, cross-validated fit with every
    control, ablation with random and magnitude-matched controls, dopamine neurons, value-guided search, then the
    HTML report with the report card first. Finished stages are skipped; a killed run continues where it stopped."""
    from rpe.reproduce import Pipeline, ReproduceConfig, StageFailed, load_state, warm_up

    try:
        cfg = ReproduceConfig(model=model, task=task, budget=budget, seed=seed, task_options=tuple(task_option or ()),
                              skip=tuple(s.strip() for s in skip.split(",") if s.strip()), device=device, dtype=dtype,
                              device_map=device_map, attn_implementation=attn_implementation)
        load_state(cfg, out)  # a folder of other settings is refused before the model loads
    except ValueError as err:
        fail(str(err))
    lm, tok = load_cli_model(model, device, dtype, device_map, attn_implementation)
    with console.status("warm-up: timing one rollout batch and one probe fit on this machine"):
        try:
            w = warm_up(lm, tok, cfg)
        except ValueError as err:
            fail(str(err))
    del lm, tok
    try:
        pipe = Pipeline(cfg, out, n_layers=w.n_layers, completion_prompts=w.completion_prompts)
    except ValueError as err:
        fail(str(err))
    est = pipe.estimate(w.batch_s, w.probe_fit_s)
    spec = cfg.spec
    plan = Table(title=f"rpe reproduce: {model} on {task}, {budget} budget ({spec.purpose})")
    for col in ("stage", "what it runs", "estimate"):
        plan.add_column(col, overflow="fold")
    pending = {s.name for s in pipe.pending()}
    for s in pipe.stages:
        when = (f"skipped: {s.skipped}" if s.skipped else _minutes(est.seconds[s.name]) if s.name in pending
                else "done (kept)")
        plan.add_row(s.name, s.what, when)
    console.print(plan)
    console.print(f"estimated {_minutes(est.total)} from a warm-up on this machine (one rollout batch of {spec.batch_size} "
                  f"rows: {w.batch_s:.1f} s; one linear probe: {w.probe_fit_s:.2f} s); rough, within a factor of about 2",
                  highlight=False)
    pipe.out.mkdir(parents=True, exist_ok=True)
    pipe.write_commands()
    if estimate_only:
        console.print(f"the commands: {pipe.out / 'commands.sh'}")
        return
    t0 = time.perf_counter()

    def announce(stage, event: str) -> None:
        if event == "start":
            n = [s.name for s in pipe.stages if not s.skipped].index(stage.name) + 1
            total = sum(not s.skipped for s in pipe.stages)
            console.rule(f"stage {n}/{total}: {stage.name} (estimate {_minutes(est.seconds.get(stage.name, 0))})")

    try:
        pipe.run(run_rpe, on_stage=announce)
    except StageFailed as err:
        fail(f"{err}\n  what the earlier stages wrote is kept: fix the cause and re-run the same `rpe reproduce` "
             "command to continue from this stage")
    _print_summary(pipe, time.perf_counter() - t0, est)


def _print_summary(pipe, seconds: float, est) -> None:
    from rpe.reproduce import card

    table = Table(title=f"report card: {pipe.cfg.model} on {pipe.cfg.task} ({pipe.cfg.budget} budget; 95% intervals "
                        "clustered by problem)")
    for col, ratio in (("claim", 2), ("measured here", 3), ("control, same run", 3), ("verdict", 2)):
        table.add_column(col, overflow="fold", ratio=ratio)
    for r in card(pipe.out):
        table.add_row(r.claim, r.measured, r.control, f"[bold]{r.verdict}[/]" + (f": {r.note}" if r.note else ""))
    console.print(table)
    times = ", ".join(f"{name} {_minutes(s['seconds'])} (est. {_minutes(est.seconds[name])})"
                      for name, s in pipe.state["stages"].items() if name in est.seconds)
    console.print(f"stages run this time: {times or 'none, every stage was already complete'}; {_minutes(seconds)} in all",
                  highlight=False)
    console.print(f"report: {(pipe.report / 'report.html').resolve()}\ncommands of each stage: {pipe.out / 'commands.sh'}")
