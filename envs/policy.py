"""A language model as the agent of the reasoning environments: one step of text per call, for one episode or many.

``policy = LLMPolicy(model, tokenizer)`` is callable: ``policy(obs)`` returns the next step for one observation (the
transcript), ``policy(list_of_obs)`` a list (a vector environment's batch). So a plain gymnasium loop reads
``env.step(policy(obs))`` and a vector loop ``venv.step(policy(list(obs)))``.

One call = one batched decode across the given episodes, each row stopping at the step separator (a blank line),
an end token or ``max_step_tokens``; finished rows leave the batch (as in :mod:`rpe.decoding`). Each episode's KV
cache is kept between calls: a transcript that extends one the policy has seen feeds only its new tokens (the
environment's separator and the step the policy just wrote), so a T-step episode costs one prompt prefill (the
few-shot prefix shared by all episodes is encoded once), never a re-encode of the transcript. Where the
transcript's tokens differ from what was fed (a re-tokenised boundary), the cache is cropped to the common prefix
and the rest fed again; an unknown transcript (a new episode, an autoreset) starts from the shared prefix.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from rpe.decoding import (
    CONTINUOUS_MODEL_TYPES,
    concat_caches,
    crop_cache,
    decode_step,
    feed_tokens,
    hits_stop,
    left_pad_cache,
    next_tokens,
    row_generator,
)
from rpe.sampling import SamplingConfig, common_prefix_len, eos_ids, split_at_stop

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

STEP_STOP = "\n\n"


@dataclass
class _Episode:
    ids: list[int]
    """Tokens in the cache."""
    cache: object


class LLMPolicy:
    """Generates the next reasoning step of one or many episodes (see the module docstring).

    Args:
        model: a causal LM (Llama or Qwen2 architecture: its cache is kept and batched across episodes).
        tokenizer: its tokenizer.
        sampling: temperature (0 = greedy), top-k, top-p; ``max_new_tokens`` is ignored (``max_step_tokens``).
        max_step_tokens: budget of one step.
        seed: seeds the policy's sampling streams (call ``c``, row ``i`` draws from ``(seed, c * 4096 + i)``).
        max_episodes: cached episodes kept (least recently used are dropped).
    """

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, *,
                 sampling: SamplingConfig | None = None, max_step_tokens: int = 64, seed: int = 0,
                 max_episodes: int = 256):
        if getattr(model.config, "model_type", None) not in CONTINUOUS_MODEL_TYPES:
            raise ValueError(f"LLMPolicy keeps batched KV caches for {', '.join(CONTINUOUS_MODEL_TYPES)} models; "
                             f"got {model.config.model_type!r}")
        self.model = model
        self.tokenizer = tokenizer
        self.sampling = sampling or SamplingConfig()
        self.max_step_tokens = max_step_tokens
        self.seed = seed
        self.max_episodes = max_episodes
        self._episodes: list[_Episode] = []
        self._calls = 0
        self._ends = eos_ids(model, tokenizer)
        self.stats = {"calls": 0, "fed_tokens": 0, "generated_tokens": 0}
        """Work done so far: policy calls, tokens fed to extend cached transcripts, tokens generated."""

    def __call__(self, obs: str | Sequence[str]) -> str | list[str]:
        single = isinstance(obs, str)
        steps = self.act([obs] if single else list(obs))
        return steps[0] if single else steps

    # -- caches --------------------------------------------------------------------------------------------
    def _start(self, ids: list[int], siblings: Sequence[_Episode] = ()) -> _Episode:
        """The cached episode that ``ids`` extends (taken from the store), or a copy of the one sharing the longest
        prefix (e.g. the few-shot examples of another episode, also one started earlier in this call:
        ``siblings``) cropped to it, or a fresh one."""
        from transformers import DynamicCache

        best, keep = None, 0
        for ep in [*self._episodes, *siblings]:
            k = common_prefix_len([ep.ids, ids])
            if k > keep:
                best, keep = ep, k
        keep = min(keep, len(ids) - 1)  # the last token is fed again: its logits pick the first new token
        if best is None or keep <= 0:
            return _Episode([], DynamicCache(config=self.model.config))
        if keep == len(best.ids) and best in self._episodes:  # the transcript extends this episode: continue it
            self._episodes.remove(best)
            return best
        ep = _Episode(best.ids[:keep], copy.deepcopy(best.cache))  # share a prefix, leave the other episode be
        crop_cache(ep.cache, keep)
        return ep

    def _row_cache(self, cache, j: int, pad: int):
        """Row ``j`` of a batch cache without its ``pad`` left-padding columns, as a batch-1 cache."""
        from transformers import DynamicCache

        out = DynamicCache(config=self.model.config)
        for layer_idx, layer in enumerate(cache.layers):
            out.update(layer.keys[j : j + 1, :, pad:].clone(), layer.values[j : j + 1, :, pad:].clone(), layer_idx)
        return out

    def _feed(self, ep: _Episode, ids: list[int]) -> torch.Tensor:
        """Feed ``ids[len(ep.ids):]`` into the episode's cache; returns the last position's logits (V,)."""
        new = ids[len(ep.ids):]
        logits = feed_tokens(self.model, ep.cache, new, len(ep.ids))
        self.stats["fed_tokens"] += len(new)
        ep.ids = list(ids)
        return logits

    # -- acting --------------------------------------------------------------------------------------------
    def act(self, observations: list[str]) -> list[str]:
        """The next step's text for each observation (transcripts), decoded together."""
        device = next(self.model.parameters()).device
        call = self._calls
        self._calls += 1
        self.stats["calls"] += 1
        with torch.inference_mode():
            all_ids = [self.tokenizer(o, add_special_tokens=False)["input_ids"] for o in observations]
            episodes, logits = [], []
            for ids in all_ids:
                ep = self._start(ids, episodes)  # a new episode copies the shared prefix of one fed before it
                episodes.append(ep)
                logits.append(self._feed(ep, ids))
            # one batch: every cache left-padded to the longest, masks marking the real positions
            lengths = [len(ep.ids) for ep in episodes]
            width = max(lengths)
            pads = [width - n for n in lengths]
            caches = []
            for ep, pad in zip(episodes, pads):
                c = copy.deepcopy(ep.cache)
                left_pad_cache(c, pad)
                caches.append(c)
            cache = caches[0]
            for c in caches[1:]:
                concat_caches(cache, c)
            mask = torch.tensor([[0] * pad + [1] * n for pad, n in zip(pads, lengths)])
            last = torch.stack(logits)
            gens = [row_generator(self.seed, call * 4096 + i) for i in range(len(episodes))]
            generated: list[list[int]] = [[] for _ in episodes]
            alive = list(range(len(episodes)))
            while alive:
                keep = []
                for j, (i, tok) in enumerate(zip(alive, next_tokens(last, self.sampling, [gens[i] for i in alive]))):
                    fed_all = tok in self._ends  # an end token: every generated token was fed back
                    if not fed_all:
                        generated[i].append(tok)
                        if (len(generated[i]) < self.max_step_tokens
                                and not hits_stop(self.tokenizer, generated[i], [STEP_STOP])):
                            keep.append(j)
                            continue
                    # the row is done: its cache leaves the batch with the episode (the last token, not fed, is
                    # fed with the environment's next transcript)
                    fed = generated[i] if fed_all else generated[i][:-1]
                    episodes[i].cache = self._row_cache(cache, j, pads[i])
                    episodes[i].ids = episodes[i].ids + fed
                if not keep:
                    break
                if len(keep) < len(alive):
                    cache.batch_select_indices(torch.tensor(keep, device=device))
                    mask = mask[keep]
                    alive = [alive[j] for j in keep]
                last, mask = decode_step(self.model, cache, mask, [generated[i][-1] for i in alive],
                                         [lengths[i] + len(generated[i]) - 1 for i in alive])
        steps = []
        for ep, gen in zip(episodes, generated):
            self.stats["generated_tokens"] += len(gen)
            _, text, _, _ = split_at_stop(self.tokenizer, gen, [STEP_STOP])
            steps.append(text.strip())
            self._episodes.append(ep)  # its cache holds the transcript the environment will extend
        del self._episodes[: max(0, len(self._episodes) - self.max_episodes)]
        return steps


__all__ = ["LLMPolicy", "STEP_STOP"]
