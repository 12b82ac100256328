r"""When a DUFM solve is done: the stopping rules and their one vocabulary.

Every solver (:func:`deepcollapse.dufm.solve.solve`, :func:`deepcollapse.dufm.batched.train_batched`, and the
batched multi-start solvers) checks the same rules, in this order of priority, and reports the first that holds
as its ``stop_reason``:

``"diverged"``
    the loss or the gradient norm is NaN or infinite.
``"gap"``
    a certified gap: ``(L - L_*) / |L_*| <= tol_gap``, where ``L_*`` is a *proven* lower bound on the loss
    (``L_DNC`` when K = 2 or L = 1, the cases where the DNC optimum is proven global). Only checked when
    the caller passes such a bound.
``"stationary"``
    the relative gradient norm :math:`\|\nabla L\|\,\|θ\| / L \le` ``tol_grad`` (θ all parameters). It is
    the first-order relative change of the loss under a relative change of the parameters, so it does not
    depend on the units of the loss or of the parameters; at the zero solution (θ = 0) it is 0.
``"stalled"``
    the relative loss change ``|L_t - L_{t-1}| / |L_t| <= tol_rel`` on ``patience`` consecutive checks.
``"target_loss"``, ``"max_seconds"``, ``"max_steps"``
    budgets: the loss is at most ``target_loss``; the solver time reached ``max_seconds``; the step
    counter reached ``max_steps``.

The rules are pure functions of tensors with any leading batch shape, so one configuration and a batch of
many are stopped by the same code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from deepcollapse._validate import check_positive_int, check_real

__all__ = [
    "DEFAULT_MAX_STEPS",
    "STOP_REASONS",
    "StopRules",
    "calm_count",
    "relative_gap",
    "relative_grad_norm",
    "stop_codes",
]

#: The stop reasons in order of priority; code ``i + 1`` of :func:`stop_codes` is ``STOP_REASONS[i]``.
STOP_REASONS = ("diverged", "gap", "stationary", "stalled", "target_loss", "max_seconds", "max_steps")

#: Default step budgets per optimizer (an L-BFGS step runs up to ``lbfgs_iters`` inner iterations).
DEFAULT_MAX_STEPS = {"gd": 100_000, "lbfgs": 2_000, "nesterov": 50_000, "adam": 50_000}

_TINY = 1e-300


@dataclass
class StopRules:
    """The stopping rules shared by every solver (module docstring); ``None`` switches a budget off."""

    tol_gap: float = 1e-9  # stop when (L - L_*)/|L_*| <= tol_gap, L_* a proven lower bound (if given)
    tol_grad: float = 1e-5  # stop when ||∇L||·||θ|| / L <= tol_grad (relative gradient norm)
    tol_rel: float = 1e-13  # stall: |ΔL|/|L| <= tol_rel ...
    patience: int = 20  # ... on this many consecutive checks
    target_loss: float | None = None  # stop once L <= target_loss (benchmarks)
    max_seconds: float | None = None  # stop after this much solver time

    def __post_init__(self) -> None:
        self.tol_gap = check_real("tol_gap", self.tol_gap, low=0.0)
        self.tol_grad = check_real("tol_grad", self.tol_grad, low=0.0)
        self.tol_rel = check_real("tol_rel", self.tol_rel, low=0.0)
        self.patience = check_positive_int("patience", self.patience)
        if self.target_loss is not None:
            self.target_loss = check_real("target_loss", self.target_loss)
        if self.max_seconds is not None:
            self.max_seconds = check_real("max_seconds", self.max_seconds, low=0.0)


def relative_grad_norm(grad_norm: Tensor, param_norm: Tensor, loss: Tensor) -> Tensor:
    """``||∇L|| · ||θ|| / |L|`` (``|L|`` floored at 1e-300): the certificate of the ``"stationary"`` rule."""
    return grad_norm * param_norm / loss.abs().clamp_min(_TINY)


def relative_gap(loss: Tensor | float, reference: Tensor | float) -> Tensor:
    """``(L - L_ref) / |L_ref|``, the one gap convention of the package (``L - L_ref`` when ``L_ref = 0``).

    With ``L_ref = L_DNC`` it is the gap reported by the solvers and by the solution record; with a proven
    lower bound it is the certificate of the ``"gap"`` rule.
    """
    loss = torch.as_tensor(loss, dtype=torch.float64) if not isinstance(loss, Tensor) else loss
    lb = torch.as_tensor(reference, dtype=loss.dtype, device=loss.device)
    return (loss - lb) / torch.where(lb == 0, torch.ones_like(lb), lb.abs())


def calm_count(calm: Tensor, loss: Tensor, prev_loss: Tensor, tol_rel: float) -> Tensor:
    """Consecutive checks with ``|L - L_prev| / |L| <= tol_rel``: ``calm + 1`` where it holds, else 0.

    A NaN ``prev_loss`` (the first check) resets the count.
    """
    rel = (loss - prev_loss).abs() / loss.abs().clamp_min(_TINY)
    return torch.where(rel <= tol_rel, calm + 1, torch.zeros_like(calm))


def stop_codes(
    rules: StopRules,
    *,
    loss: Tensor,
    grad_norm: Tensor,
    param_norm: Tensor,
    calm: Tensor,
    step: int,
    max_steps: int,
    seconds: float = 0.0,
    lower_bound: Tensor | float | None = None,
) -> Tensor:
    """Which rule stops each configuration: 0 for none, else ``1 + STOP_REASONS.index(reason)``.

    ``loss``, ``grad_norm``, ``param_norm`` and ``calm`` share one shape (``()`` for one run, ``(B,)`` for a
    batch); ``calm`` comes from :func:`calm_count`. The first rule in the order of :data:`STOP_REASONS`
    that holds wins.
    """
    holds = [
        ~torch.isfinite(loss) | ~torch.isfinite(grad_norm),
        _false(loss) if lower_bound is None else relative_gap(loss, lower_bound) <= rules.tol_gap,
        relative_grad_norm(grad_norm, param_norm, loss) <= rules.tol_grad,
        calm >= rules.patience,
        _false(loss) if rules.target_loss is None else loss <= rules.target_loss,
        _false(loss) | (rules.max_seconds is not None and seconds >= rules.max_seconds),
        _false(loss) | (step >= max_steps),
    ]
    codes = torch.zeros(loss.shape, dtype=torch.int64, device=loss.device)
    for code in range(len(holds), 0, -1):  # lowest code last, so that it wins
        codes = torch.where(holds[code - 1], torch.full_like(codes, code), codes)
    return codes


def _false(like: Tensor) -> Tensor:
    return torch.zeros(like.shape, dtype=torch.bool, device=like.device)
