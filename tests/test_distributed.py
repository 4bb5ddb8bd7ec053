"""Launched runs on 2 CPU processes (torchrun, gloo): the launchers pass our options through, data-parallel
rollouts equal a one-process run, and only the main rank writes the merged files."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from rpe.distributed import Ranks, barrier, broadcast_object, current_ranks, gather_objects, process_group

ROOT = Path(__file__).resolve().parents[1]


def _options(command, path=()):
    """(command path, option) for every long option of every ``rpe`` command."""
    if hasattr(command, "commands"):
        for name, sub in command.commands.items():
            yield from _options(sub, (*path, name))
        return
    for param in command.params:
        for opt in getattr(param, "opts", []):
            if opt.startswith("--"):
                yield path, opt


def test_launchers_pass_every_rpe_option_through():
    """argparse reads any unambiguous prefix of its own options anywhere on the line: `torchrun ... -m rpe.cli
    rollouts --n 8` stopped in torchrun's parser ("ambiguous option: --n could match --nnodes, ...")."""
    import typer.main
    from accelerate.commands.launch import launch_command_parser
    from torch.distributed.run import get_args_parser

    from rpe.cli import app

    launchers = {"torchrun": (get_args_parser(), ["--nproc_per_node", "2"]),
                 "accelerate launch": (launch_command_parser(), ["--num_processes", "2", "--cpu"])}
    options = list(_options(typer.main.get_command(app)))
    assert len(options) > 100 and ((("rollouts",), "--n-problems") in options)
    refused = []
    for name, (parser, own) in launchers.items():
        for path, opt in options:
            line = [*own, "-m", "rpe.cli", *path, opt, "1"]
            try:
                ns = parser.parse_args(line)
            except SystemExit:
                refused.append(f"{name}: rpe {' '.join(path)} {opt}")
                continue
            rest = ns.training_script_args
            assert ns.training_script == "rpe.cli" and rest == [*path, opt, "1"], (name, path, opt, rest)
    assert not refused, refused


def test_ranks_share_work_round_robin_and_pick_their_own_gpu():
    shares = [[b for b in range(7) if Ranks(r, 3).owns(b)] for r in range(3)]
    assert shares == [[0, 3, 6], [1, 4], [2, 5]]
    assert Ranks(1, 2, local_rank=1).device("cuda") == "cuda:1"
    assert Ranks(1, 2, local_rank=1).device("cuda:0") == "cuda:0"  # an explicit device is kept
    assert Ranks(0, 1).device("cuda") == "cuda" and Ranks(1, 2).device("cpu") == "cpu"


def test_single_process_helpers_are_identities(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    with process_group() as ranks:
        assert ranks == Ranks(0, 1, 0) and ranks.is_main
        barrier()
        assert gather_objects({"a": 1}) == [{"a": 1}] and broadcast_object(3) == 3
    assert not torch.distributed.is_initialized()


def test_a_world_without_rendezvous_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    assert current_ranks().world == 2
    with pytest.raises(RuntimeError, match="MASTER_ADDR.*torchrun"):
        with process_group():
            pass


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}


def _rollouts(args, nproc, port):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
                str(port), "-m", "rpe.cli"] if nproc > 1 else [sys.executable, "-m", "rpe.cli"]
    return subprocess.run([*launcher, "rollouts", *args], capture_output=True, text=True, timeout=600, env=_env(),
                          cwd=ROOT)


def _tiny_folder(tmp_path) -> Path:
    """The tiny random Llama saved as a model folder the CLI loads."""
    from rpe.tiny import tiny_model

    model, tok = tiny_model()
    folder = tmp_path / "tiny"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.mark.slow
def test_two_process_rollouts_equal_the_one_process_run(tmp_path):
    from rpe.rollouts import PARTS_DIR
    from rpe.store import StateSet

    folder = _tiny_folder(tmp_path)
    common = ["--model", str(folder), "--task", "chain_sum_2", "--n-problems", "5", "--samples", "2", "--batch-size",
              "3", "--shots", "1", "--max-new-tokens", "10", "--capture-layers", "1,2", "--device", "cpu", "--seed", "3"]
    one = _rollouts([*common, "--out", str(tmp_path / "one")], 1, 0)
    assert one.returncode == 0, one.stderr[-3000:]
    two = _rollouts([*common, "--out", str(tmp_path / "two")], 2, 29541)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("trajectories ->") == 1  # the main rank reports, once
    a, b = (pq.read_table(tmp_path / d / "trajectories.parquet") for d in ("one", "two"))
    assert a.num_rows == b.num_rows == 10
    assert a.to_pylist() == b.to_pylist()  # 4 batches: ranks took 0,2 and 1,3; merged in batch order
    ma, mb = (json.loads((tmp_path / d / "manifest.json").read_text()) for d in ("one", "two"))
    assert {k: v for k, v in ma.items() if k != "sha256"} == {k: v for k, v in mb.items() if k != "sha256"}
    sa, sb = (StateSet.load(tmp_path / d / "states.safetensors") for d in ("one", "two"))
    for layer in (1, 2):
        assert torch.equal(sa.acts[layer], sb.acts[layer])
    assert not (tmp_path / "two" / PARTS_DIR).exists()
    # resume: a launched rerun of the finished folder returns it as it is
    again = _rollouts([*common, "--out", str(tmp_path / "two")], 2, 29542)
    assert again.returncode == 0, again.stderr[-3000:]
    assert pq.read_table(tmp_path / "two" / "trajectories.parquet").to_pylist() == a.to_pylist()


@pytest.mark.slow
def test_a_launched_run_with_another_configuration_is_refused_on_every_rank(tmp_path):
    folder = _tiny_folder(tmp_path)
    common = ["--model", str(folder), "--task", "chain_sum_2", "--n-problems", "2", "--shots", "1",
              "--max-new-tokens", "6", "--device", "cpu", "--out", str(tmp_path / "r")]
    first = _rollouts(common, 2, 29543)
    assert first.returncode == 0, first.stderr[-3000:]
    before = (tmp_path / "r" / "trajectories.parquet").read_bytes()
    other = _rollouts([*common, "--seed", "9"], 2, 29544)
    assert other.returncode != 0
    printed = " ".join((other.stdout + other.stderr).split())  # the console wraps long lines
    assert printed.count("holds a run with a different configuration") == 2  # both ranks stop with the reason
    assert (tmp_path / "r" / "trajectories.parquet").read_bytes() == before  # nothing written is lost


CPU_OVERRIDES = ["--model", "tiny", "--task", "chain_sum_2", "--shots", "1", "--use_vllm", "false", "--bf16", "false",
                 "--use_cpu", "true", "--max_steps", "2", "--per_device_train_batch_size", "4", "--num_generations", "4",
                 "--max_completion_length", "8", "--n_train_problems", "8", "--n_eval_problems", "6",
                 "--eval_max_new_tokens", "8", "--save_strategy", "no", "--logging_steps", "1",
                 "--gradient_checkpointing", "false"]
"""The multi-GPU recipe on 2 CPU processes: tiny random Llama, no vLLM, no bf16, 2 steps (docs/guides/recipes.md)."""


def _documented_train_line() -> list[str]:
    """The 2-process CPU line of docs/guides/recipes.md (continued lines joined), as tokens."""
    import shlex

    page = (ROOT / "docs" / "guides" / "recipes.md").read_text().replace("\\\n", " ")
    lines = [ln for ln in page.splitlines() if ln.startswith("torchrun --nproc_per_node 2 -m rpe.cli train ")]
    assert len(lines) == 1, lines
    return shlex.split(lines[0])


def test_the_documented_two_process_line_is_the_one_the_tests_run():
    tokens = _documented_train_line()
    assert tokens[:6] == ["torchrun", "--nproc_per_node", "2", "-m", "rpe.cli", "train"]
    assert tokens[6:-4] == ["--config", "recipes/multi_gpu_grpo_rpe.yaml", *CPU_OVERRIDES]
    assert tokens[-4] == "--bundle" and tokens[-2] == "--output_dir"


def _launch_train(tmp_path, port, *extra, script=True):
    from rpe.bundle import random_bundle
    from rpe.tiny import tiny_model

    model, tok = tiny_model()
    random_bundle(model, tok).save(tmp_path / "bundle")
    head = [str(ROOT / "tests" / "dist_train.py"), str(tmp_path / "side")] if script else ["-m", "rpe.cli"]
    documented = _documented_train_line()[6:-4]  # --config ... and the CPU overrides, from the docs
    documented[1] = str(ROOT / documented[1])
    # torchrun, not `accelerate launch --cpu`: accelerate starts several CPU processes only through mpirun
    line = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port), *head,
            "train", *documented, "--bundle", str(tmp_path / "bundle"), "--output_dir", str(tmp_path / "train"), *extra]
    run = subprocess.run(line, capture_output=True, text=True, timeout=900, env=_env(), cwd=tmp_path)
    assert run.returncode == 0, (run.stdout[-2000:], run.stderr[-4000:])
    return run


def _rank_logs(tmp_path):
    return [json.loads((tmp_path / "side" / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.slow
def test_documented_multi_gpu_launch_line_runs_on_two_cpu_processes(tmp_path):
    run = _launch_train(tmp_path, 29551, script=False)
    out = tmp_path / "train"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["eval_before"]["n"] == summary["eval_after"]["n"] == 6
    assert (out / "rpe_bundle").is_dir() and (out / "log_history.json").exists()
    assert run.stdout.count("held-out accuracy") == 1  # the main rank reports
    printed = run.stdout + run.stderr
    assert "world_size=2" in printed or printed.count("'rpe/value_s0'") == 2  # two processes trained


@pytest.mark.slow
def test_ranks_share_refits_and_only_the_main_rank_writes(tmp_path):
    _launch_train(tmp_path, 29552, "--refit_every", "1")
    probes = [torch.load(tmp_path / "side" / f"rank{r}_probe.pt") for r in (0, 1)]
    bundle = json.loads((tmp_path / "train" / "rpe_bundle" / "bundle.json").read_text())
    refits = bundle["metrics"]["online_refits"]
    assert refits and refits[-1]["n_trajectories"] == 16  # 2 steps x 2 ranks x 4 completions: both ranks' buffers
    from rpe.bundle import SubsystemBundle

    start = SubsystemBundle.load(tmp_path / "bundle").probe_state.weights
    assert any(not torch.equal(probes[0][k], start[k]) for k in start)  # the refit changed the probe
    for k in probes[0]:
        assert torch.equal(probes[0][k], probes[1][k]), k  # ... identically on both ranks
    out = str(tmp_path / "train")
    logs = _rank_logs(tmp_path)
    main_files = {p for p in logs[0]["written"] if p.startswith(out)}
    other_files = {p for p in logs[1]["written"] if p.startswith(out)}
    assert any(p.endswith("summary.json") for p in main_files) and any("rpe_bundle" in p for p in main_files)
    # rank 1 may write only rollout parts of its own (here none: the 6 held-out problems are one batch, rank 0's)
    assert all("/parts/" in p for p in other_files), sorted(other_files)
    assert logs[1]["summary"]["eval_after"] == logs[0]["summary"]["eval_after"]  # read back from the merged folder


@pytest.mark.slow
def test_internal_critic_steps_are_identical_on_both_ranks(tmp_path):
    _launch_train(tmp_path, 29553, "--trainer", "internal_critic", "--eval_before_after", "false")
    probes = [torch.load(tmp_path / "side" / f"rank{r}_probe.pt") for r in (0, 1)]
    from rpe.bundle import SubsystemBundle

    start = SubsystemBundle.load(tmp_path / "bundle").probe_state.weights
    assert any(not torch.equal(probes[0][k], start[k]) for k in start)  # the critic trained
    for k in probes[0]:
        assert torch.allclose(probes[0][k], probes[1][k], atol=0, rtol=0), k
    history = json.loads((tmp_path / "train" / "log_history.json").read_text())
    assert sum("critic/loss" in h for h in history) == 2


def test_partitioned_parameters_are_named_and_refused_before_loading(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from rpe.distributed import partitioned_parameters

    for var in ("ACCELERATE_USE_FSDP", "ACCELERATE_DEEPSPEED_ZERO_STAGE"):
        monkeypatch.delenv(var, raising=False)
    plain = SimpleNamespace(fsdp="", deepspeed=None)
    assert partitioned_parameters(plain) is None and partitioned_parameters() is None
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    assert "ZeRO-3" in partitioned_parameters(SimpleNamespace(fsdp="", deepspeed=str(ds)))
    assert partitioned_parameters(SimpleNamespace(fsdp="", deepspeed={"zero_optimization": {"stage": 2}})) is None
    assert "FSDP" in partitioned_parameters(SimpleNamespace(fsdp=["full_shard"], deepspeed=None))
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")  # what `accelerate launch` sets from its config
    assert "zero_stage: 3" in partitioned_parameters(plain)

    pytest.importorskip("trl")
    from rpe.trainers.recipes import parse_recipe, train
    from rpe.trainers.trl_adapter import PartitionedParametersError

    recipe = parse_recipe(ROOT / "recipes" / "multi_gpu_grpo_rpe.yaml",
                          [*CPU_OVERRIDES, "--bundle", str(tmp_path / "no_bundle"), "--output_dir", str(tmp_path / "t")])
    with pytest.raises(PartitionedParametersError, match="ZeRO-3.*ZeRO-2"):
        train(*recipe)
    assert not (tmp_path / "t").exists()  # refused before anything was loaded or written


@pytest.mark.slow
def test_two_process_monte_carlo_values_equal_the_one_process_values(tmp_path):
    from rpe.prompts import PromptConfig
    from rpe.rollouts import RolloutConfig, collect_rollouts
    from rpe.sampling import SamplingConfig
    from rpe.tiny import tiny_model

    model, tok = tiny_model()
    cfg = RolloutConfig(n_problems=5, sampling=SamplingConfig(max_new_tokens=16), prompt=PromptConfig(shots=1))
    collect_rollouts(model, tok, cfg, tmp_path / "r", model_name="tiny")
    script = str(ROOT / "tests" / "dist_mc.py")
    for name, launcher in (("one", [sys.executable]),
                           ("two", [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                                    "--master_port", "29561"])):
        (tmp_path / name).mkdir()
        run = subprocess.run([*launcher, script, str(tmp_path / "r"), str(tmp_path / name)], capture_output=True,
                             text=True, timeout=600, env=_env())
        assert run.returncode == 0, run.stderr[-3000:]
    one = json.loads((tmp_path / "one" / "values_rank0.json").read_text())
    assert len(one) >= 3 and len({v for vals in one.values() for v in vals[:-1]}) > 1
    for rank in (0, 1):  # every rank returns every value
        assert json.loads((tmp_path / "two" / f"values_rank{rank}.json").read_text()) == one
    cached = json.loads((tmp_path / "two" / "mc.json").read_text())
    assert list(cached.values())[0] == one  # the main rank merged the ranks' caches ...
    assert not list((tmp_path / "two").glob("mc.json.rank*"))  # ... and removed them
