"""DNCMonitor in a training loop: one CSV row per epoch whose numbers equal a numpy reference on the model
of that epoch, test-set NCC against the train means, the plot, resume, and a missing TensorBoard."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from torch import nn

from deepcollapse._validate import DeepCollapseError
from deepcollapse.files import read_csv
from deepcollapse.measure.monitor import DNCMonitor
from reference import batches, np_dnc

K = 10
pytestmark = pytest.mark.usefixtures("one_thread")


def net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, K))


def np_row(model: nn.Sequential, train: tuple, test: tuple) -> dict[str, float]:
    """A few columns of the monitor's row, from the definition on all features at once (float64)."""
    with torch.no_grad():
        h_tr, h_te = (model[1](model[0](x)).double().numpy() for x, _ in (train, test))
        pred_te = model(test[0]).argmax(1).numpy()
    y_tr, y_te = train[1].numpy(), test[1].numpy()
    ref_tr, ref_te = np_dnc(h_tr, y_tr, K), np_dnc(h_te, y_te, K)
    ncc = ((h_te[:, None] - ref_tr["means"][None]) ** 2).sum(-1).argmin(1)  # train means on test features
    return {
        "train/1/nc1": ref_tr["nc1"],
        "test/1/nc1": ref_te["nc1"],
        "test/1/ncc_accuracy": float((ncc == y_te).mean()),
        "test/1/nc4": float((ncc != pred_te).mean()),
    }


def test_monitor_in_a_training_loop(digits, tmp_path) -> None:
    x, y = digits
    train, test = (x[:400], y[:400]), (x[400:], y[400:])
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    monitor = DNCMonitor(
        model,
        num_classes=K,
        train_loader=batches(*train),
        test_loader=batches(*test),
        out=tmp_path,
        plot_metrics=("nc1", "nc4"),
    )
    expected = []
    for epoch in range(3):
        for xb, yb in batches(*train, 50):
            opt.zero_grad()
            nn.functional.cross_entropy(model(xb), yb).backward()
            opt.step()
        monitor.measure(epoch)
        expected.append(np_row(model, train, test))
    rows = read_csv(tmp_path / "dnc_history.csv", text_columns=())
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    assert {"train/0/nc1", "train/2/nc3_duality", "test/2/ncc_accuracy"} <= set(rows[0])
    for row, ref in zip(rows, expected, strict=True):
        for col, value in ref.items():
            assert row[col] == pytest.approx(value, rel=1e-6, abs=1e-12), col
    assert rows[0]["train/1/nc1"] != pytest.approx(rows[2]["train/1/nc1"], rel=1e-3)  # training moved it
    png = (tmp_path / "dnc_history.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert monitor.probe.stats["1"].total == 400  # the train set's statistics are kept


def test_resume_and_refusal(digits, tmp_path) -> None:
    x, y = digits
    kw = dict(num_classes=K, train_loader=batches(x, y), out=tmp_path, layers="relu", plot_metrics=())
    DNCMonitor(net(), **kw).measure(0)
    with pytest.raises(DeepCollapseError, match=r"out: .*dnc_history.csv exists; pass resume=True"):
        DNCMonitor(net(), **kw)
    DNCMonitor(net(), resume=True, **kw).measure(1)
    rows = read_csv(tmp_path / "dnc_history.csv", text_columns=())
    assert [r["epoch"] for r in rows] == [0, 1] and rows[0]["train/1/nc1"] == pytest.approx(rows[1]["train/1/nc1"])
    assert not (tmp_path / "dnc_history.png").exists()


def test_no_files_without_out(digits, tmp_path, monkeypatch) -> None:
    x, y = digits
    monkeypatch.chdir(tmp_path)
    res = DNCMonitor(net(), num_classes=K, train_loader=batches(x, y), layers="relu").measure(0)
    assert list(res) == ["train"] and list(tmp_path.iterdir()) == []


def test_missing_tensorboard_is_one_line(digits, tmp_path, monkeypatch) -> None:
    x, y = digits
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if not installed
    with pytest.raises(
        DeepCollapseError, match=r"needs the tensorboard package; pip install 'deepcollapse\[tensorboard\]'"
    ):
        DNCMonitor(net(), num_classes=K, train_loader=batches(x, y), tensorboard=tmp_path / "tb")


def test_writer_object_receives_every_number(digits) -> None:
    x, y = digits

    class Writer:
        def __init__(self) -> None:
            self.scalars: dict[str, tuple[float, int]] = {}

        def add_scalar(self, tag: str, value: float, step: int) -> None:
            self.scalars[tag] = (value, step)

    w = Writer()
    res = DNCMonitor(net(), num_classes=K, train_loader=batches(x, y), layers="relu", tensorboard=w).measure(4)
    assert w.scalars["dnc/train/nc1/1"] == (res["train"]["1"]["nc1"], 4)
    finite = [v for m in res["train"].values() for v in m.values() if np.isfinite(v)]
    assert len(w.scalars) == len(finite)
