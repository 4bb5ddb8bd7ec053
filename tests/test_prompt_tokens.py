"""The tokens the bundle saw (issue #27 item 4): rollouts tokenise prompts as TRL does, the bundle records whether
they began with the BOS, and a read on other tokens is refused with both named."""

import json

import numpy as np
import pytest

from rpe.bundle import BundleMismatchError, SubsystemBundle, prompts_start_with_bos, random_bundle
from rpe.prompts import PromptConfig
from rpe.records import read_trajectories
from rpe.rollouts import RolloutConfig, collect_rollouts, rollout_settings
from rpe.sampling import SamplingConfig
from rpe.signals import SignalReader
from rpe.tiny import tiny_tokenizer


@pytest.fixture(scope="module")
def bos_tok():
    """The tiny char tokenizer that adds ``<s>`` as Gemma-3's and Llama-3's tokenizers add their BOS."""
    return tiny_tokenizer(add_bos=True)


def _rollouts(model, tok, style, out):
    cfg = RolloutConfig(task="chain_sum", n_problems=2, samples=1, batch_size=2, seed=3, prompt=PromptConfig(style=style, shots=1),
                        sampling=SamplingConfig(max_new_tokens=6))
    collect_rollouts(model, tok, cfg, out, model_name="tiny")
    return read_trajectories(out)


@pytest.mark.parametrize("style", ["completion", "chat"])
def test_rollout_prompts_are_the_tokens_trl_gives_the_same_prompt(tiny_llama, bos_tok, tmp_path, style):
    model, _ = tiny_llama
    trajs = _rollouts(model, bos_tok, style, tmp_path / style)
    for t in trajs:
        if style == "completion":  # TRL 1.16, plain-text prompts: processing_class(text=prompts)["input_ids"]
            assert t.prompt_token_ids == bos_tok(text=t.prompt)["input_ids"] and t.prompt_token_ids[0] == bos_tok.bos_token_id
        else:  # a conversation: apply_chat_template(tokenize=True), the template writes what it needs
            assert t.prompt_token_ids == bos_tok(t.prompt, add_special_tokens=False)["input_ids"]
            assert t.prompt_token_ids[0] != bos_tok.bos_token_id
    run_config = json.loads((tmp_path / style / "run_config.json").read_text())
    assert run_config.get("prompt_special_tokens") is (True if style == "completion" else None)
    settings = rollout_settings(tmp_path / style)  # the finished folder reads back (dopamine, ablate, search)
    assert settings.config.prompt.style == style


def test_a_resume_with_other_prompt_tokens_is_refused(tiny_llama, bos_tok, tmp_path):
    """A completion-style folder from before prompts got their BOS (no ``prompt_special_tokens``) cannot be
    extended: its parts would mix prompts with and without it."""
    model, _ = tiny_llama
    _rollouts(model, bos_tok, "completion", tmp_path)
    path = tmp_path / "run_config.json"
    old = json.loads(path.read_text())
    del old["prompt_special_tokens"]
    path.write_text(json.dumps(old))
    (tmp_path / "manifest.json").unlink()
    with pytest.raises(ValueError, match="different configuration"):
        _rollouts(model, bos_tok, "completion", tmp_path)


def test_prompts_start_with_bos_reads_all_none_or_mixed(bos_tok):
    assert prompts_start_with_bos([[1, 5], [1, 6]], bos_tok) is True
    assert prompts_start_with_bos([[5], [6]], bos_tok) is False
    assert prompts_start_with_bos([[1, 5], [6]], bos_tok) is None and prompts_start_with_bos([], bos_tok) is None


def test_a_read_on_other_prompt_tokens_than_the_bundles_is_refused_naming_both(tiny_llama, bos_tok, tmp_path):
    model, _ = tiny_llama
    bundle = random_bundle(model, bos_tok)
    bundle.prompt_bos = True
    bundle = SubsystemBundle.load(bundle.save(tmp_path / "b"), model=model, tokenizer=bos_tok)
    assert bundle.prompt_bos is True  # saved and loaded
    reader = SignalReader(bundle, model, bos_tok)
    text, completion = "Question: 1 + 2?\nSolution:\n", bos_tok("1 + 2 = 3.", add_special_tokens=False)["input_ids"]
    with_bos, without = bos_tok(text)["input_ids"], bos_tok(text, add_special_tokens=False)["input_ids"]
    (sig,) = reader.read([with_bos], [completion])
    assert np.isfinite(sig.values).all() and len(sig.values) == 2  # s_0 and one step
    with pytest.raises(BundleMismatchError, match=r"begin with '<s>' \(id 1\), but 1 of these 2 prompts do not") as err:
        reader.read([with_bos, without], [completion, completion])
    assert "tokenizer(text), as TRL does" in str(err.value)
    bundle.prompt_bos = False  # fitted without: a prompt with the BOS is refused the other way round
    with pytest.raises(BundleMismatchError, match="do not begin with '<s>'"):
        reader.read([with_bos], [completion])
    bundle.prompt_bos = None  # bundles from before recorded nothing: nothing to check
    reader.read([without], [completion])
    # bundle.value tokenises texts as the fitted prompts began
    bundle.prompt_bos = True
    assert bundle.encode_text(bos_tok, text) == with_bos and bundle.encode_text(bos_tok, "<s>" + text) == with_bos
    bundle.prompt_bos = False
    assert bundle.encode_text(bos_tok, text) == without


def test_fit_records_whether_the_prompts_began_with_the_bos(tiny_llama, bos_tok, tmp_path):
    from rpe.fit import FitConfig, fit_bundle
    from rpe.probe import ProbeConfig

    model, _ = tiny_llama
    cfg = RolloutConfig(task="chain_sum", n_problems=16, samples=2, batch_size=16, seed=3,
                        prompt=PromptConfig(style="completion", shots=1), sampling=SamplingConfig(max_new_tokens=6))
    collect_rollouts(model, bos_tok, cfg, tmp_path, model_name="tiny")
    trajs = read_trajectories(tmp_path)
    for t in trajs[: len(trajs) // 2]:  # both outcomes, whatever the random model wrote
        t.reward = 1.0 - t.reward
    fit = FitConfig(layers=[2], prune_fracs=[1.0], probe=ProbeConfig(family="linear", hidden=0), n_boot=20, sparsity_draws=0)
    bundle, _ = fit_bundle(model, bos_tok, trajs, fit, model_name="tiny")
    assert bundle.prompt_bos is True


def test_the_gymnasium_wrapper_reads_the_prompt_tokens_the_bundle_was_fitted_on(tiny_llama, bos_tok):
    import gymnasium

    from rpe.envs import InternalRPE, LLMPolicy

    model, _ = tiny_llama
    bundle = random_bundle(model, bos_tok)
    bundle.prompt_bos = True
    env = InternalRPE(gymnasium.make("rpe/ChainSum-v0", max_steps=2), bundle, model=model, tokenizer=bos_tok)
    env.reset(seed=0)  # without a policy it tokenises as the bundle's prompts were: the BOS in front
    assert env._prompt_ids[0] == bos_tok.bos_token_id
    policy = LLMPolicy(model, bos_tok, max_step_tokens=4)  # plain prompts without special tokens: refused
    with pytest.raises(BundleMismatchError, match="begin with '<s>'"):
        InternalRPE(gymnasium.make("rpe/ChainSum-v0", max_steps=2), bundle, policy).reset(seed=0)
    policy = LLMPolicy(model, bos_tok, max_step_tokens=4, add_special_tokens=True)
    obs, info = InternalRPE(gymnasium.make("rpe/ChainSum-v0", max_steps=2), bundle, policy).reset(seed=0)
    assert 0.0 <= info["internal_value"] <= 1.0


def test_step_spans_come_from_the_decoding_the_text_was_made_with(tiny_llama):
    """A special token inside a completion (an end-of-turn the model wrote mid-way) adds no characters to
    generation's text (decoded skipping special tokens): spans must not shift by its name's length."""
    from rpe.rollouts import make_steps

    _, tok = tiny_llama
    first, second = tok("1 + 2 = 3.\n\n", add_special_tokens=False)["input_ids"], tok("3 + 4 = 7.", add_special_tokens=False)["input_ids"]
    ids = first + [tok.eos_token_id] + second + [tok.eos_token_id]
    text = tok.decode(ids, skip_special_tokens=True)  # what generation records as the completion
    steps = make_steps(tok, ids, text, "paragraph", None)
    assert [s.text for s in steps] == ["1 + 2 = 3.", "3 + 4 = 7."]
    for s in steps:
        assert tok.decode(ids[s.token_start : s.token_end], skip_special_tokens=True).strip() == s.text
        assert ids[s.token_end - 1] == tok(".", add_special_tokens=False)["input_ids"][0]  # s_t: the step's last token
    # the reader cuts the same spans from the ids alone
    from rpe.bundle import random_bundle

    model, _ = tiny_llama
    reader = SignalReader(random_bundle(model, tok), model, tok)
    assert reader.step_spans(ids) == [(s.token_start, s.token_end) for s in steps]
