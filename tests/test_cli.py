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
    result = runner.invoke(app, ["rollouts", "--model", "gemma3-270m", "--out", str(tmp_path / "o"), "--n", "1"])
    assert result.exit_code == 2 and "rpe models fetch gemma3-270m" in result.output


def test_models_list(tmp_path, monkeypatch):
    monkeypatch.setenv("RPE_CACHE_DIR", str(tmp_path))
    result = runner.invoke(app, ["models", "list"])
    assert result.exit_code == 0 and "smollm2-135m-instruct" in result.output and "gemma3-270m" in result.output
