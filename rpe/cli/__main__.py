"""``python -m rpe.cli ...``: the ``rpe`` command, for launchers that start a module (``accelerate launch -m rpe.cli``,
``torchrun -m rpe.cli``)."""

from rpe.cli import app

app(prog_name="rpe")
