from types import SimpleNamespace

import numpy as np
import pytest

from rpe.prompts import PromptBuilder, PromptConfig
from rpe.generation import generate_from_ids
from rpe.sampling import SamplingConfig
from rpe.search import STEP_STOP, SearchConfig, run_search, search_batch
from rpe.tasks import load_task


def test_every_method_runs_on_the_same_problems(tiny_llama, tiny_bundle):
    model, tok = tiny_llama
    task = load_task("chain_sum_2")
    builder = PromptBuilder(task, tok, PromptConfig(shots=1))
    cfg = SearchConfig(n=2, max_steps=2, max_step_tokens=6, max_new_tokens=12)
    res = run_search(model, tok, tiny_bundle, task, builder, ["value", "dopamine", "logprob", "random", "greedy", "majority"],
                     3, cfg)
    for m, r in res["methods"].items():
        assert 0 <= r["accuracy"] <= 1 and r["ci95"][0] <= r["accuracy"] <= r["ci95"][1]
        assert 0 < r["tokens_per_problem"] <= (12 if m == "greedy" else 2 * 12), m
    again = run_search(model, tok, tiny_bundle, task, builder, ["value"], 3, cfg)
    assert again["methods"]["value"] == res["methods"]["value"]  # seeded


def test_the_search_leaves_out_the_questions_it_is_told_to(tiny_llama, tiny_bundle, monkeypatch):
    """With a fitting run's question keys, none of those questions is searched (before, `rpe search --rollouts`
    drew seed 1's problems, which on a fixed list overlap the fitting ones)."""
    import rpe.search as search_module
    from rpe.tasks import question_key

    model, tok = tiny_llama
    task = load_task("chain_sum_2")
    builder = PromptBuilder(task, tok, PromptConfig(shots=1))
    fitted = [question_key(p) for p in task.problems(4, seed=1)]  # what a plain draw of seed 1 would search
    asked = []
    real = search_module.search_batch

    def spy(model, tok, reader, prompts, *args, **kwargs):
        asked.extend(tok.decode(p) for p in prompts)
        return real(model, tok, reader, prompts, *args, **kwargs)

    monkeypatch.setattr(search_module, "search_batch", spy)
    run_search(model, tok, tiny_bundle, task, builder, ["greedy"], 4,
               SearchConfig(n=2, max_steps=1, max_step_tokens=4, max_new_tokens=8), exclude_questions=fitted)
    fitted_questions = [p.prompt for p in task.problems(4, seed=1)]
    assert asked and not any(q in text for q in fitted_questions for text in asked)


def test_search_input_errors(tiny_llama, tiny_bundle):
    model, tok = tiny_llama
    task = load_task("chain_sum_2")
    builder = PromptBuilder(task, tok, PromptConfig(shots=1))
    with pytest.raises(ValueError, match="unknown search methods"):
        run_search(model, tok, tiny_bundle, task, builder, ["beam"], 1, SearchConfig())
    with pytest.raises(ValueError, match="need a bundle"):
        run_search(model, tok, None, task, builder, ["value"], 1, SearchConfig())


def _score(c) -> float:
    """A stand-in internal value that differs between candidates of equal length: the sum of the token ids."""
    return float(sum(c))


class _StandInReader:
    """Stands in for SignalReader: a candidate's internal value is :func:`_score`, its dopamine the negative."""

    def read(self, prompts, completions, spans=None):
        return [SimpleNamespace(values=np.array([0.0, _score(c)]), dopamine=np.array([-_score(c)]))
                for c in completions]


def test_value_search_keeps_the_candidate_the_reader_values_most(tiny_llama):
    model, tok = tiny_llama
    prompts = [tok("What is 2 + 3? " * 12, add_special_tokens=False)["input_ids"],
               tok("What is 4 + 1? " * 12, add_special_tokens=False)["input_ids"]]
    cfg = SearchConfig(n=3, max_steps=1, max_step_tokens=8, max_new_tokens=8, batch_problems=2)
    rows = [p for p in prompts for _ in range(3)]
    sampling = SamplingConfig(temperature=cfg.temperature, max_new_tokens=8)
    cands = generate_from_ids(model, tok, rows, sampling, stop_strings=[STEP_STOP], seed=5).completion_ids
    rng = np.random.default_rng(0)
    groups = [cands[3 * j : 3 * j + 3] for j in range(2)]
    assert all(len({_score(c) for c in g}) == 3 for g in groups)  # distinct scores: the argmax is unambiguous
    picked = {}
    for method, pick in (("value", max), ("dopamine", min)):
        texts, spent = search_batch(model, tok, _StandInReader(), prompts, method, cfg, rng, seed=5)
        for j, (text, group) in enumerate(zip(texts, groups)):
            best = pick(group, key=_score)
            assert text == tok.decode(best, skip_special_tokens=True)
            assert spent[j] == sum(len(c) for c in group)
            picked[method, j] = group.index(best)
    assert len(set(picked.values())) > 1  # a selector that always takes one position would fail here


def test_greedy_search_does_not_depend_on_how_problems_are_batched(tiny_llama, tiny_bundle):
    model, tok = tiny_llama
    task = load_task("chain_sum_2")
    builder = PromptBuilder(task, tok, PromptConfig(shots=1))
    runs = [run_search(model, tok, tiny_bundle, task, builder, ["greedy"], 4,
                       SearchConfig(max_steps=2, max_step_tokens=6, max_new_tokens=12, batch_problems=b))
            for b in (1, 4)]
    assert runs[0]["methods"]["greedy"] == runs[1]["methods"]["greedy"]


def test_search_resumes_finished_methods_and_saves_after_each(tiny_llama, tiny_bundle):
    model, tok = tiny_llama
    task = load_task("chain_sum_2")
    builder = PromptBuilder(task, tok, PromptConfig(shots=1))
    cfg = SearchConfig(n=2, max_steps=1, max_step_tokens=4, max_new_tokens=4)
    saved = []
    first = run_search(model, tok, tiny_bundle, task, builder, ["random"], 2, cfg, on_method=lambda r: saved.append(r))
    assert len(saved) == 1 and saved[0]["methods"]["random"]["correct"] == first["methods"]["random"]["correct"]
    fake = {**first, "methods": {"random": {**first["methods"]["random"], "accuracy": 0.123}}}
    kept = run_search(model, tok, tiny_bundle, task, builder, ["random"], 2, cfg, done=fake)
    assert kept["methods"]["random"]["accuracy"] == 0.123  # not rerun
    other = run_search(model, tok, tiny_bundle, task, builder, ["random"], 2, SearchConfig(n=3, max_steps=1, max_step_tokens=4,
                       max_new_tokens=4), done=fake)
    assert other["methods"]["random"]["accuracy"] != 0.123  # another config: rerun


def test_paired_counts_are_the_discordant_problems():
    from rpe.search import paired_counts

    res = {"methods": {"greedy": {"correct": [1, 1, 0, 0, 1]}, "value": {"correct": [1, 0, 1, 1, 0]},
                       "random": {"correct": [1, 1, 0, 0, 1]}}}
    assert paired_counts(res, "greedy") == {"value": (2, 2), "random": (0, 0)}


def test_value_scores_cover_every_candidate_of_a_large_batch(tiny_llama, tiny_bundle):
    """8 problems x 4 candidates = 32 rows, more than one reader batch: every non-empty candidate is scored by
    its own read (the shadowed-``spans`` bug left rows 17-32 at -inf, so they could never be picked)."""
    from rpe.search import _scores
    from rpe.signals import SignalReader

    model, tok = tiny_llama
    reader = SignalReader(tiny_bundle, model, tok, batch_size=16)
    prefixes = [tok(f"Q{i // 4}: {i}+1=", add_special_tokens=False)["input_ids"] for i in range(32)]
    cands = [tok(f"{i}+1={i + 1}" + "x" * (i % 5), add_special_tokens=False)["input_ids"] for i in range(32)]
    scores = _scores("value", reader, prefixes, cands, [[] for _ in cands], np.random.default_rng(0))
    assert np.isfinite(scores).all()
    for i in (3, 20, 31):
        alone = reader.read([prefixes[i]], [cands[i]], spans=[[(0, len(cands[i]))]])[0]
        assert scores[i] == pytest.approx(alone.values[-1], abs=1e-5)
