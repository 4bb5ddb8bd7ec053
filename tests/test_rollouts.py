import json

import pytest

from rpe.prompts import PromptConfig
from rpe.metrics import wilson_interval
from rpe.records import SCHEMA_VERSION, TRAJECTORIES_FILE, Trajectory, read_trajectories
from rpe.rollouts import RolloutConfig, collect_rollouts
from rpe.sampling import SamplingConfig


def _cfg(**kw):
    base = dict(task="chain_sum", n_problems=5, samples=2, batch_size=4, seed=7,
                sampling=SamplingConfig(temperature=1.0, max_new_tokens=12), prompt=PromptConfig(shots=1))
    base.update(kw)
    return RolloutConfig(**base)


def test_collect_writes_versioned_records_and_manifest(tiny_llama, tmp_path):
    model, tok = tiny_llama
    result = collect_rollouts(model, tok, _cfg(), tmp_path / "run", model_name="tiny")
    trajs = read_trajectories(tmp_path / "run")
    assert result.n_trajectories == len(trajs) == 10
    assert len({t.trajectory_id for t in trajs}) == 10
    assert {t.sample_index for t in trajs} == {0, 1}
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["schema_version"] == SCHEMA_VERSION and manifest["model"]["name"] == "tiny"
    assert manifest["n_problems"] == 5 and manifest["seed"] == 7
    assert manifest["sampling"]["temperature"] == 1.0
    assert 0.0 <= manifest["accuracy"] <= 1.0
    assert not (tmp_path / "run" / "parts").exists()
    for t in trajs:
        assert t.reward in (0.0, 1.0)
        assert len(t.completion_token_ids) <= 12
        assert t.finish_reason in ("eos", "length")
        assert t.truncated == (t.finish_reason == "length")
        assert tok.decode(t.prompt_token_ids) == t.prompt
        for s in t.steps:
            assert t.completion[s.char_start : s.char_end] == s.text
    # readable with datasets
    import datasets

    ds = datasets.load_dataset("parquet", data_files=str(tmp_path / "run" / TRAJECTORIES_FILE), split="train")
    assert ds.num_rows == 10 and "steps" in ds.column_names


def test_trajectory_row_round_trip(tiny_llama, tmp_path):
    model, tok = tiny_llama
    collect_rollouts(model, tok, _cfg(n_problems=2, samples=1), tmp_path, model_name="tiny")
    for t in read_trajectories(tmp_path):
        assert Trajectory.from_row(t.to_row()) == t
        positions = t.state_positions()
        assert positions[0] == len(t.prompt_token_ids) - 1 and len(positions) == len(t.steps) + 1


def test_older_schema_is_refused_with_version(tiny_llama, tmp_path):
    model, tok = tiny_llama
    collect_rollouts(model, tok, _cfg(n_problems=1, samples=1), tmp_path, model_name="tiny")
    row = read_trajectories(tmp_path)[0].to_row()
    row["schema_version"] = 0
    with pytest.raises(ValueError, match="schema version 0"):
        Trajectory.from_row(row)


class _Interrupt(Exception):
    pass


def _interrupt_after(n_batches: int):
    """A progress callback that stops collection after ``n_batches`` finished batches."""
    calls = []

    def progress(done, total):
        calls.append(done)
        if len(calls) == n_batches:
            raise _Interrupt

    return progress


def test_interrupted_run_resumes_without_loss_or_duplicates(tiny_llama, tmp_path):
    model, tok = tiny_llama
    cfg = _cfg(n_problems=6, samples=2, batch_size=4)  # 3 batches
    collect_rollouts(model, tok, cfg, tmp_path / "full", model_name="tiny")
    full = {t.trajectory_id: t.completion for t in read_trajectories(tmp_path / "full")}

    with pytest.raises(_Interrupt):
        collect_rollouts(model, tok, cfg, tmp_path / "cut", model_name="tiny", progress=_interrupt_after(2))
    assert len(list((tmp_path / "cut" / "parts").glob("*.parquet"))) == 2
    assert not (tmp_path / "cut" / TRAJECTORIES_FILE).exists()
    # a leftover temp file from a killed write must not be read as a part
    (tmp_path / "cut" / "parts" / ".part-00002.parquet.123.tmp").write_bytes(b"half")
    collect_rollouts(model, tok, cfg, tmp_path / "cut", model_name="tiny")
    resumed = {t.trajectory_id: t.completion for t in read_trajectories(tmp_path / "cut")}
    assert resumed == full


def test_damaged_part_is_regenerated(tiny_llama, tmp_path):
    model, tok = tiny_llama
    cfg = _cfg(n_problems=4, samples=1, batch_size=2)
    with pytest.raises(_Interrupt):
        collect_rollouts(model, tok, cfg, tmp_path, model_name="tiny", progress=_interrupt_after(1))
    part = tmp_path / "parts" / "part-00000.parquet"
    part.write_bytes(part.read_bytes()[:50])
    result = collect_rollouts(model, tok, cfg, tmp_path, model_name="tiny")
    assert result.n_trajectories == 4


def test_changed_config_is_refused_unless_overwrite(tiny_llama, tmp_path):
    model, tok = tiny_llama
    collect_rollouts(model, tok, _cfg(n_problems=1, samples=1), tmp_path, model_name="tiny")
    with pytest.raises(ValueError, match="different configuration .*--overwrite"):
        collect_rollouts(model, tok, _cfg(n_problems=2, samples=1), tmp_path, model_name="tiny")
    assert collect_rollouts(model, tok, _cfg(n_problems=2, samples=1), tmp_path, model_name="tiny", overwrite=True).n_trajectories == 2


def test_checksum_mismatch_is_reported(tiny_llama, tmp_path):
    model, tok = tiny_llama
    collect_rollouts(model, tok, _cfg(n_problems=1, samples=1), tmp_path, model_name="tiny")
    with (tmp_path / TRAJECTORIES_FILE).open("ab") as f:
        f.write(b"x")
    with pytest.raises(ValueError, match="sha256"):
        read_trajectories(tmp_path)


def test_unfinished_folder_is_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="resume"):
        read_trajectories(tmp_path)


def test_missing_folder_names_rpe_rollouts(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"does not exist: no rollouts there.*`rpe rollouts "):
        read_trajectories(tmp_path / "nowhere")


def test_config_checks():
    with pytest.raises(ValueError, match="n_problems"):
        RolloutConfig(n_problems=0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingConfig(temperature=-1)
    with pytest.raises(ValueError, match="segment_pattern"):
        RolloutConfig(segmenter="regex")
    assert RolloutConfig(sampling={"temperature": 0.0}).sampling.generate_kwargs()["do_sample"] is False


def test_wilson_interval():
    lo, hi = wilson_interval(56, 100)
    assert lo == pytest.approx(0.4622, abs=1e-3) and hi == pytest.approx(0.6532, abs=1e-3)
    assert wilson_interval(0, 0) == (0.0, 1.0)


@pytest.mark.slow
def test_real_model_rollouts_are_multi_step_and_scored(real_model, tmp_path):
    model, tok = real_model
    cfg = RolloutConfig(task="chain_sum", n_problems=8, samples=1, batch_size=8, sampling=SamplingConfig(max_new_tokens=64))
    result = collect_rollouts(model, tok, cfg, tmp_path, model_name="smollm2-135m-instruct")
    trajs = read_trajectories(tmp_path)
    assert result.mean_steps >= 2
    assert all(t.finish_reason == "eos" for t in trajs)
    for t in trajs:
        assert t.steps[-1].text.startswith("Answer:")
        assert t.reward == float(t.final_answer == t.reference_answer)


@pytest.mark.parametrize("segmenter", ["paragraph", "sentence"])
def test_capture_during_generation_matches_a_separate_pass(tiny_llama, tmp_path, segmenter):
    import torch

    from rpe.store import StateSet, capture_states

    model, tok = tiny_llama
    cfg = _cfg(n_problems=3, samples=2, batch_size=4, capture_layers=[1, 3], segmenter=segmenter)
    collect_rollouts(model, tok, cfg, tmp_path, model_name="tiny")
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["files"]["states"] == "states.safetensors"
    during = StateSet.load(tmp_path / "states.safetensors")
    trajs = read_trajectories(tmp_path)
    after = capture_states(model, trajs, [1, 3], pad_token_id=tok.pad_token_id, reuse_prefix=False)
    assert during.trajectory_ids == after.trajectory_ids
    assert torch.equal(during.traj_index, after.traj_index) and torch.equal(during.step_index, after.step_index)
    for layer in (1, 3):
        assert torch.allclose(during.acts[layer], after.acts[layer], atol=1e-4)
    assert any(t.finish_reason == "length" for t in trajs)  # the fallback for the never-fed last token ran


def test_capture_of_a_missing_layer_fails_before_generation(tiny_llama, tmp_path):
    model, tok = tiny_llama
    with pytest.raises(ValueError, match="4 decoder layers"):
        collect_rollouts(model, tok, _cfg(capture_layers=[9]), tmp_path, model_name="tiny")
    parts = tmp_path / "parts"
    assert not parts.exists() or not any(parts.iterdir())


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_shared_prefix_generation_gives_the_same_tokens(arch):
    from rpe.tiny import TinyModelConfig, tiny_model
    from rpe.generation import generate_from_ids

    model, tok = tiny_model(TinyModelConfig(architecture=arch))
    prefix = tok("Q: example one. A: 1.\n\nQ: example two. A: 2.\n\n", add_special_tokens=False)["input_ids"]
    prompts = [prefix + tok(s, add_special_tokens=False)["input_ids"] for s in ["Q: 3+4?", "Q: a longer one?", "Q: x"]]
    greedy = SamplingConfig(temperature=0.0, max_new_tokens=12)
    fast = generate_from_ids(model, tok, prompts, greedy, reuse_prefix=True, min_prefix=8)
    plain = generate_from_ids(model, tok, prompts, greedy, reuse_prefix=False)
    assert fast.completion_ids == plain.completion_ids
    sampled = SamplingConfig(temperature=1.0, max_new_tokens=12)
    a = generate_from_ids(model, tok, prompts, sampled, reuse_prefix=True, min_prefix=8, seed=3)
    b = generate_from_ids(model, tok, prompts, sampled, reuse_prefix=False, seed=3)
    assert a.completion_ids == b.completion_ids


def test_run_folder_from_before_a_new_none_option_still_resumes(tiny_llama, tmp_path):
    model, tok = tiny_llama
    cfg = _cfg(n_problems=1, samples=1)
    collect_rollouts(model, tok, cfg, tmp_path, model_name="tiny")
    run_config = json.loads((tmp_path / "run_config.json").read_text())
    del run_config["rollout"]["capture_layers"]  # as written by a version without that option
    (tmp_path / "run_config.json").write_text(json.dumps(run_config))
    assert collect_rollouts(model, tok, cfg, tmp_path, model_name="tiny").n_trajectories == 1


def test_stop_string_cut_keeps_the_last_content_token(tiny_llama):
    from rpe.sampling import cut_at_stop

    _, tok = tiny_llama
    ids = tok("Answer: 42\n\nQuestion: next", add_special_tokens=False)["input_ids"]
    kept, text, stopped = cut_at_stop(tok, ids, ["\n\nQuestion:"])
    assert stopped and text == "Answer: 42" and tok.decode(kept) == "Answer: 42"
    assert cut_at_stop(tok, ids, ["zzz"]) == (ids, "Answer: 42\n\nQuestion: next", False)


def test_parts_merge_when_one_part_has_no_answers_and_no_steps(tmp_path):
    """A batch where no completion has a final answer or a step used to be written with Arrow's null type and
    broke the merge of a 200-problem ablation arm."""
    from rpe.records import SCHEMA_VERSION, Step, Trajectory, read_trajectories, write_trajectories
    from rpe.rollouts import _part_path

    def traj(i, answer, steps):
        return Trajectory(SCHEMA_VERSION, f"p{i}#0", f"p{i}", "chain_sum", 0, "q", "c", steps, answer, "3",
                          float(answer == "3"), [1, 2], [], "length", True, False, {"name": "m"},
                          {"temperature": 0.7}, 0)

    write_trajectories(_part_path(tmp_path, 0), [traj(0, "3", [Step("c", 0, 1, 0, 1)])])
    write_trajectories(_part_path(tmp_path, 1), [traj(1, None, [])])
    from rpe.rollouts import finalize_rollouts

    finalize_rollouts(tmp_path, {"model": {"name": "m"}, "task_spec": {}, "rollout": {"sampling": {}, "seed": 0}}, 2)
    got = read_trajectories(tmp_path)
    assert [t.final_answer for t in got] == ["3", None] and [len(t.steps) for t in got] == [1, 0]


def test_stop_tail_keeps_the_models_own_tokens_of_the_stop_string(tiny_llama):
    """Search appends the kept step plus its stop string: re-tokenising "\\n\\n" can give one token where the
    model wrote two, a context the model never produces itself."""
    from rpe.sampling import split_at_stop

    _, tok = tiny_llama
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    raw = enc("Step 1: 2 + 3 = 5.") + enc("\n") + enc("\n") + enc("Step 2")
    ids, text, stopped, tail = split_at_stop(tok, raw, ["###", "\n\n"])
    assert stopped and text == "Step 1: 2 + 3 = 5."
    assert ids + tail == raw[: len(raw) - len(enc("Step 2"))]
    assert tok.decode(ids + tail) == "Step 1: 2 + 3 = 5.\n\n"
    assert split_at_stop(tok, raw, ["###"]) == (raw, tok.decode(raw, skip_special_tokens=True), False, [])
    assert split_at_stop(tok, raw, ["Step 2", "\n\n"])[1] == text  # the earliest stop string wins


def test_generation_logprobs_match_a_forward_pass(tiny_llama):
    """Log-probs recorded while generating (raw logits, not the tempered ones) equal a separate forward's."""
    import numpy as np
    import torch

    from rpe.generation import generate_from_ids
    from rpe.sampling import SamplingConfig

    model, tok = tiny_llama
    shared = tok("Solve each problem step by step. " * 6, add_special_tokens=False)["input_ids"]
    prompts = [shared + tok(q, add_special_tokens=False)["input_ids"] for q in ("2 + 3 =", "7 - 4 - 1 =")]
    for engine in ("continuous", "generate"):
        gen = generate_from_ids(model, tok, prompts, SamplingConfig(temperature=0.7, max_new_tokens=10), seed=3,
                                token_logprobs=True, engine=engine)
        assert sum(len(c) for c in gen.completion_ids) >= 10, engine
        for p, c, lp in zip(prompts, gen.completion_ids, gen.token_logprobs):
            assert len(lp) == len(c)
            if not c:
                continue
            with torch.inference_mode():
                logits = model(input_ids=torch.tensor([p + c])).logits[0].float()
            want = torch.log_softmax(logits[len(p) - 1 : -1], -1).gather(-1, torch.tensor(c)[:, None]).squeeze(-1)
            np.testing.assert_allclose(lp, want.numpy(), atol=1e-4)
        plain = generate_from_ids(model, tok, prompts, SamplingConfig(temperature=0.7, max_new_tokens=10), seed=3,
                                  engine=engine)
        assert plain.completion_ids == gen.completion_ids and plain.token_logprobs == []


def test_folders_made_before_engines_resume_with_the_generate_engine_and_say_so(tiny_llama, tmp_path):
    import json

    import pytest

    from rpe.prompts import PromptConfig
    from rpe.rollouts import RolloutConfig, collect_rollouts
    from rpe.sampling import SamplingConfig

    model, tok = tiny_llama
    cfg = RolloutConfig(task="chain_sum_2", n_problems=4, samples=1, batch_size=2, engine="generate",
                        prompt=PromptConfig(shots=1), sampling=SamplingConfig(max_new_tokens=8))
    collect_rollouts(model, tok, cfg, tmp_path, model_name="tiny")
    path = tmp_path / "run_config.json"
    old = json.loads(path.read_text())
    del old["rollout"]["engine"]  # as written before engines existed
    path.write_text(json.dumps(old))
    again = collect_rollouts(model, tok, cfg, tmp_path, model_name="tiny")  # resumes: the old engine is generate
    assert again.n_trajectories == 4
    with pytest.raises(ValueError, match="pass --engine generate to resume it"):
        collect_rollouts(model, tok, RolloutConfig(**{**cfg.to_dict(), "engine": "continuous"}), tmp_path,
                         model_name="tiny")
