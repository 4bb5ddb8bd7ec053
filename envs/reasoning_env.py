"""``ReasoningEnv``: a verifiable reasoning task as a gymnasium environment (one action = one step).

Observation: the transcript so far (prompt + the steps taken), as text, ending where the next step starts: after
a step that did not end the episode it ends with the step separator (a blank line), so an agent that continues
the text writes the next step, not a separator. Action: the next reasoning step, as text. The reward is 0 until
the episode ends; a step that states a final answer ends it (``terminated``) with the verifier's score. Hitting
``max_steps`` or ``max_chars`` ends it with reward 0 (``truncated``).

Example:
    >>> import gymnasium, rpe.envs
    >>> env = gymnasium.make("rpe/ChainSum-v0")
    >>> obs, info = env.reset(seed=0)
    >>> obs, reward, terminated, truncated, info = env.step("Answer: 3")
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import gymnasium
from gymnasium import spaces

from rpe.prompts import PromptBuilder, PromptConfig
from rpe.answers import has_final_answer
from rpe.tasks import Problem, Task, load_task

STEP_SEPARATOR = "\n\n"
_PRINTABLE = "".join(chr(c) for c in range(32, 127)) + "\n"


class TextSpace(spaces.Space[str]):
    """Any Unicode string of at most ``max_length`` characters (gymnasium's ``Text`` needs a finite charset,
    but model output can hold any character). ``sample()`` draws printable ASCII."""

    def __init__(self, max_length: int, seed: int | None = None):
        super().__init__(shape=None, dtype=None, seed=seed)
        self.max_length = max_length

    def contains(self, x: Any) -> bool:
        return isinstance(x, str) and len(x) <= self.max_length

    def sample(self, mask: Any = None, probability: Any = None) -> str:
        length = int(self.np_random.integers(1, min(self.max_length, 64) + 1))
        return "".join(self.np_random.choice(list(_PRINTABLE), size=length))

    @property
    def is_np_flattenable(self) -> bool:
        return False

    def __repr__(self) -> str:
        return f"TextSpace(max_length={self.max_length})"

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, TextSpace) and other.max_length == self.max_length


class ReasoningEnv(gymnasium.Env[str, str]):
    """A verifiable reasoning task as a text environment.

    Args:
        task: a :class:`rpe.tasks.Task` or a name for :func:`rpe.tasks.load_task` (default ``chain_sum``).
        n_problems: size of the problem pool; ``reset`` draws one uniformly with ``self.np_random``.
        problem_seed: seed of the pool (``task.problems(n_problems, problem_seed)``).
        prompt_fn: problem -> prompt text (e.g. a :class:`rpe.prompts.PromptBuilder` with a chat template);
            default: a few-shot completion-style prompt.
        max_steps: steps before the episode is truncated.
        max_chars: transcript length (characters) before the episode is truncated; also the observation bound.
    """

    metadata = {"render_modes": ["ansi"], "render_fps": 1}

    def __init__(
        self,
        task: Task | str = "chain_sum",
        *,
        n_problems: int = 1000,
        problem_seed: int = 0,
        prompt_fn: Callable[[Problem], str] | None = None,
        max_steps: int = 8,
        max_chars: int = 16_384,
        render_mode: str | None = None,
    ):
        if max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {max_steps}")
        if render_mode not in (None, "ansi"):
            raise ValueError(f"render_mode {render_mode!r} is not supported; use None or 'ansi'")
        self.task = load_task(task) if isinstance(task, str) else task
        self.problems = list(self.task.problems(n_problems, seed=problem_seed))
        if not self.problems:
            raise ValueError(f"task {self.task.name!r} has no problems")
        self.prompt_fn = prompt_fn or PromptBuilder(self.task, None, PromptConfig(style="completion"))
        self.max_steps = max_steps
        self.max_chars = max_chars
        self.render_mode = render_mode
        self.observation_space = TextSpace(max_chars)
        self.action_space = TextSpace(max_chars)
        self.problem: Problem | None = None
        self.prompt = ""
        self.steps: list[str] = []
        self._ended = False

    @property
    def completion(self) -> str:
        """The steps taken so far, joined by blank lines."""
        return STEP_SEPARATOR.join(self.steps)

    def _obs(self) -> str:
        """The context of the next step: the transcript, plus the separator after a step when the episode goes on."""
        sep = STEP_SEPARATOR if self.steps and not self._ended else ""
        return (self.prompt + self.completion + sep)[-self.max_chars :]

    def _info(self) -> dict[str, Any]:
        assert self.problem is not None
        return {"problem_id": self.problem.id, "step_index": len(self.steps), "answer": self.problem.answer}

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
        """Draw a problem (or take ``options["problem_index"]``) and return the prompt as observation.

        Returns:
            ``(observation, info)``: the prompt text, and ``{"problem_id", "step_index": 0, "answer"}``.
        """
        super().reset(seed=seed)
        index = (options or {}).get("problem_index")
        if index is None:
            index = int(self.np_random.integers(len(self.problems)))
        if not 0 <= index < len(self.problems):
            raise ValueError(f"problem_index {index} is outside the pool of {len(self.problems)} problems")
        self.problem = self.problems[index]
        self.prompt = self.prompt_fn(self.problem)
        self.steps = []
        self._ended = False
        return self._obs(), self._info()

    def step(self, action: str) -> tuple[str, float, bool, bool, dict[str, Any]]:
        """Append one reasoning step.

        Returns:
            ``(observation, reward, terminated, truncated, info)``: the transcript; the verifier's score when
            the step states a final answer, else 0.0; whether a final answer was given; whether a step or
            length limit cut the episode; ``{"problem_id", "step_index", "answer"}`` (+ ``"final": True``).
        """
        if self.problem is None:
            raise RuntimeError("call reset() before step()")
        if not isinstance(action, str):
            raise TypeError(f"action must be the step text (str), got {type(action).__name__}")
        self.steps.append(action.strip())
        info = self._info()
        terminated = has_final_answer(action)
        reward = float(self.task.score(self.problem, self.completion)) if terminated else 0.0
        truncated = not terminated and (
            len(self.steps) >= self.max_steps or len(self.prompt) + len(self.completion) >= self.max_chars
        )
        if terminated or truncated:
            info["final"] = True
            self._ended = True
        return self._obs(), reward, terminated, truncated, info

    def render(self) -> str | None:
        if self.render_mode == "ansi":
            return self._obs()
        return None

