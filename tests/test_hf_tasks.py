"""hf: tasks offline, on tiny datasets in GSM8K and MATH-500 shape saved with ``datasets.save_to_disk``."""

import pytest

datasets = pytest.importorskip("datasets")

from rpe.hf_data import DatasetTaskError  # noqa: E402
from rpe.tasks import HFDatasetTask, load_task  # noqa: E402

GSM8K = {
    "question": ["Tom has 3 bags of 4 apples. How many apples?", "A pen costs $1,200 cents... how many cents for 2?",
                 "Sam reads 5 pages a day for 3 days. Pages?"],
    "answer": ["Each bag has 4.\nSo 3*4=<<3*4=12>>12 apples.\n#### 12", "2*1200=<<2*1200=2400>>2400\n#### 2,400",
               "5*3=<<5*3=15>>15\n#### 15"],
}
MATH500 = {
    "problem": ["What is $\\frac{1}{2} + \\frac{1}{4}$?", "Solve $x^2 = 9$ for $x > 0$.", "Compute $2^5$."],
    "solution": ["Add: $\\frac{2}{4} + \\frac{1}{4} = \\boxed{\\frac{3}{4}}$.", "So $x = \\boxed{3}$.",
                 "$2^5 = \\boxed{32}$."],
    "answer": ["\\frac{3}{4}", "3", "32"],
    "level": [2, 1, 1],
    "subject": ["Prealgebra", "Algebra", "Prealgebra"],
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(GSM8K), "test": datasets.Dataset.from_dict(GSM8K)}
                         ).save_to_disk(str(root / "gsm8k"))
    datasets.DatasetDict({"test": datasets.Dataset.from_dict(MATH500)}).save_to_disk(str(root / "math500"))
    return root


def test_gsm8k_shape_answers_solutions_and_scores(saved):
    task = load_task(f"hf:{saved / 'gsm8k'}", split="test")
    problems = list(task.problems(5))
    assert [p.answer for p in problems] == ["12", "2400", "15"]  # '#### 2,400' read as a model's answer is
    assert task.score(problems[1], "so 2400 cents.\n\nAnswer: 2,400") == 1.0
    assert task.score(problems[0], "Answer: 13") == 0.0 and task.score(problems[0], "") == 0.0
    # few-shot solutions: one paragraph per line, calculator annotations gone, the answer line last
    assert task.worked_solution(problems[0]) == "Each bag has 4.\n\nSo 3*4=12 apples.\n\nAnswer: 12"
    again = load_task(task.spec())  # the manifest's spec loads the same task
    assert isinstance(again, HFDatasetTask) and [p.id for p in again.problems(3)] == [p.id for p in problems]
    assert {p.id for p in task.problems(3, seed=1)} == {p.id for p in problems}  # another seed: a shuffle


def test_math500_shape_boxed_verification_and_difficulty(saved):
    task = load_task(f"hf:{saved / 'math500'}")
    p = next(iter(task.problems(1)))
    assert p.answer == "\\frac{3}{4}" and task.difficulty(p) == {"level": 2.0}
    assert task.score(p, "The sum is $\\boxed{0.75}$.") == 1.0  # math-verify: 0.75 == 3/4
    assert task.score(p, "Answer: 3/4") == 1.0 and task.score(p, "Answer: 1/2") == 0.0
    assert task.worked_solution(p).endswith("Answer: \\frac{3}{4}")
    boxed = load_task(f"hf:{saved / 'math500'}", answer="solution")  # the answer read from the solution's box
    assert [q.answer for q in boxed.problems(3)] == ["\\frac{3}{4}", "3", "32"]


def test_a_wrong_mapping_names_the_columns_that_exist(saved, monkeypatch):
    with pytest.raises(DatasetTaskError, match=r"no column 'text' for the question; its columns are \['problem'"):
        load_task(f"hf:{saved / 'math500'}", question="text")
    with pytest.raises(DatasetTaskError, match=r"has splits \['test'\], not 'train'"):
        load_task(f"hf:{saved / 'math500'}", split="train")
    with pytest.raises(ValueError, match="unknown option.*'colum'"):
        load_task(f"hf:{saved / 'gsm8k'}", colum="question")
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # as on a machine without the hub, at once
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DatasetTaskError, match="save_to_disk"):  # no hub: the message says what to do
        load_task("hf:nobody/no-such-dataset-rpe-test")


def test_rollouts_on_an_hf_task_and_held_out_problems(saved, tiny_llama, tmp_path):
    from rpe.prompts import PromptConfig
    from rpe.rollouts import RolloutConfig, collect_rollouts, rollout_settings
    from rpe.sampling import SamplingConfig
    from rpe.tasks import draw_problems, question_key

    model, tok = tiny_llama
    name = f"hf:{saved / 'gsm8k'}"
    cfg = RolloutConfig(task=name, n_problems=2, sampling=SamplingConfig(max_new_tokens=4), prompt=PromptConfig(shots=1))
    res = collect_rollouts(model, tok, cfg, tmp_path / "r", task=load_task(name), model_name="tiny")
    assert res.manifest["task"]["kind"] == "hf" and res.n_trajectories == 2
    settings = rollout_settings(tmp_path / "r")
    assert settings.task().spec() == res.manifest["task"]
    left = draw_problems(settings.task(), 1, 1, settings.question_keys())  # held out: the one question not used
    assert question_key(left[0]) not in settings.question_keys() and left[0].answer == "15"
