from pathlib import Path

import pytest
from typer.testing import CliRunner

from rpe.cli import app

runner = CliRunner()


def test_help_lists_subcommands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for cmd in ("models", "tasks", "rollouts", "report", "bench"):
        assert cmd in result.output


def test_unknown_task_fails_cleanly():
    result = runner.invoke(app, ["rollouts", "--task", "nope", "--out", "x"])
    assert result.exit_code == 2 and "chain_sum" in result.output


def test_unfetched_model_prints_fetch_command(tmp_path, monkeypatch):
    monkeypatch.setenv("RPE_CACHE_DIR", str(tmp_path))
    result = runner.invoke(app, ["rollouts", "--model", "gemma3-270m", "--out", str(tmp_path / "o"), "--n-problems", "1"])
    assert result.exit_code == 2 and "rpe models fetch gemma3-270m" in result.output


def test_models_list(tmp_path, monkeypatch):
    monkeypatch.setenv("RPE_CACHE_DIR", str(tmp_path))
    result = runner.invoke(app, ["models", "list"])
    assert result.exit_code == 0 and "smollm2-135m-instruct" in result.output and "gemma3-270m" in result.output


def test_fit_on_single_class_rollouts_explains_how_to_recalibrate(tiny_llama, tmp_path):
    from rpe.prompts import PromptConfig
    from rpe.rollouts import RolloutConfig, collect_rollouts
    from rpe.sampling import SamplingConfig

    model, tok = tiny_llama
    folder = tmp_path / "tiny"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    cfg = RolloutConfig(n_problems=12, samples=1, sampling=SamplingConfig(max_new_tokens=8), prompt=PromptConfig(shots=1))
    collect_rollouts(model, tok, cfg, tmp_path / "r", model_name=str(folder))  # a random model solves nothing
    result = runner.invoke(app, ["fit", "--rollouts", str(tmp_path / "r"), "--out", str(tmp_path / "b")])
    assert result.exit_code == 2
    assert "all 12 trajectories are wrong" in result.output and "20% and 80%" in result.output
    assert not (tmp_path / "b").exists()


def test_fit_on_missing_rollouts(tmp_path):
    result = runner.invoke(app, ["fit", "--rollouts", str(tmp_path), "--out", str(tmp_path / "b")])
    assert result.exit_code == 2 and "trajectories.parquet" in result.output


def test_task_options_are_parsed_and_checked():
    from rpe.cli.common import parse_options

    assert parse_options(["max_animals=2", "name=x", "flag=true"]) == {"max_animals": 2, "name": "x", "flag": True}
    bad = runner.invoke(app, ["rollouts", "--task", "rg:leg_counting", "--task-option", "bogus=1", "--out", "x"])
    assert bad.exit_code == 2 and "invalid options" in bad.output
    malformed = runner.invoke(app, ["rollouts", "--task-option", "novalue", "--out", "x"])
    assert malformed.exit_code == 2 and "KEY=VALUE" in malformed.output


@pytest.mark.slow
def test_search_cli_saves_per_method_and_resumes(real_model, tmp_path):
    import json

    out = tmp_path / "search.json"
    args = ["search", "--n-problems", "2", "--methods", "greedy", "--candidates", "2", "--max-new-tokens", "24",
            "--max-step-tokens", "12", "--out", str(out)]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    saved = json.loads(out.read_text())
    assert saved["model"] == "smollm2-135m-instruct" and saved["n_problems"] == 2
    assert 0 < saved["methods"]["greedy"]["tokens_per_problem"] <= 24
    saved["methods"]["greedy"]["accuracy"] = 0.25  # a marker: a resumed run keeps finished methods
    out.write_text(json.dumps(saved))
    again = runner.invoke(app, args + ["--methods", "greedy,random"])
    assert again.exit_code == 0, again.output
    both = json.loads(out.read_text())["methods"]
    assert both["greedy"]["accuracy"] == 0.25 and set(both) == {"greedy", "random"}
    bad = runner.invoke(app, ["search", "--n-problems", "1", "--methods", "value", "--out", str(tmp_path / "x.json")])
    assert bad.exit_code != 0 and "need a bundle" in bad.output


def test_python_dash_m_rpe_cli_runs_the_command():
    """The form launchers need (``accelerate launch -m rpe.cli``, ``torchrun -m rpe.cli``): before __main__.py
    it answered "'rpe.cli' is a package and cannot be directly executed"."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "rpe.cli", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "rollouts" in out.stdout and "Usage: rpe" in out.stdout


def test_every_rpe_line_of_the_makefile_parses():
    """`make demo` runs `$(RPE) ...` lines that no other test parses (a renamed option broke the demo)."""
    import re
    import shlex

    import typer.main

    makefile = (Path(__file__).resolve().parents[1] / "Makefile").read_text()
    variables = dict(re.findall(r"^([A-Z_]+)\s*[:?]?=\s*(.*)$", makefile, flags=re.M))
    lines = [ln.strip() for ln in makefile.splitlines() if ln.strip().startswith("$(RPE) ")]
    assert len(lines) >= 3 and any(ln.startswith("$(RPE) reproduce ") for ln in lines)  # fetch, demo, bench
    group = typer.main.get_command(app)
    for line in lines:
        text = re.sub(r"\$\((\w+)\)", lambda m: variables.get(m.group(1), "x"), line.removeprefix("$(RPE) "))
        args = shlex.split(text)
        command, rest = group, args
        while hasattr(command, "commands") and rest and rest[0] in command.commands:
            command, rest = command.commands[rest[0]], rest[1:]
        command.make_context(args[0], list(rest))  # raises on an unknown option or a missing required one


def test_progress_without_a_terminal_prints_lines():
    """rich draws nothing until the end when output is a file: LineProgress prints a line per interval and at the end."""
    import io

    from rich.console import Console

    from rpe.cli.common import LineProgress

    buf = io.StringIO()
    with LineProgress(Console(file=buf, width=200), every=0.0) as bar:
        job = bar.add_task("rollouts", total=4)
        for done in range(1, 5):
            bar.update(job, completed=done)
    lines = buf.getvalue().splitlines()
    assert lines[0].startswith("rollouts: 1/4 (") and "left)" in lines[0]
    assert lines[-1].startswith("rollouts: 4/4 (") and len(lines) == 4  # the end is not printed twice
    quiet = io.StringIO()
    with LineProgress(Console(file=quiet), every=3600.0) as bar:
        job = bar.add_task("arms", total=None)
        bar.update(job, completed=7)
    assert quiet.getvalue().strip().startswith("arms: 7 (")  # only at the end
    phases = io.StringIO()
    with LineProgress(Console(file=phases, width=200), every=0.0) as bar:
        job = bar.add_task("search", total=2)
        bar.update(job, description="value", completed=2)
        started = bar.tasks[job]["start"]
        bar.update(job, description="random", completed=1)  # the next method counts again from 0
        assert bar.tasks[job]["start"] >= started and phases.getvalue().splitlines()[-1].startswith("random: 1/2")
