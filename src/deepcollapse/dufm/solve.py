"""Full-batch solvers for the DUFM objective.

``gd`` is the paper's plain full-batch gradient descent, ``θ ← θ - η ∇L(θ)``, written out by hand.
Faster routes to the same optimum: ``lbfgs`` (``torch.optim.LBFGS`` with a strong-Wolfe line search,
several inner iterations per step; the default), ``nesterov`` (SGD with Nesterov momentum) and ``adam``.

Two details make L-BFGS reliable on the DUFM. (1) torch's L-BFGS drops curvature pairs with
``y^T s <= 1e-10`` (an absolute threshold), which near a small optimum discards every pair; the solver
therefore minimizes ``lbfgs_scale · L`` (same minimizers). (2) ReLU kinks can stall the line search
(some optima sit where pre-activations are exactly 0); a step that does not lower the loss restarts
L-BFGS from a fresh memory.

A run stops by the rules of :mod:`deepcollapse.dufm.stopping`, checked before every step: divergence, a
certified gap (when a proven lower bound is passed), stationarity (relative gradient norm), a stall,
and the budgets. The result carries the certificate: the gradient norm, the relative gradient norm and,
when ``dnc_loss`` is given, the gap. A diverged run raises
:class:`~deepcollapse._validate.DivergenceError` after the history is kept on the result. The history holds
the loss parts and, at log-spaced steps, the per-layer DNC metrics.

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
from deepcollapse.dufm.stopping import (
    DEFAULT_MAX_STEPS,
    STOP_REASONS,
    StopRules,
    calm_count,
    relative_gap,
    relative_grad_norm,
    stop_codes,
)
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
class SolverConfig(StopRules):
    """How to minimize the DUFM objective; the stopping rules (``tol_*``, ``patience``, budgets) are
    :class:`~deepcollapse.dufm.stopping.StopRules`."""

    optimizer: str = "lbfgs"  # gd (the paper's), lbfgs, nesterov, adam
    lr: float | None = None  # None: DEFAULT_LR[optimizer]
    max_steps: int | None = None  # outer steps; None: DEFAULT_MAX_STEPS[optimizer]
    momentum: float = 0.9  # nesterov only
    lbfgs_iters: int = 10  # inner iterations per lbfgs step (the stopping rules are checked between steps)
    lbfgs_history: int = 50  # curvature pairs kept (the two-loop recursion dominates the cost of a step)
    lbfgs_scale: float = 1e4  # the objective is multiplied by this inside L-BFGS (see module doc)
    history_points: int = 60  # log-spaced steps at which per-layer metrics are recorded
    metrics: bool = True  # record per-layer metrics in the history

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.optimizer not in OPTIMIZERS:
            raise DeepCollapseError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.lr is None:
            self.lr = DEFAULT_LR[self.optimizer]
        self.lr = _positive("lr", self.lr)
        if self.max_steps is None:
            self.max_steps = DEFAULT_MAX_STEPS[self.optimizer]
        self.max_steps = check_positive_int("max_steps", self.max_steps)
        self.momentum = check_real("momentum", self.momentum, low=0.0, high=1.0)
        self.lbfgs_iters = check_positive_int("lbfgs_iters", self.lbfgs_iters)
        self.lbfgs_history = check_positive_int("lbfgs_history", self.lbfgs_history)
        self.lbfgs_scale = _positive("lbfgs_scale", self.lbfgs_scale)
        self.history_points = check_positive_int("history_points", self.history_points)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _positive(name: str, value: Any) -> float:
    return check_real(name, value, low=0.0, low_inclusive=False)


@dataclass
class SolveResult:
    """What a run produced. ``history`` rows are JSON/CSV-ready dicts.

    The certificate of the end point: ``grad_norm`` (``||∇L||_2``), ``rel_grad_norm``
    (``||∇L||·||θ||/L``, the ``"stationary"`` rule's quantity) and ``gap`` (``(L - L_DNC)/L_DNC`` when
    ``dnc_loss`` was given, else ``None``). ``stop_reason`` is one of
    :data:`deepcollapse.dufm.stopping.STOP_REASONS`.
    """

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
    rel_grad_norm: float = math.nan
    gap: float | None = None
    layers: list[dict[str, Any]] = field(default_factory=list)


def log_steps(max_steps: int, points: int) -> set[int]:
    """About ``points`` integer steps spaced evenly in log scale over ``0..max_steps`` (0 and 1 included)."""
    out = {0, max_steps}
    for i in range(points):  # i = 0 gives step 1
        out.add(round(math.exp(math.log(max_steps) * i / max(points - 1, 1))))
    return out


def flat_metrics(layers: list[dict[str, Any]]) -> dict[str, float]:
    """Per-layer metrics as flat columns ``<name>_l<layer>`` with the names of :data:`metrics.METRICS`.

    ``nc1_l1``, ``nc2_orth_l2``, ``nc2_etf_l1``, ``nc3_span_l2``, ``rank_l2``; pre-activations as ``nc1_pre2``,
    ``rank_pre2``. ``nc2_orth`` (the orthogonal-frame distance, the DUFM's target after a ReLU) is written for the
    post-ReLU layers >= 2; H1's means have no fixed frame, so layer 1 has ``nc2_etf_l1`` only.
    """
    row: dict[str, float] = {}
    for e in layers:
        l = e["layer"]
        if e["stage"] == "pre":
            row[f"nc1_pre{l}"] = e["nc1"]
            row[f"rank_pre{l}"] = e["rank"]
            continue
        row[f"nc1_l{l}"] = e["nc1"]
        nc2 = "nc2_orth" if e["stage"] == "post" else "nc2_etf"
        row[f"{nc2}_l{l}"] = e[nc2]
        if "nc3_span" in e:
            row[f"nc3_span_l{l}"] = e["nc3_span"]
        row[f"rank_l{l}"] = e["rank"]
    return row


@dataclass
class _State:
    """The solver's counters; with the parameters and the optimizer state, all a checkpoint holds."""

    step: int = 0
    evaluations: int = 0
    seconds: float = 0.0
    calm: int = 0  # consecutive checks with a tiny relative change
    prev_loss: float | None = None
    history: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class _Point:
    """The objective, its parts and its gradient at the current parameters."""

    loss: float
    fit: float
    reg: float
    grad_norm: float
    param_norm: float


@dataclass
class _Run:
    """What one solve works with: the model and its parameters, settings, the optimizer and the state."""

    model: DUFM
    cfg: SolverConfig
    params: list[torch.Tensor]
    opt: torch.optim.Optimizer | None
    st: _State
    dnc_loss: float | None
    lower_bound: float | None
    callback: Callable[[dict[str, Any]], None] | None


def solve(
    model: DUFM,
    config: SolverConfig | None = None,
    *,
    dnc_loss: float | None = None,
    lower_bound: float | None = None,
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
    dnc_loss : the theory's ``L_DNC``; when given, history rows and the result carry the ``gap``.
    lower_bound : a proven lower bound on the loss (``L_DNC`` for K = 2 or L = 1); when given, the run
        also stops on the certified gap ``(L - lower_bound)/|lower_bound| <= config.tol_gap``.
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
    run = _Run(model, cfg, params, _make_optimizer(params, cfg), _State(), dnc_loss, lower_bound, callback)
    if resume_state is not None:
        _restore(model, run.opt, run.st, resume_state)
    small = model.h1.device.type == "cpu" and sum(p.numel() for p in params) < SMALL_PROBLEM
    threads = torch.get_num_threads()
    if small:  # intra-op threads only add overhead (and contention) on matrices this small
        torch.set_num_threads(1)
    try:
        point, reason = _loop(run, progress=progress, checkpoint=checkpoint, checkpoint_every=checkpoint_every)
    finally:
        torch.set_num_threads(threads)
    if checkpoint is not None and reason != "diverged":  # never overwrite a good state with NaNs
        save_checkpoint(checkpoint, model, run.opt, run.st, cfg)
    result = _result(run, point, reason)
    if reason == "diverged":
        err = DivergenceError(
            f"the loss became {point.loss} at step {run.st.step} ({cfg.optimizer}, lr={cfg.lr}); try a smaller lr"
        )
        err.result = result  # type: ignore[attr-defined]
        raise err
    return result


def _loop(run: _Run, *, progress: bool, checkpoint: str | Path | None, checkpoint_every: float) -> tuple[_Point, str]:
    """Evaluate, check the stopping rules, record, step; until a rule holds. Returns the last point."""
    cfg, st = run.cfg, run.st
    marks = log_steps(cfg.max_steps, cfg.history_points)
    bar = _Progress(cfg.max_steps, enabled=progress, start=st.step)
    last_ckpt = time.perf_counter()
    boundary: tuple[int, int, int, float | None, float] | None = _boundary(st)
    try:
        while True:
            point = _timed(st, lambda: _evaluate(run))
            bar.update(st.step, point.loss, gap=_gap(run, point.loss))
            reason = _check(run, point)
            if reason or st.step in marks:
                _record(run, point, reason)
            if reason:
                return point, reason
            if isinstance(run.opt, torch.optim.LBFGS) and _stalled(st, point):
                run.opt = _make_optimizer(run.params, cfg)  # stalled at a kink: restart with a fresh memory
            st.prev_loss = point.loss
            boundary = None  # inside an optimizer step
            _timed(st, lambda: _step(run))
            st.step += 1
            boundary = _boundary(st)
            if checkpoint is not None and time.perf_counter() - last_ckpt >= checkpoint_every:
                save_checkpoint(checkpoint, run.model, run.opt, st, cfg)
                last_ckpt = time.perf_counter()
    except KeyboardInterrupt:
        # Keep the state of the last step boundary so that --resume continues exactly. An interrupt
        # inside an optimizer step leaves the parameters half-updated: then the last periodic
        # checkpoint stays as it is.
        if checkpoint is not None and boundary is not None:
            st.evaluations, n_rows, st.calm, st.prev_loss, st.seconds = boundary
            del st.history[n_rows:]
            save_checkpoint(checkpoint, run.model, run.opt, st, cfg)
        raise
    finally:
        bar.close()


def _boundary(st: _State) -> tuple[int, int, int, float | None, float]:
    return st.evaluations, len(st.history), st.calm, st.prev_loss, st.seconds


def _timed(st: _State, fn: Callable[[], Any]) -> Any:
    t0 = time.perf_counter()
    try:
        return fn()
    finally:
        st.seconds += time.perf_counter() - t0


def _stalled(st: _State, point: _Point) -> bool:
    return st.prev_loss is not None and point.loss >= st.prev_loss


def _evaluate(run: _Run) -> _Point:
    """The loss, its parts, ``||∇L||`` and ``||θ||``; leaves the gradient in ``p.grad`` (for ``gd``)."""
    for p in run.params:
        p.grad = None
    total, fit, reg = run.model.loss()
    total.backward()
    run.st.evaluations += 1
    with torch.no_grad():
        gn = torch.sqrt(sum(p.grad.pow(2).sum() for p in run.params))
        pn = torch.sqrt(sum(p.pow(2).sum() for p in run.params))
    return _Point(float(total.detach()), float(fit.detach()), float(reg.detach()), float(gn), float(pn))


def _check(run: _Run, point: _Point) -> str:
    """The stop reason at ``point`` ("" to go on); updates the stall counter."""
    st, f64 = run.st, torch.float64
    loss = torch.tensor(point.loss, dtype=f64)
    prev = torch.tensor(math.nan if st.prev_loss is None else st.prev_loss, dtype=f64)
    st.calm = int(calm_count(torch.tensor(st.calm), loss, prev, run.cfg.tol_rel))
    code = stop_codes(
        run.cfg,
        loss=loss,
        grad_norm=torch.tensor(point.grad_norm, dtype=f64),
        param_norm=torch.tensor(point.param_norm, dtype=f64),
        calm=torch.tensor(st.calm),
        step=st.step,
        max_steps=run.cfg.max_steps,
        seconds=st.seconds,
        lower_bound=run.lower_bound,
    )
    return STOP_REASONS[int(code) - 1] if int(code) else ""


def _gap(run: _Run, loss: float) -> float | None:
    if run.dnc_loss is None or run.dnc_loss <= 0:
        return None
    return float(relative_gap(loss, run.dnc_loss))


def _rel_grad(point: _Point) -> float:
    f64 = torch.float64
    return float(
        relative_grad_norm(
            torch.tensor(point.grad_norm, dtype=f64),
            torch.tensor(point.param_norm, dtype=f64),
            torch.tensor(point.loss, dtype=f64),
        )
    )


def _record(run: _Run, point: _Point, reason: str) -> None:
    """Append (or, on a resumed step, replace) a history row and pass it to the callback.

    The row holds the per-layer metrics unless ``config.metrics`` is off or the run diverged."""
    st = run.st
    row: dict[str, Any] = {
        "step": st.step,
        "evaluations": st.evaluations,
        "seconds": round(st.seconds, 6),
        "loss": point.loss,
        "fit": point.fit,
        "reg": point.reg,
        "grad_norm": point.grad_norm,
        "rel_grad_norm": _rel_grad(point),
    }
    gap = _gap(run, point.loss)
    if gap is not None:
        row["gap"] = gap
    if run.cfg.metrics and reason != "diverged":
        row.update(flat_metrics(_layers(run.model)))
    if st.history and st.history[-1]["step"] == st.step:
        st.history[-1] = row  # a resumed run re-evaluates the step it was saved at
    else:
        st.history.append(row)
    if run.callback is not None:
        run.callback(row)


def _layers(m: DUFM) -> list[dict[str, Any]]:
    return layer_metrics(m.h1, list(m.weights), m.labels, m.config.num_classes)


def _result(run: _Run, point: _Point, reason: str) -> SolveResult:
    m, st = run.model, run.st
    layers = _layers(m) if math.isfinite(point.loss) else []
    return SolveResult(
        model=m,
        history=st.history,
        steps=st.step,
        evaluations=st.evaluations,
        seconds=st.seconds,
        stop_reason=reason,
        loss=point.loss,
        fit=point.fit,
        reg=point.reg,
        grad_norm=point.grad_norm,
        rel_grad_norm=_rel_grad(point),
        gap=_gap(run, point.loss),
        layers=layers,
    )


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


def _step(run: _Run) -> None:
    """One optimizer step; ``gd`` uses the gradient left by :func:`_evaluate`."""
    opt, cfg, params = run.opt, run.cfg, run.params
    if opt is None:
        with torch.no_grad():
            for p in params:
                p.sub_(p.grad, alpha=cfg.lr)
    elif isinstance(opt, torch.optim.LBFGS):

        def closure() -> torch.Tensor:
            for p in params:
                p.grad = None
            total = run.model.loss()[0] * cfg.lbfgs_scale
            total.backward()
            run.st.evaluations += 1
            return total

        opt.step(closure)
    else:
        opt.step()


class _Progress:
    """A rich progress bar over solver steps (a no-op when disabled)."""

    def __init__(self, total: int, *, enabled: bool, start: int) -> None:
        self.enabled = enabled
        self.last = -math.inf  # the first update always shows
        if not enabled:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            transient=True,
        )
        self.task = self.progress.add_task("DUFM", total=total, completed=start, info="")
        self.progress.start()

    def update(self, step: int, loss: float, *, gap: float | None) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if now - self.last < 0.1:
            return
        self.last = now
        info = f"loss {loss:.8g}" + (f"  gap {gap:.2e}" if gap is not None else "")
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
    if opt is not None:  # load_checkpoint checked that the optimizer is the same
        opt.load_state_dict(ckpt["optimizer"])
    for k, v in ckpt["state"].items():
        setattr(st, k, v)
