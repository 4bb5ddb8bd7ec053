"""Prompt selection for GRPO / RLOO by the model's internal value V(s_0), before anything is generated.

In GRPO a prompt whose G samples all fail (or all succeed) has zero advantage: everything generated for it
teaches nothing. One prefill per candidate prompt gives its internal value V(s_0) (the value neurons at the
prompt's last token; no token generated), and a prompt predicted near 0 or near 1 can be skipped before its
samples are paid for. Kept: prompts with ``low <= V(s_0) <= high``, plus a random ``explore`` share of the others
(the probe is wrong sometimes, and a policy that improves moves prompts out of the hopeless band).

Controls, each at the same keep rate as the selection it is compared with (:func:`select_matched`,
:func:`select_by_score`, :func:`random_keep`): the same cut driven by the question's length (as many of the
longest skipped as the band skipped as hopeless, as many of the shortest as it skipped as solved) or by the
task's difficulty features, and random skipping. :func:`zero_advantage_share` is the measurement: the share of
groups whose G sampled rewards are all equal.

Refreshed as the policy moves: :class:`LiveSelection` holds the kept set over the whole training set and
:class:`SelectionSampler` draws GRPO's prompt groups from whatever it holds at each draw (TRL's ``RepeatSampler``
order when everything is kept), so a callback that re-reads V(s_0) with the current policy
(``rpe.trainers.selection.SelectionRefresh``) changes which prompts the next batches take.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass
class SelectionConfig:
    """Options of prompt selection."""

    low: float = 0.05
    """Prompts with V(s_0) below this are predicted hopeless (all G samples fail) and skipped."""
    high: float = 0.95
    """Prompts with V(s_0) above this are predicted solved (all G samples succeed) and skipped."""
    explore: float = 0.1
    """Share of the skipped prompts kept anyway, at random (exploration; 0 = none)."""
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.low <= self.high <= 1:
            raise ValueError(f"need 0 <= low <= high <= 1, got low={self.low}, high={self.high}")
        if not 0 <= self.explore <= 1:
            raise ValueError(f"explore must lie in [0, 1], got {self.explore}")


def in_band(values: np.ndarray, cfg: SelectionConfig) -> np.ndarray:
    """(n,) bool: the values inside the band ``[cfg.low, cfg.high]`` (ends included)."""
    values = np.asarray(values, dtype=np.float64)
    return (values >= cfg.low) & (values <= cfg.high)


def select_by_value(values: np.ndarray, cfg: SelectionConfig) -> np.ndarray:
    """(n,) bool: keep the prompts whose V(s_0) lies in ``[low, high]``, and a random ``explore`` share of the rest
    (deterministic for ``cfg.seed``)."""
    values = np.asarray(values, dtype=np.float64)
    if np.isnan(values).any():
        raise ValueError("select_by_value: a prompt's value is NaN (check the model's activations and the bundle)")
    keep = in_band(values, cfg)
    rng = np.random.default_rng(cfg.seed)
    outside = np.flatnonzero(~keep)
    keep[outside[rng.random(len(outside)) < cfg.explore]] = True
    return keep


def select_by_score(scores: np.ndarray, n_keep: int, *, two_sided: bool = True) -> np.ndarray:
    """(n,) bool: ``n_keep`` prompts chosen by another predictor at the same keep rate (a control): with
    ``two_sided`` the prompts whose score ranks nearest the middle (both extremes dropped, as the value band drops
    both), else the ``n_keep`` highest."""
    scores = np.asarray(scores, dtype=np.float64)
    n_keep = int(min(max(n_keep, 0), len(scores)))
    if two_sided:
        ranks = np.argsort(np.argsort(scores, kind="stable"), kind="stable")
        order = np.argsort(np.abs(ranks - (len(scores) - 1) / 2), kind="stable")
    else:
        order = np.argsort(-scores, kind="stable")
    keep = np.zeros(len(scores), dtype=bool)
    keep[order[:n_keep]] = True
    return keep


def select_matched(scores: np.ndarray, n_below: int, n_above: int) -> np.ndarray:
    """(n,) bool: the same cut as a value band made, driven by another predictor: drop the ``n_below`` prompts it
    ranks lowest (predicted hardest) and the ``n_above`` it ranks highest (predicted easiest), keep the rest. With
    ``scores`` = minus the question's length, this is "skip the longest and the shortest as the band skipped the
    hopeless and the solved"; ties keep the earlier prompt."""
    scores = np.asarray(scores, dtype=np.float64)
    n = len(scores)
    n_below, n_above = int(min(max(n_below, 0), n)), int(min(max(n_above, 0), n))
    if n_below + n_above > n:
        raise ValueError(f"cannot drop {n_below} + {n_above} of {n} prompts")
    order = np.argsort(scores, kind="stable")
    keep = np.ones(n, dtype=bool)
    keep[order[:n_below]] = False
    if n_above:
        keep[order[n - n_above:]] = False
    return keep


def band_cut(values: np.ndarray, keep: np.ndarray, cfg: SelectionConfig) -> tuple[int, int]:
    """How many prompts a value selection skipped below the band and above it (``keep`` from
    :func:`select_by_value`): what a matched control skips from each end."""
    values = np.asarray(values, dtype=np.float64)
    return int(((values < cfg.low) & ~keep).sum()), int(((values > cfg.high) & ~keep).sum())


def random_keep(n: int, n_keep: int, seed: int = 0) -> np.ndarray:
    """(n,) bool: ``n_keep`` prompts kept uniformly at random (the random-skipping control)."""
    keep = np.zeros(n, dtype=bool)
    keep[np.random.default_rng(seed).choice(n, size=int(min(max(n_keep, 0), n)), replace=False)] = True
    return keep


def zero_advantage_share(rewards: Sequence[Sequence[float]]) -> float:
    """Share of groups (one per prompt: its G samples' rewards) whose rewards are all equal: zero advantage after
    GRPO's group normalisation, nothing learnt from the group."""
    groups = [np.asarray(g, dtype=np.float64) for g in rewards]
    if not groups:
        return float("nan")
    return float(np.mean([bool(np.all(g == g[0])) for g in groups]))


def prompt_values(model, tokenizer, bundle, prompts: Sequence[str], batch_size: int = 16) -> np.ndarray:
    """(n,) V(s_0) of each prompt text: one prefill per prompt (batched), the value neurons read at its last
    token, tokenised as the bundle's prompts were; no token is generated."""
    return bundle.value(model, tokenizer, list(prompts), batch_size=batch_size).float().cpu().numpy()


def prompt_text(prompt, tokenizer) -> str:
    """The model input text of a TRL dataset's ``prompt``: plain text as is, a conversation (list of messages)
    through the tokenizer's chat template with the generation prompt (as TRL renders it)."""
    if isinstance(prompt, str):
        return prompt
    return tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True, tokenize=False)


class LiveSelection:
    """The prompts kept now, over the whole training set, updated from fresh V(s_0) (:meth:`update`).

    Attributes:
        keep: (n,) bool, the prompts the next draws may take.
        values: (n,) the V(s_0) the last update used.
        updates: how many times :meth:`update` ran (the first is the selection before training).
    """

    def __init__(self, values: np.ndarray, cfg: SelectionConfig):
        self.cfg = cfg
        self.updates = 0
        self.update(values)

    def update(self, values: np.ndarray) -> np.ndarray:
        """Keep what :func:`select_by_value` keeps of ``values`` (the explore draw seeded by ``(seed, update)``);
        returns the new mask.

        Raises:
            ValueError: NaN values, or none kept (the last kept set stays).
        """
        from dataclasses import replace

        keep = select_by_value(values, replace(self.cfg, seed=self.cfg.seed * 1_000_003 + self.updates))
        if not keep.any():
            raise ValueError(f"prompt selection kept none of {len(keep)} prompts (V(s_0) from {np.min(values):.3f} "
                             f"to {np.max(values):.3f}, band [{self.cfg.low}, {self.cfg.high}])")
        self.keep, self.values = keep, np.asarray(values, dtype=np.float64)
        self.updates += 1
        return keep


class SelectionSampler:
    """Indices of GRPO's prompt groups (as TRL's ``RepeatSampler`` yields them: a shuffled order cut into chunks of
    ``batch_size`` prompts, each chunk ``repeat_count`` times, each prompt ``mini_repeat_count`` times in a row),
    taking only prompts that ``selection.keep`` holds when their chunk is drawn. With everything kept the order
    equals ``RepeatSampler``'s for the same seed.
    """

    def __init__(self, selection: LiveSelection, mini_repeat_count: int, batch_size: int = 1, repeat_count: int = 1,
                 shuffle: bool = True, seed: int | None = None):
        import torch

        self.selection = selection
        self.mini_repeat_count, self.batch_size, self.repeat_count = mini_repeat_count, batch_size, repeat_count
        self.num_samples = len(selection.keep)
        self.shuffle = shuffle
        self.generator = torch.Generator()
        if seed is not None:
            self.generator.manual_seed(seed)

    def __iter__(self):
        import torch

        order = (torch.randperm(self.num_samples, generator=self.generator).tolist() if self.shuffle
                 else list(range(self.num_samples)))
        chunk: list[int] = []
        for index in order:
            if not self.selection.keep[index]:
                continue  # skipped as the selection stands now
            chunk.append(index)
            if len(chunk) < self.batch_size:
                continue
            for _ in range(self.repeat_count):
                for i in chunk:
                    yield from [i] * self.mini_repeat_count
            chunk = []

    def __len__(self) -> int:
        return (self.num_samples // self.batch_size) * self.batch_size * self.mini_repeat_count * self.repeat_count


SELECT_BY = ("value", "length", "random")
"""Rules of :func:`select_dataset`: the internal value's band, or a control at the band's keep rate."""


def select_dataset(dataset, model, tokenizer, bundle, cfg: SelectionConfig, *, prompt_column: str = "prompt",
                   batch_size: int = 16, select_by: str = "value",
                   questions: Sequence[str] | None = None) -> tuple[object, dict[str, float]]:
    """A TRL training dataset narrowed to the prompts a rule keeps (their V(s_0) in a column ``rpe_value_s0``),
    and a summary (``n``, ``kept``, ``kept_share``, ``below_low``, ``above_high``, ``select_by``).

    ``select_by``: ``value`` keeps what :func:`select_by_value` keeps; the controls keep as many prompts as it
    would: ``length`` skips as many of the longest questions (characters of ``questions``, default the prompt
    texts) as the band skipped as hopeless and as many of the shortest as it skipped as solved
    (:func:`select_matched`), ``random`` a uniform draw (:func:`random_keep`, ``cfg.seed``).

    Raises:
        ValueError: the dataset has no ``prompt_column``, an unknown rule, ``questions`` of another length, or
            every prompt is skipped (widen ``low``/``high`` or raise ``explore``).
    """
    if prompt_column not in dataset.column_names:
        raise ValueError(f"the dataset has no column {prompt_column!r} (columns: {', '.join(dataset.column_names)})")
    if select_by not in SELECT_BY:
        raise ValueError(f"select_by {select_by!r} is not one of {', '.join(SELECT_BY)}")
    texts = [prompt_text(p, tokenizer) for p in dataset[prompt_column]]
    if questions is not None and len(questions) != len(texts):
        raise ValueError(f"{len(questions)} questions for {len(texts)} prompts")
    values = prompt_values(model, tokenizer, bundle, texts, batch_size=batch_size)
    keep = select_by_value(values, cfg)
    if not keep.any():
        raise ValueError(f"prompt selection kept none of {len(values)} prompts (V(s_0) from {values.min():.3f} to "
                         f"{values.max():.3f}, band [{cfg.low}, {cfg.high}]): widen the band or raise explore")
    if select_by == "length":
        keep = select_matched(-np.array([len(q) for q in (questions or texts)], dtype=np.float64),
                              *band_cut(values, keep, cfg))
    elif select_by == "random":
        keep = random_keep(len(values), int(keep.sum()), seed=cfg.seed)
    summary = {"n": int(len(values)), "kept": int(keep.sum()), "kept_share": float(keep.mean()),
               "below_low": float((values < cfg.low).mean()), "above_high": float((values > cfg.high).mean()),
               "select_by": select_by}
    narrowed = dataset.add_column("rpe_value_s0", values.tolist()).select(np.flatnonzero(keep).tolist())
    return narrowed, summary


__all__ = ["SELECT_BY", "LiveSelection", "SelectionConfig", "SelectionSampler", "band_cut", "prompt_text",
           "prompt_values", "random_keep", "select_by_score", "select_by_value", "select_dataset", "select_matched",
           "zero_advantage_share"]
