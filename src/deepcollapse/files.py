"""Result files: atomic JSON/CSV writes, run directories, checkpoints.

Every result a command writes goes through here, so a killed process never leaves a half-written file:
each write goes to a temporary file in the same directory and is renamed over the target. Files are
created with the mode an ordinary ``open`` would give them (``0o666`` less the user's umask).

Numbers that are not finite keep their meaning in JSON and CSV: ``inf``, ``-inf`` and ``nan`` are written
as the strings ``"inf"``, ``"-inf"`` and ``"nan"`` (``float()`` reads each back), while a value that was not
computed is ``null`` in JSON and an empty cell in CSV (or is left out altogether).
"""

from __future__ import annotations

import csv
import json
import math
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from deepcollapse._validate import DeepCollapseError

__all__ = [
    "append_csv_rows",
    "atomic_write_bytes",
    "check_out_dir",
    "nonfinite_text",
    "prepare_out_dir",
    "read_csv",
    "read_json",
    "save_torch",
    "to_jsonable",
    "write_csv",
    "write_json",
]

# Files whose presence marks a directory as holding a run.
RUN_MARKERS = ("config.json", "summary.json", "history.csv", "metrics.json", "results.csv")


def _umask() -> int:
    """The process's umask (read by setting and restoring it: the only portable way)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and an atomic rename.

    The file gets mode ``0o666 & ~umask``, as ``open(path, "w")`` would create it (``mkstemp`` alone
    would leave it ``0o600``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def nonfinite_text(v: float) -> str:
    """``"inf"``, ``"-inf"`` or ``"nan"``: how a non-finite float is written (``float()`` reads it back)."""
    return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")


def to_jsonable(obj: Any) -> Any:
    """Tensors, numpy values and paths made JSON-safe; non-finite floats become ``"inf"``/``"-inf"``/``"nan"``.

    ``None`` stays ``None`` (JSON ``null``): it means "not computed", never an infinite or undefined value.
    """
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return to_jsonable(obj.detach().cpu().tolist() if obj.numel() != 1 else obj.item())
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item") and callable(obj.item) and not isinstance(obj, str):
        try:
            return to_jsonable(obj.item())
        except (TypeError, ValueError):
            pass
    if hasattr(obj, "tolist") and callable(obj.tolist):
        return to_jsonable(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return nonfinite_text(obj)
    return obj


def write_json(path: str | Path, obj: Any) -> None:
    """Atomically write ``obj`` as indented JSON."""
    text = json.dumps(to_jsonable(obj), indent=2, allow_nan=False) + "\n"
    atomic_write_bytes(path, text.encode())


def read_json(path: str | Path) -> Any:
    """The object in a JSON file (non-finite numbers stay the strings ``"inf"``, ``"-inf"``, ``"nan"``)."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise DeepCollapseError(f"no such file: {path}") from None
    except json.JSONDecodeError as e:
        raise DeepCollapseError(f"{path} is not valid JSON: {e}") from None


def _columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    cols: list[str] = []
    for r in rows:
        for k in r:
            if k not in cols:
                cols.append(k)
    return cols


def _cell(v: Any) -> Any:
    v = to_jsonable(v)
    if v is None:
        return ""
    if isinstance(v, float):
        return repr(v)  # round-trips exactly
    if isinstance(v, list | dict):
        return json.dumps(v)
    return v


def write_csv(path: str | Path, rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> None:
    """Atomically write ``rows`` (dicts) as CSV; columns are the union of keys in first-seen order."""
    import io

    cols = list(columns) if columns is not None else _columns(rows)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: _cell(r.get(k)) for k in cols})
    atomic_write_bytes(path, buf.getvalue().encode())


def append_csv_rows(path: str | Path, rows: Iterable[Mapping[str, Any]], columns: Sequence[str]) -> None:
    """Append rows to a CSV with fixed ``columns`` (header written if the file is new), then fsync.

    Each call appends whole lines and flushes them to disk, so a killed process loses at most the row
    being written; :func:`read_csv` drops a trailing partial line.
    """
    path = Path(path)
    new = not path.exists() or path.stat().st_size == 0
    path.parent.mkdir(parents=True, exist_ok=True)
    import io

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    if new:
        w.writeheader()
    for r in rows:
        w.writerow({k: _cell(r.get(k)) for k in columns})
    with open(path, "a", encoding="utf-8") as f:
        f.write(buf.getvalue())
        f.flush()
        os.fsync(f.fileno())


def _parse(v: str) -> Any:
    if v == "":
        return None
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    if v in ("True", "False"):
        return v == "True"
    return v


def read_csv(path: str | Path, *, text_columns: Sequence[str] = ("key",)) -> list[dict[str, Any]]:
    """Rows of a CSV written by this module, numbers parsed; a trailing partial line is dropped.

    ``text_columns`` are kept as strings (identifiers such as hex keys like ``"2498324e5906"`` would
    otherwise parse as numbers).
    """
    path = Path(path)
    if not path.exists():
        raise DeepCollapseError(f"no such file: {path}")
    text = path.read_text(encoding="utf-8")
    if text and not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]  # a write cut short by a kill
    lines = text.splitlines()
    if not lines:
        return []
    reader = csv.DictReader(lines)
    keep = set(text_columns)
    return [{k: (v if k in keep else _parse(v)) for k, v in row.items()} for row in reader]


def check_out_dir(out: str | Path, *, overwrite: bool = False, resume: bool = False) -> list[str]:
    """The result files already in ``out`` (none when it is new); raise if it may not be used. Writes nothing.

    A directory that holds a run (any of :data:`RUN_MARKERS`) is refused unless ``overwrite`` or ``resume``,
    so a command can check its output directory before it spends time computing.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DeepCollapseError(f"out {out} exists and is not a directory")
    held = [m for m in RUN_MARKERS if (out / m).exists()]
    if held and not (overwrite or resume):
        raise DeepCollapseError(
            f"out {out} already holds a run ({', '.join(held)}); pass overwrite=True to replace it"
            " or choose another directory"
        )
    return held


def prepare_out_dir(out: str | Path, *, overwrite: bool = False, resume: bool = False) -> Path:
    """Create ``out``; refuse a directory that already holds a run unless ``overwrite`` or ``resume``.

    With ``overwrite`` the known result files are removed first (nothing else is touched).
    """
    out = Path(out)
    held = check_out_dir(out, overwrite=overwrite, resume=resume)
    if held and overwrite and not resume:
        for m in held:
            (out / m).unlink()
    out.mkdir(parents=True, exist_ok=True)
    return out


def save_torch(path: str | Path, obj: Any) -> None:
    """Atomically ``torch.save`` ``obj`` (checkpoints)."""
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())
