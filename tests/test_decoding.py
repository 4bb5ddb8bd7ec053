"""The continuous-batching engine: same greedy tokens as ``model.generate``, sampling independent of batching,
recorded activations equal to a separate forward, identical prompts prefilled once."""

import pytest
import torch

from rpe.decoding import generate_continuous
from rpe.generation import generate_from_ids
from rpe.kvcache import shared_prefix_len
from rpe.sampling import SamplingConfig
from rpe.tracker import ActivationTracker, decoder_layers

SHARED = "Solve each problem step by step and finish with the answer line. " * 2


def _prompts(tok, n, repeat=1):
    return [tok(SHARED + f"Q{i // repeat}: {i // repeat}+{i // repeat % 7}=", add_special_tokens=False)["input_ids"]
            for i in range(n)]


def test_greedy_tokens_equal_model_generate_with_stop_strings():
    from rpe.tiny import tiny_model

    model, tok = tiny_model()
    with torch.no_grad():  # pad (an end id) is the random model's greedy choice at once; make it one among many
        for end in (tok.eos_token_id, tok.pad_token_id):
            model.lm_head.weight[end] = model.lm_head.weight[end] * 0.3
    prompts = _prompts(tok, 9)
    greedy = SamplingConfig(temperature=0, max_new_tokens=16)
    plain = generate_from_ids(model, tok, prompts, greedy, engine="generate").texts
    longest = max(plain, key=len)
    assert len(longest) >= 4
    for stop in ((), (longest[2:4],)):
        fast = generate_from_ids(model, tok, prompts, greedy, stop_strings=stop, engine="continuous", max_rows=4)
        ref = generate_from_ids(model, tok, prompts, greedy, stop_strings=stop, engine="generate")
        assert fast.completion_ids == ref.completion_ids and fast.texts == ref.texts
        assert fast.finish_reasons == ref.finish_reasons and fast.stop_ids == ref.stop_ids
    assert "stop" in fast.finish_reasons


def test_sampling_does_not_depend_on_batch_size_or_refill(tiny_llama):
    model, tok = tiny_llama
    prompts = _prompts(tok, 12)
    sampling = SamplingConfig(temperature=0.9, top_k=20, top_p=0.9, max_new_tokens=20)
    runs = [generate_continuous(model, tok, prompts, sampling, seed=7, max_rows=m, refill=r)[0].completion_ids
            for m, r in ((12, 4), (3, 1), (5, 2))]
    assert runs[0] == runs[1] == runs[2]
    other_seed = generate_continuous(model, tok, prompts, sampling, seed=8, max_rows=12)[0].completion_ids
    assert other_seed != runs[0]
    lengths = {len(c) for c in runs[0]}
    assert len(lengths) > 2  # rows finish at different times, so retirement and refill really happened


def test_recorded_activations_equal_a_separate_forward(tiny_llama):
    """Per row: the prompt after the shared prefix, then every generated token that was fed back (all of them for
    an EOS-terminated row, all but the last for a row cut at the budget)."""
    model, tok = tiny_llama
    prompts = _prompts(tok, 10)
    prefix = shared_prefix_len(prompts, 32)
    assert prefix > 0
    gen, recorded = generate_continuous(model, tok, prompts, SamplingConfig(temperature=0.8, max_new_tokens=18),
                                        seed=1, max_rows=4, refill=1, record_layers=[1, 3])
    assert {"eos", "length"} <= set(gen.finish_reasons)
    for p, c, why, rec in zip(prompts, gen.completion_ids, gen.finish_reasons, recorded):
        fed = len(c) if why == "eos" else len(c) - 1
        assert rec[1].shape == (len(p) - prefix + fed, 64)
        with ActivationTracker(model, [1, 3], record_all=True) as tr, torch.no_grad():
            model(input_ids=torch.tensor([p + c]))
        full = tr.generated()
        for layer in (1, 3):
            torch.testing.assert_close(rec[layer], full[layer][0, prefix : prefix + rec[layer].shape[0]], atol=1e-4,
                                       rtol=1e-4)


def test_identical_prompts_are_prefilled_once_and_still_sample_apart(tiny_llama):
    model, tok = tiny_llama
    prompts = _prompts(tok, 8, repeat=4)  # 2 states x 4 continuations
    widths = []
    def shape(module, args, kwargs):
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        widths.append(hidden.shape[:2])

    hook = decoder_layers(model)[0].register_forward_pre_hook(shape, with_kwargs=True)
    try:
        gen, _ = generate_continuous(model, tok, prompts, SamplingConfig(temperature=1.0, max_new_tokens=12), seed=0,
                                     max_rows=8)
    finally:
        hook.remove()
    prefix = shared_prefix_len(prompts, 32)
    assert tuple(widths[0]) == (1, prefix)  # the shared few-shot prefix, once
    assert widths[1][0] == 2 and widths[1][1] > 1  # one prefill forward with 2 rows (the two distinct prompts)
    assert all(w[1] == 1 for w in widths[2:])  # then decode steps only
    assert len({tuple(c) for c in gen.completion_ids[:4]}) > 1  # the 4 continuations of a state differ


def test_unsupported_architectures_use_model_generate(tiny_llama):
    from rpe.generation import resolve_engine
    from rpe.tiny import TinyModelConfig, tiny_model

    gemma, tok = tiny_model(TinyModelConfig(architecture="gemma3"))
    assert resolve_engine(gemma, "continuous") == "generate"
    with pytest.raises(ValueError, match="continuous batching cannot serve this gemma3_text model .4 of its 4 cache layers are DynamicSlidingWindowLayer"):
        generate_continuous(gemma, tok, _prompts(tok, 2), SamplingConfig(max_new_tokens=4))
    with pytest.raises(ValueError, match="unknown generation engine"):
        resolve_engine(gemma, "vllm")
    out = generate_from_ids(gemma, tok, _prompts(tok, 2), SamplingConfig(temperature=0, max_new_tokens=4))
    assert len(out.completion_ids) == 2


def test_models_asking_for_other_processing_use_model_generate():
    from rpe.generation import resolve_engine
    from rpe.tiny import tiny_model

    model, _ = tiny_model()
    assert resolve_engine(model, "continuous") == "continuous"
    model.generation_config.repetition_penalty = 1.3  # the continuous engine would silently ignore it
    assert resolve_engine(model, "continuous") == "generate"


def test_stack_caches_pads_each_cache_on_the_left_and_joins_the_rows(tiny_llama):
    import torch
    from transformers import DynamicCache

    from rpe.decoding import feed_tokens
    from rpe.kvcache import stack_caches

    model, _ = tiny_llama

    def cache_of(ids):
        c = DynamicCache(config=model.config)
        with torch.no_grad():
            feed_tokens(model, c, ids, 0)
        return c

    seqs = [[5, 6, 7], [8, 9, 10, 11, 12], [13]]
    pads = [2, 0, 4]
    refs = [cache_of(ids) for ids in seqs]
    two = cache_of([20, 21])  # a cache of two rows joins like any other
    two.batch_repeat_interleave(2)
    got = stack_caches([cache_of(ids) for ids in seqs] + [two], pads + [3])
    for idx, layer in enumerate(got.layers):
        for name in ("keys", "values"):
            parts = [getattr(c.layers[idx], name) for c in [*refs, two]]
            want = torch.cat([torch.cat([t.new_zeros(t.shape[0], t.shape[1], pad, t.shape[3]), t], 2)
                              for t, pad in zip(parts, pads + [3])], 0)
            torch.testing.assert_close(getattr(layer, name), want)


def test_boundary_keeper_keeps_every_step_end_and_little_else():
    """Boundary-only capture keeps the last token of every paragraph, newline and sentence step as tokens arrive
    (white space before the separator, a newline merged into the step's last token, a decimal point that ends no
    sentence, the final step without one)."""
    import itertools

    from rpe.decoding import BoundaryKeeper
    from rpe.models import DEFAULT_MODEL, is_fetched, model_dir
    from rpe.segment import split_steps, token_char_ends, token_spans
    from rpe.tiny import tiny_tokenizer

    tokenizers = [tiny_tokenizer()]
    if is_fetched(DEFAULT_MODEL):
        from transformers import AutoTokenizer

        tokenizers.append(AutoTokenizer.from_pretrained(model_dir(DEFAULT_MODEL)))
    text = ("Step 1: 3 + 4 = 7.  \n\nStep 2: 7 - 2 = 5.\n\n\nStep 3: we add 5 and 1, which gives 6 in all.\n"
            "\nIs 6.5 right? No! It is 6. Answer: 6")
    for tok, text in itertools.product(tokenizers, (text, text + " \n")):  # the final step with white space after
        ids = tok(text, add_special_tokens=False)["input_ids"]
        for segmenter in ("paragraph", "newline", "sentence"):
            keeper, kept = BoundaryKeeper(segmenter=segmenter), []
            for position, i in enumerate(ids):
                kept += keeper.fed(position, tok.decode([i]))
            kept += keeper.flush()
            ends = [b - 1 for _, b in token_spans(split_steps(text, segmenter), token_char_ends(tok, ids))]
            assert set(ends) <= set(kept), (type(tok).__name__, segmenter)
            assert len(kept) <= 4 * len(ends) + 8 < len(ids)  # proportional to the steps, not the tokens
