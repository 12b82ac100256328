r"""Training a backbone with a DUFM head on real data, with DNC measured every epoch (docs/real-networks.md).

The training loss is the DUFM objective in the paper's units, with the backbone's output ``H1`` in the
place of the free features, plus a separate weight decay on the backbone's parameters ``θ``:

.. math::

    \mathcal L = \frac1{2N}\|W_L H_L - Y\|_F^2 + \frac{λ_W}2 \sum_l \|W_l\|_F^2 + \frac{λ_{H1}}2 \|H_1\|_F^2
        + \frac{λ_B}2 \|θ\|^2 .

A mini-batch ``B`` of size ``b`` uses its unbiased estimate
``1/(2b) Σ_{i∈B} ||out_i - y_i||² + λ_W/2 Σ||W_l||² + λ_H1/2 (N/b) Σ_{i∈B} ||h1_i||² + λ_B/2 ||θ||²``
(:func:`loss_terms`); with ``b = N`` it *is* :func:`deepcollapse.dufm.objective` (plus the backbone
term), so the head can be compared with the DUFM optimum ``L_DNC`` for the same ``K``, ``n`` (training
samples per class) and λ's (:func:`compare_with_theory`). Cross-entropy replaces the fit term with
``--loss ce``.

Checkpoints (``checkpoint.pt``, written atomically after every epoch) hold the config, the model, the
optimizer, the epoch, the history and every RNG state (torch, CUDA, numpy, python, and the generator
that draws the data order), so a resumed run repeats an uninterrupted one exactly (bit for bit on the CPU;
on CUDA cuDNN is set to deterministic algorithms and the metrics are summed on the CPU). The learning rate
is a pure function of the step (:func:`lr_at`), so the schedule needs no state of its own.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from deepcollapse._validate import DeepCollapseError, DivergenceError, check_nonneg, check_positive_int, check_real
from deepcollapse.dufm.model import DUFMConfig, fit_term, forward, label_matrix, objective, penalty
from deepcollapse.files import prepare_out_dir, read_json, save_torch, write_csv, write_json
from deepcollapse.measure import metrics as M
from deepcollapse.nets.data import DataConfig, Dataset, load_dataset
from deepcollapse.nets.models import DUFMNet, NetConfig, build_net
from deepcollapse.theory import closed_form as theory
from deepcollapse.theory.analysis import analyze_solution

__all__ = [
    "BACKBONE_DEFAULTS",
    "LAYER_METRICS",
    "LOSSES",
    "OPTIMIZERS",
    "PRESETS",
    "SCHEDULES",
    "TrainConfig",
    "TrainResult",
    "collect_features",
    "compare_with_theory",
    "epoch_metrics",
    "fit_to_optimal",
    "layer_names",
    "load_summary",
    "loss_terms",
    "lr_at",
    "make_config",
    "train",
]

OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("cosine", "step", "constant")
LOSSES = ("mse", "ce")
CHECKPOINT = "checkpoint.pt"
# Fields that may differ between a checkpoint and the run resuming it.
_RESUMABLE = ("epochs", "device")


# Learning rate and warm-up of each backbone when the user gives none (SGD, momentum 0.9, batch 32). The
# batch-normalized backbones start with large features (an initial MSE of 3-8 with a He-initialized head),
# and at lr 0.05 without warm-up SGD diverged within five batches on digits for every head depth 1..5;
# lr 0.01 with one epoch of warm-up trained every depth tried (tests/test_train.py trains each default).
BACKBONE_DEFAULTS: dict[str, dict[str, float]] = {
    "mlp": {"lr": 0.05, "warmup_epochs": 0.0},
    "cnn": {"lr": 0.01, "warmup_epochs": 1.0},
    "resnet20": {"lr": 0.01, "warmup_epochs": 1.0},
}


@dataclass
class TrainConfig:
    """Everything that determines a run. Saved in ``config.json`` and in every checkpoint."""

    data: DataConfig = field(default_factory=DataConfig)
    net: NetConfig = field(default_factory=NetConfig)
    epochs: int = 200  # passes over the training set
    batch_size: int = 32
    optimizer: str = "sgd"  # sgd (with momentum) or adam
    lr: float | None = None  # peak learning rate; None = the backbone's (BACKBONE_DEFAULTS)
    momentum: float = 0.9  # SGD only
    schedule: str = "cosine"  # cosine (to 0), step (x0.1 at 50% and 75%), constant
    warmup_epochs: float | None = None  # linear warm-up over this many epochs (per step); None = the backbone's
    loss: str = "mse"  # mse (the DUFM's, default) or ce
    lambda_w: float = 5e-3  # λ_W: weight decay of every head layer, DUFM units
    lambda_h: float = 1e-4  # λ_H1: penalty on the backbone's output features, DUFM units
    backbone_wd: float = 5e-4  # λ_B: weight decay of the backbone's parameters
    measure_per_class: int | None = None  # training samples per class for the per-epoch metrics; None = all
    fit_optimal_epochs: int = 30  # the reverse experiment: epochs to fit a fresh backbone to the optimal H1
    seed: int = 0  # initialization and data order
    device: str = "cpu"  # cpu, cuda, cuda:N or auto

    def __post_init__(self) -> None:
        if isinstance(self.data, dict):
            self.data = DataConfig(**self.data)
        if isinstance(self.net, dict):
            self.net = NetConfig(**self.net)
        self.epochs = check_positive_int("epochs", self.epochs)
        self.batch_size = check_positive_int("batch_size", self.batch_size)
        for name, allowed in (("optimizer", OPTIMIZERS), ("schedule", SCHEDULES), ("loss", LOSSES)):
            if getattr(self, name) not in allowed:
                raise DeepCollapseError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        defaults = BACKBONE_DEFAULTS[self.net.backbone]
        self.lr = check_real("lr", defaults["lr"] if self.lr is None else self.lr, low=0.0, low_inclusive=False)
        self.momentum = check_real("momentum", self.momentum, low=0.0, high=0.999)
        warmup = defaults["warmup_epochs"] if self.warmup_epochs is None else self.warmup_epochs
        self.warmup_epochs = check_nonneg("warmup_epochs", warmup)
        self.lambda_w = check_nonneg("lambda_w", self.lambda_w)
        self.lambda_h = check_nonneg("lambda_h", self.lambda_h)
        self.backbone_wd = check_nonneg("backbone_wd", self.backbone_wd)
        if self.measure_per_class is not None:
            self.measure_per_class = check_positive_int("measure_per_class", self.measure_per_class)
        self.fit_optimal_epochs = check_positive_int("fit_optimal_epochs", self.fit_optimal_epochs, minimum=0)
        self.seed = int(self.seed)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# Presets: values for options the user did not give (explicit options win).
PRESETS: dict[str, dict[str, Any]] = {
    # Follow-up paper (Súkeník et al. 2024): ResNet20 + 4-layer MLP head on CIFAR-10 (needs a GPU and the
    # CIFAR-10 python batches: --data-dir).
    "paper-resnet20": {
        "dataset": "cifar10",
        "backbone": "resnet20",
        "head_layers": 4,
        "head_width": 64,
        "feature_dim": 64,
        "lambda_w": 5e-3,
        "backbone_wd": 5e-3,
        "lambda_h": 5e-6,
        "lr": 0.05,
        "batch_size": 128,
        "epochs": 200,
        "schedule": "cosine",
        "warmup_epochs": 5,
        "measure_per_class": 500,
        "fit_optimal_epochs": 30,
    },
    # About three minutes on a 2-core CPU: 500 training and 200 test samples per class, Adam (with SGD at this
    # size the CNN on Fashion-MNIST reached only ~88% training accuracy in 30 epochs, Adam ~98%).
    "cpu-quick": {
        "per_class": 500,
        "test_per_class": 200,
        "epochs": 60,
        "batch_size": 32,
        "optimizer": "adam",
        "lr": 2e-3,
        "fit_optimal_epochs": 30,
    },
}


@dataclass
class TrainResult:
    """What :func:`train` returns: the per-epoch history, the summary (as in ``summary.json``), the out dir."""

    history: list[dict[str, Any]]
    summary: dict[str, Any]
    out: Path | None
    stopped_early: bool = False


# ---------------------------------------------------------------- pure pieces


def lr_at(epoch: int, config: TrainConfig, *, step: int = 0, steps: int = 1) -> float:
    """Learning rate at mini-batch ``step`` (of ``steps``) of epoch ``epoch`` (0-based); ``t = epoch + step/steps``.

    cosine: ``lr · ½(1 + cos(π t/E))``; step: ``lr · 0.1^{#\\{m ∈ (⌊E/2⌋, ⌊3E/4⌋) : epoch ≥ m\\}}``;
    constant: ``lr``. A linear warm-up multiplies it by ``min(1, (epoch·steps + step + 1)/(warmup·steps))``.
    """
    E = config.epochs
    t = epoch + step / steps
    if config.schedule == "cosine":
        lr = config.lr * 0.5 * (1.0 + math.cos(math.pi * t / E))
    elif config.schedule == "step":
        lr = config.lr * 0.1 ** sum(epoch >= m for m in (E // 2, (3 * E) // 4))
    else:
        lr = config.lr
    if config.warmup_epochs > 0:
        lr *= min(1.0, (epoch * steps + step + 1) / (config.warmup_epochs * steps))
    return lr


def loss_terms(
    h1: Tensor,
    out: Tensor,
    labels: Tensor,
    head_weights: list[Tensor],
    backbone_params: list[Tensor],
    *,
    num_samples: int,
    lambda_w: float,
    lambda_h: float,
    backbone_wd: float = 0.0,
    loss: str = "mse",
) -> dict[str, Tensor]:
    """The mini-batch estimate of the DUFM training loss (module docstring); rows are samples.

    ``fit = 1/(2b) Σ_i ||out_i - e_{y_i}||²`` (``mse``) or the mean cross-entropy (``ce``);
    ``reg_w = λ_W/2 Σ_l ||W_l||²``; ``reg_h1 = λ_H1/2 · (N/b) Σ_i ||h1_i||²`` with ``N = num_samples``;
    ``reg_backbone = λ_B/2 Σ ||θ||²``; ``total`` their sum (pass the head's biases in ``head_weights`` to
    decay them too). With ``b = N`` and ``λ_B = 0`` this equals
    :func:`deepcollapse.dufm.objective` on ``(H1^T, W, Y)``.
    """
    b = out.shape[0]
    if loss == "mse":
        fit = fit_term(out.T, nn.functional.one_hot(labels, out.shape[1]).T.to(out.dtype))
    else:
        fit = nn.functional.cross_entropy(out, labels)
    zero = out.new_zeros(())
    reg_w = sum((penalty(w.reshape(1, -1), lambda_w) for w in head_weights), zero)
    reg_h1 = penalty(h1, lambda_h * num_samples / b)
    reg_b = sum((penalty(p.reshape(1, -1), backbone_wd) for p in backbone_params), zero) if backbone_wd else zero
    return {"total": fit + reg_w + reg_h1 + reg_b, "fit": fit, "reg_w": reg_w, "reg_h1": reg_h1, "reg_backbone": reg_b}


def layer_names(num_layers: int) -> list[str]:
    """Column suffixes of the measured layers: ``h1`` (backbone output), ``l2..lL`` (head), ``out``."""
    return ["h1", *[f"l{i}" for i in range(2, num_layers + 1)], "out"]


@torch.no_grad()
def collect_features(model: DUFMNet, x: Tensor, *, batch_size: int = 512) -> tuple[Tensor, list[Tensor], Tensor]:
    """``(H1, [H_2..H_L], out)`` over all of ``x`` in eval mode (rows are samples, float32, model's device)."""
    was = model.training
    model.eval()
    h1s, hid, outs = [], [], []
    for i in range(0, x.shape[0], batch_size):
        h1, hidden, out = model(x[i : i + batch_size])
        h1s.append(h1)
        hid.append(hidden)
        outs.append(out)
    model.train(was)
    hidden = [torch.cat([h[j] for h in hid]) for j in range(len(hid[0]))] if hid and hid[0] else []
    return torch.cat(h1s), hidden, torch.cat(outs)


#: The registry names (:data:`deepcollapse.measure.metrics.METRICS`) each layer row and ``history.csv`` carry.
LAYER_METRICS = ("nc1", "nc2_orth", "nc2_etf", "nc3_span", "ncc_accuracy", "nc4", "cdnv", "mean_norm")
assert set(LAYER_METRICS) <= set(M.METRICS)


def epoch_metrics(
    features: list[Tensor], labels: Tensor, num_classes: int, weights: list[Tensor]
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Per-layer DNC metrics of ``features = [H1, H_2..H_L, out]`` (rows are samples).

    Columns ``<metric>_<layer>`` (layers from :func:`layer_names`), with the names of
    :data:`deepcollapse.measure.metrics.METRICS` (:data:`LAYER_METRICS`): ``nc1`` (tr(Σ_W Σ_B⁺)/K), ``nc2_orth``
    (orthogonal-frame distance of the uncentred means, the DUFM's target after a ReLU and at the output),
    ``nc2_etf`` (simplex-ETF distance of the centred means), ``nc3_span`` (fraction of ``W_l`` outside the span
    of layer l's class means; none at ``out``), ``ncc_accuracy`` (nearest-class-centre accuracy), ``nc4``
    (Papyan's NC4: the fraction of samples whose nearest class mean at that layer differs from the network's
    prediction, the argmax of ``out``), ``cdnv``, ``mean_norm`` (mean class-mean norm). Also returns one dict
    per layer.
    """
    names = layer_names(len(weights))
    flat: dict[str, float] = {}
    rows = []
    labels = labels.cpu()
    predictions = features[-1].detach().cpu().argmax(1)
    for name, h, w in zip(names, features, [*weights, None], strict=True):
        # on the CPU: deterministic sums
        stats = M.class_stats(h.detach().cpu(), labels, num_classes, predictions=predictions)
        m = M.dnc_metrics(stats, weight=None if w is None else w.detach().cpu())
        row = {"layer": name, **{k: m.get(k) for k in LAYER_METRICS}}
        rows.append(row)
        for k, v in row.items():
            if k != "layer" and v is not None:
                flat[f"{k}_{name}"] = v
    return flat, rows


def _dufm_config(config: TrainConfig, *, num_classes: int, n: int) -> DUFMConfig:
    net = config.net
    widths = [net.feature_dim] + [net.head_width] * (net.head_layers - 1)
    return DUFMConfig(
        num_classes=num_classes,
        n_per_class=n,
        num_layers=net.head_layers,
        width=widths,
        lambda_h=config.lambda_h,
        lambda_w=config.lambda_w,
    )


def compare_with_theory(
    h1: Tensor, head_weights: list[Tensor], labels: Tensor, config: TrainConfig, *, num_classes: int
) -> dict[str, Any]:
    """The head on the learned features against the DUFM optimum for the same K, n and λ's.

    ``h1`` holds the features of the *whole* training set (rows, sorted by class, n per class). Returns the
    one solution record of :func:`deepcollapse.theory.analysis.analyze_solution` on ``(H1^T, W)`` -- the
    DUFM objective ``loss`` against ``dnc_loss`` = L_DNC and their relative ``gap``, the output scale, per-layer
    norms, NC1 and orthogonal-frame errors, class-mean ranks and spectra, the ``verdict`` -- plus per layer
    the alignment ``nc3_span`` of ``W_l`` with layer l's class means (``metrics.nc3_span``), ``n``, the λ's and
    ``ratio`` (``loss / L_DNC``).
    """
    if config.net.head_bias:
        return {"skipped": "the head has biases; the DUFM (and its theory) has none"}
    counts = torch.bincount(labels.cpu(), minlength=num_classes)
    if len(set(counts.tolist())) != 1 or not bool((labels.cpu().diff() >= 0).all()):
        raise DeepCollapseError("the theory comparison needs balanced training classes sorted by class")
    n = int(counts[0])
    cfg = _dufm_config(config, num_classes=num_classes, n=n)
    h = h1.detach().to(torch.float64).cpu().T
    ws = [w.detach().to(torch.float64).cpu() for w in head_weights]
    result = analyze_solution(h, ws, cfg)
    with torch.no_grad():
        _, post, _ = forward(h, ws)
    for entry, feat, w in zip(result["layers"], [h, *post], ws, strict=True):
        entry["nc3_span"] = M.nc3_span(w, M.class_stats(feat.T, labels.cpu(), num_classes, ncc=False))
    note = (
        "K = 2: L_DNC is the global optimum of the DUFM"
        if num_classes == 2
        else "K > 2: L_DNC is the best DNC configuration; lower-rank solutions can beat it (the follow-up)"
    )
    result.update(num_classes=num_classes, n=n, num_layers=cfg.num_layers, lambda_h=config.lambda_h,
                  lambda_w=config.lambda_w, ratio=result["ratio_dnc"], note=note)  # fmt: skip
    return result


def run_epoch(
    batch_loss: Callable[[Tensor, Tensor], tuple[dict[str, Tensor], int]],
    optimizer: torch.optim.Optimizer,
    x: Tensor,
    y: Tensor,
    *,
    config: TrainConfig,
    epoch: int,
    generator: torch.Generator,
    on_batch: Callable[[], None] | None = None,
) -> tuple[dict[str, float], int, float]:
    """One pass of mini-batch training -- the one training loop of this module.

    The samples are visited in the order of ``torch.randperm(len(y), generator=generator)``, in batches of
    ``config.batch_size``; batch ``b`` sets the learning rate to ``lr_at(epoch, config, step=b, steps)``,
    computes ``terms, correct = batch_loss(x_b, y_b)`` and takes one optimizer step on ``terms["total"]``.
    Returns the sample-weighted sums of the terms, the summed ``correct`` and the last learning rate. A
    non-finite loss raises :class:`DivergenceError` ("the loss became ... at epoch e, batch b").
    """
    n = len(y)
    steps = math.ceil(n / config.batch_size)
    perm = torch.randperm(n, generator=generator).to(x.device)
    sums: dict[str, float] = {}
    correct, lr = 0, config.lr
    for b, i in enumerate(range(0, n, config.batch_size)):
        idx = perm[i : i + config.batch_size]
        lr = lr_at(epoch, config, step=b, steps=steps)
        for g in optimizer.param_groups:
            g["lr"] = lr
        terms, right = batch_loss(x[idx], y[idx])
        if not torch.isfinite(terms["total"]):
            raise DivergenceError(f"the loss became {terms['total'].item()} at epoch {epoch + 1}, batch {b + 1}")
        optimizer.zero_grad(set_to_none=True)
        terms["total"].backward()
        optimizer.step()
        for key, v in terms.items():
            sums[key] = sums.get(key, 0.0) + v.item() * len(idx)
        correct += right
        if on_batch is not None:
            on_batch()
    return sums, correct, lr


def _optimal_target(data: Dataset, config: TrainConfig) -> tuple[Tensor, list[Tensor], DUFMConfig] | str:
    """The optimal H1 class means (K, d1), the optimal head and its DUFM config, or why there is none."""
    k = data.num_classes
    cfg = _dufm_config(config, num_classes=k, n=data.n_per_class)
    try:
        h_star, w_star = theory.optimal_parameters(cfg)
    except DeepCollapseError as e:  # e.g. a width below K, or a λ of 0: no unique optimum to fit
        return f"no explicit DUFM optimum to fit: {e}"
    means = M.class_stats(h_star.T, data.y_train, k, ncc=False).means.to(torch.float32)
    if float(means.abs().max()) == 0.0:
        return "the DUFM optimum is all zeros for these λ's (past the zero threshold)"
    return means, [w.double().cpu() for w in w_star], cfg


def fit_to_optimal(
    data: Dataset,
    config: TrainConfig,
    *,
    device: torch.device,
    epochs: int,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """The reverse experiment: fit a fresh backbone to the optimal DUFM features.

    Target ``H1*`` from :func:`deepcollapse.theory.optimal_parameters` (class means ``t e_c``); the backbone
    (seed + 1) minimizes ``1/(2b) Σ_i ||f(x_i) - h*_{y_i}||²`` (:func:`deepcollapse.dufm.model.fit_term`)
    with Adam (lr 1e-3, cosine) and no weight decay (the target's scale ``t`` is small, so a decay would bias
    the fit more than it regularizes), by :func:`run_epoch`. Reports the relative errors
    ``||H1 - H1*||_F / ||H1*||_F`` on the training and test sets, the DUFM objective of the fitted ``H1``
    under the optimal head (against L_DNC), and that head's accuracies.
    """
    target = _optimal_target(data, config)
    if isinstance(target, str):
        return {"skipped": target}
    means, ws, cfg = target
    torch.manual_seed(config.seed + 1)
    backbone = build_net(config.net, input_shape=data.input_shape, num_classes=data.num_classes).backbone.to(device)
    fit_config = replace(config, optimizer="adam", lr=1e-3, schedule="cosine", warmup_epochs=0.0, epochs=epochs)
    opt = torch.optim.Adam(backbone.parameters(), lr=fit_config.lr)
    goal = means.to(device)
    gen = torch.Generator().manual_seed(config.seed + 1)

    def batch_loss(xb: Tensor, yb: Tensor) -> tuple[dict[str, Tensor], int]:
        return {"total": fit_term(backbone(xb).T, goal[yb].T)}, 0

    backbone.train()
    x, y = data.x_train.to(device), data.y_train.to(device)
    for epoch in range(epochs):
        try:
            run_epoch(batch_loss, opt, x, y, config=fit_config, epoch=epoch, generator=gen)
        except DivergenceError as e:
            raise DivergenceError(f"fitting the backbone to the optimal H1 diverged: {e}") from None
        if progress is not None:
            progress(epoch + 1)
    return _fit_report(backbone, data, means, ws, cfg, device=device, epochs=epochs)


@torch.no_grad()
def _fit_report(
    backbone: nn.Module, data: Dataset, means: Tensor, ws: list[Tensor], cfg: DUFMConfig, *, device: torch.device,
    epochs: int,
) -> dict[str, Any]:  # fmt: skip
    """Errors of the fitted features, their DUFM objective under the optimal head, that head's accuracies."""
    backbone.eval()
    target = means.double()

    def features(xs: Tensor) -> Tensor:
        return torch.cat([backbone(xs[i : i + 512].to(device)) for i in range(0, len(xs), 512)]).double().cpu()

    def rel_err(h1: Tensor, ys: Tensor) -> float:
        return float(torch.linalg.matrix_norm(h1 - target[ys]) / torch.linalg.matrix_norm(target[ys]))

    def acc(h1: Tensor, ys: Tensor) -> float:
        return float((forward(h1.T, ws)[2].argmax(0) == ys).double().mean())

    h_tr, h_te = features(data.x_train), features(data.x_test)
    y_mat = label_matrix([data.n_per_class] * data.num_classes)
    total, fit, reg = objective(h_tr.T, ws, y_mat, cfg.lambda_h, cfg.lambdas_w)
    dnc = theory.dnc_loss(num_classes=cfg.num_classes, num_layers=cfg.num_layers, n=cfg.n, lambda_h=cfg.lambda_h,
                          lambda_w=cfg.lambdas_w)  # fmt: skip
    return {
        "epochs": epochs,
        "rel_error_train": rel_err(h_tr, data.y_train),
        "rel_error_test": rel_err(h_te, data.y_test),
        "loss": float(total),
        "fit": float(fit),
        "reg": float(reg),
        "dnc_loss": dnc,
        "gap": (float(total) - dnc) / dnc if dnc > 0 else None,
        "train_accuracy": acc(h_tr, data.y_train),
        "test_accuracy": acc(h_te, data.y_test),
        "target_mean_norm": float(means.norm(dim=1).mean()),
    }


# ---------------------------------------------------------------- state


def _rng_state(gen: torch.Generator) -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "name": np_state[0],
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached": float(np_state[4]),
        },
        "python": random.getstate(),
        "data": gen.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any], gen: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    npst = state["numpy"]
    np.random.set_state(
        (npst["name"], npst["keys"].numpy().astype(np.uint32), npst["pos"], npst["has_gauss"], npst["cached"])
    )
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    gen.set_state(state["data"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _config_diff(saved: dict[str, Any], current: dict[str, Any], prefix: str = "") -> list[str]:
    diffs = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += _config_diff(a, b, f"{prefix}{key}.")
        elif a != b and not (prefix == "" and key in _RESUMABLE):
            diffs.append(f"{prefix}{key}: {a!r} in the checkpoint, {b!r} now")
    return diffs


def _load_checkpoint(path: Path, config: TrainConfig) -> dict[str, Any]:
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)  # RNG states must stay on the CPU
    except Exception as e:
        raise DeepCollapseError(
            f"cannot read checkpoint {path}: {type(e).__name__}: {str(e).splitlines()[0]}"
        ) from None
    if not isinstance(ck, dict) or "config" not in ck or "model" not in ck:
        raise DeepCollapseError(f"{path} is not a deepcollapse training checkpoint")
    diffs = _config_diff(ck["config"], config.to_dict())
    if diffs:
        raise DeepCollapseError(
            f"--resume: {path} comes from a different configuration ({'; '.join(diffs[:3])}"
            f"{' ...' if len(diffs) > 3 else ''}); use the same options or another --out"
        )
    saved_epochs = ck["config"]["epochs"]
    if saved_epochs != config.epochs and config.schedule != "constant":
        raise DeepCollapseError(
            f"--resume: the checkpoint was made with --epochs {saved_epochs} and --schedule {config.schedule},"
            f" whose learning rates depend on the number of epochs; resume with --epochs {saved_epochs}"
        )
    return ck


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DeepCollapseError(f"device {device!r}: CUDA is not available on this machine")
    try:
        return torch.device(device)
    except RuntimeError:
        raise DeepCollapseError(f"device must be cpu, cuda, cuda:N or auto, got {device!r}") from None


def _measure_indices(labels: Tensor, num_classes: int, per_class: int | None) -> Tensor:
    """The first ``per_class`` samples of every class: a fixed subset of the training set for the metrics."""
    if per_class is None:
        return torch.arange(len(labels))
    return torch.cat([torch.nonzero(labels == c).flatten()[:per_class] for c in range(num_classes)])


# ---------------------------------------------------------------- the loop


def train(
    config: TrainConfig,
    out: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    stop_after: int | None = None,
    progress: bool = False,
    data: Dataset | None = None,
    log: Callable[[str], None] | None = None,
    num_threads: int | None = None,
) -> TrainResult:
    """Train ``config``'s network on its data, measuring DNC every epoch; write results to ``out``.

    Writes ``config.json``, ``checkpoint.pt`` and ``history.csv`` after every epoch, and at the end
    ``summary.json`` and the plots ``metrics.png`` (``nc1``, ``nc2_orth``, ``nc3_span`` per layer against
    epochs) and ``loss.png`` (the head's DUFM objective against L_DNC). ``resume`` continues from
    ``out/checkpoint.pt`` (its config must match, except ``epochs`` under a constant schedule, and
    ``device``). ``stop_after`` stops after that many epochs in total, as a killed run would (no summary).
    ``data`` overrides loading. A NaN loss raises :class:`DivergenceError`; the last good checkpoint is kept.
    ``num_threads`` sets torch's CPU threads for the run (1 avoids OpenMP contention on small or shared CPUs); it is
    not part of the config.
    """
    kwargs = {"resume": resume, "overwrite": overwrite, "stop_after": stop_after, "progress": progress, "data": data}
    if num_threads is None:
        return _train(config, out, log=log, **kwargs)
    before = torch.get_num_threads()
    torch.set_num_threads(check_positive_int("num_threads", num_threads))
    try:
        return _train(config, out, log=log, **kwargs)
    finally:
        torch.set_num_threads(before)


def _train(
    config: TrainConfig,
    out: str | Path,
    *,
    resume: bool,
    overwrite: bool,
    stop_after: int | None,
    progress: bool,
    data: Dataset | None,
    log: Callable[[str], None] | None,
) -> TrainResult:
    out = prepare_out_dir(out, overwrite=overwrite, resume=resume)
    device = _resolve_device(config.device)
    data = data if data is not None else load_dataset(config.data)
    model, optimizer, gen = _setup(config, data, device)
    history, start = _restore(out, config, model, optimizer, gen, resume=resume, say=log or (lambda _m: None))
    write_json(out / "config.json", {**config.to_dict(), "dataset": data.describe()})
    end = config.epochs if stop_after is None else min(config.epochs, stop_after)
    bar = _progress(progress)
    steps = math.ceil(len(data.y_train) / config.batch_size)
    task = bar.add_task("training", total=(end - start) * steps) if bar is not None else None
    try:
        for epoch in range(start, end):
            row = _train_epoch(model, optimizer, data, config, epoch, gen, device,
                               on_batch=None if bar is None else lambda: bar.advance(task))  # fmt: skip
            row["time_s"] = (history[-1]["time_s"] if history else 0.0) + row.pop("seconds")
            history.append(row)
            _save_epoch(out, config, epoch, model, optimizer, history, gen)
            if bar is not None:
                bar.update(task, description=_bar_text(row, config))
    finally:
        if bar is not None:
            bar.stop()
    if end < config.epochs:
        return TrainResult(history, {}, out, stopped_early=True)
    return TrainResult(history, _finish(model, data, config, history, out, device), out)


def _setup(config: TrainConfig, data: Dataset, device: torch.device) -> tuple[DUFMNet, Any, torch.Generator]:
    """The seeded network, its optimizer and the generator of the data order."""
    if device.type == "cuda":  # repeatable convolutions, so a resumed run follows the same path
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    torch.manual_seed(config.seed)
    np.random.seed(config.seed % 2**32)
    random.seed(config.seed)
    model = build_net(config.net, input_shape=data.input_shape, num_classes=data.num_classes).to(device)
    if config.optimizer == "sgd":
        optimizer: Any = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum)
    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    return model, optimizer, torch.Generator().manual_seed(config.seed)


def _restore(
    out: Path, config: TrainConfig, model: DUFMNet, optimizer: Any, gen: torch.Generator, *, resume: bool,
    say: Callable[[str], None],
) -> tuple[list[dict[str, Any]], int]:  # fmt: skip
    """``(history, first epoch)`` from ``out/checkpoint.pt`` when resuming (model, optimizer, RNGs restored)."""
    ck_path = out / CHECKPOINT
    if not resume:
        return [], 0
    if not ck_path.exists():
        say(f"nothing to resume in {out}: starting a new run")
        return [], 0
    ck = _load_checkpoint(ck_path, config)
    try:
        model.load_state_dict(ck["model"])
        optimizer.load_state_dict(ck["optimizer"])
    except (RuntimeError, ValueError, KeyError) as e:
        raise DeepCollapseError(f"--resume: {ck_path} does not fit this model: {str(e).splitlines()[0]}") from None
    _set_rng_state(ck["rng"], gen)
    say(f"resuming {out} after epoch {int(ck['epoch'])}")
    return list(ck["history"]), int(ck["epoch"])


def _train_epoch(
    model: DUFMNet, optimizer: Any, data: Dataset, config: TrainConfig, epoch: int, gen: torch.Generator,
    device: torch.device, *, on_batch: Callable[[], None] | None,
) -> dict[str, Any]:  # fmt: skip
    """One epoch of :func:`run_epoch` on the DUFM training loss (:func:`loss_terms`), then its history row."""
    t0 = time.perf_counter()
    n_train = len(data.y_train)
    head = model.head.parameters() if config.net.head_bias else model.head.weights()
    head, backbone = list(head), list(model.backbone.parameters())

    def batch_loss(xb: Tensor, yb: Tensor) -> tuple[dict[str, Tensor], int]:
        h1, _, out_b = model(xb)
        terms = loss_terms(h1, out_b, yb, head, backbone, num_samples=n_train, lambda_w=config.lambda_w,
                           lambda_h=config.lambda_h, backbone_wd=config.backbone_wd, loss=config.loss)  # fmt: skip
        return terms, int((out_b.argmax(1) == yb).sum())

    model.train()
    x_tr, y_tr = data.x_train.to(device), data.y_train.to(device)
    try:
        sums, correct, lr = run_epoch(batch_loss, optimizer, x_tr, y_tr, config=config, epoch=epoch, generator=gen,
                                      on_batch=on_batch)  # fmt: skip
    except DivergenceError as e:
        kept = f"; the last good checkpoint (epoch {epoch}) is kept" if epoch > 0 else ""
        raise DivergenceError(f"{e}{kept}; lower --lr or the λ's") from None
    row = _epoch_row(model, config, epoch, lr, sums, correct, data, device)
    row["seconds"] = time.perf_counter() - t0
    return row


def _save_epoch(
    out: Path, config: TrainConfig, epoch: int, model: DUFMNet, optimizer: Any, history: list[dict[str, Any]],
    gen: torch.Generator,
) -> None:  # fmt: skip
    """``checkpoint.pt`` (everything a resume needs) and ``history.csv`` after an epoch, atomically."""
    ckpt = {"format": 1, "config": config.to_dict(), "epoch": epoch + 1, "model": model.state_dict(),
            "optimizer": optimizer.state_dict(), "history": history, "rng": _rng_state(gen)}  # fmt: skip
    save_torch(out / CHECKPOINT, ckpt)
    write_csv(out / "history.csv", history)


def _bar_text(row: dict[str, Any], config: TrainConfig) -> str:
    last = layer_names(config.net.head_layers)[-2]
    return (
        f"epoch {row['epoch']}/{config.epochs} loss {row['loss']:.4f} train {row['train_acc']:.3f} "
        f"test {row['test_acc']:.3f} nc1_{last} {row.get('nc1_' + last, 0):.2e}"
    )


def _progress(enabled: bool) -> Any:
    if not enabled:
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    bar.start()
    return bar


def _epoch_row(
    model: DUFMNet,
    config: TrainConfig,
    epoch: int,
    lr: float,
    sums: dict[str, float],
    correct: int,
    data: Dataset,
    device: torch.device,
) -> dict[str, Any]:
    """One line of ``history.csv``: epoch averages of the loss parts, accuracies, DUFM estimate, metrics."""
    k, n_train = data.num_classes, len(data.y_train)
    x_tr, y_tr = data.x_train.to(device), data.y_train.to(device)
    x_te, y_te = data.x_test.to(device), data.y_test.to(device)
    m_idx = _measure_indices(data.y_train, k, config.measure_per_class).to(device)
    row: dict[str, Any] = {"epoch": epoch + 1, "lr": lr}
    for key in ("total", "fit", "reg_w", "reg_h1", "reg_backbone"):
        row["loss" if key == "total" else key] = sums[key] / n_train
    row["reg"] = row["reg_w"] + row["reg_h1"] + row["reg_backbone"]
    row["train_acc_running"] = correct / n_train
    h1, hidden, out = collect_features(model, x_tr[m_idx], batch_size=max(512, config.batch_size))
    y_m = y_tr[m_idx]
    row["train_acc"] = float((out.argmax(1) == y_m).float().mean())
    _, _, out_te = collect_features(model, x_te, batch_size=max(512, config.batch_size))
    row["test_acc"] = float((out_te.argmax(1) == y_te).float().mean())
    with torch.no_grad():
        est = loss_terms(
            h1.double(), out.double(), y_m, [w.double() for w in model.head.weights()], [],
            num_samples=n_train, lambda_w=config.lambda_w, lambda_h=config.lambda_h,
        )  # fmt: skip
    row["dufm_loss"] = float(est["total"])
    row["dufm_fit"] = float(est["fit"])
    row["dufm_reg"] = float(est["reg_w"] + est["reg_h1"])
    flat, _ = epoch_metrics([h1, *hidden, out], y_m, k, model.head.weights())
    row.update(flat)
    return row


def _finish(
    model: DUFMNet,
    data: Dataset,
    config: TrainConfig,
    history: list[dict[str, Any]],
    out: Path,
    device: torch.device,
) -> dict[str, Any]:
    """Final measurements on the whole training set, the theory comparison, plots and ``summary.json``."""
    from deepcollapse.plots import plot_loss, plot_metric_curves

    k = data.num_classes
    h1, hidden, outp = collect_features(model, data.x_train.to(device))
    y = data.y_train.to(device)
    _, _, out_te = collect_features(model, data.x_test.to(device))
    _, layers = epoch_metrics([h1, *hidden, outp], y, k, model.head.weights())
    theory_block = compare_with_theory(h1, model.head.weights(), data.y_train, config, num_classes=k)
    fit_block: dict[str, Any] | None = None
    if config.fit_optimal_epochs > 0 and not config.net.head_bias:
        fit_block = fit_to_optimal(data, config, device=device, epochs=config.fit_optimal_epochs)
    names = layer_names(config.net.head_layers)
    first, last = history[0], history[-1]
    summary = {
        "dataset": data.describe(),
        "epochs": len(history),
        "train_accuracy": float((outp.argmax(1) == y).float().mean()),
        "test_accuracy": float((out_te.argmax(1) == data.y_test.to(device)).float().mean()),
        "final_loss": last["loss"],
        "time_s": last.get("time_s"),
        "layers": layers,
        "nc1_first_epoch": {nm: first.get(f"nc1_{nm}") for nm in names},
        "nc1_last_epoch": {nm: last.get(f"nc1_{nm}") for nm in names},
        "theory": theory_block,
        "fit_optimal": fit_block,
        "config": config.to_dict(),
    }
    write_json(out / "summary.json", summary)
    plot_metric_curves(
        history, out / "metrics.png", metrics=("nc1", "nc2_orth", "nc3_span"), layer_keys=names, x="epoch",
        title=f"{data.name} K={k}: DNC metrics per layer",
    )  # fmt: skip
    loss_rows = [
        {"epoch": r["epoch"], "loss": r["dufm_loss"], "fit": r["dufm_fit"], "reg": r["dufm_reg"]} for r in history
    ]
    dnc = theory_block.get("dnc_loss") if isinstance(theory_block, dict) else None
    plot_loss(loss_rows, out / "loss.png", x="epoch", optimum=dnc or None, title="head: DUFM objective")
    return summary


def load_summary(out: str | Path) -> dict[str, Any]:
    """``summary.json`` of a finished run."""
    return read_json(Path(out) / "summary.json")


# Where each option lives: the data config, the network config, or the training config itself.
_DATA_KEYS = {"dataset": "name", "data_dir": "root", "classes": "classes", "per_class": "per_class",
              "test_per_class": "test_per_class", "test_fraction": "test_fraction"}  # fmt: skip
_NET_KEYS = (
    "backbone",
    "feature_dim",
    "head_layers",
    "head_width",
    "head_bias",
    "mlp_width",
    "mlp_depth",
    "cnn_channels",
)


def make_config(options: dict[str, Any], *, preset: str | None = None) -> TrainConfig:
    """A :class:`TrainConfig` from flat options (CLI names, ``None`` = not given) over a preset's values.

    Precedence: explicit option > preset (:data:`PRESETS`) > the dataclass defaults. ``seed`` also seeds
    the data draw.
    """
    if preset is not None and preset not in PRESETS:
        raise DeepCollapseError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    merged = dict(PRESETS.get(preset, {})) if preset else {}
    merged.update({k: v for k, v in options.items() if v is not None})
    known = set(_DATA_KEYS) | set(_NET_KEYS) | {f for f in TrainConfig.__dataclass_fields__ if f not in ("data", "net")}
    unknown = sorted(set(merged) - known)
    if unknown:
        raise DeepCollapseError(f"unknown option(s) {unknown}")
    data = {_DATA_KEYS[k]: v for k, v in merged.items() if k in _DATA_KEYS}
    if "seed" in merged:
        data["seed"] = merged["seed"]
    net = {k: v for k, v in merged.items() if k in _NET_KEYS}
    rest = {k: v for k, v in merged.items() if k not in _DATA_KEYS and k not in _NET_KEYS}
    return TrainConfig(data=DataConfig(**data), net=NetConfig(**net), **rest)
