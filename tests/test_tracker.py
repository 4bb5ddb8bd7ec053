import pytest
import torch

from rpe.tiny import TinyModelConfig, tiny_model
from rpe.tracker import ActivationTracker, decoder_layers


def _hidden_states(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states  # reference only


def _n_hooks(model):
    """Hooks on the decoder blocks (transformers itself may hook other modules)."""
    return sum(len(m._forward_hooks) for m in decoder_layers(model))


@pytest.mark.parametrize("arch", ["llama", "gemma3", "qwen2"])
def test_captures_block_outputs_at_positions_and_neurons(arch):
    model, tok = tiny_model(TinyModelConfig(architecture=arch))
    enc = tok(["Step 1: 2 + 3 = 5.", "Answer: 7"], return_tensors="pt", padding=True)
    ref = _hidden_states(model, enc.input_ids, enc.attention_mask)  # ref[l + 1] = output of block l
    neurons = torch.tensor([3, 10, 60])
    before = _n_hooks(model)
    with ActivationTracker(model, [0, 2], neurons=neurons) as tr:
        tr.select(rows=[0, 1, 1], starts=[4, 9, 12])
        out = tr.forward(**enc)
    assert set(out) == {0, 2}
    for layer in (0, 2):
        assert out[layer].shape == (3, 3)
        expected = torch.stack([ref[layer + 1][0, 4], ref[layer + 1][1, 9], ref[layer + 1][1, 12]])[:, neurons]
        assert torch.allclose(out[layer], expected, atol=1e-5)
    assert _n_hooks(model) == before


def test_span_mode_averages_tokens(tiny_llama):
    model, tok = tiny_llama
    enc = tok(["abcdefgh"], return_tensors="pt")
    ref = _hidden_states(model, enc.input_ids, enc.attention_mask)
    with ActivationTracker(model, [1]) as tr:
        tr.select(rows=[0], starts=[2], ends=[6])
        out = tr.forward(**enc)
    assert torch.allclose(out[1][0], ref[2][0, 2:6].mean(0), atol=1e-5)


def test_hooks_removed_on_error(tiny_llama):
    model, _ = tiny_llama
    before = _n_hooks(model)
    with pytest.raises(RuntimeError, match="boom"):
        with ActivationTracker(model, [0, 1, 3]):
            assert _n_hooks(model) == before + 3
            raise RuntimeError("boom")
    assert _n_hooks(model) == before


def test_generation_mode_records_prefill_and_decode(tiny_llama):
    model, tok = tiny_llama
    enc = tok(["1 + 2 ="], return_tensors="pt")
    model.generate(**enc, max_new_tokens=1, do_sample=False, pad_token_id=tok.pad_token_id)  # transformers' own hooks
    before = _n_hooks(model)
    with ActivationTracker(model, [1], record_all=True) as tr:
        out = model.generate(**enc, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    rec = tr.generated()[1]
    total = out.shape[1] - 1  # the last sampled token is never fed back
    assert rec.shape == (1, total, 64)
    ref = _hidden_states(model, out[:, :total], torch.ones_like(out[:, :total]))
    assert torch.allclose(rec, ref[2], atol=1e-4)
    assert _n_hooks(model) == before


def test_generation_mode_around_generate_batch_with_a_shared_prefix(tiny_llama):
    """generate_batch encodes the shared few-shot prefix once (a batch-1 call) before the batched generate: the
    tracker joins the two so position i is position i of the padded prefix + suffix input (was a crash)."""
    from rpe.generation import generate_batch
    from rpe.sampling import SamplingConfig

    model, tok = tiny_llama
    prefix = "Q: worked example one. A: 1.\n\nQ: worked example two. A: 2.\n\nQ: three and four. A: 7.\n\n"
    prompts = [prefix + q for q in ("Q: 3+4?", "Q: a longer question here?", "Q: x")]
    with ActivationTracker(model, [1, 2], record_all=True) as tr:
        gen = generate_batch(model, tok, prompts, SamplingConfig(temperature=0.0, max_new_tokens=6))
    full = tr.generated()
    assert tr.prefix_tokens >= 32  # the prefix call really happened
    width = max(len(p) for p in gen.prompt_ids)
    for r, (p, c) in enumerate(zip(gen.prompt_ids, gen.completion_ids)):
        seq = torch.tensor([p + c[:-1]]) if c else torch.tensor([p])
        ref = _hidden_states(model, seq, torch.ones_like(seq))
        last_prompt = full[1][r, width - 1]
        assert torch.allclose(last_prompt, ref[2][0, len(p) - 1], atol=1e-4)  # s_0 of each row
        if c:
            assert torch.allclose(full[2][r, width + len(c) - 2], ref[3][0, -1], atol=1e-4)  # a decode position
    dropped = tr.generated(drop_prefix=True)
    assert dropped[1].shape[1] == full[1].shape[1] - tr.prefix_tokens
    assert torch.equal(dropped[1], full[1][:, tr.prefix_tokens :])


def test_generation_mode_refuses_unrelated_calls(tiny_llama):
    model, tok = tiny_llama
    with ActivationTracker(model, [1], record_all=True) as tr:
        model(**tok(["a b", "c d"], return_tensors="pt", padding=True))
        model(**tok(["a b", "c d", "e f"], return_tensors="pt", padding=True))
    with pytest.raises(ValueError, match="one ActivationTracker.record_all=True. per generate call"):
        tr.generated()


def test_bad_layers_and_neurons_are_refused(tiny_llama):
    model, _ = tiny_llama
    with pytest.raises(ValueError, match="4 decoder layers"):
        ActivationTracker(model, [4])
    with pytest.raises(ValueError, match="0..63"):
        ActivationTracker(model, [0], neurons=torch.tensor([64]))
    with pytest.raises(RuntimeError, match="context manager"):
        ActivationTracker(model, [0]).forward(input_ids=torch.tensor([[5]]))
    assert len(decoder_layers(model)) == 4
