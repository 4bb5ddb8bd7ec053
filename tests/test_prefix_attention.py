"""Shared-prefix attention (rpe.prefix_attention): one stored copy of a shared prefix, attended by every row and
merged by log-sum-exp, gives what a plain forward over prefix + row gives, on every architecture with full
attention; the continuous engine uses it, and its tokens and recorded activations equal the copied-prefix engine's."""

import pytest
import torch
from transformers import DynamicCache

from rpe.kvcache import prefix_cache
from rpe.prefix_attention import SharedPrefix, prefix_attention, prefix_attention_refusal
from rpe.tiny import TinyModelConfig, tiny_model

PLAIN = ("llama", "qwen2", "qwen3", "mistral", "phi3")
PREFIX = "Examples: 1 + 2 = 3. 4 + 4 = 8. 5 - 3 = 2.\n"
ROWS = ("7 + 1 =", "2 - 2 = 0 and", "9 =")


@pytest.fixture(scope="module", params=PLAIN)
def arch_model(request):
    model, tok = tiny_model(TinyModelConfig(architecture=request.param))
    return request.param, model.eval(), tok


def _shared_forward(model, prefix, rows, next_tokens):
    """Prefill ``rows`` after a shared ``prefix`` (left-padded among themselves), then one decode step: the logits
    of every row token and of the step."""
    sp = SharedPrefix.from_cache(prefix_cache(model, prefix, "cpu"))
    p, ws = len(prefix), max(map(len, rows))
    ids = torch.tensor([[0] * (ws - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (ws - len(r)) + [1] * len(r) for r in rows])
    with torch.no_grad(), prefix_attention(model):
        cache = DynamicCache(config=model.config)
        first = model(input_ids=ids, attention_mask=mask, position_ids=(p + mask.cumsum(1) - 1).clamp_min(0),
                      cache=cache, use_cache=True, shared_prefix=sp).logits
        mask = torch.cat([mask, torch.ones(len(rows), 1, dtype=torch.long)], 1)
        step = model(input_ids=torch.tensor([[t] for t in next_tokens]), attention_mask=mask,
                     position_ids=torch.tensor([[p + len(r)] for r in rows]), cache=cache, use_cache=True,
                     shared_prefix=sp).logits[:, -1]
        assert cache.get_seq_length() == ws + 1  # the rows' cache holds their own tokens only
    return [first[i, ws - len(r):] for i, r in enumerate(rows)], step, sp


def test_shared_prefix_logits_equal_a_plain_forward_over_prefix_and_row(arch_model):
    arch, model, tok = arch_model
    prefix = tok(PREFIX, add_special_tokens=False)["input_ids"]
    rows = [tok(r, add_special_tokens=False)["input_ids"] for r in ROWS]
    got, step, sp = _shared_forward(model, prefix, rows, [5, 6, 7])
    with torch.no_grad():
        for i, r in enumerate(rows):
            ref = model(input_ids=torch.tensor([prefix + r + [5 + i]])).logits[0]
            torch.testing.assert_close(got[i], ref[len(prefix):-1], atol=2e-5, rtol=1e-4)
            torch.testing.assert_close(step[i], ref[-1], atol=2e-5, rtol=1e-4)
    assert model.config._attn_implementation == "sdpa"  # restored on exit
    assert sp.length == len(prefix) and sp.keys[0].shape[0] == 1


def test_without_the_prefix_the_rows_miss_it():
    """The check above can fail: rows that do not attend to the prefix give other logits."""
    model, tok = tiny_model(TinyModelConfig(architecture="llama"))
    prefix = tok(PREFIX, add_special_tokens=False)["input_ids"]
    row = tok(ROWS[0], add_special_tokens=False)["input_ids"]
    with torch.no_grad(), prefix_attention(model):
        alone = model(input_ids=torch.tensor([row]), position_ids=torch.arange(len(prefix), len(prefix) + len(row))[None],
                      attention_mask=torch.ones(1, len(row), dtype=torch.long)).logits[0]
        ref = model(input_ids=torch.tensor([prefix + row])).logits[0, len(prefix):]
    assert (alone - ref).abs().max() > 1e-2


def test_bf16_shared_prefix_is_as_close_to_fp32_as_plain_bf16_attention():
    model, tok = tiny_model(TinyModelConfig(architecture="qwen2"))
    prefix = tok(PREFIX, add_special_tokens=False)["input_ids"]
    rows = [tok(r, add_special_tokens=False)["input_ids"] for r in ROWS]
    ref, ref_step, _ = _shared_forward(model, prefix, rows, [5, 6, 7])
    bf16 = model.to(torch.bfloat16)
    got, step, sp = _shared_forward(bf16, prefix, rows, [5, 6, 7])
    assert sp.keys[0].dtype == torch.bfloat16 and got[0].dtype == torch.bfloat16
    with torch.no_grad():
        plain = [bf16(input_ids=torch.tensor([prefix + r])).logits[0, len(prefix):] for r in rows]
    for g, p, r in zip(got, plain, ref):
        assert (g.float() - r).abs().max() <= 2 * (p.float() - r).abs().max() + 1e-2


def test_a_sliding_window_model_is_refused_and_the_implementation_is_restored_after_an_error():
    gemma = tiny_model(TinyModelConfig(architecture="gemma3", sliding_window=16))[0]
    assert "DynamicSlidingWindowLayer" in prefix_attention_refusal(gemma)
    with pytest.raises(ValueError, match="shared-prefix attention cannot serve this gemma3_text model"):
        with prefix_attention(gemma):
            pass
    model = tiny_model(TinyModelConfig(architecture="llama"))[0]
    with pytest.raises(RuntimeError, match="boom"):
        with prefix_attention(model):
            assert model.model.layers[0].self_attn.config._attn_implementation == "rpe_shared_prefix"
            raise RuntimeError("boom")
    assert model.config._attn_implementation == "sdpa"


def test_the_engine_with_a_shared_prefix_equals_the_copied_prefix_engine_token_for_token(arch_model, monkeypatch):
    import rpe.decoding
    from rpe.generation import generate_from_ids
    from rpe.sampling import SamplingConfig

    arch, model, tok = arch_model
    prompts = [tok(PREFIX + q, add_special_tokens=False)["input_ids"] for q in (*ROWS, "3 + 3 =", "1 =")]
    runs, widths = {}, {}
    step = rpe.decoding.decode_step

    def spy(model, cache, mask, tokens, positions, **kw):  # the rows' cache width with the prefix shared or copied
        widths.setdefault(share, set()).add((cache.get_seq_length(), "shared_prefix" in kw))
        return step(model, cache, mask, tokens, positions, **kw)

    monkeypatch.setattr(rpe.decoding, "decode_step", spy)
    for share in (True, False):  # sampled, rows of several lengths, 2 slots so rows are admitted as others finish
        runs[share] = generate_from_ids(model, tok, prompts, SamplingConfig(temperature=0.8, max_new_tokens=9), seed=3,
                                        max_rows=2, record_layers=[1], share_prefix=share)
    p = runs[True].prefix_len
    assert all(used and w < p for w, used in widths[True]) and all(not used and w > p for w, used in widths[False])
    assert runs[True].prefix_len == len(tok(PREFIX, add_special_tokens=False)["input_ids"])
    assert runs[True].completion_ids == runs[False].completion_ids
    for a, b in zip(runs[True].activations, runs[False].activations):
        torch.testing.assert_close(a[1], b[1], atol=2e-5, rtol=1e-4)


def test_the_written_out_path_used_off_cpu_equals_the_fused_cpu_kernel(monkeypatch):
    import rpe.prefix_attention as pa

    model, tok = tiny_model(TinyModelConfig(architecture="qwen3"))
    prefix = tok(PREFIX, add_special_tokens=False)["input_ids"]
    rows = [tok(r, add_special_tokens=False)["input_ids"] for r in ROWS]
    assert pa._fused_cpu_attention() is not None  # torch >= 2.4 on CPU has it
    fused, fused_step, _ = _shared_forward(model, prefix, rows, [5, 6, 7])
    monkeypatch.setattr(pa, "_fused_cpu_attention", lambda: None)
    manual, manual_step, _ = _shared_forward(model, prefix, rows, [5, 6, 7])
    for a, b in zip(fused, manual):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(fused_step, manual_step, atol=2e-5, rtol=1e-4)
