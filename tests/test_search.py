import pytest

from rpe.prompts import PromptBuilder, PromptConfig
from rpe.search import SearchConfig, run_search
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


def test_search_input_errors(tiny_llama, tiny_bundle):
    model, tok = tiny_llama
    task = load_task("chain_sum_2")
    builder = PromptBuilder(task, tok, PromptConfig(shots=1))
    with pytest.raises(ValueError, match="unknown search methods"):
        run_search(model, tok, tiny_bundle, task, builder, ["beam"], 1, SearchConfig())
    with pytest.raises(ValueError, match="need a bundle"):
        run_search(model, tok, None, task, builder, ["value"], 1, SearchConfig())
