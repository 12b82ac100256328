"""The ``deepcollapse`` command: thin wrappers over the Python API.

Each sub-command lives in its own module with a ``register(app)`` function. Errors that users cause
(:class:`~deepcollapse._validate.DeepCollapseError`) are printed as one line with exit code 1, never as a
traceback.
"""

from __future__ import annotations

import sys

import typer

from deepcollapse._validate import DeepCollapseError
from deepcollapse.cli import atlas, dufm, measure, reproduce, sweep, train

app = typer.Typer(
    name="deepcollapse",
    help="Deep neural collapse: DUFM solver, theory, DNC metrics, real networks, sweeps.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

for _module in (dufm, measure, train, sweep, reproduce, atlas):
    _module.register(app)


def main() -> None:
    """Console entry point."""
    try:
        app()
    except DeepCollapseError as e:
        typer.secho(f"error: {e}", err=True, fg=typer.colors.RED)
        sys.exit(1)
