"""Shared pieces of the CLI: one-line errors, device/dtype parsing, summary tables."""

from __future__ import annotations

import functools
import inspect
import math
import re
from collections.abc import Callable, Mapping, Sequence
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


# ``name=value`` in a library message, not part of a dotted path, a quoted string or an option
_ASSIGNED = re.compile(r"(?<![\w.'\"/-])([a-z][a-z0-9_]*)=(\S+?)(?=[\s,;:)\]]|$)")


def flag(name: str) -> str:
    """The option of Python parameter ``name``: ``num_classes`` -> ``--num-classes``."""
    return "--" + name.replace("_", "-")


def as_flags(message: str, given: Mapping[str, Any]) -> str:
    """A library error rephrased in the command's options.

    Library errors name Python parameters; ``given`` holds the command's parameters and their values.
    ``name=value`` becomes ``--name value`` (``--name`` / ``--no-name`` for booleans), and a message that
    starts with a parameter the user gave (not ``None``) starts with its option instead. Other words stay.
    """

    def assigned(m: re.Match[str]) -> str:
        name, value = m.group(1), m.group(2)
        if name not in given:
            return m.group(0)
        if value in ("True", "False"):
            return flag(name) if value == "True" else "--no-" + name.replace("_", "-")
        return f"{flag(name)} {value}"

    message = _ASSIGNED.sub(assigned, message)
    head, _, rest = message.partition(" ")
    if rest and head in given and given[head] is not None:
        message = f"{flag(head)} {rest}"
    return message


def handle_errors(fn: F) -> F:
    """Turn :class:`DeepCollapseError` (and KeyboardInterrupt) into a one-line message and exit code.

    The message is rephrased with :func:`as_flags`, so that errors raised in library code name options.
    """
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except DeepCollapseError as e:
            try:
                given = dict(signature.bind(*args, **kwargs).arguments)
            except TypeError:
                given = {}
            fail(as_flags(str(e), given))
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
    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    for r, row in zip(rows, cells, strict=True):
        table.add_row(*row)
        undefined |= any(isinstance(r.get(c), float) and math.isnan(r[c]) for c in columns)
    # never truncate a header or a number: a table wider than the terminal wraps instead
    need = 1 + sum(3 + max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns))
    Console(width=max(console.width, need)).print(table)
    if undefined:
        console.print(
            "nan: undefined for that layer (e.g. all its class means coincide or its features do not vary,"
            " as in a dead ReLU layer)"
        )
