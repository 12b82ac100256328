"""The CLI's shared pieces: library errors rephrased in options, tables that never truncate."""

from __future__ import annotations

import pytest
import typer
from typer.testing import CliRunner

from deepcollapse._validate import DeepCollapseError
from deepcollapse.cli.common import as_flags, handle_errors, print_table


@pytest.mark.parametrize(
    ("message", "given", "want"),
    [
        (
            "out x holds a run; pass overwrite=True to replace it",
            {"overwrite": False},
            "out x holds a run; pass --overwrite to replace it",
        ),
        (
            "labels must lie in 0..2 (num_classes=3), found 3",
            {"labels": None, "num_classes": None},
            "labels must lie in 0..2 (--num-classes 3), found 3",
        ),
        ("rtol must be a number in (0, 1), got 2.0", {"rtol": 2.0}, "--rtol must be a number in (0, 1), got 2.0"),
        ("rtol must be a number in (0, 1), got 2.0", {"rtol": None}, "rtol must be a number in (0, 1), got 2.0"),
        ("use light=False, passes=1", {"light": True, "passes": 2}, "use --no-light, --passes 1"),
        (
            "e.g. fixed.max_steps=100, got 'seed=3'",
            {"max_steps": 1, "seed": 2},
            "e.g. fixed.max_steps=100, got 'seed=3'",
        ),
        ("cov='light' needs passes=2", {"passes": 1}, "cov='light' needs --passes 2"),
    ],
)
def test_as_flags(message: str, given: dict, want: str) -> None:
    assert as_flags(message, given) == want


def test_handle_errors_maps_the_command_parameters() -> None:
    app = typer.Typer()

    @app.command()
    @handle_errors
    def cmd(num_classes: int = 3, batch_size: int = 1) -> None:
        raise DeepCollapseError(f"batch_size must be >= 2, got {batch_size} (num_classes={num_classes})")

    r = CliRunner().invoke(app, ["--batch-size", "1"])
    assert r.exit_code == 1 and r.output == "error: --batch-size must be >= 2, got 1 (--num-classes 3)\n"


def test_tables_are_not_truncated(capsys) -> None:
    rows = [{"a_long_column_name": 1.5, "another_long_column_name": 2, "third_long_one": "x" * 30}] * 2
    print_table("t", rows, ("a_long_column_name", "another_long_column_name", "third_long_one"))
    out = capsys.readouterr().out
    assert "another_long_column_name" in out and "x" * 30 in out and "…" not in out
