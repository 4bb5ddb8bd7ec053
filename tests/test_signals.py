import numpy as np
import pytest
import torch

from rpe.signals import GenerationCapture, SignalReader
from rpe.kvcache import right_pad
from rpe.tiny import TinyModelConfig, tiny_model


def _hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _left_padded(tok, prompts):
    """(ids, mask) of ``prompts`` left-padded to one width, as ``generate`` takes them."""
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), tok.pad_token_id)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    return ids, mask


def test_read_values_rpe_and_dopamine(tiny_llama, tiny_bundle):
    model, tok = tiny_llama
    reader = SignalReader(tiny_bundle, model, tok)
    prompts = [tok("Q: 1+2=", add_special_tokens=False)["input_ids"], tok("Q: 3+4+5=", add_special_tokens=False)["input_ids"]]
    comps = [tok("1+2=3\n\nAnswer: 3", add_special_tokens=False)["input_ids"],
             tok("3+4=7\n\n7+5=12\n\nAnswer: 12", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]]
    sigs = reader.read(prompts, comps)
    assert [s.n_steps for s in sigs] == [2, 3]
    for p, c, s in zip(prompts, comps, sigs):
        assert s.values.shape == (s.n_steps + 1,) and s.rpe.shape == (s.n_steps,) and s.dopamine.shape == (s.n_steps,)
        np.testing.assert_allclose(s.rpe, reader.gamma * s.values[1:] - s.values[:-1])
        # V(s_0) and V(s_t) equal the bundle's value of the text that ends there
        texts = [tok.decode(p)] + [tok.decode(p + c[:e]) for _, e in s.step_spans]
        np.testing.assert_allclose(s.values, tiny_bundle.value(model, tok, texts).numpy(), atol=1e-5)
    assert sigs[1].scalar("rpe_sum") == pytest.approx(sigs[1].rpe.sum())
    assert sigs[1].scalar("value_final") == pytest.approx(sigs[1].values[-1])
    with pytest.raises(ValueError, match="unknown signal"):
        sigs[0].scalar("rpe_median")


def test_generation_capture_matches_a_separate_forward(tiny_llama, tiny_bundle):
    model, tok = tiny_llama
    reader = SignalReader(tiny_bundle, model, tok)
    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in ("Q: 12+3=\n\n", "Q: 4=\n\n", "Q: 9-1-1=\n\n")]
    ids, mask = _left_padded(tok, prompts)
    width = ids.shape[1]
    before = _hooks(model)
    with GenerationCapture(model, tiny_bundle.layer, reader.columns) as cap:
        torch.manual_seed(0)
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=True,
                             pad_token_id=tok.pad_token_id)
    assert "generate" not in vars(model) and _hooks(model) == before  # wrapper and hooks gone
    comps = []
    for row in out[:, width:].tolist():
        comps.append(row[: row.index(tok.eos_token_id) + 1] if tok.eos_token_id in row else row)
    got = cap.match(comps) if cap.last else None
    assert got is None  # remove() forgets the capture
    with GenerationCapture(model, tiny_bundle.layer, reader.columns) as cap:
        torch.manual_seed(0)
        out2 = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=True,
                              pad_token_id=tok.pad_token_id)
        assert torch.equal(out, out2)
        captured = cap.match(comps)
        assert captured is not None and captured.prompt_ids == prompts
        assert cap.match([c[:-1] + [c[-1] + 1] for c in comps]) is None
        from_gen = reader.from_recorded(captured.recorded, captured.width, comps, captured.prompt_ids)
    separate = reader.read(prompts, comps)
    for a, b in zip(from_gen, separate):  # includes rows whose last token was never fed back
        np.testing.assert_allclose(a.values, b.values, atol=1e-5)
        np.testing.assert_allclose(a.dopamine, b.dopamine, atol=1e-4)


def test_wrong_model_is_refused(tiny_bundle):
    from rpe.bundle import BundleMismatchError


    other, tok = tiny_model(TinyModelConfig(architecture="qwen2"))
    with pytest.raises(BundleMismatchError):
        SignalReader(tiny_bundle, other, tok)


def test_shared_prefix_reuse_gives_the_same_signals(tiny_llama, tiny_bundle):
    model, tok = tiny_llama
    reader = SignalReader(tiny_bundle, model, tok)
    shots = "Q: 1+1=2\n\nQ: 2+2=4\n\nQ: 3+3=6\n\nQ: 4+4=8\n\n"  # a shared few-shot prefix (> 32 tokens)
    prompts = [tok(shots + q, add_special_tokens=False)["input_ids"] for q in ("Q: 5+5=", "Q: 6+6+1=", "Q: 7=")]
    comps = [tok(c, add_special_tokens=False)["input_ids"] for c in ("10\n\nAnswer: 10", "12\n\n13\n\nAnswer: 13", "7")]
    fast = reader.read(prompts, comps)
    slow = reader.read(prompts, comps, reuse_prefix=False)
    for a, b in zip(fast, slow):
        np.testing.assert_allclose(a.values, b.values, atol=1e-5)
        np.testing.assert_allclose(a.dopamine, b.dopamine, atol=1e-4)


def test_reads_in_training_mode_with_checkpointing_and_dropout_equal_eval_reads(tiny_bundle):
    """TRL scores completions with the model in training mode: reads ran with dropout on and, under gradient
    checkpointing, with the layers that drop a passed prefix cache on older transformers."""
    model, tok = tiny_model(TinyModelConfig(extra={"attention_dropout": 0.5}))
    reader = SignalReader(tiny_bundle, model, tok)
    shots = "Q: 1+1=2\n\nQ: 2+2=4\n\nQ: 3+3=6\n\nQ: 4+4=8\n\n"
    prompts = [tok(shots + q, add_special_tokens=False)["input_ids"] for q in ("Q: 5+5=", "Q: 6+6+1=")]
    comps = [tok(c, add_special_tokens=False)["input_ids"] for c in ("10\n\nAnswer: 10", "12\n\n13\n\nAnswer: 13")]
    reference = reader.read(prompts, comps, reuse_prefix=False)  # eval mode, no prefix reuse
    model.gradient_checkpointing_enable()
    model.train()
    for reuse in (True, False):
        for a, b in zip(reader.read(prompts, comps, reuse_prefix=reuse), reference):
            np.testing.assert_allclose(a.values, b.values, atol=1e-5)
            np.testing.assert_allclose(a.dopamine, b.dopamine, atol=1e-4)
    assert model.training and all(m.training for m in model.modules())  # the trainer's mode is given back


class _EosAfter:
    """Logits processor: row i must emit EOS once it has generated ``k[i]`` tokens (None: never EOS)."""

    def __init__(self, start: int, k: list[int | None], eos: int):
        self.start, self.k, self.eos = start, k, eos

    def __call__(self, input_ids, scores):
        n = input_ids.shape[1] - self.start
        for i, k in enumerate(self.k):
            if k is None:
                scores[i, self.eos] = -float("inf")
            elif n >= k:
                scores[i, :] = -float("inf")
                scores[i, self.eos] = 0.0
        return scores


def test_eos_terminated_rows_are_read_from_the_capture_without_a_forward(tiny_llama, tiny_bundle):
    """Rows that stopped at EOS have every state fed back during generation: they must come from the recording
    (no recompute), and match a separate forward row by row. Only the row cut at the limit is recomputed."""
    from transformers import LogitsProcessorList

    model, tok = tiny_llama
    reader = SignalReader(tiny_bundle, model, tok)
    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in ("Q: 12+3=\n\n", "Q: 4=\n\n", "Q: 9-1-1=\n\n", "Q: 7\n\n")]
    ids, mask = _left_padded(tok, prompts)
    width = ids.shape[1]
    stop = _EosAfter(width, [3, 9, 6, None], tok.eos_token_id)  # three rows end with EOS, one runs to the limit
    with GenerationCapture(model, tiny_bundle.layer, reader.columns) as cap:
        torch.manual_seed(0)
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=True,
                             pad_token_id=tok.pad_token_id, logits_processor=LogitsProcessorList([stop]))
        comps = []
        for row in out[:, width:].tolist():
            comps.append(row[: row.index(tok.eos_token_id) + 1] if tok.eos_token_id in row else row)
        assert [len(c) for c in comps] == [4, 10, 7, 12] and [c[-1] == tok.eos_token_id for c in comps] == [True] * 3 + [False]
        captured = cap.match(comps)
        assert captured is not None
        from_gen = reader.from_recorded(captured.recorded, captured.width, comps, captured.prompt_ids)
    assert reader.last_recomputed == 1  # only the length-cut row needed its own forward
    separate = reader.read(prompts, comps)
    for a, b in zip(from_gen, separate):
        assert a.n_steps == b.n_steps
        np.testing.assert_allclose(a.values, b.values, atol=1e-5)
        np.testing.assert_allclose(a.dopamine, b.dopamine, atol=1e-4)


@pytest.mark.parametrize("given_spans", [False, True])
def test_read_returns_every_row_when_a_call_spans_several_batches(tiny_llama, tiny_bundle, given_spans):
    """40 sequences through a reader of batch size 16 (three forwards) give the 40 results one-by-one reads
    give. (A loop variable once shadowed the ``spans`` argument: every batch after the first read the last
    row's spans, and the call returned 16 results for 40 inputs; value-guided search scored only its first
    16 candidates.)"""
    model, tok = tiny_llama
    reader = SignalReader(tiny_bundle, model, tok, batch_size=16)
    prompts = [tok(f"Q{i}: {i}+{i % 7}=", add_special_tokens=False)["input_ids"] for i in range(40)]
    comps = [tok(f"{i}+{i % 7}={2 * i}" + "\n\nmore" * (i % 3), add_special_tokens=False)["input_ids"] for i in range(40)]
    spans = [reader.step_spans(c) for c in comps] if given_spans else None
    together = reader.read(prompts, comps, spans=spans)
    assert len(together) == 40
    for i in (0, 15, 16, 17, 31, 32, 39):
        alone = reader.read([prompts[i]], [comps[i]])[0]
        assert together[i].step_spans == alone.step_spans and together[i].n_steps == 1 + i % 3
        np.testing.assert_allclose(together[i].values, alone.values, atol=1e-5)


def test_nan_activations_while_reading_signals_name_the_layer_and_the_fix(tiny_llama, tiny_bundle):
    from rpe.tracker import NonFiniteActivationError, decoder_layers

    model, tok = tiny_llama
    handle = decoder_layers(model)[0].register_forward_hook(
        lambda m, a, o: (o[0] * float("nan"),) + tuple(o[1:]) if isinstance(o, tuple) else o * float("nan"))
    try:
        with pytest.raises(NonFiniteActivationError, match=r"layer 2 while reading internal signals; float16 overflows"):
            SignalReader(tiny_bundle, model, tok).read([[5, 6, 7, 8]], [[9, 10, 11]])
    finally:
        handle.remove()
