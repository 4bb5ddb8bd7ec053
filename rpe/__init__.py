"""rpe: find the reward subsystem (value and dopamine neurons) inside a language model and put it to work.

Modules by stage of the data flow (docs/development.md draws it):

- tasks and prompts: :mod:`rpe.tasks` (verifiable tasks), :mod:`rpe.answers` (extraction, verifiers),
  :mod:`rpe.hf_data` (Hugging Face datasets as tasks), :mod:`rpe.prompts` (few-shot prompts),
  :mod:`rpe.segment` (steps), :mod:`rpe.jsonl`;
- generation: :mod:`rpe.generation` (engines), :mod:`rpe.decoding` (continuous batching), :mod:`rpe.sampling`
  (streams, warping, stop strings), :mod:`rpe.kvcache` (shared-prefix caches), :mod:`rpe.tracker` (capture hooks);
- records and states: :mod:`rpe.rollouts` (resumable collection), :mod:`rpe.records` (Trajectory schema, Parquet,
  atomic writes), :mod:`rpe.store` (activations at states);
- discovery: :mod:`rpe.probe` (value probes), :mod:`rpe.logistic` (its solvers), :mod:`rpe.crossval`, :mod:`rpe.fit` (the cross-validated
  pipeline, stage by stage), :mod:`rpe.difficulty` (the difficulty control), :mod:`rpe.dopamine`;
- the bundle: :mod:`rpe.bundle` (the artefact every use loads);
- uses: :mod:`rpe.signals`, :mod:`rpe.interventions`, :mod:`rpe.controls`, :mod:`rpe.ablate`, :mod:`rpe.search`,
  :mod:`rpe.early_stop` (best-of-n that stops hopeless samples), :mod:`rpe.rollout_stop` (the same inside
  rollouts, and what it saves), :mod:`rpe.selection` (GRPO prompts by V(s_0)),
  :mod:`rpe.simulation`, :mod:`rpe.baselines`, :mod:`rpe.envs` (gymnasium), :mod:`rpe.trainers` (TRL);
- reports: :mod:`rpe.analyze`, :mod:`rpe.report`, :mod:`rpe.report_card`;
- ground floor: :mod:`rpe.metrics`, :mod:`rpe.models` (offline registry, loading), :mod:`rpe.tiny` (tiny random
  models of each architecture, for tests and examples);
- :mod:`rpe.cli` (the ``rpe`` command) and :mod:`rpe.bench` (measurement).

TRL integration lives in :mod:`rpe.trainers` only; importing ``rpe`` never imports TRL.
"""

__version__ = "0.1.0"
