"""The ``rpe`` Typer application, its sub-applications and the helpers every command module shares."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

if TYPE_CHECKING:
    from rpe.distributed import Ranks

app = typer.Typer(help="Find the reward subsystem inside a language model and put it to work.", no_args_is_help=True)
models_app = typer.Typer(help="Offline model registry: list and fetch models.", no_args_is_help=True)
bench_app = typer.Typer(help="Benchmarks: ratios against baselines measured in the same run.", no_args_is_help=True)
app.add_typer(models_app, name="models")
app.add_typer(bench_app, name="bench")
console = Console()


def fail(message: str) -> None:
    console.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(2)


class LineProgress:
    """Progress for output that is not a terminal (a log file, a batch job): rich draws its bar only when the run
    ends there, so this prints one line per task at most every ``every`` seconds and at the end:
    ``description: done/total (elapsed, about R left)``, timed from the start of the current phase (a new
    description or a count that starts again). The same calls as ``rich.progress.Progress``."""

    def __init__(self, out: Console, every: float = 30.0, disable: bool = False):
        self.out, self.every, self.disable = out, every, disable
        self.tasks: dict[int, dict] = {}

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc) -> None:
        for job in self.tasks:
            self._print(job)

    def add_task(self, description: str, total: float | None = None, **_: object) -> int:
        job = len(self.tasks)
        self.tasks[job] = {"description": description, "total": total, "completed": 0, "start": time.monotonic(),
                           "printed": time.monotonic()}
        return job

    def update(self, job: int, *, completed: float | None = None, total: float | None = None,
               description: str | None = None, advance: float | None = None, **_: object) -> None:
        t = self.tasks[job]
        if (description is not None and description != t["description"]) or (
                completed is not None and completed < t["completed"]):
            t["start"] = time.monotonic()  # a new phase (another arm, another method): its own clock
        for key, value in (("completed", completed), ("total", total), ("description", description)):
            if value is not None:
                t[key] = value
        if advance is not None:
            t["completed"] += advance
        done = t["total"] is not None and t["completed"] >= t["total"]
        if done or time.monotonic() - t["printed"] >= self.every:
            self._print(job)

    def _print(self, job: int) -> None:
        t = self.tasks[job]
        if self.disable or t.get("last") == (t["description"], t["completed"]):
            return
        elapsed = time.monotonic() - t["start"]
        of = f"/{t['total']:g}" if t["total"] is not None else ""
        left = ""
        if t["total"] and 0 < t["completed"] < t["total"]:
            left = f", about {elapsed * (t['total'] - t['completed']) / t['completed']:.0f} s left"
        self.out.print(f"{t['description']}: {t['completed']:g}{of} ({elapsed:.0f} s{left})", highlight=False)
        t["printed"], t["last"] = time.monotonic(), (t["description"], t["completed"])


def progress_bar(ranks: Ranks | None = None) -> Progress | LineProgress:
    """A progress bar on a terminal, progress lines elsewhere (:class:`LineProgress`); under a launcher only the
    main rank reports, for its own share of the work."""
    disable = ranks is not None and not ranks.is_main
    if not console.is_terminal:
        return LineProgress(console, disable=disable)
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TimeRemainingColumn(), console=console, disable=disable,
    )


@app.callback()
def main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Log at INFO level.")) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")



DEVICE_OPTION = typer.Option("auto", "--device", help="auto (cuda when available, else cpu), cpu, cuda, cuda:N.")
DTYPE_OPTION = typer.Option("auto", "--dtype", help="auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16, "
                            "float16. bfloat16 on a CPU is fast where it has bf16 kernels (AVX512-BF16 / AMX).")
DEVICE_MAP_OPTION = typer.Option(None, "--device-map", help="transformers' device_map, e.g. auto to shard the model "
                                 "over the visible GPUs (replaces --device).")
ATTN_OPTION = typer.Option(None, "--attn-implementation", help="transformers' attention implementation: sdpa, "
                           "eager, flash_attention_2 (default: transformers' choice).")


def load_cli_model(model: str, device: str = "auto", dtype: str = "auto", device_map: Optional[str] = None,
                   attn_implementation: Optional[str] = None):
    """``(model, tokenizer)`` for a command, with a clear error (and exit code 2) for a model that is missing, an
    unknown device or dtype, or a load that fails. Under a launcher (``torchrun``, ``accelerate launch``) each
    process takes its own GPU (``cuda:LOCAL_RANK``)."""
    from rpe.distributed import current_ranks
    from rpe.models import ModelNotFetchedError, UnknownModelError, load_model

    ranks = current_ranks()
    if ranks.world > 1 and device_map:
        fail(f"--device-map {device_map} shards one model over the GPUs, but this is a launched run with "
             f"{ranks.world} processes (one model each): use one or the other")
    device = ranks.device(device)  # under a launcher: this process's own GPU
    try:
        return load_model(model, device=device, dtype=dtype, device_map=device_map,
                          attn_implementation=attn_implementation)
    except (ModelNotFetchedError, UnknownModelError, ValueError) as err:
        fail(str(err))
    except OSError as err:
        fail(f"cannot load model {model!r}: {err}")


def print_bench(result: dict) -> None:
    """A benchmark's JSON as the last line, with the machine it ran on."""
    from rpe.bench.machine import machine_info

    print(json.dumps({**result, "machine": machine_info()}))


def parse_options(pairs: list[str]) -> dict:
    """``["k=v", ...]`` -> dict, values parsed as JSON when they can be (numbers, booleans), else strings."""
    from rpe.tasks import parse_task_options

    try:
        return parse_task_options(pairs)
    except ValueError as err:
        fail(str(err))


def parse_layers(layers: Optional[str]) -> Optional[list[int]]:
    if not layers:
        return None
    try:
        return [int(x) for x in layers.split(",") if x.strip()]
    except ValueError:
        fail(f"--layers takes comma-separated integers such as 4,8,12; got {layers!r}")


def parse_floats(values: str, option: str) -> list[float]:
    """Comma-separated numbers of the option ``option`` (a clear error otherwise)."""
    try:
        out = [float(x) for x in values.split(",") if x.strip()]
    except ValueError:
        fail(f"{option} takes comma-separated numbers such as 0.05,0.1,0.2; got {values!r}")
    if not out:
        fail(f"{option} is empty")
    return out


def rollout_model_name(rollouts: Path, model: Optional[str]) -> str:
    manifest = rollouts / "manifest.json"
    if model:
        return model
    if not manifest.exists():
        fail(f"{rollouts} has no manifest.json; pass --model or point --rollouts at a finished `rpe rollouts` folder")
    return json.loads(manifest.read_text())["model"]["name"]


def short_name(name: str) -> str:
    """A control's name without its parenthesised explanation (the JSON keeps the full one)."""
    import re

    return re.sub(r" \([^)]*\)", "", name)


def interval_text(m: dict) -> str:
    point = m.get("auroc", m.get("diff"))
    return f"{point:.3f} [{m['low']:.3f}, {m['high']:.3f}]"


