"""rpe: find the reward subsystem (value and dopamine neurons) inside a language model and put it to work.

Modules: :mod:`rpe.models` (offline registry, loading), :mod:`rpe.tasks` (verifiable tasks),
:mod:`rpe.envs` (gymnasium environments), :mod:`rpe.rollouts` (batched, resumable collection),
:mod:`rpe.tracker` (activation hooks), :mod:`rpe.store`, :mod:`rpe.probe` (value probes),
:mod:`rpe.dopamine`, :mod:`rpe.bundle` (the artefact downstream code loads), :mod:`rpe.fit` (the pipeline).
TRL integration lives in :mod:`rpe.trainers` only; importing ``rpe`` never imports TRL.
"""

__version__ = "0.1.0"
