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

Shared prefix: when the episodes of one call share a prefix (the few-shot examples), the batch holds its keys
and values once (:class:`rpe.prefix_attention.SharedPrefix`, batch dimension 1) and each row's cache only the
row's own tokens, so a decode step reads the prefix once rather than once per episode (``share_prefix``, on by
default where :func:`rpe.prefix_attention.prefix_attention_refusal` allows; the outputs equal the copied prefix's).

The policy keeps its own tokens: when the next observation is the transcript it just extended (the step it wrote
plus the separator, as :class:`~rpe.envs.ReasoningEnv` returns it), it continues from the tokens it generated
rather than a re-tokenisation of the text (which can differ: SmolLM2 writes a blank line as two ``"\n"`` tokens,
its tokenizer encodes it as one ``"\n\n"``, and the model continues differently after the one it never writes).

Recording (:meth:`LLMPolicy.record`, used by :class:`~rpe.envs.InternalRPE`): the chosen neurons of one layer are
kept for every token fed to an episode's cache, prompt, fed observations and generated steps alike, so the
wrapper reads the step's internal value from what the policy computed anyway, without a forward of its own.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from rpe.decoding import decode_step, feed_tokens
from rpe.kvcache import (cache_nbytes, common_prefix_len, crop_cache, plain_cache_refusal, shared_prefix_len,
                         stack_caches)
from rpe.prefix_attention import SharedPrefix, prefix_attention_refusal, switched_attention
from rpe.sampling import SamplingConfig, eos_ids, hits_stop, logits_device, next_tokens, row_generator, split_at_stop

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

STEP_STOP = "\n\n"


@dataclass(eq=False)  # episodes are compared by identity (their tensors have no truth value)
class _Episode:
    ids: list[int]
    """Tokens in the cache."""
    cache: object
    text: str | None = None
    """The transcript that ``ids + pending`` encode (the observation plus the step generated from it), when known."""
    pending: list[int] = field(default_factory=list)
    """Tokens of ``text`` not fed yet (the last token of a step: its logits were never needed)."""
    acts: torch.Tensor | None = None
    """(len(ids), k) recorded neurons of the fed tokens (when the policy records)."""


class LLMPolicy:
    """Generates the next reasoning step of one or many episodes (see the module docstring).

    Args:
        model: a causal LM whose cache layers are plain full attention (:func:`rpe.kvcache.plain_cache_refusal`:
            Llama, Qwen2, Qwen3, Phi-3, Mistral without a window); its cache is kept and batched across episodes.
        tokenizer: its tokenizer.
        sampling: temperature (0 = greedy), top-k, top-p; ``max_new_tokens`` is ignored (``max_step_tokens``).
        max_step_tokens: budget of one step.
        seed: seeds the policy's sampling streams (call ``c``, row ``i`` draws from ``(seed, c * 4096 + i)``).
        max_episodes: cached episodes kept (least recently used are dropped).
        max_cache_bytes: device memory the kept episode caches may hold together (least recently used are
            dropped first; the newest is always kept). Default 4 GiB: Llama-3-8B's bf16 cache is 128 KiB per
            token, so about 16 episodes of 2,048 tokens.
        add_special_tokens: let the tokenizer add its special tokens (a BOS) to a new observation: True for
            plain completion prompts, as TRL and ``rpe rollouts`` tokenise them (a bundle fitted on such prompts
            refuses a read without the BOS); chat-rendered prompts carry them in the template.
        share_prefix: keep the prefix the episodes of one call share once, attended by every row
            (:mod:`rpe.prefix_attention`), rather than a copy per row; ignored (copied) where the model's attention
            cannot be served that way. Same tokens and recordings either way.
        min_shared_prefix: the shortest shared prefix (tokens) worth sharing.
    """

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, *,
                 sampling: SamplingConfig | None = None, max_step_tokens: int = 64, seed: int = 0,
                 max_episodes: int = 256, max_cache_bytes: int = 4 << 30, add_special_tokens: bool = False,
                 share_prefix: bool = True, min_shared_prefix: int = 16):
        refusal = plain_cache_refusal(model)
        if refusal is not None:
            raise ValueError(f"LLMPolicy keeps episode caches batched and padded, which needs plain full-attention cache "
                             f"layers; in this {model.config.model_type} model {refusal}")
        self.model = model
        self.tokenizer = tokenizer
        self.sampling = sampling or SamplingConfig()
        self.max_step_tokens = max_step_tokens
        self.seed = seed
        self.max_episodes = max_episodes
        self.max_cache_bytes = max_cache_bytes
        self.add_special_tokens = add_special_tokens
        self.share_prefix = share_prefix and prefix_attention_refusal(model) is None
        self.min_shared_prefix = min_shared_prefix
        self._episodes: list[_Episode] = []
        self._calls = 0
        self._ends = eos_ids(model, tokenizer)
        self._record: tuple[int, torch.Tensor] | None = None
        self.stats = {"calls": 0, "fed_tokens": 0, "generated_tokens": 0, "shared_prefix_tokens": 0}
        """Work done so far: policy calls, tokens fed to extend cached transcripts, tokens generated, and the
        prefix tokens the calls' batches held once instead of once per row (summed over calls)."""

    def record(self, layer: int, columns: torch.Tensor) -> None:
        """Keep the activations of ``columns`` (LongTensor (k,), neuron indices) at decoder block ``layer`` for every
        token fed from now on; :meth:`observe` returns them. Episodes cached before have no record and are dropped.

        Raises:
            ValueError: the policy already records another layer or other neurons (one bundle per policy).
        """
        from rpe.tracker import check_layers

        check_layers(self.model, [layer])
        columns = torch.as_tensor(columns, dtype=torch.long).cpu()
        if self._record is not None:
            if self._record[0] != layer or not torch.equal(self._record[1], columns):
                raise ValueError(f"this LLMPolicy already records layer {self._record[0]} for another bundle; use one "
                                 "policy per bundle (or the same bundle for every InternalRPE wrapper)")
            return
        self._record = (layer, columns)
        self._episodes.clear()

    def _tracker(self):
        from rpe.tracker import ActivationTracker

        if self._record is None:
            return contextlib.nullcontext()
        layer, columns = self._record
        return ActivationTracker(self.model, [layer], neurons=columns, record_all=True)

    def _recorded(self, tracker) -> torch.Tensor | None:
        """(B, T, k) of the last forward, or None when not recording."""
        return None if self._record is None else tracker.take_last()[self._record[0]]

    def __call__(self, obs: str | Sequence[str]) -> str | list[str]:
        single = isinstance(obs, str)
        steps = self.act([obs] if single else list(obs))
        return steps[0] if single else steps

    # -- caches --------------------------------------------------------------------------------------------
    def _start(self, ids: list[int], siblings: Sequence[_Episode] = (), *, whole: bool = False) -> _Episode:
        """An episode whose cache holds a prefix of ``ids`` (all but the last token, or all with ``whole``): the
        cached episode ``ids`` extends or repeats (taken from the store), else a copy of the one sharing the longest
        prefix (e.g. the few-shot examples of another episode, also one started earlier in this call:
        ``siblings``) cropped to it, else a fresh one."""
        from transformers import DynamicCache

        best, common = None, 0
        for ep in [*self._episodes, *siblings]:
            k = common_prefix_len([ep.ids, ids])
            if k > common:
                best, common = ep, k
        keep = common if whole else min(common, len(ids) - 1)  # the last token is fed with the batch's first step
        if best is None or keep <= 0:
            return _Episode([], DynamicCache(config=self.model.config), acts=self._empty_acts())
        if common == len(best.ids) and best in self._episodes:  # the transcript extends (or repeats) this episode
            self._episodes.remove(best)
            ep = best
        else:  # share a prefix (a copy of its first ``keep`` positions), leave the other episode be
            ep = _Episode(best.ids[:keep], self._row_cache(best.cache, 0, 0, keep),
                          acts=None if best.acts is None else best.acts[:keep].clone())
        if keep < len(ep.ids):
            crop_cache(ep.cache, keep)
        ep.ids = ep.ids[:keep]
        ep.acts = None if ep.acts is None else ep.acts[:keep]
        ep.text, ep.pending = None, []
        return ep

    def _empty_acts(self) -> torch.Tensor | None:
        return None if self._record is None else torch.zeros(0, self._record[1].numel())

    def _row_cache(self, cache, j: int, start: int = 0, end: int | None = None, prefix: SharedPrefix | None = None):
        """A batch-1 copy of row ``j`` of ``cache``, positions ``start:end`` (e.g. without a row's left padding,
        or a shared prefix), behind ``prefix`` when given (a row of a batch that held the shared prefix once)."""
        from transformers import DynamicCache

        out = DynamicCache(config=self.model.config)
        for layer_idx, layer in enumerate(cache.layers):
            keys, values = layer.keys[j : j + 1, :, start:end], layer.values[j : j + 1, :, start:end]
            if prefix is not None:  # the concatenation is the copy
                keys = torch.cat([prefix.keys[layer_idx], keys], 2)
                values = torch.cat([prefix.values[layer_idx], values], 2)
            else:
                keys, values = keys.clone(), values.clone()
            out.update(keys, values, layer_idx)
        return out

    def _feed(self, ep: _Episode, ids: list[int], tracker=None) -> None:
        """Feed ``ids[len(ep.ids):]`` into the episode's cache (recording into ``ep.acts`` when the policy records)."""
        new = ids[len(ep.ids):]
        if not new:
            return
        feed_tokens(self.model, ep.cache, new, len(ep.ids))
        got = self._recorded(tracker)
        if got is not None and ep.acts is not None:
            ep.acts = torch.cat([ep.acts, got[0]])
        self.stats["fed_tokens"] += len(new)
        ep.ids = list(ids)

    def encode(self, observation: str) -> list[int]:
        """Token ids of an observation as the policy feeds it: its own tokens of a transcript it wrote (plus the
        tokenised rest when the observation extends it), else the tokenizer's."""
        known = [ep for ep in self._episodes if ep.text is not None and observation.startswith(ep.text)]
        if not known:
            ids = self.tokenizer(observation, add_special_tokens=self.add_special_tokens)["input_ids"]
        else:
            ep = max(known, key=lambda e: len(e.text or ""))  # the longest transcript the observation extends
            rest = observation[len(ep.text or ""):]
            ids = ep.ids + ep.pending + (self.tokenizer(rest, add_special_tokens=False)["input_ids"] if rest else [])
        if len(ids) < 2:
            raise ValueError(f"LLMPolicy needs an observation of at least two tokens (a prompt); got {observation!r}")
        return ids

    def observe(self, observation: str, *, upto: int | None = None) -> tuple[list[int], torch.Tensor]:
        """The tokens of ``observation`` (:meth:`encode`) and the recorded activations of at least the first ``upto``
        of them (default: all), feeding only what the policy has not computed (a new episode's prompt, an action
        from elsewhere).

        A step the policy wrote itself costs nothing: its tokens were recorded while it generated them, and what
        was not fed (the step separator, when ``upto`` stops before it) is fed by the next :meth:`act` with its
        batch.

        Returns:
            ``(ids, acts)``: the transcript's token ids, and (n, k) float32 activations of the recorded columns for
            ``ids[:n]``, with ``upto <= n <= len(ids)``.

        Raises:
            RuntimeError: the policy does not record (:meth:`record`).
        """
        if self._record is None:
            raise RuntimeError("LLMPolicy.observe needs recording: call policy.record(layer, columns) first")
        ids = self.encode(observation)
        need = len(ids) if upto is None else min(upto, len(ids))
        for ep in self._episodes:  # recorded already (the policy wrote it)
            k = common_prefix_len([ep.ids, ids])
            if k >= need and ep.acts is not None and len(ep.acts) >= k:
                return list(ids), ep.acts[:k]
        with torch.inference_mode(), self._tracker() as tracker:
            ep = self._start(ids, whole=True)
            self._feed(ep, ids, tracker)
        ep.text = observation
        self._keep(ep)
        assert ep.acts is not None and len(ep.acts) == len(ids)
        return list(ids), ep.acts

    def _keep(self, ep: _Episode) -> None:
        self._episodes.append(ep)
        del self._episodes[: max(0, len(self._episodes) - self.max_episodes)]
        sizes = [cache_nbytes(e.cache) for e in self._episodes]
        while len(self._episodes) > 1 and sum(sizes) > self.max_cache_bytes:
            self._episodes.pop(0)
            sizes.pop(0)

    @property
    def cache_bytes(self) -> int:
        """Bytes of keys and values the kept episode caches hold."""
        return sum(cache_nbytes(e.cache) for e in self._episodes)

    def _shared_prefix(self, episodes: Sequence[_Episode]) -> SharedPrefix | None:
        """The prefix the caches of ``episodes`` share (from the first's cache; every episode keeps at least one
        token of its own), or None when sharing is off, there is one episode or the prefix is short."""
        if not self.share_prefix or len(episodes) < 2:
            return None
        n = shared_prefix_len([ep.ids for ep in episodes], self.min_shared_prefix)
        if not n:
            return None
        layers = episodes[0].cache.layers
        self.stats["shared_prefix_tokens"] += n
        return SharedPrefix([layer.keys[:, :, :n] for layer in layers], [layer.values[:, :, :n] for layer in layers])

    # -- acting --------------------------------------------------------------------------------------------
    def act(self, observations: list[str]) -> list[str]:
        """The next step's text for each observation (transcripts), decoded together."""
        call = self._calls
        self._calls += 1
        self.stats["calls"] += 1
        with torch.inference_mode(), self._tracker() as tracker:
            all_ids = [self.encode(o) for o in observations]
            episodes = []
            for ids in all_ids:
                ep = self._start(ids, episodes)  # a new episode copies the shared prefix of one fed before it
                self._feed(ep, ids[:-1], tracker)  # the last token goes with the batch's first step
                episodes.append(ep)
            # one batch: every cache left-padded to the longest, masks marking the real positions (the episodes'
            # own caches are used: each gets its row back when its step ends). A prefix every episode shares is
            # held once and each row keeps only its own tokens.
            shared = self._shared_prefix(episodes)
            start = 0 if shared is None else shared.length
            lengths = [len(ep.ids) - start for ep in episodes]
            pads = [max(lengths) - n for n in lengths]
            own = ([ep.cache for ep in episodes] if shared is None
                   else [self._row_cache(ep.cache, 0, start) for ep in episodes])
            cache = stack_caches(own, pads)
            forward_kwargs = {} if shared is None else {"shared_prefix": shared}
            mask = torch.tensor([[0] * pad + [1] * n for pad, n in zip(pads, lengths)])
            sample_on = logits_device(self.model)
            gens = [row_generator(self.seed, call * 4096 + i, sample_on) for i in range(len(episodes))]
            generated: list[list[int]] = [[] for _ in episodes]
            fed: list[list[torch.Tensor]] = [[] for _ in episodes]  # recorded (k,) per token fed in the batch
            alive = list(range(len(episodes)))
            tokens = [ids[-1] for ids in all_ids]  # each observation's last token, then the generated ones
            attention = switched_attention(self.model) if shared is not None else contextlib.nullcontext()
            with attention:  # checked in __init__
                while True:
                    last, mask = decode_step(self.model, cache, mask, tokens,
                                             [len(all_ids[i]) + len(generated[i]) - 1 for i in alive],
                                             **forward_kwargs)
                    got = self._recorded(tracker)
                    if got is not None:
                        for j, i in enumerate(alive):
                            fed[i].append(got[j, 0])
                    keep = []
                    for j, (i, tok) in enumerate(zip(alive, next_tokens(last, self.sampling, [gens[i] for i in alive]))):
                        ends = tok in self._ends  # an end token: every generated token was fed back
                        if not ends:
                            generated[i].append(tok)
                            if (len(generated[i]) < self.max_step_tokens
                                    and not hits_stop(self.tokenizer, generated[i], [STEP_STOP])):
                                keep.append(j)
                                continue
                        # the row is done: its cache leaves the batch with the episode; a last generated token (not
                        # fed) is fed with the episode's next step
                        ep = episodes[i]
                        ep.cache = self._row_cache(cache, j, pads[i], prefix=shared)
                        ep.ids = all_ids[i] + (generated[i] if ends else generated[i][:-1])
                        ep.pending = [] if ends else generated[i][-1:]
                        if ep.acts is not None:
                            ep.acts = torch.cat([ep.acts, torch.stack(fed[i])])
                    if not keep:
                        break
                    if len(keep) < len(alive):
                        cache.batch_select_indices(torch.tensor(keep))  # CPU indices serve layers on every device
                        mask = mask[keep]
                        alive = [alive[j] for j in keep]
                    tokens = [generated[i][-1] for i in alive]
        self.stats["fed_tokens"] += len(episodes)  # each observation's last token
        steps = []
        for obs, ep, gen in zip(observations, episodes, generated):
            self.stats["generated_tokens"] += len(gen)
            kept, text, stopped, tail = split_at_stop(self.tokenizer, gen, [STEP_STOP])
            step = text.strip()
            steps.append(step)
            # the transcript the environment will return: the observation, the step, the separator. When the
            # generated tokens spell exactly that, the next call continues from them (the model's own tokens)
            exact = (stopped and step == text and kept + tail == gen
                     and self.tokenizer.decode(gen, skip_special_tokens=True) == text + STEP_STOP)
            ep.text = obs + text + STEP_STOP if exact else None
            self._keep(ep)  # its cache holds the transcript the environment will extend
        return steps


__all__ = ["LLMPolicy", "STEP_STOP"]
