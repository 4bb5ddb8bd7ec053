"""Tiny random-initialised causal LMs of each architecture our users bring, and a character tokenizer: no download.

They serve the tests, the docs' runnable examples and ``--model tiny``: each architecture's real building blocks
(fused projections, sliding-window layers, q/k norms) at a size that runs in milliseconds on a CPU.

=========== ======================================================================================
architecture what it exercises
=========== ======================================================================================
``llama``   the reference: separate q/k/v and gate/up projections, full attention
``qwen2``   q/k/v biases; ``sliding_window`` set turns on Qwen2's sliding-window layers
``qwen3``   q/k RMS norms inside attention
``mistral`` a sliding window on every layer (Mistral's default is 4096 tokens; here ``sliding_window``)
``phi3``    fused ``qkv_proj`` and ``gate_up_proj``
``gemma3``  interleaved sliding-window (default 64 tokens here) and full-attention layers
=========== ======================================================================================
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from rpe.models import prepare_tokenizer

TINY_CHARS = [chr(c) for c in range(32, 127)] + ["\n"]
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)
TINY_ARCHITECTURES = ("llama", "qwen2", "qwen3", "mistral", "phi3", "gemma3")
"""Every architecture :func:`tiny_model` builds."""


def tiny_tokenizer(add_bos: bool = False):
    """A character-level fast tokenizer (ASCII + newline) with a small chat template; no download. With
    ``add_bos``, ``tokenizer(text)`` puts ``<s>`` in front (as Llama-3's and Gemma-3's tokenizers put their BOS);
    ``add_special_tokens=False`` leaves it out."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {tok: i for i, tok in enumerate(specials + TINY_CHARS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    if add_bos:
        backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tok.chat_template = TINY_CHAT_TEMPLATE
    prepare_tokenizer(tok)
    return tok


@dataclass
class TinyModelConfig:
    """Sizes of a tiny random model for tests."""

    architecture: Literal["llama", "qwen2", "qwen3", "mistral", "phi3", "gemma3"] = "llama"
    hidden_size: int = 64
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 128
    sliding_window: int | None = None
    """Tokens of the sliding window: Gemma-3's sliding layers (default 64), Mistral's every layer (default none,
    i.e. full attention), Qwen2's layers with ``use_sliding_window`` (default off); others have none."""
    seed: int = 0
    extra: dict = field(default_factory=dict)
    """More config keys, passed to the architecture's config class."""


def tiny_model(config: TinyModelConfig | None = None, **overrides):
    """A tiny random-initialised causal LM of ``config.architecture`` (:data:`TINY_ARCHITECTURES`) and the char
    tokenizer. The global torch RNG is left as it was.

    Returns:
        ``(model, tokenizer)`` in fp32 on the CPU, deterministic for a given ``config.seed``.
    """
    import transformers
    from transformers import AutoModelForCausalLM

    cfg = config or TinyModelConfig(**overrides)
    tokenizer = tiny_tokenizer()
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=2048,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    window = cfg.sliding_window
    if cfg.architecture == "gemma3":
        common.update(head_dim=cfg.hidden_size // cfg.num_heads, sliding_window=window or 64)
    elif cfg.architecture == "mistral":
        common.update(sliding_window=window)
    elif cfg.architecture == "qwen2" and window:
        common.update(use_sliding_window=True, sliding_window=window, max_window_layers=0)
    elif cfg.architecture == "qwen3":
        common.update(head_dim=cfg.hidden_size // cfg.num_heads)
    elif window:
        raise ValueError(f"tiny {cfg.architecture} has no sliding window; use gemma3, mistral or qwen2")
    classes = {"llama": "LlamaConfig", "qwen2": "Qwen2Config", "qwen3": "Qwen3Config", "mistral": "MistralConfig",
               "phi3": "Phi3Config", "gemma3": "Gemma3TextConfig"}
    if cfg.architecture not in classes:
        raise ValueError(f"unknown tiny architecture {cfg.architecture!r}; choose {', '.join(TINY_ARCHITECTURES)}")
    mcfg = getattr(transformers, classes[cfg.architecture])(**{**common, **cfg.extra})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = AutoModelForCausalLM.from_config(mcfg, dtype=torch.float32).eval()
    model.name_or_path = f"tiny-{cfg.architecture}"
    return model, tokenizer


TINY_ANSWER_CHAIN = {">": "G", "G": "o", "o": ".", ".": "\n", "\n": "\nA", "A": "n", "n": "s", "s": "w", "w": "e",
                     "e": "r", "r": ":", ":": " ", " ": "01", "0": "</s>", "1": "</s>"}
"""The planted next-character table of :func:`tiny_answering_model`: after the chat template's ``<assistant>`` it
writes ``Go.`` then one or more newlines (a fair choice at each) then ``Answer: `` and a fair coin ``0``/``1``."""


def tiny_answering_model(seed: int = 0, scale: float = 30.0, architecture: str = "llama",
                         sliding_window: int | None = None):
    """A tiny model of ``architecture`` (:data:`TINY_ARCHITECTURES`) that answers in the task's format, with both
    outcomes: every completion reads ``Go.``, one or more newlines, ``Answer: 0`` or ``Answer: 1`` (a fair coin,
    whatever the question), then EOS. With :func:`tiny_parity_task` about half the trajectories are correct and
    have one or more steps, so every stage that needs both outcomes (``rpe fit``, ``rpe dopamine``, ``rpe
    reproduce``) runs on it in seconds, on every architecture. Nothing about its internals is a finding: the
    answer ignores the question.

    How: each decoder layer's contribution to the residual stream is shrunk 100x (the attention and MLP output
    projections; Gemma-3's post-sublayer norms, which would undo that, scaled to 0.01), so the last hidden state
    is nearly the current character's (orthonormal) embedding and the untied head reads off
    :data:`TINY_ANSWER_CHAIN` as a bigram table; the layers still carry a little of the context, so activations
    differ between prompts. ``sliding_window`` as in :class:`TinyModelConfig`.
    """
    model, tok = tiny_model(TinyModelConfig(architecture=architecture, seed=seed, sliding_window=sliding_window,
                                            extra={"tie_word_embeddings": False}))
    vocab = tok.get_vocab()
    d = model.config.hidden_size
    used = sorted({vocab[c] for c in TINY_ANSWER_CHAIN} | {vocab["</s>"]})
    if len(used) > d:
        raise ValueError(f"the answer chain uses {len(used)} characters, more than hidden size {d}")
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.mul_(0.01)
            layer.mlp.down_proj.weight.mul_(0.01)
            for norm in ("post_attention_layernorm", "post_feedforward_layernorm"):
                if architecture == "gemma3":  # Gemma's RMSNorm scales by (1 + weight)
                    getattr(layer, norm).weight.fill_(-0.99)
        emb = model.get_input_embeddings().weight
        for i, token in enumerate(used):  # orthonormal directions for the characters of the chain
            emb[token] = 0.0
            emb[token, i] = d ** 0.5
        head = model.get_output_embeddings().weight
        head.zero_()
        for char, successors in TINY_ANSWER_CHAIN.items():
            nexts = ["</s>"] if successors == "</s>" else list(successors)
            for nxt in nexts:
                head[vocab[nxt], used.index(vocab[char])] = scale / d ** 0.5
    model.name_or_path = "tiny-answering" if architecture == "llama" else f"tiny-answering-{architecture}"
    return model, tok


def tiny_parity_task(path) -> str:
    """Write a JSONL task of 80 parity questions (answer ``1`` for odd, ``0`` for even; worked solutions in the
    format :func:`tiny_answering_model` writes) to ``path``; returns the path as a string (``load_task`` takes it)."""
    import json
    import random
    from pathlib import Path

    rng = random.Random(0)
    lines = []
    for _ in range(80):
        n = rng.randrange(10, 1000)
        lines.append(json.dumps({"prompt": f"Is {n} odd? Say 1 or 0.", "answer": str(n % 2),
                                 "solution": f"Go.\n\nAnswer: {n % 2}"}) + "\n")
    Path(path).write_text("".join(lines))
    return str(path)


__all__ = ["TINY_ANSWER_CHAIN", "TINY_ARCHITECTURES", "TINY_CHARS", "TINY_CHAT_TEMPLATE", "TinyModelConfig", "tiny_answering_model",
           "tiny_model", "tiny_parity_task", "tiny_tokenizer"]
