"""Full-batch solvers for the DUFM objective.

``gd`` is the paper's plain full-batch gradient descent, ``θ ← θ - η ∇L(θ)``, written out by hand.
Faster routes to the same optimum: ``lbfgs`` (``torch.optim.LBFGS`` with a strong-Wolfe line search,
several inner iterations per step; the default), ``nesterov`` (SGD with Nesterov momentum) and ``adam``.

Two details make L-BFGS reliable on the DUFM. (1) torch's L-BFGS drops curvature pairs with
``y^T s <= 1e-10`` (an absolute threshold), which near a small optimum discards every pair; the solver
therefore minimizes ``lbfgs_scale · L`` (same minimizers). (2) ReLU kinks can stall the line search
(some optima sit where pre-activations are exactly 0); a step that does not lower the loss restarts
L-BFGS from a fresh memory.

A run stops at the first of: gradient norm ``||∇L||_2 <= tol_grad``; relative loss change
``|L_t - L_{t-1}| / L_t <= tol_rel`` on ``patience`` consecutive steps; ``max_steps``; a non-finite
loss (:class:`~deepcollapse._validate.DivergenceError`, raised after the history is kept on the result).
The history holds the loss parts and, at log-spaced steps, the per-layer DNC metrics.

A checkpoint (:func:`save_checkpoint`) is the whole solver state -- parameters, optimizer state, step,
history, stopping counters -- so a resumed run continues exactly where an unbroken one would be.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from deepcollapse._validate import DeepCollapseError, DivergenceError, check_positive_int, check_real
from deepcollapse.dufm.model import DUFM, DUFMConfig, layer_metrics
from deepcollapse.files import save_torch

__all__ = [
    "OPTIMIZERS",
    "SolveResult",
    "SolverConfig",
    "flat_metrics",
    "load_checkpoint",
    "save_checkpoint",
    "solve",
]

OPTIMIZERS = ("gd", "lbfgs", "nesterov", "adam")
SMALL_PROBLEM = 200_000  # parameters; below this a CPU solve runs on one thread
DEFAULT_LR = {"gd": 0.5, "lbfgs": 1.0, "nesterov": 0.1, "adam": 1e-3}


@dataclass
class SolverConfig:
    """How to minimize the DUFM objective."""

    optimizer: str = "lbfgs"  # gd (the paper's), lbfgs, nesterov, adam
    lr: float | None = None  # None: gd 0.5, lbfgs 1.0, nesterov 0.1, adam 1e-3
    max_steps: int = 5000  # outer steps (an lbfgs step runs up to `lbfgs_iters` iterations)
    tol_grad: float = 1e-10  # stop when ||grad||_2 <= tol_grad
    tol_rel: float = 1e-15  # stop when |ΔL|/L <= tol_rel on `patience` consecutive steps
    patience: int = 20
    momentum: float = 0.9  # nesterov only
    lbfgs_iters: int = 20  # inner iterations per lbfgs step
    lbfgs_history: int = 100
    lbfgs_scale: float = 1e4  # the objective is multiplied by this inside L-BFGS (see module doc)
    history_points: int = 60  # log-spaced steps at which per-layer metrics are recorded
    metrics: bool = True  # record per-layer metrics in the history
    target_loss: float | None = None  # also stop once the loss is <= target_loss (benchmarks)
    max_seconds: float | None = None  # also stop after this much solver time

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise DeepCollapseError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.lr is None:
            self.lr = DEFAULT_LR[self.optimizer]
        self.lr = check_real("lr", self.lr, low=0.0, low_inclusive=False)
        self.max_steps = check_positive_int("max_steps", self.max_steps)
        self.tol_grad = check_real("tol_grad", self.tol_grad, low=0.0)
        self.tol_rel = check_real("tol_rel", self.tol_rel, low=0.0)
        self.patience = check_positive_int("patience", self.patience)
        self.momentum = check_real("momentum", self.momentum, low=0.0, high=1.0)
        self.lbfgs_iters = check_positive_int("lbfgs_iters", self.lbfgs_iters)
        self.lbfgs_history = check_positive_int("lbfgs_history", self.lbfgs_history)
        self.lbfgs_scale = check_real("lbfgs_scale", self.lbfgs_scale, low=0.0, low_inclusive=False)
        self.history_points = check_positive_int("history_points", self.history_points)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class SolveResult:
    """What a run produced. ``history`` rows are JSON/CSV-ready dicts."""

    model: DUFM
    history: list[dict[str, Any]]
    steps: int
    evaluations: int
    seconds: float
    stop_reason: str
    loss: float
    fit: float
    reg: float
    grad_norm: float
    layers: list[dict[str, Any]] = field(default_factory=list)


def log_steps(max_steps: int, points: int) -> set[int]:
    """About ``points`` integer steps spaced evenly in log scale over ``0..max_steps`` (0 and 1 included)."""
    out = {0, 1, max_steps}
    if max_steps > 1:
        for i in range(points):
            out.add(round(math.exp(math.log(max_steps) * i / max(points - 1, 1))))
    return out


def flat_metrics(layers: list[dict[str, Any]]) -> dict[str, float]:
    """Per-layer metrics as flat columns: ``nc1_l1``, ``nc2_l2``, ``nc3_l2``, ``nc1_pre2``, ``rank_pre2``...

    ``nc2`` is the orthogonal-frame distance (the DUFM's target after a ReLU, layers >= 2); H1's means
    have no fixed frame, so layer 1 has ``nc2etf_l1`` only.
    """
    row: dict[str, float] = {}
    for e in layers:
        l = e["layer"]
        if e["stage"] == "pre":
            row[f"nc1_pre{l}"] = e["nc1"]
            row[f"rank_pre{l}"] = e["rank"]
            continue
        row[f"nc1_l{l}"] = e["nc1"]
        if e["stage"] == "post":
            row[f"nc2_l{l}"] = e["nc2_orth"]
        else:
            row[f"nc2etf_l{l}"] = e["nc2_etf"]
        if "nc3_span" in e:
            row[f"nc3_l{l}"] = e["nc3_span"]
        row[f"rank_l{l}"] = e["rank"]
    return row


def _make_optimizer(params: list[torch.Tensor], cfg: SolverConfig) -> torch.optim.Optimizer | None:
    if cfg.optimizer == "gd":
        return None
    if cfg.optimizer == "nesterov":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=True)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr)
    return torch.optim.LBFGS(
        params,
        lr=cfg.lr,
        max_iter=cfg.lbfgs_iters,
        history_size=cfg.lbfgs_history,
        line_search_fn="strong_wolfe",
        tolerance_grad=0.0,
        tolerance_change=0.0,
    )


@dataclass
class _State:
    step: int = 0
    evaluations: int = 0
    seconds: float = 0.0
    calm: int = 0  # consecutive steps with a tiny relative change
    prev_loss: float | None = None
    history: list[dict[str, Any]] = field(default_factory=list)


def solve(
    model: DUFM,
    config: SolverConfig | None = None,
    *,
    dnc_loss: float | None = None,
    progress: bool = False,
    callback: Callable[[dict[str, Any]], None] | None = None,
    checkpoint: str | Path | None = None,
    checkpoint_every: float = 30.0,
    resume_state: dict[str, Any] | None = None,
) -> SolveResult:
    """Minimize the DUFM objective of ``model`` in place.

    Parameters
    ----------
    model : the DUFM; its parameters are updated in place.
    config : solver settings (default :class:`SolverConfig`).
    dnc_loss : the theory's optimum; when given, history rows carry the relative ``gap``.
    progress : show a progress bar (rich).
    callback : called with each history row as it is recorded.
    checkpoint : path of a checkpoint written every ``checkpoint_every`` seconds and at the end.
    resume_state : a dict from :func:`load_checkpoint` to continue from.

    Small CPU problems (under ``SMALL_PROBLEM`` parameters) run with one intra-op thread, restored after.

    Raises
    ------
    DivergenceError : the loss became NaN or inf; ``err.result`` holds the run so far.
    """
    cfg = config or SolverConfig()
    params = [model.h1, *model.weights]
    small = model.h1.device.type == "cpu" and sum(p.numel() for p in params) < SMALL_PROBLEM
    threads = torch.get_num_threads()
    if small:  # intra-op threads only add overhead (and contention) on matrices this small
        torch.set_num_threads(1)
    try:
        return _solve(model, cfg, params, dnc_loss, progress, callback, checkpoint, checkpoint_every, resume_state)
    finally:
        torch.set_num_threads(threads)


def _solve(
    model: DUFM,
    cfg: SolverConfig,
    params: list[torch.Tensor],
    dnc_loss: float | None,
    progress: bool,
    callback: Callable[[dict[str, Any]], None] | None,
    checkpoint: str | Path | None,
    checkpoint_every: float,
    resume_state: dict[str, Any] | None,
) -> SolveResult:
    opt = _make_optimizer(params, cfg)
    st = _State()
    if resume_state is not None:
        _restore(model, opt, st, resume_state)
    marks = log_steps(cfg.max_steps, cfg.history_points)
    labels, K = model.labels, model.config.num_classes

    def closure() -> torch.Tensor:
        for p in params:
            p.grad = None
        total = model.loss()[0] * cfg.lbfgs_scale
        total.backward()
        st.evaluations += 1
        return total

    def grads() -> tuple[float, float, float, float]:
        for p in params:
            p.grad = None
        total, fit, reg = model.loss()
        total.backward()
        st.evaluations += 1
        total, fit, reg = total.detach(), fit.detach(), reg.detach()
        gn = math.sqrt(sum(float(p.grad.detach().pow(2).sum()) for p in params))
        return float(total), float(fit), float(reg), gn

    def record(loss: float, fit: float, reg: float, gn: float, with_metrics: bool) -> dict[str, Any]:
        row: dict[str, Any] = {
            "step": st.step,
            "evaluations": st.evaluations,
            "seconds": round(st.seconds, 6),
            "loss": loss,
            "fit": fit,
            "reg": reg,
            "grad_norm": gn,
        }
        if dnc_loss is not None and dnc_loss > 0:
            row["gap"] = (loss - dnc_loss) / dnc_loss
        if with_metrics and cfg.metrics and math.isfinite(loss):
            row.update(flat_metrics(layer_metrics(model.h1, list(model.weights), labels, K)))
        if st.history and st.history[-1]["step"] == st.step:
            st.history[-1] = row  # a resumed run re-evaluates the step it was saved at
        else:
            st.history.append(row)
        if callback is not None:
            callback(row)
        return row

    bar = _Progress(cfg.max_steps, enabled=progress, start=st.step)
    last_ckpt = time.perf_counter()
    stop_reason = "max_steps"
    loss = fit = reg = gn = float("nan")
    in_step = False
    boundary = (st.evaluations, len(st.history), st.calm, st.prev_loss, st.seconds)
    try:
        while True:
            t0 = time.perf_counter()
            loss, fit, reg, gn = grads()
            st.seconds += time.perf_counter() - t0
            if not math.isfinite(loss) or not math.isfinite(gn):
                stop_reason = "diverged"
                record(loss, fit, reg, gn, False)
                break
            rel = abs(loss - st.prev_loss) / max(abs(loss), 1e-300) if st.prev_loss is not None else math.inf
            st.calm = st.calm + 1 if rel <= cfg.tol_rel else 0
            if isinstance(opt, torch.optim.LBFGS) and st.prev_loss is not None and loss >= st.prev_loss:
                opt = _make_optimizer(params, cfg)  # stalled at a kink: restart with a fresh memory
            st.prev_loss = loss
            if gn <= cfg.tol_grad:
                stop_reason = "tol_grad"
            elif st.calm >= cfg.patience:
                stop_reason = "tol_rel"
            elif cfg.target_loss is not None and loss <= cfg.target_loss:
                stop_reason = "target_loss"
            elif cfg.max_seconds is not None and st.seconds >= cfg.max_seconds:
                stop_reason = "max_seconds"
            elif st.step >= cfg.max_steps:
                stop_reason = "max_steps"
            else:
                stop_reason = ""
            if stop_reason or st.step in marks:
                record(loss, fit, reg, gn, True)
            if stop_reason:
                break
            t0 = time.perf_counter()
            in_step = True
            _step(params, opt, cfg, closure)
            st.step += 1
            in_step = False
            st.seconds += time.perf_counter() - t0
            boundary = (st.evaluations, len(st.history), st.calm, st.prev_loss, st.seconds)
            bar.update(st.step, loss, row_gap=(loss - dnc_loss) / dnc_loss if dnc_loss else None)
            if checkpoint is not None and time.perf_counter() - last_ckpt >= checkpoint_every:
                save_checkpoint(checkpoint, model, opt, st, cfg)
                last_ckpt = time.perf_counter()
    except KeyboardInterrupt:
        # Keep the state of the last step boundary so that --resume continues exactly. An interrupt
        # inside an optimizer step leaves the parameters half-updated: then the last periodic
        # checkpoint stays as it is.
        if checkpoint is not None and not in_step:
            st.evaluations, n_rows, st.calm, st.prev_loss, st.seconds = boundary
            del st.history[n_rows:]
            save_checkpoint(checkpoint, model, opt, st, cfg)
        raise
    finally:
        bar.close()
    if checkpoint is not None and stop_reason != "diverged":  # never overwrite a good state with NaNs
        save_checkpoint(checkpoint, model, opt, st, cfg)
    layers = layer_metrics(model.h1, list(model.weights), labels, K) if math.isfinite(loss) else []
    result = SolveResult(
        model=model,
        history=st.history,
        steps=st.step,
        evaluations=st.evaluations,
        seconds=st.seconds,
        stop_reason=stop_reason,
        loss=loss,
        fit=fit,
        reg=reg,
        grad_norm=gn,
        layers=layers,
    )
    if stop_reason == "diverged":
        err = DivergenceError(
            f"the loss became {loss} at step {st.step} ({cfg.optimizer}, lr={cfg.lr}); try a smaller --lr"
        )
        err.result = result  # type: ignore[attr-defined]
        raise err
    return result


def _step(
    params: list[torch.Tensor],
    opt: torch.optim.Optimizer | None,
    cfg: SolverConfig,
    closure: Callable[[], torch.Tensor],
) -> None:
    if opt is None:  # plain gradient descent, the gradients are those of grads()
        with torch.no_grad():
            for p in params:
                p.sub_(p.grad, alpha=cfg.lr)
    elif isinstance(opt, torch.optim.LBFGS):
        opt.step(closure)
    else:
        opt.step()


class _Progress:
    """A rich progress bar over solver steps (a no-op when disabled)."""

    def __init__(self, total: int, *, enabled: bool, start: int = 0) -> None:
        self.enabled = enabled
        self.last = 0.0
        if not enabled:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(
            TextColumn("[bold]DUFM"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            transient=True,
        )
        self.task = self.progress.add_task("solve", total=total, completed=start, info="")
        self.progress.start()

    def update(self, step: int, loss: float, *, row_gap: float | None) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if now - self.last < 0.1:
            return
        self.last = now
        info = f"loss {loss:.8g}" + (f"  gap {row_gap:.2e}" if row_gap is not None else "")
        self.progress.update(self.task, completed=step, info=info)

    def close(self) -> None:
        if self.enabled:
            self.progress.stop()


def save_checkpoint(
    path: str | Path, model: DUFM, opt: torch.optim.Optimizer | None, st: _State, cfg: SolverConfig
) -> None:
    """Atomically save the whole solver state (see :func:`load_checkpoint`)."""
    save_torch(
        path,
        {
            "dufm_config": model.config.to_dict(),
            "solver_config": cfg.to_dict(),
            "model": model.state_dict(),
            "optimizer": None if opt is None else opt.state_dict(),
            "state": asdict(st),
        },
    )


def load_checkpoint(path: str | Path, dufm_config: DUFMConfig, solver_config: SolverConfig) -> dict[str, Any]:
    """Load a checkpoint and check that it belongs to the same configuration."""
    path = Path(path)
    if not path.exists():
        raise DeepCollapseError(f"nothing to resume: no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file
        raise DeepCollapseError(f"cannot read checkpoint {path}: {e}") from None
    mine = dufm_config.to_dict()
    theirs = ckpt.get("dufm_config", {})
    diff = sorted(k for k in set(mine) | set(theirs) if k != "device" and mine.get(k) != theirs.get(k))
    sdiff = sorted(
        k
        for k in ("optimizer", "lr", "momentum", "lbfgs_iters", "lbfgs_history")
        if solver_config.to_dict().get(k) != ckpt.get("solver_config", {}).get(k)
    )
    if diff or sdiff:
        raise DeepCollapseError(
            f"checkpoint {path} is from a different configuration (differs in: {', '.join(diff + sdiff)})"
        )
    return ckpt


def _restore(model: DUFM, opt: torch.optim.Optimizer | None, st: _State, ckpt: dict[str, Any]) -> None:
    model.load_state_dict(ckpt["model"])
    if opt is not None and ckpt.get("optimizer") is not None:
        opt.load_state_dict(ckpt["optimizer"])
    for k, v in ckpt["state"].items():
        setattr(st, k, v)
