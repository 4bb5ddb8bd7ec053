"""The ``rpe`` command, one module per command group.

- :mod:`rpe.cli._app`: the Typer application and shared helpers (errors, progress bars, argument parsing);
- :mod:`rpe.cli.data`: ``rpe models``, ``rpe tasks``, ``rpe rollouts``, ``rpe report``;
- :mod:`rpe.cli.discovery`: ``rpe fit``, ``rpe dopamine``;
- :mod:`rpe.cli.uses`: ``rpe train``, ``rpe analyze``, ``rpe search``, ``rpe ablate``;
- :mod:`rpe.cli.bench`: ``rpe bench ...``.

Importing the package registers every command on :data:`app` (the ``rpe`` entry point).
"""

from rpe.cli import bench, data, discovery, uses  # noqa: F401  (registers the commands, in help order)
from rpe.cli._app import _parse_options, app

__all__ = ["app", "_parse_options"]

if __name__ == "__main__":
    app()
