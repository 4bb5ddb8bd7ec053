"""Reliability: hostile model output, kill -9 mid-run, corrupted artefacts, over-long and empty inputs."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rpe.probe import lambda_returns
from rpe.records import SCHEMA_VERSION, Step, Trajectory

ROOT = Path(__file__).resolve().parents[1]


# -- hostile model output --------------------------------------------------------------------------------
@pytest.mark.parametrize("task_name", ["chain_sum", "rg:basic_arithmetic"])
def test_huge_or_hostile_answers_score_zero_quickly(task_name, tmp_path, monkeypatch):
    from rpe.tasks import load_task

    monkeypatch.chdir(tmp_path)
    task = load_task(task_name)
    p = next(iter(task.problems(1)))
    huge = "Answer: " + "9*" * 5_000_000 + "9"  # a 10 MB expression
    start = time.perf_counter()
    assert task.score(p, huge) == 0.0
    assert task.score(p, "(" * 100_000 + "Answer: 1") in (0.0, 1.0)
    assert task.score(p, 'Answer: __import__("os").system("touch pwned")') == 0.0
    assert time.perf_counter() - start < 10
    assert not (tmp_path / "pwned").exists()


def test_no_unsafe_deserialisation_in_the_package():
    import re

    bad = []
    for path in list((ROOT / "rpe").rglob("*.py")) + list((ROOT / "trainers").rglob("*.py")) + list((ROOT / "envs").rglob("*.py")):
        src = path.read_text()
        for pattern in (r"(?<![.\w])eval\(", r"(?<![.\w])exec\(", r"\bpickle\.", r"yaml\.load\(", r"torch\.load\((?![^)]*weights_only=True)"):
            if re.search(pattern, src):
                bad.append(f"{path.name}: {pattern}")
    assert not bad, bad


# -- properties --------------------------------------------------------------------------------------------
@settings(max_examples=100, deadline=None)
@given(st.lists(st.text(alphabet=st.sampled_from(list("ab12+= .:")), min_size=1, max_size=10), min_size=0, max_size=5))
def test_step_spans_index_the_step_tokens(steps):
    from rpe.tiny import tiny_tokenizer
    from rpe.rollouts import make_steps

    tok = tiny_tokenizer()
    steps = [s.strip() for s in steps if s.strip()]
    text = "\n\n".join(steps)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    got = make_steps(tok, ids, text, "paragraph", None)
    assert [s.text for s in got] == steps
    for s in got:
        assert tok.decode(ids[s.token_start : s.token_end]) == s.text


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=80), st.lists(st.integers(0, 50), max_size=30), st.floats(0, 1))
def test_trajectory_schema_round_trip(text, ids, reward):
    t = Trajectory(SCHEMA_VERSION, "p#0", "p", "task", 0, text, text[::-1], [Step(text, 0, len(text), 0, len(ids))],
                   None, "1", reward, ids, ids[::-1], "eos", False, False, {"name": "m"}, {"temperature": 0.7}, 3)
    assert Trajectory.from_row(json.loads(json.dumps(t.to_row()))) == t


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(1, 6), min_size=1, max_size=8), st.data())
def test_td_targets_equal_mc_when_gamma_is_one_and_values_are_true_returns(lengths, data):
    rewards = torch.tensor([float(data.draw(st.integers(0, 1))) for _ in lengths])
    traj = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])
    true_values = rewards[traj]  # with gamma = 1 the true value of every state is the final reward
    for lam in (0.0, 0.5, 1.0):
        torch.testing.assert_close(lambda_returns(true_values, rewards, traj, 1.0, lam), true_values)


# -- kill -9 mid-run ---------------------------------------------------------------------------------------
# Each child holds still at a chosen point of a write (after the temp file or staging folder is complete, between
# the two renames of a bundle swap, ...), says so by creating a marker file, and is killed there: the test knows
# what it interrupted. A child that exits before reaching the point (a crash) fails the test with its stderr.
HOLD = textwrap.dedent("""
    import os, pathlib, sys, time
    MARKER = pathlib.Path(sys.argv[1])
    MODE = sys.argv[2]

    def hold(point):
        if point == MODE:
            MARKER.write_text(point)
            time.sleep(600)
""")


def _kill_at(script: str, mode: str, tmp_path: Path, timeout: float = 180.0) -> str:
    """Run ``HOLD + script`` until it reaches the hold point ``mode``, then SIGKILL it; returns the point."""
    marker = tmp_path / f"marker-{mode}"
    marker.unlink(missing_ok=True)
    err_path = tmp_path / f"stderr-{mode}.txt"
    with err_path.open("wb") as err:
        proc = subprocess.Popen([sys.executable, "-c", HOLD + script, str(marker), mode], cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=err)
        start = time.time()
        while proc.poll() is None and not marker.exists() and time.time() - start < timeout:
            time.sleep(0.02)
        exited = proc.poll()
        if exited is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    stderr = err_path.read_text(errors="replace")[-3000:]
    assert exited is None, f"the child exited ({exited}) before reaching {mode!r}:\n{stderr}"
    assert marker.exists(), f"the child never reached {mode!r} in {timeout} s:\n{stderr}"
    assert proc.returncode == -signal.SIGKILL
    return marker.read_text()


ROLLOUT_SCRIPT = textwrap.dedent("""
    import rpe.records as records
    from rpe.tiny import tiny_model
    from rpe.prompts import PromptConfig
    from rpe.rollouts import RolloutConfig, SamplingConfig, collect_rollouts

    real_replace = records.os.replace
    def replace(src, dst):  # the part file of batch 2 is written in full, its rename pending
        if str(dst).endswith("part-00002.parquet"):
            hold("part written, rename pending")
        real_replace(src, dst)
    records.os.replace = replace
    real_fsync = records.os.fsync
    def fsync(fd):  # the temp file of batch 1 holds its bytes, not yet synced or renamed
        if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith(".part-00001"):
            hold("part being written")
        real_fsync(fd)
    records.os.fsync = fsync
    model, tok = tiny_model()
    cfg = RolloutConfig(task="chain_sum_2", n_problems=12, samples=1, batch_size=3, seed=0,
                        prompt=PromptConfig(shots=1), sampling=SamplingConfig(max_new_tokens=24))
    collect_rollouts(model, tok, cfg, "{out}", model_name="tiny")
""")


def test_kill_9_during_rollouts_then_resume_loses_and_duplicates_nothing(tmp_path):
    from rpe.records import read_trajectories

    out = tmp_path / "killed"
    script = ROLLOUT_SCRIPT.replace("{out}", str(out))
    for point in ("part being written", "part written, rename pending"):
        _kill_at(script, point, tmp_path)
        assert not (out / "trajectories.parquet").exists()  # never read as complete
        assert list(out.glob("parts/.part-*.tmp")) or point.endswith("pending")  # the write really was in flight
    n_parts = len(list(out.glob("parts/part-*.parquet")))
    assert n_parts == 2  # batches 0 and 1 finished; batch 2's rename never happened
    subprocess.run([sys.executable, "-c", HOLD + script, str(tmp_path / "m"), "none"], cwd=ROOT, check=True,
                   capture_output=True)
    ref = tmp_path / "ref"
    subprocess.run([sys.executable, "-c", HOLD + ROLLOUT_SCRIPT.replace("{out}", str(ref)), str(tmp_path / "m"), "none"],
                   cwd=ROOT, check=True, capture_output=True)
    got, want = read_trajectories(out), read_trajectories(ref)
    assert len({t.trajectory_id for t in got}) == len(got) == 12
    assert [t.completion for t in got] == [t.completion for t in want]


BUNDLE_SCRIPT = textwrap.dedent("""
    sys.path.insert(0, {tests!r})
    import rpe.bundle as bundle_module
    from conftest import make_tiny_bundle
    from rpe.tiny import tiny_model

    path = pathlib.Path({path!r})
    real_save_file, real_replace = bundle_module.save_file, bundle_module.os.replace
    def save_file(tensors, filename):
        real_save_file(tensors, filename)
        hold("staging half written")  # weights in the staging folder, bundle.json not yet
    def replace(src, dst):
        if pathlib.Path(dst) == path:
            hold("old moved aside, new not yet in place")
        else:
            hold("staging complete, swap pending")
        real_replace(src, dst)
    bundle_module.save_file, bundle_module.os.replace = save_file, replace
    model, tok = tiny_model()
    make_tiny_bundle(model, tok, seed=int({seed})).save(path)
""")


def test_kill_9_during_bundle_save_keeps_a_complete_bundle(tmp_path):
    """Killed at each point of the folder swap, the bundle path loads complete: the old bundle (the new one is
    only in place once it is whole), also when the kill lands between moving the old one aside and moving the
    new one in."""
    from rpe.bundle import SubsystemBundle

    path = tmp_path / "bundle"

    def script(seed):
        return BUNDLE_SCRIPT.format(tests=str(ROOT / "tests"), path=str(path), seed=seed)

    subprocess.run([sys.executable, "-c", HOLD + script(0), str(tmp_path / "m"), "none"], cwd=ROOT, check=True,
                   capture_output=True)
    old = SubsystemBundle.load(path)
    for point in ("staging half written", "staging complete, swap pending", "old moved aside, new not yet in place"):
        _kill_at(script(1), point, tmp_path)
        got = SubsystemBundle.load(path)
        assert torch.equal(got.value_neurons, old.value_neurons) and all(
            torch.equal(got.probe_state.weights[k], v) for k, v in old.probe_state.weights.items()), point
    subprocess.run([sys.executable, "-c", HOLD + script(1), str(tmp_path / "m"), "none"], cwd=ROOT, check=True,
                   capture_output=True)
    new = SubsystemBundle.load(path)
    assert not all(torch.equal(new.probe_state.weights[k], v) for k, v in old.probe_state.weights.items())
    assert not list(tmp_path.glob(".bundle.*")), "a finished save leaves no staging or old folder behind"


def test_kill_9_during_analysis_keeps_the_old_report(tmp_path):
    from test_analyze import _write_jsonl

    rollouts = _write_jsonl(tmp_path / "r.jsonl", n=200)
    script = textwrap.dedent(f"""
        sys.path.insert(0, {str(ROOT / 'tests')!r})
        import rpe.records as records
        from conftest import make_tiny_bundle
        from rpe.analyze import analyze_rollouts
        from rpe.tiny import tiny_model
        real_replace = records.os.replace
        def replace(src, dst):
            if str(dst).endswith("report.html"):
                hold("new report written, rename pending")
            real_replace(src, dst)
        records.os.replace = replace
        model, tok = tiny_model()
        hold("model loaded")
        analyze_rollouts(model, tok, make_tiny_bundle(model, tok), {str(rollouts)!r}, {str(tmp_path / 'out')!r})
    """)
    subprocess.run([sys.executable, "-c", HOLD + script, str(tmp_path / "m"), "none"], cwd=ROOT, check=True,
                   capture_output=True)
    good = (tmp_path / "out" / "report.html").read_bytes()
    (tmp_path / "out" / "report.html").write_bytes(good + b"<!-- previous run -->")  # tell old from new
    for point in ("model loaded", "new report written, rename pending"):
        _kill_at(script, point, tmp_path)
        assert (tmp_path / "out" / "report.html").read_bytes() == good + b"<!-- previous run -->", point
    assert list((tmp_path / "out").glob(".report.html.*.tmp")), "the killed write left its temp file, not the report"


# -- corrupted artefacts -------------------------------------------------------------------------------------
def test_truncated_parquet_and_safetensors_are_named(tmp_path):
    from rpe.records import read_trajectories
    from rpe.store import StateSet

    bad = tmp_path / "t.parquet"
    bad.write_bytes(b"PAR1" + b"\0" * 100)
    with pytest.raises(ValueError, match=r"t\.parquet is not a readable Parquet file .*; delete it and re-run"):
        read_trajectories(bad)
    st_path = tmp_path / "s.safetensors"
    st_path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":")
    with pytest.raises(ValueError, match="s.safetensors is not a readable activation store"):
        StateSet.load(st_path)


# -- over-long and empty inputs ----------------------------------------------------------------------------
def test_over_long_prompt_is_truncated_and_flagged_not_a_crash(tiny_llama, tmp_path):
    from rpe.records import read_trajectories
    from rpe.rollouts import RolloutConfig, collect_rollouts
    from rpe.sampling import SamplingConfig
    from rpe.tasks import JsonlTask

    model, tok = tiny_llama
    path = tmp_path / "long.jsonl"
    path.write_text(json.dumps({"prompt": "1+1=? " * 400, "answer": "2"}) + "\n" + json.dumps({"prompt": "2+2=?", "answer": "4"}) + "\n")
    from rpe.prompts import PromptConfig

    cfg = RolloutConfig(task=str(path), n_problems=2, max_prompt_tokens=256, sampling=SamplingConfig(max_new_tokens=8),
                        prompt=PromptConfig(shots=0))
    collect_rollouts(model, tok, cfg, tmp_path / "r", task=JsonlTask(path), model_name="tiny")
    trajs = read_trajectories(tmp_path / "r")
    assert [t.prompt_truncated for t in trajs] == [True, False] and len(trajs[0].prompt_token_ids) == 256


def test_zero_step_trajectories_and_empty_tasks(tiny_llama, tiny_bundle, tmp_path):
    from rpe.analyze import analyze_rollouts
    from rpe.signals import SignalReader

    model, tok = tiny_llama
    sig = SignalReader(tiny_bundle, model, tok).read([tok("Q: 1+1=", add_special_tokens=False)["input_ids"]], [[]])[0]
    assert sig.n_steps == 0 and sig.values.shape == (1,) and sig.scalar("rpe_sum") == 0.0
    rows = [{"prompt": "Q: 1", "completion": "", "reward": 0.0}, {"prompt": "Q: 2", "steps": ["x"], "reward": 1.0}]
    (tmp_path / "r.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    res = analyze_rollouts(model, tok, tiny_bundle, tmp_path / "r.jsonl", tmp_path / "out")
    assert res["n_states"] == 1 + 2
    from rpe.rollouts import RolloutConfig

    with pytest.raises(ValueError, match="n_problems"):
        RolloutConfig(n_problems=0)
