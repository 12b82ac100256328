"""Saved features: readers of ``.npz``/``.npy`` files and the measurement of every layer they hold.

Each layer is an ``(N, ...)`` array (flattened per sample); ``labels`` is an ``(N,)`` integer array (an
``(N, 1)`` column or an ``(N, K)`` one-hot array are accepted too).

* ``FEATURES.npz`` holding ``features`` and/or ``layer_<name>`` arrays (depth = order in the file), ``labels``
  and optionally the classifier that reads the last layer: ``weight`` (or ``classifier_weight``), ``(K, D)``,
  and ``bias`` (or ``classifier_bias``), ``(K,)``. Feature members are read chunk by chunk from the archive
  (compressed or not), never whole.
* a directory holding ``labels.npy`` and ``features.npy`` and/or ``layer_<name>.npy`` (depth = natural
  order of the names), or one ``.npy`` file with a separate labels file. ``.npy`` files are memory-mapped
  (``np.load(mmap_mode="r")``) and read in chunks of rows.

:func:`measure_saved` streams every layer through
:func:`~deepcollapse.measure.accumulate.accumulate_stats` (its default, fastest exact path) and returns a
:class:`Measurement`: per layer the metrics of :func:`~deepcollapse.measure.metrics.dnc_metrics` and per-class
quantities. Everything is checked before anything is computed that could fail late (labels, classes, the
classifier's shape, the options); errors name the Python parameter at fault.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deepcollapse._validate import DeepCollapseError, check_positive_int
from deepcollapse.measure.accumulate import ClassAccumulator, accumulate_stats
from deepcollapse.measure.metrics import (
    METRICS,
    ClassStats,
    PairSummary,
    centred_means,
    classifier_predictions,
    dnc_metrics,
    pair_summary,
)

__all__ = [
    "BIAS_KEYS",
    "WEIGHT_KEYS",
    "ClassSelection",
    "Classifier",
    "LayerArray",
    "LayerResult",
    "MeasureOptions",
    "Measurement",
    "SavedFeatures",
    "load_inputs",
    "measure_saved",
    "per_class_rows",
    "read_classifier",
    "select_classes",
]

WEIGHT_KEYS = ("weight", "classifier_weight")  # the classifier's (K, D) weight in an .npz
BIAS_KEYS = ("bias", "classifier_bias")  # its (K,) bias


@dataclass(frozen=True)
class LayerArray:
    """One layer on disk: its name, shape, dtype and a reader of successive row chunks."""

    name: str
    shape: tuple[int, ...]
    chunks: Callable[[int], Iterator[np.ndarray]]
    dtype: np.dtype = field(default_factory=lambda: np.dtype(np.float64))

    @property
    def dim(self) -> int:
        """Features per sample ``D`` (the product of the non-batch dimensions)."""
        return int(np.prod(self.shape[1:], dtype=np.int64))


@dataclass(frozen=True)
class Classifier:
    """The linear classifier ``x -> W x + b`` that reads the last layer: ``weight`` (K, D), ``bias`` (K,)."""

    weight: np.ndarray
    bias: np.ndarray | None
    source: str


@dataclass(frozen=True)
class SavedFeatures:
    """What a features file holds: its layers in depth order, the labels and the classifier (if any)."""

    path: Path
    layers: list[LayerArray]
    labels: np.ndarray
    classifier: Classifier | None = None


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

    return LayerArray(name, tuple(arr.shape), chunks, arr.dtype)


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

        return LayerArray(name, tuple(whole.shape), whole_chunks, whole.dtype)
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

    return LayerArray(name, tuple(shape), chunks, dtype)


def _natural(name: str) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _layer_name(key: str) -> str | None:
    if key == "features":
        return "features"
    return key[len("layer_") :] if key.startswith("layer_") and len(key) > len("layer_") else None


def _pick(arrays: dict[str, np.ndarray], keys: Sequence[str], path: Path) -> np.ndarray | None:
    found = [k for k in keys if k in arrays]
    if len(found) > 1:
        raise DeepCollapseError(f"{path} holds both {found[0]!r} and {found[1]!r}; keep one of them")
    return arrays[found[0]] if found else None


def _classifier_in(path: Path, arrays: dict[str, np.ndarray], *, required: bool) -> Classifier | None:
    w, b = _pick(arrays, WEIGHT_KEYS, path), _pick(arrays, BIAS_KEYS, path)
    if w is None:
        if b is not None:
            raise DeepCollapseError(f"{path} holds a classifier bias but no weight ({' or '.join(WEIGHT_KEYS)})")
        if required:
            raise DeepCollapseError(f"weight {path} holds no classifier array ({' or '.join(WEIGHT_KEYS)})")
        return None
    return Classifier(np.asarray(w), None if b is None else np.asarray(b), str(path))


def read_classifier(path: Path) -> Classifier:
    """A classifier from a ``.npy`` weight (K, D) or an ``.npz`` holding ``weight`` and optionally ``bias``."""
    if not path.exists():
        raise DeepCollapseError(f"weight {path}: no such file")
    try:
        if path.suffix != ".npz":
            return Classifier(np.load(path), None, str(path))
        with np.load(path) as npz:
            arrays = {k: npz[k] for k in npz.files if k in (*WEIGHT_KEYS, *BIAS_KEYS)}
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise DeepCollapseError(f"weight {path}: cannot read it as .npy/.npz: {e}") from None
    found = _classifier_in(path, arrays, required=True)
    assert found is not None
    return found


def load_inputs(path: Path, *, labels: Path | None = None, weight: Path | None = None) -> SavedFeatures:
    """The layers (in depth order), labels and classifier of an .npz, a directory of .npy, or one .npy.

    ``labels`` replaces the labels of the input (it is needed for a single .npy); ``weight`` replaces the
    classifier an .npz may hold.
    """
    path = Path(path)
    if not path.exists():
        raise DeepCollapseError(f"no such file or directory: {path}")
    classifier = None
    if path.is_dir():
        files = {p.stem: p for p in path.glob("*.npy")}
        layers = [
            _npy_layer(_layer_name(k) or k, p)
            for k, p in sorted(files.items(), key=lambda kv: _natural(kv[0]))
            if _layer_name(k)
        ]
        label_path = labels or files.get("labels")
        if label_path is None:
            raise DeepCollapseError(f"{path} holds no labels.npy: give the labels file (labels=LABELS.npy)")
        label_arr = _read_labels(Path(label_path))
    elif path.suffix == ".npz":
        try:
            with np.load(path) as npz:
                keys = list(npz.files)
                small = {k: npz[k] for k in keys if k in (*WEIGHT_KEYS, *BIAS_KEYS) or (k == "labels" and not labels)}
        except (OSError, ValueError, zipfile.BadZipFile) as e:
            raise DeepCollapseError(f"cannot read {path} as an .npz archive: {e}") from None
        layers = [_npz_layer(_layer_name(k) or k, path, k) for k in keys if _layer_name(k)]
        if labels is None and "labels" not in small:
            raise DeepCollapseError(f"{path} holds no 'labels' array (arrays: {', '.join(keys)})")
        label_arr = small["labels"] if labels is None else _read_labels(Path(labels))
        classifier = _classifier_in(path, small, required=False)
    elif path.suffix == ".npy":
        if labels is None:
            raise DeepCollapseError(f"{path} is a single .npy array: its labels are needed (labels=LABELS.npy)")
        layers, label_arr = [_npy_layer(path.stem, path)], _read_labels(Path(labels))
    else:
        raise DeepCollapseError(f"{path}: expected an .npz file, a .npy file or a directory of .npy files")
    if weight is not None:
        classifier = read_classifier(Path(weight))
    return SavedFeatures(path, _checked(path, layers), np.asarray(label_arr), classifier)


def _read_labels(path: Path) -> np.ndarray:
    if not path.exists():
        raise DeepCollapseError(f"labels {path}: no such file")
    try:
        return np.load(path)
    except (OSError, ValueError) as e:
        raise DeepCollapseError(f"labels {path}: cannot read it as a .npy array: {e}") from None


def _checked(path: Path, layers: list[LayerArray]) -> list[LayerArray]:
    if not layers:
        raise DeepCollapseError(f"{path} holds no feature arrays: name them 'features' or 'layer_<name>'")
    for layer in layers:
        if len(layer.shape) < 2:
            raise DeepCollapseError(f"layer {layer.name!r} must be (N, D) or (N, ...), got shape {layer.shape}")
    return layers


# ------------------------------------------------------------------------------------------- classes


@dataclass(frozen=True)
class ClassSelection:
    """Which classes are measured: ``classes`` (sorted original labels), ``num_classes`` (the label range
    ``K``), ``missing`` (labels in ``0..K-1`` with no sample), and per sample its row in ``classes``
    (``index``, ``-1`` for a sample of a class that is not measured)."""

    classes: np.ndarray
    num_classes: int
    missing: list[int]
    index: np.ndarray

    @property
    def subset(self) -> bool:
        """Whether some samples are left out (their class is not measured)."""
        return bool((self.index < 0).any())


def _integer_labels(labels: np.ndarray) -> np.ndarray:
    """Labels as an int64 vector: an (N, 1) column and (N, K) one-hot rows are accepted."""
    a = np.asarray(labels)
    if a.size == 0:
        raise DeepCollapseError("labels is empty: there are no samples to measure")
    if not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating) or a.dtype == bool):
        raise DeepCollapseError(f"labels must be integers, got dtype {a.dtype}")
    if a.ndim == 2 and a.shape[1] == 1:
        a = a[:, 0]
    elif a.ndim == 2:
        if not (np.isin(a, (0, 1)).all() and (a.sum(1) == 1).all()):
            raise DeepCollapseError(f"labels of shape {a.shape} must be one-hot rows (one 1 per row, zeros elsewhere)")
        return a.argmax(1).astype(np.int64)
    if a.ndim != 1:
        raise DeepCollapseError(f"labels must be (N,), (N, 1) or one-hot (N, K), got shape {a.shape}")
    if np.issubdtype(a.dtype, np.floating):
        if not np.isfinite(a).all():
            raise DeepCollapseError("labels contains NaN or inf")
        if not (a == np.round(a)).all():
            raise DeepCollapseError("labels must be integers, got non-integer values")
    return a.astype(np.int64)


def select_classes(
    labels: np.ndarray, *, num_classes: int | None = None, classes: Sequence[int] | None = None
) -> ClassSelection:
    """Check ``labels`` and choose the classes to measure.

    ``num_classes`` ``K`` (default: max label + 1): labels must lie in ``0..K-1``. ``classes`` restricts the
    measurement to those labels (samples of other classes are skipped); by default every class that has a
    sample is measured, and the classes of ``0..K-1`` without one are reported in ``missing``.
    """
    y = _integer_labels(labels)
    if num_classes is not None:
        check_positive_int("num_classes", num_classes, minimum=2)
    lo, hi = int(y.min()), int(y.max())
    k = int(num_classes) if num_classes is not None else hi + 1
    if lo < 0 or hi >= k:
        raise DeepCollapseError(f"labels must lie in 0..{k - 1} (num_classes={k}), found {lo if lo < 0 else hi}")
    present = np.unique(y)
    if classes is None:
        chosen = present
    else:
        chosen = np.unique(np.asarray([int(c) for c in classes], dtype=np.int64))
        outside = [int(c) for c in chosen if not 0 <= c < k]
        if outside:
            raise DeepCollapseError(f"classes {outside} lie outside 0..{k - 1} (num_classes={k})")
        empty = [int(c) for c in np.setdiff1d(chosen, present)]
        if empty:
            raise DeepCollapseError(f"classes {empty} have no samples in labels")
    if chosen.size < 2:
        raise DeepCollapseError(
            f"labels hold a single measured class ({chosen.tolist()}); collapse needs at least two classes"
        )
    pos = np.searchsorted(chosen, y).clip(max=chosen.size - 1)
    index = np.where(chosen[pos] == y, pos, -1)
    missing = [int(c) for c in np.setdiff1d(np.arange(k), present)] if k <= 10 * y.size else []
    return ClassSelection(chosen, k, missing, index)


# ------------------------------------------------------------------------------------------- options


def _default(fn: Callable[..., Any], name: str) -> Any:
    """The default of parameter ``name`` of ``fn``: options shared with the library keep its one default."""
    return inspect.signature(fn).parameters[name].default


@dataclass(frozen=True)
class MeasureOptions:
    """How :func:`measure_saved` streams and measures: one place for every default.

    ``batch_size`` rows read at a time; ``device`` where the statistics accumulate; ``passes`` and ``cov``
    as in :class:`~deepcollapse.measure.accumulate.ClassAccumulator` (``None``: its default);
    ``normalize`` and ``weighting`` as in :func:`~deepcollapse.measure.metrics.dnc_metrics` (their defaults
    are read from those signatures); ``rtol`` the relative singular-value cutoff of every pseudo-inverse and
    rank (``None``: the precision of the features as given).
    """

    batch_size: int = 4096
    device: str = "cpu"
    passes: int = _default(ClassAccumulator, "passes")
    cov: str | None = None
    normalize: bool = _default(dnc_metrics, "normalize")
    weighting: str = _default(dnc_metrics, "weighting")
    rtol: float | None = None

    def __post_init__(self) -> None:
        check_positive_int("batch_size", self.batch_size)
        if self.passes not in (1, 2):
            raise DeepCollapseError(f"passes must be 1 or 2, got {self.passes!r}")
        if self.weighting not in ("samples", "classes"):
            raise DeepCollapseError(f"weighting must be 'samples' or 'classes', got {self.weighting!r}")
        if self.rtol is not None and (
            isinstance(self.rtol, bool) or not isinstance(self.rtol, int | float) or not 0.0 < self.rtol < 1.0
        ):
            raise DeepCollapseError(f"rtol must be a number in (0, 1), got {self.rtol!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------- measuring


@dataclass(frozen=True)
class LayerResult:
    """One layer's measurement: ``metrics`` (name -> number), ``per_class`` rows (see :func:`per_class_rows`) and
    ``meta``: what the metrics were computed with (``rtol``: the cutoff used)."""

    name: str
    depth: int
    dim: int
    dtype: str
    samples: int
    metrics: dict[str, float | int]
    per_class: list[dict[str, Any]]
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "depth": self.depth,
            "dim": self.dim,
            "dtype": self.dtype,
            "samples": self.samples,
            **self.meta,
            "metrics": self.metrics,
        }


@dataclass(frozen=True)
class Measurement:
    """Every layer of a features file measured over ``selection.classes`` with ``options``."""

    inputs: SavedFeatures
    selection: ClassSelection
    options: MeasureOptions
    layers: list[LayerResult]

    def to_dict(self) -> dict[str, Any]:
        """The content of ``metrics.json``: metadata at the top, each layer's metrics under ``"metrics"``."""
        clf = self.inputs.classifier
        return {
            "input": str(self.inputs.path),
            "samples": int(self.selection.index.size),
            "num_classes": self.selection.num_classes,
            "classes": [int(c) for c in self.selection.classes],
            "missing_classes": self.selection.missing,
            "classifier": None
            if clf is None
            else {"source": clf.source, "shape": list(clf.weight.shape), "bias": clf.bias is not None},
            "options": self.options.to_dict(),
            "layers": [layer.to_dict() for layer in self.layers],
        }


def _check_classifier(clf: Classifier, last: LayerArray, selection: ClassSelection) -> Classifier:
    """The classifier restricted to the measured classes, after checking that it fits the last layer."""
    w, b, k = clf.weight, clf.bias, selection.num_classes
    if w.ndim != 2 or w.shape != (k, last.dim):
        raise DeepCollapseError(
            f"weight must be (num_classes, D) = ({k}, {last.dim}) to read layer {last.name!r}, got shape {w.shape}"
        )
    if b is not None and b.shape != (k,):
        raise DeepCollapseError(f"bias must be (num_classes,) = ({k},), got shape {b.shape}")
    for name, a in (("weight", w), ("bias", b)):
        if a is not None and not (np.issubdtype(a.dtype, np.number) and np.isfinite(a).all()):
            raise DeepCollapseError(f"{name} from {clf.source} must hold finite numbers")
    rows = selection.classes
    return Classifier(w[rows].astype(np.float64), None if b is None else b[rows].astype(np.float64), clf.source)


def per_class_rows(
    stats: ClassStats,
    *,
    classes: Sequence[int] | None = None,
    weighting: str = "samples",
    pairs: PairSummary | None = None,
) -> list[dict[str, Any]]:
    """Per class: ``samples`` ``n_c``; ``within_variance`` ``Var_c = 1/n_c Σ ||h_i - μ_c||²``; ``mean_norm``
    ``||μ_c||`` and ``centred_mean_norm`` ``||μ_c - μ_G||``; ``ncc_accuracy`` and ``nc4`` (the fraction of the
    class whose classifier prediction differs from its nearest class mean) when counted; the CDNV row:
    ``cdnv_mean`` its mean over the other classes, ``cdnv_max`` its largest entry and ``cdnv_max_class`` the
    class reaching it (the class ``c`` is least separated from). ``classes`` names the rows (default
    ``0..K-1``). The CDNV rows come from the tiled :func:`~deepcollapse.measure.metrics.pair_summary` (``pairs``
    when the caller has it for the same statistics and ``weighting``)."""
    if pairs is None:
        pairs = pair_summary(stats, weighting=weighting)
    ids = list(range(stats.num_classes)) if classes is None else [int(c) for c in classes]
    norms, centred = stats.means.norm(dim=1), centred_means(stats, weighting=weighting).norm(dim=1)
    counts = stats.counts.tolist()
    columns: dict[str, list[Any]] = {
        "class": ids,
        "samples": counts,
        "within_variance": stats.within_trace.tolist(),
        "mean_norm": norms.tolist(),
        "centred_mean_norm": centred.tolist(),
    }
    for name, hits in (("ncc_accuracy", stats.ncc_correct), ("nc4", stats.nc4_disagree)):
        if hits is not None:
            columns[name] = [h / n for h, n in zip(hits.tolist(), counts, strict=True)]
    columns["cdnv_mean"] = pairs.cdnv_per_class.tolist()
    columns["cdnv_max"] = pairs.cdnv_max.tolist()
    columns["cdnv_max_class"] = [ids[c] for c in pairs.cdnv_max_class.tolist()]
    return [dict(zip(columns, row, strict=True)) for row in zip(*columns.values(), strict=True)]


def _batches(
    layer: LayerArray, selection: ClassSelection, options: MeasureOptions, clf: Classifier | None = None
) -> Callable[[], Iterator[tuple[torch.Tensor, ...]]]:
    """Row chunks of ``layer`` with their row in ``selection.classes`` (samples of other classes dropped) and,
    with a classifier, its predictions ``argmax_c (W h + b)_c`` in the last pass (they give NC4)."""
    index, rows, dev, subset = torch.from_numpy(selection.index), options.batch_size, options.device, selection.subset
    w = None if clf is None else torch.from_numpy(clf.weight).to(dev)
    b = None if clf is None or clf.bias is None else torch.from_numpy(clf.bias).to(dev)
    calls = [0]

    def batches() -> Iterator[tuple[torch.Tensor, ...]]:
        calls[0] += 1
        predict = w is not None and options.passes == 2 and calls[0] == 2
        for i, chunk in enumerate(layer.chunks(rows)):
            h, y = torch.from_numpy(chunk), index[i * rows : i * rows + chunk.shape[0]]
            if subset:
                keep = y >= 0
                h, y = h[keep], y[keep]
            if y.numel():
                h, y = h.to(dev), y.to(dev)
                yield (h, y, classifier_predictions(h, w, b)) if predict else (h, y)

    return batches


def _layer_stats(
    layer: LayerArray, selection: ClassSelection, options: MeasureOptions, clf: Classifier | None
) -> ClassStats:
    """Stream one layer from disk (only the rows of the measured classes) into its statistics."""
    acc_options: dict[str, Any] = {"passes": options.passes, "name": f"layer {layer.name!r}"}
    if options.cov is not None:
        acc_options["cov"] = options.cov
    return accumulate_stats(_batches(layer, selection, options, clf), int(selection.classes.size), **acc_options)


def measure_saved(
    inputs: SavedFeatures,
    *,
    num_classes: int | None = None,
    classes: Sequence[int] | None = None,
    options: MeasureOptions | None = None,
) -> Measurement:
    """Measure every layer of ``inputs`` (see :func:`load_inputs`) over the chosen classes.

    The labels, the classes (:func:`select_classes`) and the classifier's shape are checked before any layer
    is read. With a classifier, the last layer also gets the classifier-side metrics.
    """
    options = options or MeasureOptions()
    selection = select_classes(inputs.labels, num_classes=num_classes, classes=classes)
    for layer in inputs.layers:
        if layer.shape[0] != selection.index.size:
            raise DeepCollapseError(
                f"layer {layer.name!r} has {layer.shape[0]} rows but labels has {selection.index.size} entries"
            )
    clf = None if inputs.classifier is None else _check_classifier(inputs.classifier, inputs.layers[-1], selection)
    results = []
    for depth, layer in enumerate(inputs.layers):
        head = clf if depth == len(inputs.layers) - 1 else None
        stats = _layer_stats(layer, selection, options, head)
        pairs = pair_summary(stats, weighting=options.weighting)  # once for the metrics and the per-class table
        found = dnc_metrics(
            stats,
            weight=None if head is None else torch.from_numpy(head.weight),
            bias_free=head is not None and head.bias is None,
            normalize=options.normalize,
            weighting=options.weighting,
            rtol=options.rtol,
            pairs=pairs,
        )
        meta = {k: v for k, v in found.items() if METRICS[k].kind == "meta"}
        metrics = {k: v for k, v in found.items() if k not in meta}
        rows = per_class_rows(stats, classes=selection.classes.tolist(), weighting=options.weighting, pairs=pairs)
        results.append(LayerResult(layer.name, depth, layer.dim, str(layer.dtype), stats.total, metrics, rows, meta))
    return Measurement(inputs, selection, options, results)
