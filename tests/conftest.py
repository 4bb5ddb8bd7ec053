"""Shared fixtures: tiny random models (no download) and the real default model (slow tests only)."""

from __future__ import annotations

import os

import pytest
import torch

from rpe.models import DEFAULT_MODEL, fetch_command, is_fetched
from rpe.tiny import TinyModelConfig, tiny_model


@pytest.fixture(scope="session")
def tiny_llama():
    return tiny_model(TinyModelConfig(architecture="llama", seed=0))


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def real_model():
    """SmolLM2-135M-Instruct from the cache (``make test`` fetches it first)."""
    if not is_fetched(DEFAULT_MODEL):
        if os.environ.get("RPE_REQUIRE_REAL_MODEL"):
            pytest.fail(f"{DEFAULT_MODEL} is not fetched; run `{fetch_command(DEFAULT_MODEL)}`")
        pytest.skip(f"{DEFAULT_MODEL} not fetched (run `{fetch_command(DEFAULT_MODEL)}`)")
    from rpe.models import load_model

    return load_model(DEFAULT_MODEL)


def make_tiny_bundle(model, tok, layer: int = 2, k: int = 6, m: int = 4, hidden: int = 16, seed: int = 0):
    """A bundle for a tiny model with random probe weights (see :func:`rpe.bundle.random_bundle`)."""
    from rpe.bundle import random_bundle

    return random_bundle(model, tok, layer=layer, k=k, m=m, hidden=hidden, seed=seed)


@pytest.fixture(scope="session")
def tiny_bundle(tiny_llama):
    model, tok = tiny_llama
    return make_tiny_bundle(model, tok)



@pytest.fixture(scope="session")
def answering_tiny(tmp_path_factory):
    """:func:`rpe.tiny.tiny_answering_model` saved as a model folder, and the parity task file it answers (about
    half right, one or more steps): ``(model folder, task file)``. Every pipeline stage runs on it; it measures
    nothing."""
    from rpe.tiny import tiny_answering_model, tiny_parity_task

    root = tmp_path_factory.mktemp("answering")
    model, tok = tiny_answering_model()
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    return root / "model", root / tiny_parity_task(root / "parity.jsonl")
