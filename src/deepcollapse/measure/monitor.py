"""Neural collapse over training: measure the train and test sets at an epoch, log a row, draw the curves.

:class:`DNCMonitor` wraps one :class:`~deepcollapse.measure.probe.DNCProbe`. ``monitor.measure(epoch)``
measures the train loader, then the test loader against the train set's class means (Galanti et al.'s
protocol: ``ncc_accuracy`` and ``nc4`` of the test set use the train means), appends one row to
``<out>/dnc_history.csv`` with a column ``<split>/<layer>/<metric>`` per number, redraws
``<out>/dnc_history.png`` (one panel per metric, one line per layer) and, when asked, logs every number
to TensorBoard as ``dnc/<split>/<metric>/<layer>``. In a training loop::

    monitor = DNCMonitor(model, num_classes=10, train_loader=train, test_loader=test, out="runs/dnc")
    for epoch in range(epochs):
        train_one_epoch(model)
        monitor.measure(epoch)

The model is measured in eval mode and left exactly as it was (see the probe). Under DDP, call it on every
rank with sharded loaders; only rank 0 writes files.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deepcollapse._validate import DeepCollapseError
from deepcollapse.files import append_csv_rows, read_csv, write_csv
from deepcollapse.measure.probe import DNCProbe, LayerSpec

__all__ = ["DEFAULT_PLOT_METRICS", "HISTORY_CSV", "HISTORY_PNG", "DNCMonitor", "flatten_results", "summary_writer"]

HISTORY_CSV = "dnc_history.csv"
HISTORY_PNG = "dnc_history.png"
DEFAULT_PLOT_METRICS = ("nc1", "nc2_etf", "ncc_accuracy", "nc4")


def summary_writer(logdir: str | Path) -> Any:
    """A ``torch.utils.tensorboard.SummaryWriter`` on ``logdir``; a one-line error if tensorboard is missing."""
    try:
        import tensorboard  # noqa: F401  (torch.utils.tensorboard needs the package)
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise DeepCollapseError(
            "tensorboard: logging to TensorBoard needs the tensorboard package; pip install 'deepcollapse[tensorboard]'"
        ) from None
    return SummaryWriter(log_dir=str(logdir))


def flatten_results(results: Mapping[str, Mapping[str, Mapping[str, float]]]) -> dict[str, float]:
    """``{split: {layer: {metric: v}}}`` -> ``{"split/layer/metric": v}``, in order."""
    return {
        f"{split}/{layer}/{metric}": v
        for split, rows in results.items()
        for layer, m in rows.items()
        for metric, v in m.items()
    }


def _rank() -> int:
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class DNCMonitor:
    """Measure neural collapse at an epoch: train and test loaders, one CSV row per epoch, plots, TensorBoard.

    Parameters
    ----------
    model : nn.Module
        The model being trained.
    num_classes : int
        ``K``.
    train_loader, test_loader : re-iterable loaders
        Yield what the probe accepts (see :class:`~deepcollapse.measure.probe.DNCProbe`); ``test_loader``
        is optional.
    out : str, Path or None
        Directory for ``dnc_history.csv`` and ``dnc_history.png`` (created); ``None`` writes nothing.
    layers : as for the probe
        Default: every ``Linear`` and ``ReLU``.
    plot_metrics : sequence of str
        The panels of the plot; ``()`` draws none.
    tensorboard : str, Path, a writer or None
        A log directory (a ``SummaryWriter`` is opened there; needs ``deepcollapse[tensorboard]``) or any
        object with ``add_scalar(tag, value, step)``.
    resume : bool
        Append to an existing ``dnc_history.csv`` (default: refuse to mix two runs in one file).
    probe_options :
        Passed to :class:`~deepcollapse.measure.probe.DNCProbe` (``classifier``, ``passes``, ``cov``, ...).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        num_classes: int,
        train_loader: Iterable[Any],
        test_loader: Iterable[Any] | None = None,
        out: str | Path | None = None,
        layers: LayerSpec = ("linear", "relu"),
        plot_metrics: Sequence[str] = DEFAULT_PLOT_METRICS,
        tensorboard: str | Path | Any | None = None,
        resume: bool = False,
        **probe_options: Any,
    ) -> None:
        self.probe = DNCProbe(model, layers=layers, num_classes=num_classes, **probe_options)
        self.train_loader, self.test_loader = train_loader, test_loader
        self.plot_metrics = tuple(plot_metrics)
        self.out = None if out is None else Path(out)
        self.rows: list[dict[str, Any]] = []
        self._header: list[str] | None = None  # the columns of the CSV on disk
        if self.out is not None and (self.out / HISTORY_CSV).exists():
            if not resume:
                raise DeepCollapseError(
                    f"out: {self.out / HISTORY_CSV} exists; pass resume=True to append to it or choose another out"
                )
            self.rows = read_csv(self.out / HISTORY_CSV, text_columns=())
            self._header = list(dict.fromkeys(k for r in self.rows for k in r)) or None
        self.writer = None
        if tensorboard is not None:
            self.writer = tensorboard if hasattr(tensorboard, "add_scalar") else summary_writer(tensorboard)

    @property
    def csv_path(self) -> Path | None:
        return None if self.out is None else self.out / HISTORY_CSV

    @property
    def plot_path(self) -> Path | None:
        return None if self.out is None or not self.plot_metrics else self.out / HISTORY_PNG

    def measure(self, epoch: int) -> dict[str, dict[str, dict[str, float]]]:
        """Measure at ``epoch``: ``{"train": {layer: {metric: v}}, "test": ...}``; log, write and plot."""
        results = {"train": self.probe.measure(self.train_loader)}
        if self.test_loader is not None:
            train_stats = dict(self.probe.stats)
            results["test"] = self.probe.measure(self.test_loader, reference=train_stats)
            self.probe.stats = train_stats  # keep the train set's statistics for the caller
        row: dict[str, Any] = {"epoch": epoch, **flatten_results(results)}
        self.rows.append(row)
        if _rank() == 0:
            self._log(row, epoch)
            self._write(row)
        return results

    __call__ = measure

    def _log(self, row: Mapping[str, Any], epoch: int) -> None:
        if self.writer is None:
            return
        for col, v in row.items():
            if col != "epoch" and isinstance(v, int | float) and math.isfinite(v):
                split, rest = col.split("/", 1)
                layer, metric = rest.rsplit("/", 1)
                self.writer.add_scalar(f"dnc/{split}/{metric}/{layer}", v, epoch)
        if hasattr(self.writer, "flush"):
            self.writer.flush()

    def _write(self, row: Mapping[str, Any]) -> None:
        if self.out is None:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / HISTORY_CSV
        if self._header is not None and set(row) <= set(self._header) and path.exists():
            append_csv_rows(path, [row], self._header)
        else:  # the first row, or a new column: rewrite the file with the wider header
            self._header = list(dict.fromkeys(k for r in self.rows for k in r))
            write_csv(path, self.rows, self._header)
        if self.plot_path is not None:
            from deepcollapse.plots import plot_epoch_metrics

            plot_epoch_metrics(
                self.rows, self.plot_path, metrics=self.plot_metrics, title="neural collapse over training"
            )
