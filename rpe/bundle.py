"""``SubsystemBundle``: the validated artefact everything downstream loads.

On disk, a folder:
- ``bundle.json``: bundle version, model fingerprint, layer, value-neuron (and dopamine-neuron) indices,
  probe config, metrics, and the config that made it;
- ``weights.safetensors``: standardisation stats and probe weights (safetensors only: no pickle);
- ``metrics.json``: the metrics alone, for people and scripts.

``SubsystemBundle.load(path, model=..., tokenizer=...)`` refuses a bundle made for another model, showing both
fingerprints. Saving is atomic: a crash never leaves a half-written bundle in place of a good one.

Example:
    >>> bundle = SubsystemBundle.load("runs/demo/bundle", model=model, tokenizer=tok)  # doctest: +SKIP
    >>> bundle.value(model, tok, ["...prompt and partial reasoning..."])  # doctest: +SKIP
    tensor([0.41])
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from rpe.models import ModelFingerprint, fingerprint
from rpe.probe import ProbeConfig, ProbeState, ValueProbe
from rpe.seeding import seeded

logger = logging.getLogger(__name__)

BUNDLE_VERSION = 1
BUNDLE_FILE = "bundle.json"
WEIGHTS_FILE = "weights.safetensors"


class BundleMismatchError(ValueError):
    """The bundle was made for a different model."""


class BundleFormatError(ValueError):
    """The bundle folder is missing, damaged, or of an unsupported version."""


@dataclass
class SubsystemBundle:
    """Value neurons (and, once found, dopamine neurons) of one model, with the probe that reads them.

    Attributes:
        model: fingerprint of the model the bundle was fitted on.
        layer: decoder block whose output holds the value neurons.
        value_neurons: (k,) indices into d_model.
        probe_state: the probe on ``value_neurons`` (standardisation + weights).
        probe_config: how the probe was trained.
        dopamine_neurons: (m,) indices, empty until ``rpe dopamine`` runs.
        dopamine_sign: (m,) +1 when activation rises with RPE, -1 when it falls.
        metrics: evaluation numbers (AUROC, Brier, ECE, pruning curve, ...).
        created_with: the configuration that produced the bundle.
    """

    model: ModelFingerprint
    layer: int
    value_neurons: torch.Tensor
    probe_state: ProbeState
    probe_config: ProbeConfig
    dopamine_neurons: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    dopamine_sign: torch.Tensor = field(default_factory=lambda: torch.zeros(0))
    metrics: dict[str, Any] = field(default_factory=dict)
    created_with: dict[str, Any] = field(default_factory=dict)
    dopamine_mean: torch.Tensor | None = None
    """(m,) mean step-averaged activation of each dopamine neuron on the data that found it."""
    dopamine_std: torch.Tensor | None = None
    """(m,) its standard deviation (activity is read as ``sign * (a - mean) / std``)."""
    prompt_bos: bool | None = None
    """Whether the prompts the bundle was fitted on began with the tokenizer's BOS token (:func:`prompts_start_with_bos`;
    None: not recorded, a tokenizer without one, or mixed). A read whose prompts differ is refused
    (:meth:`check_prompt_tokens`): the BOS is the attention sink every later activation depends on."""

    @property
    def probe(self) -> ValueProbe:
        return ValueProbe.from_state(self.probe_state, self.probe_config)

    def dopamine_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(m,) mean and std that standardise dopamine-neuron activations (0 and 1 when the bundle predates
        them)."""
        m = self.dopamine_neurons.numel()
        mean = self.dopamine_mean if self.dopamine_mean is not None else torch.zeros(m)
        std = self.dopamine_std if self.dopamine_std is not None else torch.ones(m)
        return mean.float(), std.float().clamp_min(1e-6)

    # -- validation ------------------------------------------------------------------------------------
    def check_model(self, model, tokenizer) -> None:
        """Raise :class:`BundleMismatchError` unless ``model``/``tokenizer`` match the bundle's fingerprint; log one
        notice when the model runs in another dtype than the bundle was fitted in (a float32 bundle on bfloat16
        activations works: the probe reads them in float32)."""
        other = fingerprint(model, tokenizer)
        bad = self.model.mismatches(other)
        if bad:
            raise BundleMismatchError(
                f"this bundle was fitted on {self.model.name!r} and cannot be used on {other.name!r} "
                f"(differs in {', '.join(bad)}).\n  bundle: {self.model.to_dict()}\n  model:  {other.to_dict()}\n"
                "Fit a bundle for this model with `rpe fit`."
            )
        if self.model.dtype and other.dtype and self.model.dtype != other.dtype:
            logger.warning("bundle fitted on %s activations, read on %s ones (%s): values can differ slightly; "
                           "fit in the dtype you read in for exact agreement", self.model.dtype, other.dtype,
                           other.name)

    def check_prompt_tokens(self, prompt_ids: Sequence[Sequence[int]], tokenizer) -> None:
        """Raise :class:`BundleMismatchError` when ``prompt_ids`` are tokenised otherwise than the prompts the
        bundle was fitted on: they begin with the tokenizer's BOS where those did not, or the reverse (e.g. a
        base model's plain prompt tokenised without special tokens, where TRL and ``rpe rollouts`` add them).
        Nothing is checked for a bundle that did not record it (:attr:`prompt_bos` None)."""
        bos = getattr(tokenizer, "bos_token_id", None)
        if self.prompt_bos is None or bos is None or not prompt_ids:
            return
        odd = [i for i, ids in enumerate(prompt_ids) if (len(ids) > 0 and ids[0] == bos) != self.prompt_bos]
        if odd:
            name = getattr(tokenizer, "bos_token", None) or f"id {bos}"
            how = ("give prompts in the form the bundle was fitted on: a chat template that writes it, or plain text "
                   "tokenised with the tokenizer's special tokens (tokenizer(text), as TRL does)"
                   if self.prompt_bos else "tokenise them without special tokens (add_special_tokens=False)")
            raise BundleMismatchError(
                f"prompt tokens differ from the bundle's: it was fitted on prompts that "
                f"{'begin' if self.prompt_bos else 'do not begin'} with {name!r} (id {bos}), but {len(odd)} of these "
                f"{len(prompt_ids)} prompts {'do not' if self.prompt_bos else 'do'} (prompt {odd[0]} begins with ids "
                f"{list(prompt_ids[odd[0]][:4])}). Internal values read on other tokens are not the fitted ones: "
                f"{how}, or fit a bundle on rollouts tokenised like these.")

    def encode_text(self, tokenizer, text: str) -> list[int]:
        """Token ids of ``text`` (a prompt, or a prompt and the reasoning so far) as the bundle's prompts were
        tokenised: without the tokenizer's special tokens, with its BOS in front where they began with it."""
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        bos = getattr(tokenizer, "bos_token_id", None)
        return [bos, *ids] if self.prompt_bos and bos is not None and ids[:1] != [bos] else ids

    # -- use -------------------------------------------------------------------------------------------
    def value(self, model, tokenizer, texts: list[str], batch_size: int = 16) -> torch.Tensor:
        """Internal value V at the last token of each text, in [0, 1]. Shape (len(texts),). Texts are tokenised
        as the bundle's prompts were (:meth:`encode_text`)."""
        from rpe.kvcache import right_pad
        from rpe.tracker import ActivationTracker

        self.check_model(model, tokenizer)
        device = next(model.parameters()).device
        out = []
        with ActivationTracker(model, [self.layer], neurons=self.value_neurons) as tracker:
            for i in range(0, len(texts), batch_size):
                enc = [self.encode_text(tokenizer, t) for t in texts[i : i + batch_size]]
                ids, mask = right_pad(enc, tokenizer.pad_token_id)
                tracker.select(list(range(len(enc))), [len(e) - 1 for e in enc])
                acts = tracker.forward(input_ids=ids.to(device), attention_mask=mask.to(device))[self.layer]
                out.append(self.probe.predict(acts))
        return torch.cat(out)

    # -- persistence -----------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write the bundle folder atomically (an existing bundle at ``path`` is replaced only once the new
        one is complete).

        The new bundle is written into a staging folder, the old one is renamed aside (``.NAME.old-PID``), the
        staging folder renamed into place, and the old one removed. A process killed between the two renames
        leaves the old bundle aside; :meth:`load` and the next :meth:`save` put it back.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        restore_interrupted_swap(path)
        _remove_leftovers_of_killed_saves(path)
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.staging-{os.getpid()}-", dir=path.parent))
        try:
            tensors = {
                "value_neurons": self.value_neurons.long().contiguous(),
                "dopamine_neurons": self.dopamine_neurons.long().contiguous(),
                "dopamine_sign": self.dopamine_sign.float().contiguous(),
                "mean": self.probe_state.mean.contiguous(),
                "std": self.probe_state.std.contiguous(),
            }
            if self.dopamine_mean is not None and self.dopamine_std is not None:
                tensors["dopamine_mean"] = self.dopamine_mean.float().contiguous()
                tensors["dopamine_std"] = self.dopamine_std.float().contiguous()
            tensors.update({f"probe.{k}": v.contiguous() for k, v in self.probe_state.weights.items()})
            save_file(tensors, str(staging / WEIGHTS_FILE))
            meta = {
                "bundle_version": BUNDLE_VERSION,
                "model": self.model.to_dict(),
                "layer": self.layer,
                "hidden": self.probe_state.hidden,
                "n_value_neurons": int(self.value_neurons.numel()),
                "n_dopamine_neurons": int(self.dopamine_neurons.numel()),
                "probe_config": asdict(self.probe_config),
                "metrics": self.metrics,
                "created_with": self.created_with,
                "prompt_bos": self.prompt_bos,
            }
            (staging / BUNDLE_FILE).write_text(json.dumps(meta, indent=2, default=_json_default))
            (staging / "metrics.json").write_text(json.dumps(self.metrics, indent=2, default=_json_default))
            old = None
            if path.exists():
                old = path.with_name(f".{path.name}.old-{os.getpid()}")
                os.replace(path, old)
            os.replace(staging, path)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return path

    @classmethod
    def resolve(cls, bundle: SubsystemBundle | str | Path, model, tokenizer) -> SubsystemBundle:
        """``bundle`` as a checked object: a folder is loaded, and either way it is checked against ``model`` (the
        transformers model, PEFT wrapper removed) and ``tokenizer``. Every API that takes "a bundle or its folder"
        goes through here.

        Raises:
            BundleFormatError: a folder that is not a complete bundle.
            BundleMismatchError: the bundle was made for another model.
        """
        if isinstance(bundle, (str, Path)):
            return cls.load(bundle, model=model, tokenizer=tokenizer)
        if not isinstance(bundle, cls):
            raise TypeError(f"expected a SubsystemBundle or the path of a bundle folder, got {type(bundle).__name__}")
        bundle.check_model(model, tokenizer)
        return bundle

    @classmethod
    def load(cls, path: str | Path, *, model=None, tokenizer=None) -> SubsystemBundle:
        """Read a bundle folder; with ``model`` and ``tokenizer``, also check it belongs to that model.

        Raises:
            BundleFormatError: missing/damaged files or an unsupported version (the message names the file).
            BundleMismatchError: the bundle was made for another model.
        """
        path = Path(path)
        restore_interrupted_swap(path)
        meta_path, weights_path = path / BUNDLE_FILE, path / WEIGHTS_FILE
        for p in (meta_path, weights_path):
            if not p.is_file():
                raise BundleFormatError(f"{p} is missing: {path} is not a complete bundle (re-run `rpe fit`)")
        try:
            meta = json.loads(meta_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise BundleFormatError(f"{meta_path} is not valid JSON ({err}); re-run `rpe fit`") from err
        version = meta.get("bundle_version")
        if version != BUNDLE_VERSION:
            raise BundleFormatError(
                f"{path} has bundle version {version}; this rpe reads version {BUNDLE_VERSION}. Re-run `rpe fit`."
            )
        try:
            tensors = load_file(str(weights_path))
        except Exception as err:
            raise BundleFormatError(f"{weights_path} is damaged ({err}); re-run `rpe fit`") from err
        weights = {k.removeprefix("probe."): v for k, v in tensors.items() if k.startswith("probe.")}
        value_neurons = tensors["value_neurons"]
        state = ProbeState(meta["layer"], value_neurons, tensors["mean"], tensors["std"], weights, meta["hidden"])
        bundle = cls(
            model=ModelFingerprint.from_dict(meta["model"]),
            layer=meta["layer"],
            value_neurons=value_neurons,
            probe_state=state,
            probe_config=ProbeConfig(**{"family": "mlp" if meta["hidden"] else "linear", **meta["probe_config"]}),
            dopamine_neurons=tensors["dopamine_neurons"],
            dopamine_sign=tensors["dopamine_sign"],
            metrics=meta.get("metrics", {}),
            created_with=meta.get("created_with", {}),
            dopamine_mean=tensors.get("dopamine_mean"),
            dopamine_std=tensors.get("dopamine_std"),
            prompt_bos=meta.get("prompt_bos"),
        )
        if model is not None:
            if tokenizer is None:
                raise ValueError("pass the tokenizer with the model: the fingerprint includes the tokenizer")
            bundle.check_model(model, tokenizer)
        return bundle


def prompts_start_with_bos(prompt_ids: Sequence[Sequence[int]], tokenizer) -> bool | None:
    """Whether every prompt in ``prompt_ids`` begins with ``tokenizer``'s BOS token (False: none does; None: the
    tokenizer has no BOS, there are no prompts, or some do and some do not)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    starts = {len(ids) > 0 and ids[0] == bos for ids in prompt_ids}
    return None if bos is None or len(starts) != 1 else starts.pop()


def restore_interrupted_swap(path: Path) -> bool:
    """Put back a bundle that :meth:`SubsystemBundle.save` moved aside and was killed before replacing.

    Returns:
        True when ``path`` was missing and a complete old bundle (``.NAME.old-PID``) was moved back.
    """
    if path.exists():
        return False
    aside = sorted((p for p in path.parent.glob(f".{path.name}.old-*") if (p / BUNDLE_FILE).is_file()),
                   key=lambda p: p.stat().st_mtime)
    if not aside:
        return False
    os.replace(aside[-1], path)
    logger.warning("restored the bundle %s from %s (a save was interrupted between its two renames)", path, aside[-1])
    return True


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _remove_leftovers_of_killed_saves(path: Path) -> None:
    """Delete staging and set-aside folders of saves to ``path`` whose process no longer runs."""
    for p in path.parent.glob(f".{path.name}.*"):
        tag = p.name[len(path.name) + 2 :]  # "staging-PID-xxxx" or "old-PID"
        kind, _, rest = tag.partition("-")
        pid = rest.split("-")[0]
        if kind in ("staging", "old") and pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)


def random_bundle(model, tokenizer, *, layer: int = 2, k: int = 6, m: int = 4, hidden: int = 16, seed: int = 0) -> SubsystemBundle:
    """A bundle with random value/dopamine neurons and random probe weights, for tests and benchmarks (it
    measures nothing). Deterministic for ``seed``."""
    from rpe.probe import ProbeNet

    g = torch.Generator().manual_seed(seed)
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    perm = torch.randperm(cfg.hidden_size, generator=g)
    value, dopa = perm[:k].sort().values, perm[k : k + m].sort().values
    with seeded(seed):
        net = ProbeNet(k, hidden)
    state = ProbeState(layer, value, torch.zeros(k), torch.ones(k), {n: w.clone() for n, w in net.state_dict().items()}, hidden)
    return SubsystemBundle(
        model=fingerprint(model, tokenizer), layer=layer, value_neurons=value, probe_state=state,
        probe_config=ProbeConfig(hidden=hidden, family="mlp" if hidden else "linear"), dopamine_neurons=dopa,
        dopamine_sign=torch.tensor([1.0, -1.0] * (m // 2) + [1.0] * (m % 2)),
        dopamine_mean=torch.zeros(m), dopamine_std=torch.ones(m), metrics={"note": "random bundle (no fit)"},
    )


def _json_default(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, float):
        return obj
    raise TypeError(f"cannot serialise {type(obj).__name__}")
