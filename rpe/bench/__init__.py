"""Measurement, in one home: benchmarks that report ratios against a baseline measured in the same run (never an
absolute timing as pass/fail), behind ``rpe bench ...`` (:mod:`rpe.cli.bench`).

- :mod:`rpe.bench.machine`: the machine a number was measured on, and the median-of-runs timer;
- :mod:`rpe.bench.pipeline`: the tracker, probe, ablation, memory, training and analysis benchmarks;
- :mod:`rpe.bench.rollouts`: rollout throughput against plain ``model.generate`` and the decode bound, and the
  gymnasium loop against ``rpe rollouts``.

The scripts in ``benchmarks/`` regenerate the results page's numbers from runs; this package measures speed and
memory. Nothing in the pipeline imports it.
"""
