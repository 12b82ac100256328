"""Readers of saved features: ``.npz`` archives, directories of ``.npy`` files, or one ``.npy`` with labels.

Each layer is an ``(N, ...)`` array (flattened per sample); ``labels`` is an ``(N,)`` integer array.

* ``FEATURES.npz`` holding ``features`` and/or ``layer_<name>`` arrays (depth = order in the file) and
  ``labels``. Members are read chunk by chunk from the archive (compressed or not), never whole.
* a directory holding ``labels.npy`` and ``features.npy`` and/or ``layer_<name>.npy`` (depth = natural
  order of the names), or one ``.npy`` file with a separate labels file. ``.npy`` files are memory-mapped
  (``np.load(mmap_mode="r")``) and read in chunks of rows.
"""

from __future__ import annotations

import re
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deepcollapse._validate import DeepCollapseError, check_finite, check_labels
from deepcollapse.measure.accumulate import accumulate_stats
from deepcollapse.measure.metrics import dnc_metrics


@dataclass(frozen=True)
class LayerArray:
    """One layer on disk: its name, shape and a reader of successive row chunks."""

    name: str
    shape: tuple[int, ...]
    chunks: Callable[[int], Iterator[np.ndarray]]


def _native(a: np.ndarray) -> np.ndarray:
    """A writable, native-byte-order copy of a chunk (torch needs both)."""
    return np.array(a, dtype=a.dtype.newbyteorder("="), copy=True)


def _npy_layer(name: str, path: Path) -> LayerArray:
    try:
        arr = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as e:
        raise DeepCollapseError(f"cannot read {path} as a .npy array: {e}") from None

    def chunks(rows: int) -> Iterator[np.ndarray]:
        for i in range(0, arr.shape[0], rows):
            yield _native(arr[i : i + rows])

    return LayerArray(name, tuple(arr.shape), chunks)


def _read_header(f: Any) -> tuple[tuple[int, ...], bool, np.dtype]:
    """``(shape, fortran_order, dtype)`` of the .npy stream ``f``, left positioned at the data."""
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    return np.lib.format.read_array_header_2_0(f)


def _npz_layer(name: str, path: Path, key: str) -> LayerArray:
    """A member of an .npz, streamed from the archive row chunk by row chunk."""
    member = f"{key}.npy"
    with zipfile.ZipFile(path) as zf, zf.open(member) as f:
        shape, fortran, dtype = _read_header(f)
    if fortran or dtype.hasobject or len(shape) == 0:
        whole = np.load(path)[key]  # rare layouts: read the member whole

        def whole_chunks(rows: int) -> Iterator[np.ndarray]:
            for i in range(0, whole.shape[0], rows):
                yield _native(np.ascontiguousarray(whole[i : i + rows]))

        return LayerArray(name, tuple(whole.shape), whole_chunks)
    row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize

    def chunks(rows: int) -> Iterator[np.ndarray]:
        with zipfile.ZipFile(path) as zf, zf.open(member) as f:
            _read_header(f)
            for i in range(0, shape[0], rows):
                n = min(rows, shape[0] - i)
                buf = f.read(n * row_bytes)
                if len(buf) != n * row_bytes:
                    raise DeepCollapseError(f"{path}: member {member} is truncated")
                yield _native(np.frombuffer(buf, dtype=dtype).reshape(n, *shape[1:]))

    return LayerArray(name, tuple(shape), chunks)


def _natural(name: str) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _layer_name(key: str) -> str | None:
    if key == "features":
        return "features"
    return key[len("layer_") :] if key.startswith("layer_") and len(key) > len("layer_") else None


def load_inputs(path: Path, labels: Path | None) -> tuple[list[LayerArray], np.ndarray]:
    """The layers (in depth order) and the labels of an .npz, a directory of .npy, or .npy + ``labels``."""
    if not path.exists():
        raise DeepCollapseError(f"no such file or directory: {path}")
    if path.is_dir():
        files = {p.stem: p for p in path.glob("*.npy")}
        layers = [
            _npy_layer(_layer_name(k) or k, p)
            for k, p in sorted(files.items(), key=lambda kv: _natural(kv[0]))
            if _layer_name(k)
        ]
        label_path = labels or files.get("labels")
        if label_path is None:
            raise DeepCollapseError(f"{path} holds no labels.npy (or pass --labels)")
    elif path.suffix == ".npz":
        try:
            with np.load(path) as npz:
                keys = list(npz.files)
                label_arr = np.asarray(npz["labels"]) if labels is None and "labels" in keys else None
        except (OSError, ValueError, zipfile.BadZipFile) as e:
            raise DeepCollapseError(f"cannot read {path} as an .npz archive: {e}") from None
        layers = [_npz_layer(_layer_name(k) or k, path, k) for k in keys if _layer_name(k)]
        if labels is None:
            if label_arr is None:
                raise DeepCollapseError(f"{path} holds no 'labels' array (arrays: {', '.join(keys)})")
            return _checked(path, layers), label_arr
        label_path = labels
    elif path.suffix == ".npy":
        if labels is None:
            raise DeepCollapseError(f"{path} is a single .npy array: pass its labels with --labels LABELS.npy")
        layers, label_path = [_npy_layer(path.stem, path)], labels
    else:
        raise DeepCollapseError(f"{path}: expected an .npz file, a .npy file or a directory of .npy files")
    return _checked(path, layers), _read_labels(Path(label_path))


def _read_labels(path: Path) -> np.ndarray:
    if not path.exists():
        raise DeepCollapseError(f"no such labels file: {path}")
    try:
        return np.load(path)
    except (OSError, ValueError) as e:
        raise DeepCollapseError(f"cannot read labels {path} as a .npy array: {e}") from None


def label_tensor(labels: np.ndarray, num_classes: int | None) -> tuple[torch.Tensor, int]:
    """Labels as int64 (an (N, 1) column is accepted) and ``K`` (default: max label + 1), checked."""
    a = np.asarray(labels)
    if a.ndim == 2 and a.shape[1] == 1:
        a = a[:, 0]
    if a.size == 0:
        raise DeepCollapseError("labels is empty: there are no samples to measure")
    if not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating) or a.dtype == bool):
        raise DeepCollapseError(f"labels must be integers, got dtype {a.dtype}")
    t = torch.from_numpy(_native(a))
    if t.is_floating_point():
        check_finite("labels", t)
        if not bool((t == t.round()).all()):
            raise DeepCollapseError("labels must be integers, got non-integer values")
    if num_classes is None:
        top = float(t.max())
        if top >= t.numel():
            raise DeepCollapseError(
                f"labels go up to {top:.0f} with only {t.numel()} samples, so some classes would be empty;"
                " relabel them as 0..K-1 or pass --num-classes"
            )
        num_classes = int(top) + 1 if float(t.min()) >= 0 else 2
        if num_classes < 2:
            raise DeepCollapseError("labels hold a single class (0); collapse needs at least two classes")
    return check_labels(t, num_classes, name="labels"), num_classes


def _checked(path: Path, layers: list[LayerArray]) -> list[LayerArray]:
    if not layers:
        raise DeepCollapseError(f"{path} holds no feature arrays: name them 'features' or 'layer_<name>'")
    for layer in layers:
        if len(layer.shape) < 2:
            raise DeepCollapseError(f"layer {layer.name!r} must be (N, D) or (N, ...), got shape {layer.shape}")
    return layers


def measure_layer(
    layer: LayerArray,
    labels: torch.Tensor,
    num_classes: int,
    *,
    batch_size: int,
    device: str,
    **options: Any,
) -> dict[str, Any]:
    """Stream one layer from disk through the accumulators and return its metrics."""
    n = layer.shape[0]
    if n != labels.numel():
        raise DeepCollapseError(f"layer {layer.name!r} has {n} rows but labels has {labels.numel()} entries")
    metric_opts = {k: options.pop(k) for k in ("normalize", "weighting")}

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for i, chunk in enumerate(layer.chunks(batch_size)):
            start = i * batch_size
            yield torch.from_numpy(chunk).to(device), labels[start : start + chunk.shape[0]].to(device)

    stats = accumulate_stats(batches, num_classes, name=f"layer {layer.name!r}", **options)
    m = dnc_metrics(stats, **metric_opts)
    m["dim"] = stats.dim
    for key in ("rank", "rank_centred"):
        m[key] = int(m[key])
    return m
