r"""Train many same-shaped DUFMs at once: stacked parameters and batched matmuls.

``B`` configurations that share ``(K, n_c, L, d_1..d_L)`` are stacked: ``H_1`` is ``(B, d_1, N)``, ``W_l``
is ``(B, d_{l+1}, d_l)``, and one :func:`torch.bmm` chain evaluates all B objectives,

.. math::

    \mathcal L_b = \frac1{2N}\|W_{L,b} H_{L,b} - Y\|_F^2 + \sum_l \frac{λ_{W_l,b}}2 \|W_{l,b}\|_F^2
        + \frac{λ_{H_1,b}}2 \|H_{1,b}\|_F^2 ,

each with its own λ's. The configurations are independent, so ``∇_{θ_b} Σ_c \mathcal L_c = ∇ \mathcal L_b``
and plain gradient descent ``θ_b ← θ_b - η_b ∇\mathcal L_b`` (per-config learning rate ``η_b``) runs
them all in one set of tensor operations. Each configuration stops on its own criterion (gradient norm,
relative loss change over ``patience`` steps, divergence, ``max_steps``); a stopped configuration is
frozen, and the batch is compacted once half of it has stopped.

Initialization equals :class:`deepcollapse.dufm.DUFM` for the same seed (drawn on the CPU in float64, in
the order ``H_1, W_1..W_L``), so a configuration trained here follows the same trajectory as plain
full-batch GD on ``DUFM(config)``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from deepcollapse._validate import DeepCollapseError, check_positive_int, check_real
from deepcollapse.dufm.model import DUFM, DUFMConfig, label_matrix

__all__ = [
    "BatchResult",
    "GDOptions",
    "batched_objective",
    "shape_key",
    "stack_init",
    "train_batched",
]


@dataclass
class GDOptions:
    """Per-configuration plain GD settings (one value, or one per configuration for ``lr``)."""

    lr: float | list[float] = 0.5  # η, the step size of θ ← θ - η ∇L
    max_steps: int = 20000
    tol_grad: float = 1e-9  # stop when ||∇L||_2 <= tol_grad
    tol_rel: float = 1e-12  # stop when |ΔL|/L <= tol_rel on `patience` consecutive checks
    patience: int = 50
    check_every: int = 10  # steps between checks of the stopping rules (the loss is computed there)

    def __post_init__(self) -> None:
        lrs = self.lr if isinstance(self.lr, list | tuple) else [self.lr]
        for i, v in enumerate(lrs):
            check_real(f"lr[{i}]" if len(lrs) > 1 else "lr", v, low=0.0, low_inclusive=False)
        self.max_steps = check_positive_int("max_steps", self.max_steps)
        self.tol_grad = check_real("tol_grad", self.tol_grad, low=0.0)
        self.tol_rel = check_real("tol_rel", self.tol_rel, low=0.0)
        self.patience = check_positive_int("patience", self.patience)
        self.check_every = check_positive_int("check_every", self.check_every)


@dataclass
class BatchResult:
    """The end of one configuration's run (parameters on the CPU, in the run's dtype)."""

    index: int  # position in the list given to train_batched
    config: DUFMConfig
    h1: Tensor
    weights: list[Tensor]
    loss: float
    fit: float
    reg: float
    grad_norm: float
    steps: int
    stop_reason: str  # "grad" | "rel" | "max_steps" | "diverged"
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)


def shape_key(config: DUFMConfig) -> tuple:
    """Configurations with equal keys can share a batch: ``(K, counts, L, widths, dtype)``."""
    return (config.num_classes, tuple(config.counts), config.num_layers, tuple(config.widths), config.dtype)


def stack_init(
    configs: Sequence[DUFMConfig], *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
) -> tuple[Tensor, list[Tensor]]:
    """Stacked initial parameters ``(H1 (B, d1, N), [W_l (B, d_{l+1}, d_l)])``, each as ``DUFM(config)``."""
    if not configs:
        raise DeepCollapseError("configs is empty")
    keys = {shape_key(c) for c in configs}
    if len(keys) > 1:
        raise DeepCollapseError(f"configurations in one batch must share shapes, got {len(keys)} different ones")
    dtype = dtype or configs[0].torch_dtype
    models = [DUFM(DUFMConfig(**{**c.to_dict(), "dtype": "float64", "device": "cpu"})) for c in configs]
    h1 = torch.stack([m.h1.detach() for m in models]).to(device=device, dtype=dtype)
    ws = [
        torch.stack([m.weights[i].detach() for m in models]).to(device=device, dtype=dtype)
        for i in range(configs[0].num_layers)
    ]
    return h1, ws


def batched_objective(
    h1: Tensor, weights: Sequence[Tensor], y: Tensor, lambda_h: Tensor, lambdas_w: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """``(total, fit, reg)``, each ``(B,)``: the DUFM objective of every stacked configuration.

    ``lambda_h`` is ``(B,)`` and ``lambdas_w`` is ``(B, L)``; ``y`` is the shared ``(K, N)`` one-hot.
    """
    h = h1
    for w in weights[:-1]:
        h = torch.relu(torch.matmul(w, h))
    out = torch.matmul(weights[-1], h)
    fit = (out - y).pow(2).sum((1, 2)) / (2 * y.shape[1])
    reg = 0.5 * lambda_h * h1.pow(2).sum((1, 2))
    for i, w in enumerate(weights):
        reg = reg + 0.5 * lambdas_w[:, i] * w.pow(2).sum((1, 2))
    return fit + reg, fit, reg


def _col(v: Tensor) -> Tensor:
    return v[:, None, None]


def _forward(h1: Tensor, weights: Sequence[Tensor]) -> tuple[list[Tensor], Tensor]:
    """``[H_1, H_2, …, H_L]`` and the output ``W_L H_L``, batched."""
    hs = [h1]
    for w in weights[:-1]:
        hs.append(torch.matmul(w, hs[-1]).relu_())
    return hs, torch.matmul(weights[-1], hs[-1])


def _backward(weights: Sequence[Tensor], hs: Sequence[Tensor], delta: Tensor) -> list[Tensor]:
    """Back-propagate ``delta = ∂fit/∂out`` (possibly pre-scaled): ``[∂/∂H_1, ∂/∂W_1, …, ∂/∂W_L]`` of the fit.

    ``∂/∂W_l = δ_{l+1} H_l^T``, ``δ_l = (W_l^T δ_{l+1}) ⊙ 1[H_l > 0]`` (no ReLU on ``H_1``).
    """
    grads: list[Tensor] = []
    for i in reversed(range(len(weights))):
        grads.append(torch.matmul(delta, hs[i].mT))
        back = torch.matmul(weights[i].mT, delta)
        delta = torch.ops.aten.threshold_backward(back, hs[i], 0) if i > 0 else back
    grads.append(delta)
    return grads[::-1]


def _gradients(
    h1: Tensor, weights: Sequence[Tensor], y: Tensor, lambda_h: Tensor, lambdas_w: Tensor
) -> tuple[list[Tensor], Tensor, Tensor, Tensor]:
    """Explicit gradients of every stacked objective, and ``(fit, reg, ||∇||_2)`` per configuration."""
    hs, out = _forward(h1, weights)
    resid = out.sub_(y)
    n = y.shape[1]
    fit = resid.pow(2).sum((1, 2)) / (2 * n)
    grads = _backward(weights, hs, resid.div_(n))
    lams = [lambda_h, *lambdas_w.unbind(1)]
    reg = torch.zeros_like(fit)
    sq = torch.zeros_like(fit)
    for g, p, lam in zip(grads, [h1, *weights], lams, strict=True):
        reg += 0.5 * lam * p.pow(2).sum((1, 2))
        g.addcmul_(p, _col(lam))
        sq += g.pow(2).sum((1, 2))
    return grads, fit, reg, sq.sqrt()


def _fused_step(h1: Tensor, weights: list[Tensor], y: Tensor, lambda_h: Tensor, lambdas_w: Tensor, lr: Tensor) -> None:
    """One in-place GD step without the loss: ``θ ← (1 - η λ) θ - η ∇fit``, ``η`` folded into ``δ``."""
    hs, out = _forward(h1, weights)
    grads = _backward(weights, hs, out.sub_(y).mul_(_col(lr / y.shape[1])))
    lams = [lambda_h, *lambdas_w.unbind(1)]
    for g, p, lam in zip(grads, [h1, *weights], lams, strict=True):
        p.mul_(_col(1 - lr * lam)).sub_(g)


def _per_config(values: Any, count: int, name: str) -> list[float]:
    if isinstance(values, list | tuple):
        if len(values) != count:
            raise DeepCollapseError(f"{name} has {len(values)} values for {count} configurations")
        return [float(v) for v in values]
    return [float(values)] * count


def train_batched(
    configs: Sequence[DUFMConfig],
    options: GDOptions | None = None,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    on_finish: Callable[[BatchResult], None] | None = None,
    history_every: int | None = None,
    compact_below: float = 0.5,
) -> list[BatchResult]:
    """Plain full-batch GD on all ``configs`` (same shapes) at once; one :class:`BatchResult` each.

    ``on_finish`` is called as soon as a configuration stops (e.g. to append a result row); results
    are returned in the order of ``configs``. ``history_every`` records ``(step, loss)`` every so many
    steps. The batch is compacted when fewer than ``compact_below`` of its rows are still running.
    """
    opts = options or GDOptions()
    b = len(configs)
    h1, ws = stack_init(configs, dtype=dtype, device=device)
    dt = h1.dtype
    cfg0 = configs[0]
    y = label_matrix(cfg0.counts, dtype=dt, device=device)
    lam_h = torch.tensor([c.lambda_h for c in configs], dtype=dt, device=device)
    lam_w = torch.tensor([c.lambdas_w for c in configs], dtype=dt, device=device)
    lr = torch.tensor(_per_config(opts.lr, b, "lr"), dtype=dt, device=device)
    idx = list(range(b))  # batch row -> configuration index
    params = [h1.contiguous(), *[w.contiguous() for w in ws]]
    prev = torch.full((b,), math.nan, dtype=dt, device=device)
    calm = torch.zeros(b, dtype=torch.int64, device=device)
    results: dict[int, BatchResult] = {}
    histories: dict[int, list[dict[str, float]]] = {i: [] for i in range(b)}
    start = time.perf_counter()
    active = torch.ones(b, dtype=torch.bool, device=device)

    def finish(row: int, reason: str, step: int, total: Tensor, fit: Tensor, reg: Tensor, gnorm: Tensor) -> None:
        i = idx[row]
        res = BatchResult(
            index=i,
            config=configs[i],
            h1=params[0][row].detach().cpu().clone(),
            weights=[p[row].detach().cpu().clone() for p in params[1:]],
            loss=float(total[row]),
            fit=float(fit[row]),
            reg=float(reg[row]),
            grad_norm=float(gnorm[row]),
            steps=step,
            stop_reason=reason,
            seconds=time.perf_counter() - start,
            history=histories[i],
        )
        results[i] = res
        if on_finish is not None:
            on_finish(res)

    for step in range(opts.max_steps + 1):
        record = bool(history_every) and step % history_every == 0
        if not (step % opts.check_every == 0 or step == opts.max_steps or record):
            _fused_step(params[0], params[1:], y, lam_h, lam_w, lr * active.to(dt))
            continue
        grads, fit, reg, gnorm = _gradients(params[0], params[1:], y, lam_h, lam_w)
        total = fit + reg
        if record:
            for row in active.nonzero().flatten().tolist():
                histories[idx[row]].append({"step": step, "loss": float(total[row])})
        rel = (total - prev).abs() / total.abs().clamp_min(1e-300)
        calm = torch.where(rel <= opts.tol_rel, calm + 1, torch.zeros_like(calm))
        prev = total
        diverged = ~torch.isfinite(total) | ~torch.isfinite(gnorm)
        by_grad = gnorm <= opts.tol_grad
        by_rel = calm >= opts.patience
        at_max = torch.full_like(active, step == opts.max_steps)
        stop = active & (diverged | by_grad | by_rel | at_max)
        if bool(stop.any()):
            for row in stop.nonzero().flatten().tolist():
                reason = (
                    "diverged" if diverged[row] else "grad" if by_grad[row] else "rel" if by_rel[row] else "max_steps"
                )
                finish(row, reason, step, total, fit, reg, gnorm)
            active = active & ~stop
        if not bool(active.any()):
            break
        step_size = _col(lr * active.to(dt))
        for p, g in zip(params, grads, strict=True):
            p.sub_(step_size * g)
        if int(active.sum()) < compact_below * len(idx):
            keep = active.nonzero().flatten()
            params = [p[keep].contiguous() for p in params]
            lam_h, lam_w, lr, prev, calm = lam_h[keep], lam_w[keep], lr[keep], prev[keep], calm[keep]
            idx = [idx[k] for k in keep.tolist()]
            active = active[keep]
    return [results[i] for i in range(b)]
