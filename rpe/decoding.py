"""Continuous batching for sampling on a CPU: finished rows stop costing compute, and free slots are refilled.

``model.generate`` runs a padded batch until its longest row stops: with completions of 35 tokens on average and a
128-token budget, most decode steps are spent on rows that already finished. :func:`generate_continuous` runs its
own decode loop over a KV cache (``transformers.DynamicCache``):

- every prompt waits in a queue; up to ``max_rows`` rows decode together;
- after each step the rows that ended (EOS, a stop string, the token budget) are removed from the batch and from
  the cache (``batch_select_indices``), so they cost nothing more;
- when ``refill`` or more slots are free, waiting prompts are prefilled as a group (the shared few-shot prefix is
  encoded once for the whole call and stored once: every row attends to that one copy through
  :mod:`rpe.prefix_attention`, or, with ``share_prefix=False``, its cache is copied into each group; identical prompts in a group, such as
  the N Monte-Carlo continuations of one state, are prefilled once and their cache copied) and joined to the
  running batch: the
  shorter of the two caches is left-padded with masked positions (keys carry their rotary positions already,
  and each row's next position comes from its own token count, so padding shifts nothing).

Sampling is per row: row ``i`` draws from its own ``torch.Generator`` seeded with ``(seed, i)``, so a row's
completion depends on its prompt, the seed and its index only, not on which rows share its batch or when it was
admitted (up to floating-point differences between batch shapes of the same matmuls). Temperature, top-k and
top-p are applied in transformers' order. The completions are therefore not token-identical to
``model.generate`` with ``torch.manual_seed(seed)`` (which draws all rows from one stream); they are identical
across batch sizes and refill timings, which is what resuming and batching need.

Activations can be recorded during the loop (``record_layers``): every forward's block outputs are split by row,
so row ``i`` gets the activations of its prompt suffix (after the shared prefix) and of every generated token
that was fed back, exactly as a separate forward over the same tokens gives them (tested).

Supported for models whose cache layers are all plain full attention (:func:`rpe.kvcache.plain_cache_refusal`
reads them from the cache the config builds: Llama, Qwen2, Qwen3, Mistral without a sliding window, Phi-3);
models with sliding-window layers (Gemma-3, Mistral or Qwen2 with a window) use ``model.generate``
(:func:`rpe.generation.generate_from_ids`), as do models whose generation config asks for processing this loop
does not apply (a repetition penalty, minimum lengths, ...).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from rpe.kvcache import cache_kwarg, cache_len, plain_cache_refusal, prefix_cache, shared_prefix_len, stack_caches
from rpe.prefix_attention import SharedPrefix, prefix_attention_refusal, switched_attention
from rpe.sampling import (
    GeneratedBatch, SamplingConfig, eos_ids, hits_stop, logits_device, next_tokens, row_generator, split_at_stop,
)


@dataclass
class _Row:
    index: int
    generator: torch.Generator
    n_real: int
    """Tokens of this row the model has seen or will see next (its next position id)."""
    generated: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    recorded: dict[int, list[torch.Tensor]] = field(default_factory=dict)
    positions: list[int] = field(default_factory=list)
    """Boundary-only recording: the position of each kept row of ``recorded``."""
    keeper: BoundaryKeeper | None = None
    held: dict[int, dict[int, torch.Tensor]] = field(default_factory=dict)
    """Boundary-only recording: activations of the tokens the keeper holds back."""
    finish: str | None = None
    watch: object | None = None
    """Early stopping: the row's :class:`rpe.rollout_stop.RowWatch`."""

    def keep(self, positions: Sequence[int]) -> None:
        for position in positions:
            for layer, a in self.held.pop(position).items():
                self.recorded[layer].append(a)
            self.positions.append(position)

    def fed(self, position: int, piece: str, acts: dict[int, torch.Tensor]) -> None:
        assert self.keeper is not None
        self.held[position] = acts
        self.keep(self.keeper.fed(position, piece))
        waiting = set(self.keeper.waiting())
        self.held = {p: a for p, a in self.held.items() if p in waiting}

    def flush(self) -> None:
        if self.keeper is not None:
            self.keep(self.keeper.flush())


BOUNDARY_SEGMENTERS = ("paragraph", "newline", "sentence")
"""Segmenters whose step ends :class:`BoundaryKeeper` finds as tokens arrive (``regex`` keeps every token)."""


class BoundaryKeeper:
    """Which fed tokens boundary-only recording keeps, decided as tokens arrive.

    The ``paragraph`` and ``newline`` segmenters end a step at its last visible character, and a newline follows
    it: so when a token with a newline arrives, the newest held-back token with visible text (white space may sit
    between) and everything after it are kept, the newline token too. The ``sentence`` segmenter ends a step at a
    ``.``, ``!`` or ``?`` followed by white space: when a token with white space arrives and the visible text
    before that white space ends in one of them, the token holding that character (this one, or the newest
    held-back token with visible text) and everything after it are kept. At the end, the held-back tokens are kept
    (the final step ends there). At most ``hold`` tokens are held back at once. A state that still misses (a
    longer run of white space) is computed by a forward of its own (:func:`rpe.store.states_from_generation`).
    """

    def __init__(self, hold: int = 8, segmenter: str = "paragraph"):
        if segmenter not in BOUNDARY_SEGMENTERS:
            raise ValueError(f"boundary-only recording knows the {', '.join(BOUNDARY_SEGMENTERS)} segmenters, not "
                             f"{segmenter!r} (record every token instead)")
        self.hold = hold
        self.sentences = segmenter == "sentence"
        self.pending: list[tuple[int, str]] = []

    def fed(self, position: int, piece: str) -> list[int]:
        """Positions to keep now, after the token at ``position`` whose text is ``piece`` was fed."""
        if self.sentences:
            return self._fed_sentence(position, piece)
        if "\n" not in piece:
            self.pending = [*self.pending[-(self.hold - 1):], (position, piece)]
            return []
        back = 0
        for k in range(len(self.pending) - 1, -1, -1):
            back = k
            if self.pending[k][1].strip():
                break
        keep = [p for p, _ in self.pending[back:]] + [position]
        self.pending.clear()
        return keep

    def _fed_sentence(self, position: int, piece: str) -> list[int]:
        space = next((i for i, c in enumerate(piece) if c.isspace()), None)
        if space is None:
            self.pending = [*self.pending[-(self.hold - 1):], (position, piece)]
            return []
        if piece[:space].strip():  # the visible text before the white space ends in this token
            back, held = len(self.pending), [*self.pending, (position, piece)]
        else:  # in the newest held-back token with visible text, if any
            back = next((k for k in range(len(self.pending) - 1, -1, -1) if self.pending[k][1].strip()), None)
            held = [*self.pending, (position, piece)]
        last = None if back is None else held[back]  # the token holding the last visible character
        ends_sentence = last is not None and last[1][:space if last[0] == position else None].rstrip()[-1] in ".!?"
        if piece[space:].strip():  # visible text after the white space: a new stretch starts in this token
            self.pending = [(position, piece)]
        else:  # only white space after it: the last visible token stays held (the final step may end there)
            self.pending = [] if ends_sentence or last is None else [last]
        return [p for p, _ in held[back:]] if ends_sentence else []

    def waiting(self) -> list[int]:
        """Positions held back, not decided yet."""
        return [p for p, _ in self.pending]

    def flush(self) -> list[int]:
        """Keep what is held back (the end of the sequence)."""
        keep = self.waiting()
        self.pending.clear()
        return keep


def decode_step(model, cache, mask: torch.Tensor, tokens: Sequence[int], positions: Sequence[int], **forward_kwargs):
    """Feed one token per row (``tokens`` at ``positions``) through ``cache``; returns ``(logits (B, V), mask)``
    with ``mask`` (B, L) extended by the new column. ``forward_kwargs`` go to the model (e.g. ``shared_prefix``)."""
    device = next(model.parameters()).device
    mask = torch.cat([mask, torch.ones(len(tokens), 1, dtype=torch.long)], 1)
    out = model(input_ids=torch.tensor([[t] for t in tokens], device=device), attention_mask=mask.to(device),
                position_ids=torch.tensor([[p] for p in positions], device=device), use_cache=True,
                logits_to_keep=1, **{cache_kwarg(model): cache}, **forward_kwargs)
    return out.logits[:, -1], mask


def feed_tokens(model, cache, tokens: Sequence[int], start: int) -> torch.Tensor:
    """Append ``tokens`` (one sequence, positions ``start..``) to a batch-1 ``cache``; returns the last logits."""
    device = next(model.parameters()).device
    out = model(input_ids=torch.tensor([list(tokens)], device=device),
                position_ids=torch.arange(start, start + len(tokens), device=device)[None], use_cache=True,
                logits_to_keep=1, **{cache_kwarg(model): cache})
    return out.logits[0, -1]


def generate_continuous(
    model,
    tokenizer,
    prompt_ids: Sequence[Sequence[int]],
    sampling: SamplingConfig,
    *,
    stop_strings: Sequence[str] = (),
    seed: int = 0,
    row_seeds: Sequence[int] | None = None,
    max_rows: int = 32,
    refill: int = 4,
    min_prefix: int = 32,
    token_logprobs: bool = False,
    record_layers: Sequence[int] | None = None,
    record_neurons: torch.Tensor | None = None,
    record_boundaries_only: bool | str = False,
    share_prefix: bool = True,
    value_stop=None,
) -> tuple[GeneratedBatch, list[dict[int, torch.Tensor]] | None]:
    """Sample a completion for every prompt with continuous batching (see the module docstring).

    Args:
        prompt_ids: token ids of each prompt (no padding); any number of them.
        sampling: temperature (0 = greedy), top-k, top-p and the token budget.
        stop_strings: strings that end a completion besides EOS (cut as in :func:`rpe.sampling.split_at_stop`).
        seed: row ``i`` samples from :func:`row_generator` ``(seed, i)``.
        row_seeds: instead, row ``i`` samples from a generator seeded ``row_seeds[i]`` (one per prompt; e.g.
            :func:`rpe.sampling.stream_seed` of what the row is, so its completion is the same in any batch).
        max_rows: rows decoded together.
        refill: free slots that trigger a refill from the queue (1 refills at every step; larger groups
            amortise the prefill forward).
        min_prefix: a prefix shared by all prompts this long or longer is encoded once (the few-shot examples).
        token_logprobs: also return each generated token's log-probability under the raw distribution.
        record_layers: decoder blocks whose outputs are recorded for every token after the shared prefix.
        record_neurons: optional neuron columns kept of each recorded layer.
        record_boundaries_only: keep only what step boundaries need (True: the ``paragraph`` segmenter's; or a
            segmenter's name, :data:`BOUNDARY_SEGMENTERS`): the last prompt token (s_0), each step's end as
            :class:`BoundaryKeeper` finds them, and each row's last fed tokens; ``batch.activation_positions``
            says which positions each row kept. Memory per row is then proportional to its steps, not its
            tokens.
        share_prefix: keep one physical copy of the shared prefix's keys and values that every row attends to
            (:mod:`rpe.prefix_attention`) instead of a copy in every row's cache; False copies it (the engine
            before shared-prefix attention; also where :func:`rpe.prefix_attention.prefix_attention_refusal`
            refuses the model).
        value_stop: a :class:`rpe.rollout_stop.ValueStop`: each row's value neurons are recorded as its tokens
            are fed, and a row whose internal value after a step falls below the rule's threshold is stopped
            once that step's separator is fed (``finish_reason`` ``value``): none of its later tokens are
            generated. ``batch.stop_values`` holds each row's V after every step it was judged at.

    Returns:
        ``(batch, recorded)``: a :class:`GeneratedBatch` in prompt order, and per prompt ``{layer: (T_i, k)}``
        activations of its suffix tokens after the shared prefix followed by its generated tokens that were fed
        back (all but the last), or None without ``record_layers``. ``batch.prompt_truncated`` is all False.
    """
    from transformers import DynamicCache

    from rpe.tracker import ActivationTracker

    refusal = plain_cache_refusal(model)
    if refusal is not None:
        raise ValueError(f"continuous batching cannot serve this {model.config.model_type} model ({refusal}); use "
                         f"rpe.generation.generate_from_ids with engine='generate'")
    boundaries = "paragraph" if record_boundaries_only is True else record_boundaries_only
    if boundaries and boundaries not in BOUNDARY_SEGMENTERS:
        raise ValueError(f"record_boundaries_only: {boundaries!r} is not one of {', '.join(BOUNDARY_SEGMENTERS)}")
    if max_rows < 1 or refill < 1:
        raise ValueError(f"max_rows and refill must be >= 1, got {max_rows}, {refill}")
    enc = [list(p) for p in prompt_ids]
    if any(not p for p in enc):
        raise ValueError("every prompt needs at least one token")
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    eos = eos_ids(model, tokenizer)
    kw = cache_kwarg(model)
    prefix_len = shared_prefix_len(enc, min_prefix) if len(enc) > 1 else 0
    base_cache = prefix_cache(model, enc[0][:prefix_len], device) if prefix_len else None
    shared = (SharedPrefix.from_cache(base_cache)
              if base_cache is not None and share_prefix and prefix_attention_refusal(model) is None else None)
    forward_kwargs = {"shared_prefix": shared} if shared is not None else {}
    prefix_in_rows = prefix_len if shared is None else 0  # cache (and mask) columns of the prefix in every row
    sample_on = logits_device(model)
    if row_seeds is not None and len(row_seeds) != len(enc):
        raise ValueError(f"{len(row_seeds)} row_seeds for {len(enc)} prompts")
    streams = ([torch.Generator(device=sample_on).manual_seed(int(s)) for s in row_seeds] if row_seeds is not None
               else [row_generator(seed, i, sample_on) for i in range(len(enc))])
    rows: list[_Row] = [_Row(i, g, len(p)) for i, (g, p) in enumerate(zip(streams, enc))]
    queue = list(range(len(enc)))
    alive: list[_Row] = []
    cache = None
    mask = torch.zeros(0, 0, dtype=torch.long)
    last_logits = torch.zeros(0)
    layers = list(record_layers or [])
    tracker = ActivationTracker(model, layers, neurons=record_neurons, record_all=True) if layers else None
    stop_tracker = (ActivationTracker(model, [value_stop.layer], neurons=value_stop.columns, record_all=True)
                    if value_stop is not None else None)
    if value_stop is not None:
        for r in rows:
            r.watch = value_stop.watch()

    def sample(logits: torch.Tensor, group: list[_Row]) -> None:
        """Pick the next token of each row of ``group`` from its (V,) logits; mark rows that end."""
        logp = torch.log_softmax(logits.float(), -1) if token_logprobs else None
        for j, (row, tok) in enumerate(zip(group, next_tokens(logits, sampling, [r.generator for r in group]))):
            if row.finish is not None:  # stopped by its value after its last fed token: nothing more generated
                continue
            if tok in eos:
                row.finish = "eos"
                continue
            row.generated.append(tok)
            if logp is not None:
                row.logprobs.append(float(logp[j, tok]))
            if len(row.generated) >= sampling.max_new_tokens:
                row.finish = "length"
            elif hits_stop(tokenizer, row.generated, stop_strings):
                row.finish = "stop"

    def admit() -> None:
        """Prefill waiting prompts into free slots and join them to the running batch."""
        nonlocal cache, mask, last_logits, alive
        take = [rows[i] for i in queue[: max_rows - len(alive)]]
        del queue[: len(take)]
        # identical prompts (the N continuations of one state) are prefilled once and their cache copied
        unique: dict[tuple[int, ...], int] = {}
        order = [unique.setdefault(tuple(enc[r.index][prefix_len:]), len(unique)) for r in take]
        suffixes = [list(k) for k in unique]
        ws = max(len(x) for x in suffixes)
        ids = torch.tensor([[pad] * (ws - len(x)) + x for x in suffixes], device=device)
        suffix_mask = torch.tensor([[0] * (ws - len(x)) + [1] * len(x) for x in suffixes])
        group_mask = torch.cat([torch.ones(len(suffixes), prefix_in_rows, dtype=torch.long), suffix_mask], 1)
        positions = (prefix_len + suffix_mask.cumsum(1) - 1).clamp_min(0)
        if base_cache is not None and shared is None:
            group_cache = copy.deepcopy(base_cache)
            group_cache.batch_repeat_interleave(len(suffixes))
        else:
            group_cache = DynamicCache(config=model.config)
        out = model(input_ids=ids, attention_mask=group_mask.to(device), position_ids=positions.to(device),
                     use_cache=True, logits_to_keep=1, **{kw: group_cache}, **forward_kwargs)
        if len(suffixes) < len(take):
            group_cache.batch_select_indices(torch.tensor(order))  # CPU indices: valid for layers on any device (device_map)
            group_mask = group_mask[order]
        if stop_tracker is not None:
            stop_tracker.take_last()  # s_0 is never judged: nothing generated yet to save
        if tracker is not None:
            got = tracker.take_last()
            for r, u in zip(take, order):
                n = len(suffixes[u])
                if record_boundaries_only:  # s_0 only: the prompt's last token
                    r.recorded = {layer: [got[layer][u, ws - 1 : ws].cpu()] for layer in layers}
                    r.positions, r.keeper = [n - 1], BoundaryKeeper(segmenter=boundaries)
                else:
                    r.recorded = {layer: [got[layer][u, ws - n :].cpu()] for layer in layers}
        logits = out.logits[:, -1][order]
        if cache is None or not alive:
            cache, mask, last_logits, alive = group_cache, group_mask, logits, take
            return
        la, lb = cache_len(cache), cache_len(group_cache)
        width = max(la, lb)
        cache = stack_caches([cache, group_cache], [width - la, width - lb])
        mask = torch.cat([torch.cat([torch.zeros(len(alive), width - la, dtype=torch.long), mask], 1),
                          torch.cat([torch.zeros(len(take), width - lb, dtype=torch.long), group_mask], 1)], 0)
        last_logits = torch.cat([last_logits, logits], 0)
        alive = alive + take

    attention = switched_attention(model) if shared is not None else contextlib.nullcontext()  # checked above
    with torch.inference_mode(), attention, (tracker if tracker is not None else contextlib.nullcontext()), \
            (stop_tracker if stop_tracker is not None else contextlib.nullcontext()):
        while queue or alive:
            if queue and (not alive or max_rows - len(alive) >= min(refill, len(queue))):
                admit()  # the admitted rows' first-token logits come from their prefill
            sample(last_logits, alive)
            keep = [j for j, r in enumerate(alive) if r.finish is None]
            if len(keep) < len(alive):  # finished rows leave the batch and the cache
                if keep:
                    cache.batch_select_indices(torch.tensor(keep))  # CPU indices serve layers on every device
                mask, last_logits = mask[keep], last_logits[keep]
                alive = [alive[j] for j in keep]
            if not alive:
                cache = None
                continue
            last_logits, mask = decode_step(model, cache, mask, [r.generated[-1] for r in alive],
                                            [r.n_real + len(r.generated) - 1 for r in alive], **forward_kwargs)
            if tracker is not None:
                got = tracker.take_last()
                for j, r in enumerate(alive):
                    if record_boundaries_only:
                        r.fed(len(enc[r.index]) - prefix_len + len(r.generated) - 1,
                              tokenizer.decode([r.generated[-1]], skip_special_tokens=False),
                              {layer: got[layer][j].cpu() for layer in layers})
                    else:
                        for layer in layers:
                            r.recorded[layer].append(got[layer][j].cpu())
            if stop_tracker is not None:
                judged = stop_tracker.take_last()[value_stop.layer]
                for j, r in enumerate(alive):
                    piece = tokenizer.decode([r.generated[-1]], skip_special_tokens=True)
                    if r.watch.fed(piece, judged[j, -1]):
                        r.finish = "value"

    completion_ids, texts, reasons, tails, logprobs = [], [], [], [], []
    for r in rows:
        ids, text, stopped, tail = split_at_stop(tokenizer, r.generated, stop_strings)
        completion_ids.append(ids)
        texts.append(text)
        reasons.append("stop" if stopped else (r.finish or "length"))
        tails.append(tail)
        logprobs.append(r.logprobs[: len(ids)])
    batch = GeneratedBatch(enc, completion_ids, texts, reasons, [False] * len(enc), tails,
                           logprobs if token_logprobs else [], prefix_len=prefix_len)
    if value_stop is not None:
        batch.stop_values = [list(r.watch.values) for r in rows]
    if layers and record_boundaries_only:
        for r in rows:
            r.flush()
        batch.activation_positions = [list(r.positions) for r in rows]
    recorded = [{layer: torch.cat(r.recorded[layer]) for layer in layers} for r in rows] if layers else None
    return batch, recorded


__all__ = ["BOUNDARY_SEGMENTERS", "BoundaryKeeper", "decode_step", "feed_tokens", "generate_continuous"]
