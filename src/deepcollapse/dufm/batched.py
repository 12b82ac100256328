r"""Train many same-shaped DUFMs at once: stacked parameters and batched matmuls.

``B`` configurations that share ``(K, n_c, L, d_1..d_L)`` are stacked: ``H_1`` is ``(B, d_1, N)``, ``W_l``
is ``(B, d_{l+1}, d_l)``, and one :func:`torch.bmm` chain evaluates all B objectives,

.. math::

    \mathcal L_b = \frac1{2N}\|W_{L,b} H_{L,b} - Y\|_F^2 + \sum_l \frac{λ_{W_l,b}}2 \|W_{l,b}\|_F^2
        + \frac{λ_{H_1,b}}2 \|H_{1,b}\|_F^2 ,

each with its own λ's (the objective is :func:`deepcollapse.dufm.model.objective`, which broadcasts over
the batch). The configurations are independent, so ``∇_{θ_b} Σ_c \mathcal L_c = ∇ \mathcal L_b`` and plain
gradient descent ``θ_b ← θ_b - η_b ∇\mathcal L_b`` (per-config learning rate ``η_b``) runs them all in
one set of tensor operations; the gradient is written out by hand (a test holds it to autograd). Each
configuration stops on its own by the rules of :mod:`deepcollapse.dufm.stopping`, checked every
``check_every`` steps; a stopped configuration is frozen, and the batch is compacted once half of it has
stopped.

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
from deepcollapse.dufm.model import DUFM, DUFMConfig, fit_term, forward, label_matrix, objective, penalty
from deepcollapse.dufm.stopping import (
    DEFAULT_MAX_STEPS,
    STOP_REASONS,
    StopRules,
    calm_count,
    relative_grad_norm,
    stop_codes,
)

__all__ = [
    "BatchResult",
    "GDOptions",
    "batched_objective",
    "shape_key",
    "stack_init",
    "train_batched",
]

#: Deprecated name: :func:`deepcollapse.dufm.model.objective` broadcasts over the batch itself.
batched_objective = objective


@dataclass
class GDOptions(StopRules):
    """Plain GD settings for a batch: ``lr`` one value or one per configuration; the stopping rules
    (``tol_*``, ``patience``, budgets) are :class:`~deepcollapse.dufm.stopping.StopRules`, checked every
    ``check_every`` steps (``patience`` counts checks)."""

    lr: float | list[float] = 0.5  # η, the step size of θ ← θ - η ∇L
    max_steps: int = DEFAULT_MAX_STEPS["gd"]
    check_every: int = 10  # steps between checks of the stopping rules (the loss is computed there)

    def __post_init__(self) -> None:
        super().__post_init__()
        lrs = self.lr if isinstance(self.lr, list | tuple) else [self.lr]
        for i, v in enumerate(lrs):
            check_real(f"lr[{i}]" if len(lrs) > 1 else "lr", v, low=0.0, low_inclusive=False)
        self.max_steps = check_positive_int("max_steps", self.max_steps)
        self.check_every = check_positive_int("check_every", self.check_every)


@dataclass
class BatchResult:
    """The end of one configuration's run (parameters on the CPU, in the run's dtype).

    ``stop_reason`` is one of :data:`deepcollapse.dufm.stopping.STOP_REASONS`; ``grad_norm`` and
    ``rel_grad_norm`` (``||∇L||·||θ||/L``) certify the end point.
    """

    index: int  # position in the list given to train_batched
    config: DUFMConfig
    h1: Tensor
    weights: list[Tensor]
    loss: float
    fit: float
    reg: float
    grad_norm: float
    steps: int
    stop_reason: str
    seconds: float
    rel_grad_norm: float = math.nan
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


def _col(v: Tensor) -> Tensor:
    return v[:, None, None]


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


@dataclass
class _Batch:
    """The configurations still in the tensors: stacked parameters, per-row settings and counters."""

    params: list[Tensor]  # [H1 (B, d1, N), W_1 (B, d2, d1), ...]
    lam_h: Tensor  # (B,)
    lam_w: Tensor  # (B, L)
    lr: Tensor  # (B,)
    prev: Tensor  # (B,) loss at the previous check
    calm: Tensor  # (B,) consecutive calm checks
    active: Tensor  # (B,) bool: still running
    idx: list[int]  # row -> configuration index

    def lams(self) -> list[Tensor]:
        return [self.lam_h, *self.lam_w.unbind(1)]

    def keep(self, rows: Tensor) -> None:
        """Drop every row not in ``rows``."""
        self.params = [p[rows].contiguous() for p in self.params]
        for name in ("lam_h", "lam_w", "lr", "prev", "calm", "active"):
            setattr(self, name, getattr(self, name)[rows])
        self.idx = [self.idx[k] for k in rows.tolist()]


@dataclass
class _Eval:
    """Loss parts, gradients and the certificate of every row at one check."""

    grads: list[Tensor]
    fit: Tensor
    reg: Tensor
    grad_norm: Tensor
    param_norm: Tensor

    @property
    def total(self) -> Tensor:
        return self.fit + self.reg


def _evaluate(b: _Batch, y: Tensor) -> _Eval:
    """Explicit gradients of every stacked objective, the loss parts and ``||∇L||``, ``||θ||`` per row."""
    _, post, out = forward(b.params[0], b.params[1:])
    n = y.shape[-1]
    fit = fit_term(out, y)
    grads = _backward(b.params[1:], [b.params[0], *post], (out - y) / n)
    reg = torch.zeros_like(fit)
    sq_g, sq_p = torch.zeros_like(fit), torch.zeros_like(fit)
    for g, p, lam in zip(grads, b.params, b.lams(), strict=True):
        reg = reg + penalty(p, lam)
        g.addcmul_(p, _col(lam))
        sq_g += g.pow(2).sum((1, 2))
        sq_p += p.pow(2).sum((1, 2))
    return _Eval(grads, fit, reg, sq_g.sqrt(), sq_p.sqrt())


def _fused_step(b: _Batch, y: Tensor) -> None:
    """One in-place GD step without the loss: ``θ ← (1 - η λ) θ - η ∇fit``, ``η`` folded into ``δ``.

    Stopped rows have ``η = 0`` and stay where they are.
    """
    lr = b.lr * b.active.to(b.lr.dtype)
    _, post, out = forward(b.params[0], b.params[1:])
    grads = _backward(b.params[1:], [b.params[0], *post], out.sub_(y).mul_(_col(lr / y.shape[-1])))
    for g, p, lam in zip(grads, b.params, b.lams(), strict=True):
        p.mul_(_col(1 - lr * lam)).sub_(g)


def _gd_step(b: _Batch, grads: list[Tensor]) -> None:
    step = _col(b.lr * b.active.to(b.lr.dtype))
    for p, g in zip(b.params, grads, strict=True):
        p.sub_(step * g)


def _per_config(values: Any, count: int, name: str) -> list[float]:
    if isinstance(values, list | tuple):
        if len(values) != count:
            raise DeepCollapseError(f"{name} has {len(values)} values for {count} configurations")
        return [float(v) for v in values]
    return [float(values)] * count


def _start(
    configs: Sequence[DUFMConfig], opts: GDOptions, dtype: torch.dtype | None, device: str | torch.device
) -> tuple[_Batch, Tensor]:
    b = len(configs)
    h1, ws = stack_init(configs, dtype=dtype, device=device)
    dt = h1.dtype

    def vec(values: Any) -> Tensor:
        return torch.tensor(values, dtype=dt, device=device)

    batch = _Batch(
        params=[h1.contiguous(), *[w.contiguous() for w in ws]],
        lam_h=vec([c.lambda_h for c in configs]),
        lam_w=vec([c.lambdas_w for c in configs]),
        lr=vec(_per_config(opts.lr, b, "lr")),
        prev=torch.full((b,), math.nan, dtype=dt, device=device),
        calm=torch.zeros(b, dtype=torch.int64, device=device),
        active=torch.ones(b, dtype=torch.bool, device=device),
        idx=list(range(b)),
    )
    return batch, label_matrix(configs[0].counts, dtype=dt, device=device)


def train_batched(
    configs: Sequence[DUFMConfig],
    options: GDOptions | None = None,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    on_finish: Callable[[BatchResult], None] | None = None,
    history_every: int | None = None,
    compact_below: float = 0.5,
    lower_bounds: Sequence[float | None] | None = None,
) -> list[BatchResult]:
    """Plain full-batch GD on all ``configs`` (same shapes) at once; one :class:`BatchResult` each.

    ``on_finish`` is called as soon as a configuration stops (e.g. to append a result row); results
    are returned in the order of ``configs``. ``history_every`` records ``(step, loss)`` every so many
    steps. The batch is compacted when fewer than ``compact_below`` of its rows are still running.
    ``lower_bounds`` (one proven lower bound on the loss, or ``None``, per configuration) switches on the
    certified-gap rule.
    """
    opts = options or GDOptions()
    batch, y = _start(configs, opts, dtype, device)
    bounds = torch.tensor(
        [math.nan if v is None else v for v in _per_config_bounds(lower_bounds, len(configs))],
        dtype=y.dtype,
        device=y.device,
    )
    results: dict[int, BatchResult] = {}
    histories: dict[int, list[dict[str, float]]] = {i: [] for i in range(len(configs))}
    start = time.perf_counter()
    for step in range(opts.max_steps + 1):
        record = bool(history_every) and step % history_every == 0
        if not (step % opts.check_every == 0 or step == opts.max_steps or record):
            _fused_step(batch, y)
            continue
        ev = _evaluate(batch, y)
        if record:
            for row in batch.active.nonzero().flatten().tolist():
                histories[batch.idx[row]].append({"step": step, "loss": float(ev.total[row])})
        codes = _stop(batch, ev, opts, step=step, seconds=time.perf_counter() - start, bounds=bounds)
        for row in codes.nonzero().flatten().tolist():
            res = _result(batch, ev, row, configs, STOP_REASONS[int(codes[row]) - 1], step, start, histories)
            results[res.index] = res
            if on_finish is not None:
                on_finish(res)
        batch.active &= codes == 0
        if not bool(batch.active.any()):
            break
        _gd_step(batch, ev.grads)
        if int(batch.active.sum()) < compact_below * len(batch.idx):
            keep = batch.active.nonzero().flatten()
            bounds = bounds[keep]
            batch.keep(keep)
    return [results[i] for i in range(len(configs))]


def _per_config_bounds(values: Sequence[float | None] | None, count: int) -> list[float | None]:
    if values is None:
        return [None] * count
    if len(values) != count:
        raise DeepCollapseError(f"lower_bounds has {len(values)} values for {count} configurations")
    return list(values)


def _stop(b: _Batch, ev: _Eval, opts: GDOptions, *, step: int, seconds: float, bounds: Tensor) -> Tensor:
    """Stop codes of the running rows (0 for stopped ones and for those that go on)."""
    total = ev.total
    b.calm = calm_count(b.calm, total, b.prev, opts.tol_rel)
    b.prev = total
    codes = stop_codes(
        opts,
        loss=total,
        grad_norm=ev.grad_norm,
        param_norm=ev.param_norm,
        calm=b.calm,
        step=step,
        max_steps=opts.max_steps,
        seconds=seconds,
        lower_bound=bounds,
    )
    return torch.where(b.active, codes, torch.zeros_like(codes))


def _result(
    b: _Batch,
    ev: _Eval,
    row: int,
    configs: Sequence[DUFMConfig],
    reason: str,
    step: int,
    start: float,
    histories: dict[int, list[dict[str, float]]],
) -> BatchResult:
    i = b.idx[row]
    return BatchResult(
        index=i,
        config=configs[i],
        h1=b.params[0][row].detach().cpu().clone(),
        weights=[p[row].detach().cpu().clone() for p in b.params[1:]],
        loss=float(ev.total[row]),
        fit=float(ev.fit[row]),
        reg=float(ev.reg[row]),
        grad_norm=float(ev.grad_norm[row]),
        rel_grad_norm=float(relative_grad_norm(ev.grad_norm[row], ev.param_norm[row], ev.total[row])),
        steps=step,
        stop_reason=reason,
        seconds=time.perf_counter() - start,
        history=histories[i],
    )
