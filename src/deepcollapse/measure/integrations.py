"""Training-framework integrations: a PyTorch Lightning callback (needs ``deepcollapse[lightning]``).

:class:`DNCCallback` runs a :class:`~deepcollapse.measure.monitor.DNCMonitor` at the end of every
``every``-th training epoch: it measures the loaders you give it, writes ``dnc_history.csv`` and
``dnc_history.png`` under ``out``, and logs every number through ``LightningModule.log_dict`` as
``dnc/<split>/<layer>/<metric>``, so it reaches whatever logger the trainer uses (TensorBoard, CSV, ...)::

    trainer = lightning.Trainer(max_epochs=20, callbacks=[DNCCallback(num_classes=10, train_loader=train,
                                                                      test_loader=test, out="runs/dnc")])

Lightning is imported when this module is; without it, creating the callback raises a one-line error.
Under a DDP strategy every rank measures its own loaders and the statistics are summed over ranks: give
each rank its shard, without the padding of ``DistributedSampler`` (padded samples would count twice).
TensorBoard alone needs no callback: ``DNCMonitor(..., tensorboard="runs/tb")``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from deepcollapse._validate import DeepCollapseError
from deepcollapse.measure.monitor import DNCMonitor, flatten_results

try:
    from lightning.pytorch.callbacks import Callback as _Callback

    HAVE_LIGHTNING = True
except ImportError:  # the callback below then refuses to be created
    _Callback = object  # type: ignore[assignment,misc]
    HAVE_LIGHTNING = False

__all__ = ["HAVE_LIGHTNING", "DNCCallback"]


class DNCCallback(_Callback):  # type: ignore[misc,valid-type]
    """Measure neural collapse at the end of training epochs (a PyTorch Lightning ``Callback``).

    Parameters
    ----------
    num_classes : int
        ``K``.
    train_loader, test_loader : re-iterable loaders
        What to measure (the test loader against the train set's class means); give loaders that yield
        the same samples on every pass (no ``shuffle`` with ``drop_last``).
    out : str, Path or None
        Directory of ``dnc_history.csv`` and ``dnc_history.png``; ``None`` writes no files.
    every : int
        Measure after epochs ``0, every, 2*every, ...``.
    log : bool
        Also log every number with ``pl_module.log_dict`` (to the trainer's logger).
    monitor_options :
        Passed to :class:`~deepcollapse.measure.monitor.DNCMonitor` (``layers``, ``plot_metrics``,
        ``tensorboard``, ``resume``) and on to the probe (``classifier``, ``passes``, ...).
    """

    def __init__(
        self,
        *,
        num_classes: int,
        train_loader: Iterable[Any],
        test_loader: Iterable[Any] | None = None,
        out: str | Path | None = None,
        every: int = 1,
        log: bool = True,
        **monitor_options: Any,
    ) -> None:
        if not HAVE_LIGHTNING:
            raise DeepCollapseError("DNCCallback needs PyTorch Lightning; pip install 'deepcollapse[lightning]'")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise DeepCollapseError(f"every must be an integer >= 1, got {every!r}")
        super().__init__()
        self.options = dict(
            num_classes=num_classes, train_loader=train_loader, test_loader=test_loader, out=out, **monitor_options
        )
        self.every, self.log = every, log
        self.monitor: DNCMonitor | None = None
        self.results: dict[str, dict[str, dict[str, float]]] = {}

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if self.monitor is None or self.monitor.probe.model is not pl_module:
            self.monitor = DNCMonitor(pl_module, **self.options)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        epoch = int(trainer.current_epoch)
        if epoch % self.every or self.monitor is None:
            return
        self.results = self.monitor.measure(epoch)
        if self.log:
            flat = flatten_results(self.results)
            pl_module.log_dict({f"dnc/{k}": float(v) for k, v in flat.items() if math.isfinite(v)}, on_epoch=True)
