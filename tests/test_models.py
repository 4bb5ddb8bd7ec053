import pytest
import torch

from rpe.models import REGISTRY, ModelNotFetchedError, UnknownModelError, fetch_model, fingerprint, load_model, resolve_model_path
from rpe.tiny import TinyModelConfig, tiny_model


@pytest.mark.parametrize("arch", ["llama", "gemma3", "qwen2"])
def test_tiny_models_run_and_are_deterministic(arch):
    m1, tok = tiny_model(TinyModelConfig(architecture=arch, seed=1))
    m2, _ = tiny_model(TinyModelConfig(architecture=arch, seed=1))
    ids = tok(["Answer: 5", "1 + 2"], return_tensors="pt", padding=True)
    with torch.no_grad():
        a = m1(**ids).logits
        b = m2(**ids).logits
    assert a.shape == (2, ids.input_ids.shape[1], len(tok))
    assert torch.equal(a, b)
    fp = fingerprint(m1, tok)
    assert fp.hidden_size == 64 and fp.num_layers == 4 and fp.vocab_size == len(tok)


def test_tiny_tokenizer_round_trips_text():
    _, tok = tiny_model()
    text = "Step 1: 2 + 3 = 5.\n\nAnswer: 5"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text


def test_unfetched_registry_model_names_the_fetch_command(tmp_path, monkeypatch):
    monkeypatch.setenv("RPE_CACHE_DIR", str(tmp_path))
    with pytest.raises(ModelNotFetchedError) as err:
        load_model("smollm2-135m-instruct")
    assert "rpe models fetch smollm2-135m-instruct" in str(err.value)
    assert str(tmp_path) in str(err.value)


def test_unknown_registry_name_lists_models():
    with pytest.raises(UnknownModelError) as err:
        fetch_model("gpt-5")
    for name in REGISTRY:
        assert name in str(err.value)


def test_non_registry_names_pass_through():
    assert resolve_model_path("/some/folder") == "/some/folder"
    assert resolve_model_path("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_fingerprint_mismatch_fields():
    a, tok = tiny_model(TinyModelConfig(hidden_size=64))
    b, _ = tiny_model(TinyModelConfig(hidden_size=32, num_heads=4))
    assert fingerprint(a, tok).mismatches(fingerprint(b, tok)) == ["hidden_size"]
    assert fingerprint(a, tok).mismatches(fingerprint(a, tok)) == []


def test_local_folder_loads(tmp_path):
    model, tok = tiny_model()
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded, ltok = load_model(str(tmp_path))
    ids = tok("1 + 2", return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(model(**ids).logits, loaded(**ids).logits)
    assert ltok.padding_side == "left" and ltok.pad_token is not None


def test_a_registry_model_keeps_a_loadable_name_or_path(tmp_path, monkeypatch):
    """vLLM (TRL's use_vllm) builds its engine from model.name_or_path: it was overwritten with the registry
    name, which is neither a folder nor a hub id."""
    from transformers import AutoConfig

    monkeypatch.setenv("RPE_CACHE_DIR", str(tmp_path))
    folder = tmp_path / "models" / "smollm2-135m-instruct"
    model, tok = tiny_model()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    (folder / "rpe_model.json").write_text("{}")
    loaded, ltok = load_model("smollm2-135m-instruct")
    assert loaded.name_or_path == str(folder)
    assert AutoConfig.from_pretrained(loaded.name_or_path).hidden_size == model.config.hidden_size
    assert fingerprint(loaded, ltok).name == "smollm2-135m-instruct"  # bundles and manifests keep the short name


@pytest.mark.slow
def test_real_default_model_loads_and_fingerprints(real_model):
    model, tok = real_model
    fp = fingerprint(model, tok, "smollm2-135m-instruct")
    assert (fp.architecture, fp.hidden_size, fp.num_layers, fp.vocab_size) == ("LlamaForCausalLM", 576, 30, 49152)
    assert tok.chat_template
