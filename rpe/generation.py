"""Batched generation: one call per batch of prompts, with stop strings, token log-probabilities and the shared
few-shot prefix encoded once for every row.

Two engines produce the same :class:`~rpe.sampling.GeneratedBatch`:

- ``continuous`` (default where supported: Llama, Qwen2): :func:`rpe.decoding.generate_continuous`, whose rows
  leave the batch as they finish and whose identical prompts share one prefill; row ``i`` samples from its own
  stream seeded with ``(seed, i)``, so a completion does not depend on the batch it ran in;
- ``generate``: one padded ``model.generate`` per batch (every architecture; the batch runs until its longest
  row stops; all rows draw from ``torch.manual_seed(seed)``'s stream).

Greedy decoding gives the same tokens on both. Sampled completions differ between the engines for the same seed
(both are reproducible), which is why rollout folders record the engine.

Example:
    >>> gen = generate_batch(model, tokenizer, prompts, SamplingConfig(max_new_tokens=64))  # doctest: +SKIP
    >>> gen.texts[0], gen.finish_reasons[0]  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import nullcontext
from typing import Any

import torch

from rpe.decoding import generate_continuous
from rpe.kvcache import batched_cache_kwargs, cache_is_plain, plain_cache_refusal, prefix_cache, shared_prefix_len
from rpe.sampling import GeneratedBatch, SamplingConfig, eos_ids, split_at_stop
from rpe.seeding import seeded

logger = logging.getLogger(__name__)

ENGINES = ("continuous", "generate")


#: generation_config settings the continuous engine does not apply (it samples with temperature, top-k and
#: top-p only); a model whose config sets one of them generates with ``model.generate``.
_UNSUPPORTED_DEFAULTS = {"repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "min_new_tokens": 0, "min_length": 0,
                         "bad_words_ids": None, "suppress_tokens": None, "begin_suppress_tokens": None,
                         "encoder_repetition_penalty": 1.0, "min_p": None, "typical_p": 1.0, "epsilon_cutoff": 0.0,
                         "eta_cutoff": 0.0}


def resolve_engine(model, engine: str) -> str:
    """``engine`` checked; ``continuous`` becomes ``generate`` on architectures it does not support and on models
    whose generation config asks for processing it does not apply (e.g. a repetition penalty)."""
    if engine not in ENGINES:
        raise ValueError(f"unknown generation engine {engine!r}; choose {' or '.join(ENGINES)}")
    if engine == "continuous":
        refusal = plain_cache_refusal(model)
        if refusal is not None:
            logger.info("engine 'generate' for this %s model: %s", model.config.model_type, refusal)
            return "generate"
        gc = getattr(model, "generation_config", None)
        if gc is not None and any(getattr(gc, k, d) not in (d, None) for k, d in _UNSUPPORTED_DEFAULTS.items()):
            return "generate"
    return engine


def generate_batch(
    model,
    tokenizer,
    prompts: Sequence[str],
    sampling: SamplingConfig,
    *,
    stop_strings: Sequence[str] = (),
    max_prompt_tokens: int = 1536,
    seed: int | None = None,
    row_seeds: Sequence[int] | None = None,
    reuse_prefix: bool = True,
    add_special_tokens: bool = False,
    **engine_options: Any,
) -> GeneratedBatch:
    """Generate completions for ``prompts`` (text) in one call.

    Args:
        prompts: full prompt texts (templates already applied).
        stop_strings: strings that end a completion besides EOS; removed from the text.
        max_prompt_tokens: longer prompts keep their last ``max_prompt_tokens`` tokens and are flagged.
        seed: the sampling seed (see the module docstring for what each engine does with it).
        row_seeds: one seed per prompt (see :func:`generate_from_ids`).
        reuse_prefix: encode a prompt prefix shared by all rows once (see :func:`generate_from_ids`).
        add_special_tokens: let the tokenizer add its special tokens (a BOS) to each prompt: True for plain
            completion prompts, as TRL tokenises them (:attr:`rpe.prompts.PromptBuilder.add_special_tokens`);
            chat-rendered prompts carry them in the template.
        **engine_options: ``engine``, ``max_rows``, ``record_layers``, ``record_neurons``, ``share_prefix``,
            ``value_stop`` of :func:`generate_from_ids`.
    """
    enc = [tokenizer(p, add_special_tokens=add_special_tokens)["input_ids"] for p in prompts]
    truncated = [len(ids) > max_prompt_tokens for ids in enc]
    gen = generate_from_ids(
        model, tokenizer, [ids[-max_prompt_tokens:] for ids in enc], sampling, stop_strings=stop_strings, seed=seed,
        row_seeds=row_seeds, reuse_prefix=reuse_prefix, **engine_options,
    )
    gen.prompt_truncated = truncated
    return gen


def generate_from_ids(
    model,
    tokenizer,
    prompt_ids: Sequence[list[int]],
    sampling: SamplingConfig,
    *,
    stop_strings: Sequence[str] = (),
    seed: int | None = None,
    row_seeds: Sequence[int] | None = None,
    reuse_prefix: bool = True,
    min_prefix: int = 32,
    token_logprobs: bool = False,
    engine: str = "continuous",
    max_rows: int | None = None,
    record_layers: Sequence[int] | None = None,
    record_neurons: torch.Tensor | None = None,
    record_boundaries_only: bool | str = False,
    share_prefix: bool = True,
    value_stop=None,
) -> GeneratedBatch:
    """:func:`generate_batch` on already tokenised prompts (e.g. a prompt plus a partial completion).

    When every prompt starts with the same ``min_prefix`` or more tokens (the few-shot examples) and the
    model's cache layers are plain full attention (:func:`rpe.kvcache.plain_cache_refusal`),
    the shared prefix is encoded once and its KV cache reused by every row; padding then sits between the
    prefix and each row's own tokens (positions come from the attention mask, so nothing shifts).
    ``token_logprobs`` also returns each generated token's log-probability from the logits computed while
    generating (no extra forward).

    Args:
        row_seeds: continuous engine: one seed per prompt, each row sampling from its own generator (a
            completion then depends on its prompt and seed only); the ``generate`` engine draws every row from
            one stream seeded ``row_seeds[0]``.
        engine: ``continuous`` (default; ``generate`` on architectures it does not support) or ``generate``.
        max_rows: rows decoded together by the continuous engine (default: all prompts; more prompts than this
            wait and fill the slots of finished rows).
        record_layers: continuous engine only: record these blocks' outputs per row into
            ``GeneratedBatch.activations`` (see :func:`rpe.decoding.generate_continuous`).
        record_neurons: the neuron columns kept of each recorded layer.
        record_boundaries_only: keep only the positions step boundaries need (see
            :func:`rpe.decoding.generate_continuous`; ``GeneratedBatch.activation_positions``).
        share_prefix: continuous engine: every row attends to one stored copy of the shared prefix
            (:mod:`rpe.prefix_attention`); False copies the prefix's cache into every row.
        value_stop: continuous engine only: a :class:`rpe.rollout_stop.ValueStop` that stops a row once its
            internal value after a step falls below its threshold (see :func:`rpe.decoding.generate_continuous`).
    """
    enc = [list(ids) for ids in prompt_ids]
    if resolve_engine(model, engine) == "continuous":
        gen, recorded = generate_continuous(
            model, tokenizer, enc, sampling, stop_strings=stop_strings,
            seed=int(torch.randint(0, 2**31 - 1, ()).item()) if seed is None else seed, row_seeds=row_seeds,
            max_rows=max_rows or len(enc), min_prefix=min_prefix if reuse_prefix else 1 << 30,
            token_logprobs=token_logprobs, record_layers=record_layers, record_neurons=record_neurons,
            record_boundaries_only=record_boundaries_only, share_prefix=share_prefix, value_stop=value_stop,
        )
        gen.activations = recorded or []
        return gen
    if value_stop is not None:
        raise ValueError(f"early stopping by internal value needs the continuous engine, which cannot serve this "
                         f"{model.config.model_type} model ({plain_cache_refusal(model) or 'engine=generate was asked for'})")
    if record_layers:
        raise ValueError("record_layers needs the continuous engine; with engine='generate' wrap the call in "
                         "rpe.tracker.ActivationTracker(record_all=True)")
    pad = tokenizer.pad_token_id
    device = next(model.parameters()).device
    prefix_len = 0
    if reuse_prefix and cache_is_plain(model):
        prefix_len = shared_prefix_len(enc, min_prefix)
    suffixes = [ids[prefix_len:] for ids in enc]
    ws = max(len(x) for x in suffixes)
    prefix = enc[0][:prefix_len]
    input_ids = torch.tensor([prefix + [pad] * (ws - len(x)) + x for x in suffixes])  # (B, P + ws)
    attention_mask = torch.tensor([[1] * prefix_len + [0] * (ws - len(x)) + [1] * len(x) for x in suffixes])
    width = prefix_len + ws
    extra: dict[str, Any] = {}
    if prefix_len:
        extra.update(batched_cache_kwargs(model, prefix_cache(model, prefix, device), len(enc), keep_original=False))
    if stop_strings:
        extra.update(stop_strings=list(stop_strings), tokenizer=tokenizer)
    if token_logprobs:
        extra.update(output_logits=True, return_dict_in_generate=True)
    stream = row_seeds[0] if row_seeds is not None else seed
    # model.generate samples from the global generator: seeded for this call only (the caller's state is kept)
    with seeded(stream, device) if stream is not None else nullcontext():
        with torch.inference_mode():
            out = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                pad_token_id=pad,
                **sampling.generate_kwargs(),
                **extra,
            )
            logprobs: list[list[float]] = []
            if token_logprobs:
                new_tokens = out.sequences[:, width:]
                per_step = [torch.log_softmax(step.float(), -1).gather(-1, new_tokens[:, t, None]).squeeze(-1).cpu()
                            for t, step in enumerate(out.logits)]
                logprobs = torch.stack(per_step, 1).tolist() if per_step else [[] for _ in enc]
                out = out.sequences
    ends = eos_ids(model, tokenizer)
    completion_ids, texts, reasons, tails = [], [], [], []
    for row in out[:, width:].tolist():
        raw, reason = [], "length"
        for t in row:
            if t in ends:
                reason = "eos"
                break
            raw.append(t)
        ids, text, stopped, tail = split_at_stop(tokenizer, raw, stop_strings)
        reason = "stop" if stopped else reason
        completion_ids.append(ids)
        texts.append(text)
        reasons.append(reason)
        tails.append(tail)
    logprobs = [lp[: len(ids)] for lp, ids in zip(logprobs, completion_ids)]
    return GeneratedBatch(enc, completion_ids, texts, reasons, [False] * len(enc), tails, logprobs)


__all__ = ["ENGINES", "generate_batch", "generate_from_ids", "resolve_engine"]
