"""Shared pieces of the CLI: one-line errors, device/dtype parsing, summary tables."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from deepcollapse._validate import DeepCollapseError

F = TypeVar("F", bound=Callable[..., Any])

console = Console()
err_console = Console(stderr=True)


def fail(message: str) -> None:
    """Print ``error: message`` on stderr and exit with code 1."""
    err_console.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code=1)


def handle_errors(fn: F) -> F:
    """Turn :class:`DeepCollapseError` (and KeyboardInterrupt) into a one-line message and exit code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except DeepCollapseError as e:
            fail(str(e))
        except KeyboardInterrupt:
            err_console.print(
                "interrupted: files written so far are kept; a run with a checkpoint continues with --resume"
            )
            raise typer.Exit(code=130) from None

    return wrapper  # type: ignore[return-value]


def parse_list(name: str, text: str, cast: Callable[[str], Any]) -> Any:
    """``"16"`` -> 16, ``"16,32,8"`` -> [16, 32, 8]; errors name the option."""
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    if not parts:
        raise DeepCollapseError(f"{name} is empty")
    try:
        values = [cast(p) for p in parts]
    except ValueError:
        raise DeepCollapseError(f"{name} must be a number or a comma-separated list, got {text!r}") from None
    return values[0] if len(values) == 1 else values


def resolve_device(device: str) -> str:
    """``auto`` -> cuda when available else cpu; a clear error for an unavailable CUDA device."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DeepCollapseError(f"--device {device}: CUDA is not available on this machine")
    try:
        torch.device(device)
    except RuntimeError:
        raise DeepCollapseError(f"--device must be cpu, cuda, cuda:N or auto, got {device!r}") from None
    return device


def fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3e}" if (v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e4)) else f"{v:.4f}"
    return str(v)


def print_table(title: str, rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
    """A compact rich table of ``rows`` restricted to ``columns``."""
    table = Table(title=title, title_justify="left")
    for c in columns:
        table.add_column(c, justify="right")
    undefined = False
    for r in rows:
        table.add_row(*(fmt(r.get(c)) for c in columns))
        undefined |= any(isinstance(r.get(c), float) and math.isnan(r[c]) for c in columns)
    console.print(table)
    if undefined:
        console.print(
            "nan: undefined for that layer (e.g. all its class means coincide or its features do not vary,"
            " as in a dead ReLU layer)"
        )
