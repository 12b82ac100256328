"""The optional integrations with the real packages: TensorBoard event files and a Lightning callback."""

from __future__ import annotations

import importlib
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


def test_tensorboard_event_file_holds_the_numbers(digits, tmp_path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    x, y = digits[0][:300], digits[1][:300]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, K))
    monitor = DNCMonitor(model, num_classes=K, train_loader=batches(x, y), layers="relu", tensorboard=tmp_path / "tb")
    first = monitor.measure(0)
    with torch.no_grad():
        model[2].weight.mul_(2.0)
        model[0].weight.add_(0.1)
    second = monitor.measure(1)
    monitor.writer.close()
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    got = [(e.step, e.value) for e in events.Scalars("dnc/train/nc1/1")]
    assert [s for s, _ in got] == [0, 1]
    for (_, value), res in zip(got, (first, second), strict=True):
        assert value == pytest.approx(res["train"]["1"]["nc1"], rel=1e-6)  # stored as float32
    with torch.no_grad():
        h = model[1](model[0](x)).double().numpy()
    assert got[1][1] == pytest.approx(np_dnc(h, y.numpy(), K)["nc1"], rel=1e-6)


# ----------------------------------------------------------------------------------------- Lightning


def lightning_module(l_pl):  # defined inside a function: lightning is an optional import
    class Digits(l_pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.body = nn.Sequential(nn.Linear(64, 32), nn.ReLU())
            self.fc = nn.Linear(32, K)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.body(x))

        def training_step(self, batch, i):
            x, y = batch
            return nn.functional.cross_entropy(self(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.5)

    return Digits()


def test_lightning_callback_measures_each_epoch(digits, tmp_path) -> None:
    l_pl = pytest.importorskip("lightning.pytorch")
    from deepcollapse.measure.integrations import DNCCallback

    x, y = digits[0][:300], digits[1][:300]
    train, test = (x[:200], y[:200]), (x[200:], y[200:])
    module = lightning_module(l_pl)
    callback = DNCCallback(
        num_classes=K,
        train_loader=batches(*train),
        test_loader=batches(*test),
        out=tmp_path / "dnc",
        layers=["body.1"],
        plot_metrics=("nc1",),
    )
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*train), batch_size=50)
    logs = l_pl.loggers.CSVLogger(tmp_path / "logs")
    trainer = l_pl.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=logs,
        callbacks=[callback],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, loader)
    rows = read_csv(tmp_path / "dnc" / "dnc_history.csv", text_columns=())
    assert [r["epoch"] for r in rows] == [0, 1]
    with torch.no_grad():  # the last row is the trained model's
        h = module.body(x[:200]).double().numpy()
        pred = module(x[200:]).argmax(1).numpy()
        h_te = module.body(x[200:]).double().numpy()
    ref = np_dnc(h, train[1].numpy(), K)
    assert rows[1]["train/body.1/nc1"] == pytest.approx(ref["nc1"], rel=1e-6)
    ncc = ((h_te[:, None] - ref["means"][None]) ** 2).sum(-1).argmin(1)
    assert rows[1]["test/body.1/nc4"] == pytest.approx(float((ncc != pred).mean()), abs=1e-12)
    assert rows[0]["train/body.1/nc1"] != pytest.approx(rows[1]["train/body.1/nc1"], rel=1e-3)
    assert module.training  # the trainer's mode is left alone
    logged = read_csv(next((tmp_path / "logs").rglob("metrics.csv")), text_columns=())
    values = [r["dnc/train/body.1/nc1"] for r in logged if r.get("dnc/train/body.1/nc1") is not None]
    assert np.allclose(values, [rows[0]["train/body.1/nc1"], rows[1]["train/body.1/nc1"]], rtol=1e-6)


def test_lightning_missing_is_one_line(monkeypatch) -> None:
    import deepcollapse.measure.integrations as integrations

    for name in ("lightning", "lightning.pytorch", "lightning.pytorch.callbacks"):
        monkeypatch.setitem(sys.modules, name, None)  # as if not installed
    try:
        importlib.reload(integrations)  # importing still works ...
        assert not integrations.HAVE_LIGHTNING
        with pytest.raises(
            DeepCollapseError, match=r"needs PyTorch Lightning; pip install 'deepcollapse\[lightning\]'"
        ):
            integrations.DNCCallback(num_classes=K, train_loader=[])  # ... creating the callback does not
    finally:
        monkeypatch.undo()
        importlib.reload(integrations)
