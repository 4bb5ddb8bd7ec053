"""``RPECallback``: one line in a TRL GRPO/RLOO script logs the model's internal value and RPE.

    trainer = GRPOTrainer(..., callbacks=[RPECallback("runs/demo/bundle")])

At ``on_init_end`` the callback finds the trainer that holds it, checks the bundle against the policy, wraps
the policy's ``generate`` (activations of the value and dopamine neurons are recorded during the trainer's own
generation: no extra forward pass) and the trainer's reward scoring (TRL's private surface is reached in
:mod:`rpe.trainers.trl_adapter` only, which names the TRL versions it is tested against). After each batch is scored it
gathers, across processes, per completion: V(s_0), V(final), RPE per step, dopamine activity and the verifiable
reward (the weighted sum of the reward functions that are not internal), and appends to the trainer's own
metrics, so they are averaged and reported with ``reward``/``kl`` by every reporter the trainer has:

``rpe/value_s0``, ``rpe/value_final``, ``rpe/rpe_mean``, ``rpe/rpe_abs_mean``, ``rpe/rpe_min``, ``rpe/rpe_max``,
``rpe/dopamine``, ``rpe/auroc_value_final``, ``rpe/auroc_value_s0``, ``rpe/captured`` (share of completions read
from the generation capture; completions cut at the length limit, and every completion under vLLM, need a
hooked forward) and ``rpe/n_completions`` (completions the
batch's numbers were computed over, gathered from every process).

Optional online refit: every ``refit_every`` optimizer steps the value probe is refitted on the value-neuron
activations of the recent batches (the neurons stay fixed), and the bundle is saved with each checkpoint
(``checkpoint-N/rpe_bundle``).

Everything is removed at ``on_train_end``; :meth:`RPECallback.close` does it by hand after a failed ``train()``.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from pathlib import Path

import numpy as np
import torch
from transformers import TrainerCallback

from rpe.bundle import SubsystemBundle
from rpe.metrics import auroc
from rpe.probe import td_errors

from .rewards import InternalSignals
from .trl_adapter import RewardTap, find_trainer, log_to_trainer, refuse_partitioned

logger = logging.getLogger(__name__)

STEP_POSITIONS = 6
"""Step positions whose mean internal RPE is logged as ``rpe/rpe_step1`` .. ``rpe/rpe_step6``."""
STEP_KEYS = tuple(f"rpe/rpe_step{k}" for k in range(1, STEP_POSITIONS + 1)) + ("rpe/rpe_terminal",)
LOGGED_KEYS = ("rpe/value_s0", "rpe/value_final", "rpe/rpe_mean", "rpe/rpe_abs_mean", "rpe/rpe_min", "rpe/rpe_max",
               "rpe/dopamine", "rpe/auroc_value_final", "rpe/auroc_value_s0", "rpe/captured", "rpe/n_completions",
               *STEP_KEYS)


class RPECallback(TrainerCallback):
    """Logs internal value, RPE and dopamine activity during GRPO/RLOO training.

    Args:
        bundle: a bundle or its folder, fitted on the policy's base model (checked at start).
        signals: share an :class:`~rpe.trainers.rewards.InternalSignals` with internal reward functions (so the
            batch is read once); by default the callback makes its own.
        refit_every: refit the value probe every this many optimizer steps (0 = never).
        refit_window: batches of states kept for the refit.
        refit_epochs: probe epochs per refit.
        save_bundle: write the (refitted) bundle into each checkpoint folder.
    """

    def __init__(self, bundle: SubsystemBundle | str | Path, *, signals: InternalSignals | None = None,
                 refit_every: int = 0, refit_window: int = 16, refit_epochs: int = 20, save_bundle: bool = True):
        self.bundle_source = bundle
        self.signals = signals
        self._own_signals = signals is None
        self.refit_every = refit_every
        self.refit_epochs = refit_epochs
        self.save_bundle = save_bundle
        self.trainer = None
        self._found = None
        self._tap: RewardTap | None = None
        self._buffer: deque = deque(maxlen=max(1, refit_window))
        self.history: list[dict[str, float]] = []

    # -- attach / detach -------------------------------------------------------------------------------
    def attach(self, trainer) -> None:
        """Wire the callback into ``trainer`` (done automatically at ``on_init_end``)."""
        if self.trainer is trainer:
            return
        refuse_partitioned(trainer.args, "RPECallback")
        tap = RewardTap(trainer, self._observe)  # checks the TRL surface first (rpe.trainers.trl_adapter)
        self.trainer = trainer
        self._tap = tap
        if self.signals is None:
            try:
                self.signals = InternalSignals(self.bundle_source, trainer.model, trainer.processing_class)
            except BaseException:
                self.close()
                raise
        self.signals.follow_trainer(trainer)

    def close(self) -> None:
        """Undo everything :meth:`attach` did (idempotent)."""
        if self._tap is not None:
            self._tap.close()
            self._tap = None
        if self.signals is not None and self._own_signals:
            self.signals.close()
            self.signals = None
        self.trainer = None
        self._found = None

    def on_init_end(self, args, state, control, **kwargs):
        # the trainer is still in its __init__ here (TRL sets up its metrics after this event): remember it,
        # wire in at on_train_begin
        self._found = find_trainer(self)

    def on_train_begin(self, args, state, control, **kwargs):
        if self.trainer is None:
            trainer = getattr(self, "_found", None) or find_trainer(self)
            if trainer is None:
                raise RuntimeError("RPECallback could not find its trainer; call callback.attach(trainer) before train()")
            self.attach(trainer)

    def on_train_end(self, args, state, control, **kwargs):
        self.close()

    # -- per batch -------------------------------------------------------------------------------------
    def _verifiable(self, rewards_per_func: torch.Tensor) -> torch.Tensor:
        """(N,) weighted sum of the non-internal reward functions (NaN where none applies)."""
        tr = self.trainer
        keep = [i for i, f in enumerate(tr.reward_funcs) if not getattr(f, "rpe_internal", False)]
        if not keep:
            return torch.full((rewards_per_func.shape[0],), float("nan"))
        w = tr.reward_weights.to(rewards_per_func.device)[keep]
        r = rewards_per_func[:, keep]
        out = (r * w).nansum(1)
        out[torch.isnan(r).all(1)] = float("nan")
        return out

    def _observe(self, prompts, completion_ids_list, rewards_per_func: torch.Tensor) -> None:
        tr = self.trainer
        acc = tr.accelerator
        n_local = len(prompts)
        sl = slice(acc.process_index * n_local, (acc.process_index + 1) * n_local)
        verifiable = self._verifiable(rewards_per_func)[sl].float().cpu()
        sigs = self.signals.signals(completion_ids_list, prompts)
        nan = float("nan")
        rows = []
        for s, r in zip(sigs, verifiable.tolist()):
            rpe = s.rpe
            by_step = [float(rpe[k]) if k < rpe.size else nan for k in range(STEP_POSITIONS)]
            # the RPE at reward delivery: r - V(s_{T-1}), the value before the last step
            terminal = (float(td_errors(s.values, self.signals.reader.gamma, reward=r)[-1])
                        if s.n_steps and not math.isnan(r) else nan)
            rows.append([
                s.scalar("value_s0"), s.scalar("value_final"),
                float(rpe.mean()) if rpe.size else nan, float(np.abs(rpe).mean()) if rpe.size else nan,
                float(rpe.min()) if rpe.size else nan, float(rpe.max()) if rpe.size else nan,
                s.scalar("dopamine"), r, self.signals.last_captured_fraction, *by_step, terminal,
            ])
        width = 9 + STEP_POSITIONS + 1
        local = torch.tensor(rows, dtype=torch.float32, device=acc.device).reshape(n_local, width)
        table = acc.gather(local).cpu().numpy()  # (N, width) over all processes
        v0, vf, rmean, rabs, rmin, rmax, dopa, reward, captured = table.T[:9]
        steps = table[:, 9:]
        y = reward >= 0.5
        ok = ~np.isnan(reward)
        metrics = {
            "rpe/value_s0": _nanmean(v0), "rpe/value_final": _nanmean(vf), "rpe/rpe_mean": _nanmean(rmean),
            "rpe/rpe_abs_mean": _nanmean(rabs), "rpe/rpe_min": _nanreduce(np.nanmin, rmin),
            "rpe/rpe_max": _nanreduce(np.nanmax, rmax), "rpe/dopamine": _nanmean(dopa),
            # values rounded to 1e-4: the samples of one prompt share s_0, and float noise between batch rows
            # (~1e-6) must not break their tie into an arbitrary ranking
            "rpe/auroc_value_final": auroc(y[ok], vf[ok].round(4)) if ok.any() else nan,
            "rpe/auroc_value_s0": auroc(y[ok], v0[ok].round(4)) if ok.any() else nan,
            "rpe/captured": _nanmean(captured),
            "rpe/n_completions": float(table.shape[0]),
            # mean RPE by step position (NaN where no completion has that step): where in the reasoning the
            # surprise happens, the quantity Schultz et al. (1997) saw move from the reward to the earliest cue
            **{key: _nanmean(steps[:, j]) for j, key in enumerate(STEP_KEYS)},
        }
        log_to_trainer(tr, metrics)
        self.history.append({"step": tr.state.global_step, **metrics})
        if self.refit_every:
            self._buffer.append(([s.value_acts for s in sigs], verifiable.tolist(), [str(p) for p in prompts]))

    # -- online refit and checkpoints ------------------------------------------------------------------
    def on_step_end(self, args, state, control, **kwargs):
        if self.refit_every and state.global_step % self.refit_every == 0 and self._buffer:
            self.refit()

    def refit(self) -> dict[str, float] | None:
        """Refit the value probe on the buffered value-neuron activations (neurons fixed); returns its metrics,
        or None (with a warning) when the buffer cannot support a fit yet.

        Under several processes every rank calls it at the same step: the buffers of all ranks are gathered,
        the main rank fits, and its probe is sent to every rank, so all ranks hold the same probe."""
        from rpe.distributed import broadcast_object, current_ranks, gather_objects
        from rpe.probe import ProbeState

        batches = [b for rank_buffer in gather_objects(list(self._buffer)) for b in rank_buffer]
        fitted = self._fit(batches) if current_ranks().is_main else None
        fitted = broadcast_object(fitted)
        if fitted is None:
            return None
        state, metrics = fitted
        bundle = self.signals.bundle
        bundle.probe_state = ProbeState(bundle.layer, bundle.value_neurons, state.mean, state.std, state.weights,
                                        state.hidden)
        bundle.metrics.setdefault("online_refits", []).append({
            "step": self.trainer.state.global_step, "n_trajectories": metrics["n_trajectories"],
            **{k: v for k, v in metrics.items() if k.startswith("test_auroc")}})
        return metrics

    def _fit(self, batches: list[tuple]) -> tuple[object, dict[str, float]] | None:
        """(probe state, metrics) of a probe fitted on ``batches`` of (value acts, rewards, prompts), or None."""
        import hashlib

        from rpe.probe import SingleClassError, ValueProbe
        from rpe.store import StateSet

        bundle = self.signals.bundle
        acts, traj, step, rewards, pids = [], [], [], [], []
        i = 0
        for batch_acts, batch_rewards, batch_prompts in batches:
            for a, r, p in zip(batch_acts, batch_rewards, batch_prompts):
                if a is None or r is None or math.isnan(r):
                    continue
                acts.append(a)
                traj += [i] * a.shape[0]
                step += list(range(a.shape[0]))
                rewards.append(float(r >= 0.5))
                pids.append(hashlib.sha1(p.encode()).hexdigest()[:16])  # hash() differs by process
                i += 1
        if not acts:
            return None
        states = StateSet({bundle.layer: torch.cat(acts)}, torch.tensor(traj), torch.tensor(step),
                          [str(j) for j in range(i)], pids, torch.tensor(rewards))
        cfg = bundle.probe_config
        from dataclasses import replace

        try:
            probe = ValueProbe(replace(cfg, epochs=self.refit_epochs, seed=cfg.seed)).fit(states, bundle.layer)
        except (SingleClassError, ValueError) as err:
            logger.warning("RPECallback: online refit skipped: %s", err)
            return None
        return probe.state, {**probe.metrics, "n_trajectories": i}

    def on_save(self, args, state, control, **kwargs):
        if not self.save_bundle or self.signals is None or not state.is_world_process_zero:
            return
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if folder.is_dir():
            self.signals.bundle.save(folder / "rpe_bundle")


def _nanmean(x: np.ndarray) -> float:
    x = x[~np.isnan(x)]
    return float(x.mean()) if x.size else float("nan")


def _nanreduce(fn, x: np.ndarray) -> float:
    return float(fn(x)) if (~np.isnan(x)).any() else float("nan")


__all__ = ["LOGGED_KEYS", "RPECallback", "STEP_KEYS", "STEP_POSITIONS"]
