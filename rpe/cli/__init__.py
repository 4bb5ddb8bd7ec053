"""The ``rpe`` command, one module per command group.

- :mod:`rpe.cli.common`: the Typer application and shared helpers (errors, progress bars, argument parsing);
- :mod:`rpe.cli.data`: ``rpe models``, ``rpe tasks``, ``rpe rollouts``, ``rpe report``;
- :mod:`rpe.cli.discovery`: ``rpe fit``, ``rpe dopamine``;
- :mod:`rpe.cli.uses`: ``rpe train``, ``rpe analyze``, ``rpe search``, ``rpe ablate``;
- :mod:`rpe.cli.reproduce`: ``rpe reproduce`` (the whole protocol, resumable);
- :mod:`rpe.cli.bench`: ``rpe bench ...``.

Importing the package registers every command on :data:`app` (the ``rpe`` entry point); ``python -m rpe.cli``
runs it too (:mod:`rpe.cli.__main__`, the form ``accelerate launch -m rpe.cli`` and ``torchrun -m rpe.cli`` need).
"""

from rpe.cli import bench, data, discovery, reproduce, uses  # noqa: F401  (registers the commands, in help order)
from rpe.cli.common import app

__all__ = ["app"]
