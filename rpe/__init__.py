"""rpe: find the reward subsystem (value and dopamine neurons) inside a language model and put it to work.

Modules: :mod:`rpe.models` (offline registry, loading), :mod:`rpe.tasks` (verifiable tasks),
:mod:`rpe.envs` (gymnasium environments), :mod:`rpe.generation` (batched generation, prefix KV cache),
:mod:`rpe.records` (Trajectory schema, Parquet, atomic writes), :mod:`rpe.rollouts` (resumable collection),
:mod:`rpe.tracker` (activation hooks), :mod:`rpe.store` (states), :mod:`rpe.probe` (value probes),
:mod:`rpe.crossval`, :mod:`rpe.fit` (the cross-validated pipeline), :mod:`rpe.dopamine`,
:mod:`rpe.bundle` (the artefact downstream code loads), :mod:`rpe.report_card`, :mod:`rpe.cli`.
TRL integration lives in :mod:`rpe.trainers` only; importing ``rpe`` never imports TRL.
"""

__version__ = "0.1.0"
