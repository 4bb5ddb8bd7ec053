import json

import pytest

from rpe.answers import extract_answer, verify
from rpe.tasks import ChainSumTask, JsonlTask, Problem, TaskFileError, UnknownTaskError, load_task


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Step 1: 2 + 3 = 5.\n\nAnswer: 5", "5"),
        ("so 12 apples\n#### 12", "12"),
        ("We get \\boxed{\\frac{1}{2}} in the end", "\\frac{1}{2}"),
        ("Thus the answer is 42.", "42"),
        ("Answer: 3\n\nWait, recheck.\n\nAnswer: 4", "4"),
        ("Answer: **-7**.", "-7"),
        ("no answer here", None),
        ("", None),
        ("Answer:   ", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_verifiers():
    assert verify("5", "5", "exact") == 1.0
    assert verify(" Paris ", "paris", "exact") == 1.0
    assert verify("5.0", "5", "numeric") == 1.0
    assert verify("1,000", "1000", "numeric") == 1.0
    assert verify("5.1", "5", "numeric") == 0.0
    assert verify("abc", "5", "numeric") == 0.0
    assert verify("\\frac{1}{2}", "0.5", "math") == 1.0
    assert verify("\\frac{1}{3}", "0.5", "math") == 0.0
    assert verify(None, "5", "exact") == 0.0
    with pytest.raises(ValueError, match="exact, numeric, math"):
        verify("1", "1", "fuzzy")


def test_chain_sum_preset_problems_are_deterministic_and_worked_solutions_score_one():
    task = load_task("chain_sum")
    assert isinstance(task, ChainSumTask)
    a = list(task.problems(20, seed=3))
    b = list(task.problems(20, seed=3))
    assert a == b and len({p.id for p in a}) == 20
    for p in a:
        assert len(p.meta["expression"].split()) == 5  # 3 terms
        solution = task.worked_solution(p)
        assert solution.count("\n\n") == 2  # two addition steps + answer line
        assert task.score(p, solution) == 1.0
        assert task.score(p, "Answer: 1000") == 0.0


@pytest.mark.parametrize("garbage", ["", "\x00\x01", "Answer:", "🙂" * 50, "Answer: " + "9" * 5000])
def test_garbage_completions_score_zero(garbage):
    task = load_task("chain_sum")
    p = next(iter(task.problems(1)))
    assert task.score(p, garbage) == 0.0


def test_hostile_completion_is_not_executed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    task = load_task("chain_sum")
    p = next(iter(task.problems(1)))
    assert task.score(p, 'Answer: __import__("os").system("touch pwned")') == 0.0
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"prompt": "q", "answer": "1", "verifier": "math"}) + "\n")
    jt = JsonlTask(path)
    assert jt.score(next(iter(jt.problems(1))), 'Answer: __import__("os").system("touch pwned")') == 0.0
    assert not (tmp_path / "pwned").exists()


def test_reasoning_gym_task_by_name_with_options():
    task = load_task("rg:leg_counting", min_animals=1, max_animals=2)
    p = next(iter(task.problems(1, seed=0)))
    assert task.score(p, f"Answer: {p.answer}") == 1.0
    assert load_task("leg_counting").name == "leg_counting"


def test_unknown_task_lists_valid_names():
    with pytest.raises(UnknownTaskError) as err:
        load_task("chain_summ")
    assert "chain_sum" in str(err.value) and "rg:NAME" in str(err.value) and "leg_counting" in str(err.value)


def test_invalid_reasoning_gym_options_are_named():
    with pytest.raises(ValueError, match="min_terms"):
        load_task("rg:chain_sum", min_terms=5, max_terms=2)


def test_jsonl_task(tmp_path):
    path = tmp_path / "mini.jsonl"
    rows = [
        {"prompt": "1+1?", "answer": "2", "verifier": "numeric"},
        {"id": "half", "prompt": "1/2?", "answer": "\\frac{1}{2}", "verifier": "math"},
        {"prompt": "Capital of France?", "answer": "Paris"},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    task = load_task(str(path))
    problems = list(task.problems(10))
    assert [p.id for p in problems] == ["mini/1", "half", "mini/3"]
    assert task.score(problems[0], "#### 2.0") == 1.0
    assert task.score(problems[1], "The answer is 0.5") == 1.0
    assert task.score(problems[2], "Answer: paris") == 1.0
    assert task.score(problems[2], "Answer: Lyon") == 0.0
    assert load_task(task.spec()).score(problems[0], "Answer: 2") == 1.0


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", "not valid JSON"),
        ('["a"]', "expected a JSON object"),
        ('{"prompt": "x"}', "missing field"),
        ('{"prompt": "x", "answer": "1", "verifier": "fuzzy"}', "unknown verifier"),
    ],
)
def test_malformed_jsonl_names_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "ok", "answer": "1"}) + "\n" + line + "\n")
    with pytest.raises(TaskFileError) as err:
        JsonlTask(path)
    assert f"{path}:2" in str(err.value) and message in str(err.value)


def test_empty_jsonl_is_an_error(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    with pytest.raises(TaskFileError, match="no problems"):
        JsonlTask(path)


def test_problem_is_hashable_value():
    assert Problem("a", "q", "1") == Problem("a", "q", "1")


def test_worked_examples_are_never_asked_questions(tmp_path):
    """A fixed problem list reshuffled with the examples' seed put evaluated questions, solved, into the prompt."""
    from rpe.prompts import PromptBuilder, PromptConfig
    from rpe.tasks import draw_problems, load_task, question_key

    path = tmp_path / "small.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"{i} + 1 = ?", "answer": str(i + 1)}) + "\n" for i in range(8)))
    task = load_task(str(path))
    asked = draw_problems(task, 6, seed=0)
    keys = [question_key(p) for p in asked]
    old = PromptBuilder(task, None, PromptConfig(shots=2), seed=0)  # no exclusion: what collection did before
    assert any(q in {p.prompt for p in asked} for q, _ in old.shots)  # the leak the exclusion closes
    builder = PromptBuilder(task, None, PromptConfig(shots=2), seed=0, exclude_questions=keys)
    assert len(builder.shots) == 2 and not {q for q, _ in builder.shots} & {p.prompt for p in asked}
    with pytest.raises(ValueError, match="fewer than 2 problems besides the 7 asked.*--shots"):
        PromptBuilder(task, None, PromptConfig(shots=2), seed=0,
                      exclude_questions=[question_key(p) for p in draw_problems(task, 7, seed=0)])


def test_worked_examples_cover_the_difficulty_levels_when_the_asked_questions_are_excluded():
    """chain_sum_mix: 800 asked problems cover most two-term questions, so a plain draw outside them kept only
    3- and 4-term examples (the model then wrote 3-step solutions to 2-term problems: accuracy 0.131)."""
    from rpe.prompts import SHOT_SEED_OFFSET, stratified_examples
    from rpe.tasks import draw_problems, load_task, question_key

    task = load_task("chain_sum_mix")
    keys = [question_key(p) for p in task.problems(800, seed=0)]
    plain = draw_problems(task, 6, SHOT_SEED_OFFSET, keys)
    terms = lambda ps: sorted(int(task.difficulty(p)["num_terms"]) for p in ps)  # noqa: E731
    assert 2 not in terms(plain)  # the skew
    shots = stratified_examples(task, 6, SHOT_SEED_OFFSET, keys)
    assert terms(shots) == [2, 2, 3, 3, 4, 4] and not {question_key(p) for p in shots} & set(keys)
    assert [p.prompt for p in shots] == [p.prompt for p in stratified_examples(task, 6, SHOT_SEED_OFFSET, keys)]


def test_a_task_whose_every_question_is_asked_draws_its_examples_from_a_disjoint_one():
    """count_bits (numbers 1-15): the documented Gemma run asks 150 problems, every question; the examples come
    from 16-31 (the error for too few unasked questions stays for tasks without such a source)."""
    from rpe.prompts import PromptBuilder, PromptConfig
    from rpe.tasks import load_task, question_key

    task = load_task("count_bits")
    keys = [question_key(p) for p in task.problems(150, seed=0)]
    assert len(set(keys)) == 15
    builder = PromptBuilder(task, None, PromptConfig(shots=4), seed=0, exclude_questions=keys)
    numbers = [int(q.split("number ")[1].split("?")[0]) for q, _ in builder.shots]
    assert len(set(numbers)) == 4 and all(16 <= n <= 31 for n in numbers)
    assert all(sol.startswith(f"Step 1: {n} in binary is {n:b}.") for n, (_, sol) in zip(numbers, builder.shots))


def test_held_out_draws_look_past_the_fitting_runs_shifted_stream():
    """reasoning-gym builds item i of seed s from seed s + i: seed 1's first items are the seed-0 run's items 1, 2, ...
    A window of n + len(excluded) draws held 0 new questions of 64 asked after a 200-problem run."""
    from rpe.tasks import draw_problems, held_out_count, load_task, question_key

    task = load_task("chain_sum_mix")
    fitting = {question_key(p) for p in task.problems(200, seed=0)}
    held = draw_problems(task, 64, seed=1, exclude=sorted(fitting))
    assert len(held) == 64 and not fitting & {question_key(p) for p in held}
    assert held_out_count(task, 64, 1, sorted(fitting)) == 64
