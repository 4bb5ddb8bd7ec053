"""Confidence baselines that a value probe must beat: question length and mean prompt log-probability."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from rpe.records import Trajectory
from rpe.kvcache import batched_cache_kwargs, prefix_cache, right_pad, shared_prefix_len


def question_length(trajectories: Sequence[Trajectory]) -> torch.Tensor:
    """(n,) prompt length in tokens (the few-shot part is shared, so differences come from the question)."""
    return torch.tensor([float(t.prompt_len) for t in trajectories])


def mean_prompt_logprob(model, trajectories: Sequence[Trajectory], *, batch_size: int = 16, pad_token_id: int = 0,
                        chunk: int = 256) -> torch.Tensor:
    """(n,) mean log-probability (nats/token) the model assigns to each prompt's own tokens: those after the
    prefix shared by all prompts (the few-shot examples), i.e. the question and its instruction.

    The shared prefix is encoded once and reused through its KV cache. Log-probabilities are computed ``chunk``
    positions at a time in fp32, so no (B, T, vocabulary) fp32 copy of the logits is made (Gemma-3's vocabulary
    is 262k).
    """
    prompts = [list(t.prompt_token_ids) for t in trajectories]
    prefix_len = shared_prefix_len(prompts)
    device = next(model.parameters()).device
    cache = prefix_cache(model, prompts[0][:prefix_len], device) if prefix_len else None
    out = []
    for start in range(0, len(prompts), batch_size):
        batch = [p[prefix_len:] for p in prompts[start : start + batch_size]]
        ids, mask = right_pad(batch, pad_token_id, prefix_len)
        kwargs = batched_cache_kwargs(model, cache, len(batch)) if cache is not None else {}
        with torch.inference_mode():
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs).logits  # (B, T, V)
        targets = ids[:, 1:].to(device)
        logp = torch.cat([token_logprobs(logits[:, a : a + chunk], targets[:, a : a + chunk])
                          for a in range(0, targets.shape[1], chunk)] or [targets.new_zeros(len(batch), 0).float()],
                         1)  # (B, T-1): token t+1 from position t
        valid = mask[:, prefix_len + 1 :].to(device).float()
        out.append(((logp * valid).sum(1) / valid.sum(1).clamp_min(1)).cpu())
    return torch.cat(out)


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(B, T) log-probability of ``targets`` (B, T) under ``logits`` (B, T or more, V) of any dtype, in fp32:
    the target's logit minus the log-sum-exp of its row, without materialising a log-softmax."""
    logits = logits[:, : targets.shape[1]].float()
    return logits.gather(-1, targets[..., None]).squeeze(-1) - torch.logsumexp(logits, -1)
