"""``rpe bench ...``: benchmarks that print ratios against a baseline measured in the same run."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from rpe.cli.common import fail, load_cli_model, print_bench, bench_app, console


@bench_app.command("memory")
def bench_memory(quick: bool = typer.Option(False, help="1k vs 10k trajectories (default 2k vs 20k).")) -> None:
    """Peak RSS of collecting + analysing N vs 10N trajectories (tiny model); last line JSON (goal ratio < 1.3)."""
    from rpe.bench.pipeline import bench_memory as run

    with console.status("collecting and analysing trajectories in fresh processes"):
        result = run(quick=quick)
    print_bench(result)


@bench_app.command("train")
def bench_train(
    quick: bool = typer.Option(False, help="4 steps per arm instead of 8."),
    model: str = typer.Option("smollm2-135m-instruct", help="Model."),
    bundle: Path = typer.Option(Path("runs/demo/bundle"), help="Bundle for the rpe arms (make demo writes this one)."),
) -> None:
    """Time per step and peak memory: GRPO + RPECallback + internal reward, and internal-critic PPO, vs stock GRPO."""
    from rpe.bench.pipeline import bench_train as run
    from rpe.trainers import require_trl

    require_trl()
    if not (bundle / "bundle.json").exists():
        fail(f"{bundle} is not a bundle; run `make demo` (or pass --bundle)")
    with console.status("benchmarking GRPO arms in fresh processes"):
        result = run(model, str(bundle), quick=quick)
    print_bench(result)


@bench_app.command("analyze")
def bench_analyze(
    quick: bool = typer.Option(False, help="32 trajectories instead of 128."),
    rollouts: Path = typer.Option(Path("runs/demo/rollouts"), help="Rollout folder (make demo writes this one)."),
    bundle: Path = typer.Option(Path("runs/demo/bundle"), help="Bundle folder."),
) -> None:
    """States analysed per second vs the forward passes alone; last line JSON with the ratio."""
    from rpe.bench.pipeline import bench_analyze as run

    if not (bundle / "bundle.json").exists() or not (rollouts / "manifest.json").exists():
        fail(f"need a finished rollout folder and a bundle ({rollouts}, {bundle}); run `make demo` first")
    with console.status("benchmarking analysis vs plain forwards"):
        result = run(str(rollouts), str(bundle), quick=quick)
    print_bench(result)


@bench_app.command("ablate")
def bench_ablate(
    quick: bool = typer.Option(False, help="Small sizes."),
    model: str = typer.Option("smollm2-135m-instruct", help="Model to benchmark."),
) -> None:
    """Generation tokens/s with vs without the ablation hook; last line is JSON with the ratio (goal >= 0.95)."""
    from rpe.bench.pipeline import bench_ablate as run

    load_cli_model(model)
    with console.status("benchmarking generation with and without the ablation hook"):
        result = run(model, quick=quick)
    print_bench(result)


@bench_app.command("rollouts")
def bench_rollouts(
    quick: bool = typer.Option(False, help="Small sizes (under a minute on 2 cores)."),
    model: str = typer.Option("smollm2-135m-instruct", help="Model to benchmark."),
    dtypes: str = typer.Option("float32,bfloat16", help="Model dtypes, comma-separated, each benchmarked in turn "
                               "(bfloat16 is skipped, with the reason, on a CPU without bf16 kernels)."),
) -> None:
    """Tokens/s of every generation path (plain generate, the prefix copied or shared) and of Monte-Carlo values,
    per dtype; last line is JSON with the ratios."""
    from dataclasses import replace

    from rpe.bench.rollouts import RolloutBenchConfig, bench_rollouts as run

    cfg = RolloutBenchConfig.quick(model) if quick else RolloutBenchConfig(model=model)
    cfg = replace(cfg, dtypes=tuple(d.strip() for d in dtypes.split(",") if d.strip()))
    load_cli_model(model)  # clear error before timing if the model is missing
    with console.status("benchmarking rollouts (naive env loop, then batched)"):
        result = run(cfg)
    print_bench(result)


@bench_app.command("env")
def bench_env(
    quick: bool = typer.Option(False, help="Small sizes (under a minute on 2 cores)."),
    model: str = typer.Option("smollm2-135m-instruct", help="Model to benchmark."),
    bundle: Optional[Path] = typer.Option(None, help="Bundle read by InternalRPE (default: a random one, same cost)."),
) -> None:
    """Episodes through LLMPolicy + InternalRPE vs rpe rollouts on the same problems; last line is JSON."""
    from rpe.bench.rollouts import RolloutBenchConfig, bench_env as run

    cfg = RolloutBenchConfig.quick(model) if quick else RolloutBenchConfig(model=model)
    load_cli_model(model)
    with console.status("benchmarking episodes through the environment vs batched rollouts"):
        result = run(cfg, str(bundle) if bundle else None)
    print_bench(result)


@bench_app.command("tracker")
def bench_tracker(
    quick: bool = typer.Option(False, help="Small sizes (under a minute on 2 cores)."),
    model: str = typer.Option("smollm2-135m-instruct", help="Model to benchmark."),
) -> None:
    """Tracker vs plain forward vs output_hidden_states; capture during generation vs a second pass."""
    from rpe.bench.pipeline import bench_tracker as run

    load_cli_model(model)
    with console.status("benchmarking the activation tracker"):
        result = run(model, quick=quick)
    print_bench(result)


@bench_app.command("probe")
def bench_probe(quick: bool = typer.Option(False, help="1k and 10k states only.")) -> None:
    """Probe fit time per epoch vs number of states (synthetic), with the scaling exponent."""
    from rpe.bench.pipeline import bench_probe as run

    with console.status("benchmarking probe fits"):
        result = run(quick=quick)
    print_bench(result)
