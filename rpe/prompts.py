"""Prompt construction: chat template with few-shot turns, or a plain few-shot completion prompt.

Chat models (SmolLM2-Instruct) get the few-shot examples as earlier user/assistant turns. Base models
(Gemma-3-270M) get ``Question: ... / Solution: ...`` blocks and stop at :data:`COMPLETION_STOP`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from rpe.tasks import Problem, Task, draw_problems

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

COMPLETION_STOP = "\n\nQuestion:"
SHOT_SEED_OFFSET = 10_000_019  # few-shot examples come from a seed disjoint from evaluation seeds


@dataclass
class PromptConfig:
    """How problems are turned into model input."""

    style: Literal["auto", "chat", "completion"] = "auto"
    """``chat`` uses the tokenizer's chat template; ``completion`` a plain text prompt; ``auto`` picks chat
    when the tokenizer has a template."""
    shots: int = 6
    """Number of worked examples shown before the problem (6 puts SmolLM2-135M on chain_sum at about 35%)."""
    instruction: str = (
        "Solve the problem step by step. Write each step as its own paragraph, then finish with "
        "a line '{answer_hint}'."
    )
    """Appended to every question; ``{answer_hint}`` is replaced by the task's answer format."""
    system: str | None = None
    """Optional system message (chat style only); None keeps the template's default."""

    def __post_init__(self) -> None:
        if self.style not in ("auto", "chat", "completion"):
            raise ValueError(f"prompt style {self.style!r} is not one of auto, chat, completion")
        if self.shots < 0:
            raise ValueError(f"shots must be >= 0, got {self.shots}")


def resolve_style(cfg: PromptConfig, tokenizer) -> Literal["chat", "completion"]:
    """The concrete prompt style for ``tokenizer`` under ``cfg``."""
    if cfg.style != "auto":
        return cfg.style
    return "chat" if getattr(tokenizer, "chat_template", None) else "completion"


def stratified_examples(task: Task, n: int, seed: int, exclude: Sequence[str] | None = None,
                        pool_factor: int = 8) -> list[Problem]:
    """``n`` worked-example problems that cover the task's difficulty levels: from a seeded draw of up to
    ``pool_factor * n`` problems outside ``exclude`` (:func:`rpe.tasks.draw_problems`), one problem per level in
    turn (levels in order of first appearance, problems in draw order), so a mixture task's examples show each
    kind of problem. Excluding the asked questions alone skews them: on ``chain_sum_mix`` (2-4 terms) 800 asked
    problems cover most of the 200 two-term questions, so a plain draw kept only 3- and 4-term examples and the
    model wrote 3-step solutions to 2-term problems. Tasks without difficulty features get the plain draw.

    Raises:
        ValueError: fewer than ``n`` problems remain outside ``exclude``.
    """
    if n == 0:
        return []
    try:
        pool = draw_problems(task, pool_factor * n, seed, exclude)
    except ValueError:
        pool = draw_problems(task, n, seed, exclude)
    levels: dict[tuple, list[Problem]] = {}
    for p in pool:
        levels.setdefault(tuple(sorted(task.difficulty(p).items())), []).append(p)
    if len(levels) == 1:
        return pool[:n]
    out: list[Problem] = []
    queues = [list(q) for q in levels.values()]
    while len(out) < n:
        for q in queues:
            if q and len(out) < n:
                out.append(q.pop(0))
    return out


class PromptBuilder:
    """Builds the model input text for problems of one task, with fixed few-shot examples.

    Args:
        task: the task (provides worked solutions for the examples).
        tokenizer: the model's tokenizer (chat template), or None for completion style.
        cfg: prompt options.
        seed: seed for drawing the examples (offset from evaluation seeds).
        exclude_questions: question keys (:func:`rpe.tasks.question_key`) the examples must not be: the problems
            the prompts will ask. A fixed problem list (JSONL, a Hugging Face split) reshuffled with another seed
            would otherwise put evaluated questions, solved, into the prompt.

    Raises:
        ValueError: the task has fewer problems outside ``exclude_questions`` than ``cfg.shots``.
    """

    def __init__(self, task: Task, tokenizer: PreTrainedTokenizerBase | None = None, cfg: PromptConfig | None = None, seed: int = 0,
                 exclude_questions: Sequence[str] | None = None):
        self.task = task
        self.tokenizer = tokenizer
        self.cfg = cfg or PromptConfig()
        self.style = resolve_style(self.cfg, tokenizer) if tokenizer is not None else "completion"
        try:
            examples = stratified_examples(task.example_task(), self.cfg.shots, seed + SHOT_SEED_OFFSET, exclude_questions)
        except ValueError:
            raise ValueError(
                f"task {task.name!r} has fewer than {self.cfg.shots} problems besides the {len(set(exclude_questions or ()))} "
                "asked, so the worked examples would repeat asked questions: ask for fewer problems or fewer shots "
                "(--shots), or use a task with more problems (another split)") from None
        self.shots = [(p.prompt, task.worked_solution(p)) for p in examples]

    @property
    def add_special_tokens(self) -> bool:
        """Whether the tokenizer adds its special tokens (a BOS) to this builder's prompts, as TRL tokenises a
        prompt of this style: plain completion text through ``tokenizer(text)``, which adds them; a chat-rendered
        prompt already carries them in the template (TRL's ``apply_chat_template(tokenize=True)``)."""
        return self.style == "completion"

    def encode(self, text: str) -> list[int]:
        """Token ids of a prompt from this builder, tokenised as TRL tokenises it (:attr:`add_special_tokens`)."""
        if self.tokenizer is None:
            raise ValueError("PromptBuilder.encode needs the model's tokenizer (built with tokenizer=None)")
        return list(self.tokenizer(text, add_special_tokens=self.add_special_tokens)["input_ids"])

    @property
    def stop_strings(self) -> list[str]:
        """Strings that end a completion (beyond EOS)."""
        return [COMPLETION_STOP] if self.style == "completion" else []

    def question(self, problem: Problem) -> str:
        instruction = self.cfg.instruction.format(answer_hint=self.task.answer_hint)
        return f"{problem.prompt}\n{instruction}" if instruction else problem.prompt

    def __call__(self, problem: Problem) -> str:
        """The full prompt text for ``problem`` (the model continues it with the solution)."""
        if self.style == "chat":
            messages = [{"role": "system", "content": self.cfg.system}] if self.cfg.system else []
            for q, solution in self.shots:
                messages += [
                    {"role": "user", "content": self.question_text(q)},
                    {"role": "assistant", "content": solution},
                ]
            messages.append({"role": "user", "content": self.question(problem)})
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        blocks = [f"Question: {self.question_text(q)}\nSolution:\n{solution}" for q, solution in self.shots]
        blocks.append(f"Question: {self.question(problem)}\nSolution:\n")
        return "\n\n".join(blocks)

    def question_text(self, prompt: str) -> str:
        return self.question(Problem(id="", prompt=prompt, answer=""))
