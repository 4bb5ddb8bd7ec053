"""Every stage on a tiny random model of each architecture users bring (Llama, Qwen2, Qwen3, Mistral, Phi-3, Gemma-3
with a sliding window shorter than the shared prefix): the fast paths decide from the cache layers, and every
path gives what a plain forward or ``model.generate`` gives."""

import numpy as np
import pytest
import torch

from rpe.kvcache import plain_cache_refusal
from rpe.tiny import TINY_ARCHITECTURES, TinyModelConfig, tiny_model

from test_probe import _synthetic_trajectories

WINDOW = 16  # Gemma-3's sliding window here; every shared prefix below is longer
PREFIX = "Examples: 1 + 2 = 3. 4 + 4 = 8. 5 - 3 = 2.\n"  # 43 characters = 43 tokens, shared by every prompt


def _model(arch: str):
    return tiny_model(TinyModelConfig(architecture=arch, sliding_window=WINDOW if arch == "gemma3" else None))


@pytest.fixture(scope="module", params=TINY_ARCHITECTURES)
def arch_model(request):
    model, tok = _model(request.param)
    return request.param, model, tok


def test_fast_paths_are_chosen_from_the_cache_layers_not_the_name():
    for arch in ("llama", "qwen2", "qwen3", "mistral", "phi3"):
        assert plain_cache_refusal(_model(arch)[0]) is None, arch
    gemma = _model("gemma3")[0]
    assert plain_cache_refusal(gemma) == ("4 of its 4 cache layers are DynamicSlidingWindowLayer (window 16 tokens), not "
                                          "plain full-attention layers")
    for arch in ("mistral", "qwen2"):  # the same model type with a window set takes the safe path
        windowed = tiny_model(TinyModelConfig(architecture=arch, sliding_window=8))[0]
        assert "DynamicSlidingWindowLayer (window 8 tokens)" in plain_cache_refusal(windowed)


def _plain_greedy(model, tok, ids, n):
    """Reference: model.generate on one unpadded row at a time, no shared cache."""
    out = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=None)
    return out[0, len(ids):].tolist()


def test_default_engine_greedy_tokens_equal_model_generate(arch_model):
    from rpe.generation import generate_from_ids, resolve_engine
    from rpe.sampling import SamplingConfig

    arch, model, tok = arch_model
    prompts = [tok(PREFIX + q, add_special_tokens=False)["input_ids"] for q in ("7 + 1 =", "2 - 2 =", "9 + 0 + 1 =")]
    assert len(prompts[0]) > 2 * WINDOW
    n = 10
    model.generation_config.eos_token_id = None  # every row runs the full budget (a random model may stop early)
    try:
        gen = generate_from_ids(model, tok, prompts, SamplingConfig(temperature=0.0, max_new_tokens=n), seed=0)
    finally:
        model.generation_config.eos_token_id = tok.eos_token_id
    assert resolve_engine(model, "continuous") == ("generate" if arch == "gemma3" else "continuous")
    assert gen.completion_ids == [_plain_greedy(model, tok, p, n) for p in prompts]


def test_captured_states_equal_a_plain_forward(arch_model):
    from rpe.store import capture_states

    arch, model, tok = arch_model
    trajs = _synthetic_trajectories(tok, n_problems=3, samples=1)
    prefix = tok(PREFIX, add_special_tokens=False)["input_ids"]
    for i, t in enumerate(trajs):  # a shared few-shot prefix longer than Gemma-3's window, questions of 3 lengths
        t.prompt_token_ids = prefix + list(t.prompt_token_ids)[: 6 + 3 * i]
    # the shared prefix is cached on every architecture (Gemma-3's sliding layers included), rows padded after it
    states = capture_states(model, trajs, [1, 2], batch_size=3, min_prefix=8)  # the last block is seen after the final norm
    for i, t in enumerate(trajs):
        ids = torch.tensor([t.prompt_token_ids + t.completion_token_ids])
        with torch.no_grad():
            hidden = model(input_ids=ids, output_hidden_states=True).hidden_states  # reference only
        positions = [t.prompt_len - 1] + [t.prompt_len + s.token_end - 1 for s in t.steps]
        for layer in (1, 2):
            got = states.acts[layer][states.traj_index == i]
            torch.testing.assert_close(got, hidden[layer + 1][0, positions], atol=2e-5, rtol=1e-4)


def test_fit_ablation_sets_and_internal_rpe_run(arch_model):
    import gymnasium

    from rpe.ablate import AblateConfig, neuron_sets
    from rpe.envs import InternalRPE
    from rpe.fit import FitConfig, fit_bundle
    from rpe.probe import ProbeConfig
    from rpe.signals import SignalReader

    arch, model, tok = arch_model
    trajs = _synthetic_trajectories(tok, n_problems=20, samples=2)
    cfg = FitConfig(layers=[1, 2], top_frac=0.1, prune_fracs=[1.0], probe=ProbeConfig(hidden=16, epochs=3), n_boot=20)
    bundle, states = fit_bundle(model, tok, trajs, cfg, model_name=f"tiny-{arch}")
    assert bundle.model.architecture == type(model).__name__ and bundle.value_neurons.numel() == 6
    sets, _ = neuron_sets(model, bundle, trajs, states, bundle.layer, 6,
                          AblateConfig(sources=["value", "random", "wanda"], random_seeds=2))
    assert {k: v.numel() for k, v in sets.items()} == {"value": 6, "random/0": 6, "random/1": 6, "wanda": 6}
    env = InternalRPE(gymnasium.make("rpe/ChainSum-v0", max_steps=4), bundle, model=model, tokenizer=tok)
    env.reset(seed=0)
    for action in ("4 + 1 = 5.", "5 - 3 = 2."):
        env.step(action)
    u = env.unwrapped
    whole = SignalReader(bundle, model, tok).read([tok(u.prompt, add_special_tokens=False)["input_ids"]],
                                                   [tok(u.completion, add_special_tokens=False)["input_ids"]])[0]
    np.testing.assert_allclose(env.internal_values, whole.values, atol=1e-4)


def test_wanda_reads_fused_projections():
    """Phi-3 fuses q/k/v and gate/up: the scores equal those computed from the split weights."""
    from rpe.controls import wanda_scores

    model, _ = _model("phi3")
    acts = torch.randn(32, 64, generator=torch.Generator().manual_seed(0))
    block = model.model.layers[2]
    by_hand = (block.self_attn.qkv_proj.weight.abs().sum(0) + block.mlp.gate_up_proj.weight.abs().sum(0))
    torch.testing.assert_close(wanda_scores(model, 1, acts), acts.norm(dim=0) * by_hand)


def test_default_lora_targets_adapt_every_attention_projection():
    peft = pytest.importorskip("peft")
    from rpe.trainers.recipes import DEFAULT_LORA_TARGETS

    expected = {"phi3": {"qkv_proj", "o_proj"}}
    for arch in TINY_ARCHITECTURES:
        model, _ = _model(arch)
        wrapped = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=DEFAULT_LORA_TARGETS, task_type="CAUSAL_LM"))
        adapted = {name.split(".")[-1] for name, mod in wrapped.named_modules() if hasattr(mod, "lora_A")}
        assert adapted == expected.get(arch, {"q_proj", "k_proj", "v_proj", "o_proj"}), arch
