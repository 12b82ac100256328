"""The solver step by step on a tiny DUFM (K = 3, two samples per class, L = 2, width 4), float64.

Every step, row and stop is compared with an independent reference written here: plain GD and hand-written
Nesterov/Adam updates, the loss and its parts in numpy, the gradient norm from autograd on a fresh model,
exact stop steps at the boundary of each rule, and a solver clock driven by the number of loss evaluations
(so that times, ``max_seconds`` and periodic checkpoints are exact).
"""

from __future__ import annotations

import fractions
import io
import math
import re
import time
import zipfile

import numpy as np
import pytest
import torch
import torch._dynamo

from deepcollapse._validate import DeepCollapseError, DivergenceError
from deepcollapse.dufm import solve as S
from deepcollapse.dufm.model import DUFM, DUFMConfig, layer_metrics
from deepcollapse.dufm.solve import SolverConfig, flat_metrics, load_checkpoint, log_steps, solve
from deepcollapse.dufm.stopping import DEFAULT_MAX_STEPS
from dufm_reference import plain_gd

CFG = DUFMConfig(num_classes=3, n_per_class=2, num_layers=2, width=4, lambda_h=0.01, lambda_w=0.02, seed=1)
METRIC_KEYS = {
    "nc1_l1",
    "nc2_etf_l1",
    "nc3_span_l1",
    "rank_l1",
    "nc1_pre2",
    "rank_pre2",
    "nc1_l2",
    "nc2_orth_l2",
    "nc3_span_l2",
    "rank_l2",
}
BASE_KEYS = {"step", "evaluations", "seconds", "loss", "fit", "reg", "grad_norm", "rel_grad_norm"}


def params(model: DUFM) -> list[torch.Tensor]:
    return [model.h1, *model.weights]


def np_parts(model: DUFM) -> tuple[float, float]:
    """``(fit, reg)`` from the definition: ``||W_2 σ(W_1 H_1) - Y||²/(2N)``, ``Σ λ/2 ||·||²``."""
    h1, w1, w2 = (p.detach().numpy() for p in params(model))
    y = np.repeat(np.eye(3), 2, axis=1)
    with np.errstate(over="ignore", invalid="ignore"):  # (the divergence test runs GD to inf)
        fit = ((w2 @ np.maximum(w1 @ h1, 0.0) - y) ** 2).sum() / (2 * 6)
    reg = 0.01 / 2 * (h1**2).sum() + 0.02 / 2 * ((w1**2).sum() + (w2**2).sum())
    return float(fit), float(reg)


def certificate(model: DUFM) -> tuple[float, float, float]:
    """``(L, ||∇L||, ||θ||)`` at the parameters of ``model`` (autograd on a copy)."""
    copy = DUFM.from_parameters(model.config, model.h1.detach(), [w.detach() for w in model.weights])
    grads = torch.autograd.grad(copy.loss()[0], params(copy))
    gn = float(torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads])))
    pn = float(torch.linalg.vector_norm(torch.cat([p.detach().flatten() for p in params(copy)])))
    return sum(np_parts(model)), gn, pn


def gd_config(**kw) -> SolverConfig:
    base = dict(optimizer="gd", lr=0.3, max_steps=4, tol_grad=0.0, tol_rel=0.0, history_points=50)
    return SolverConfig(**{**base, **kw})


def eval_clock(monkeypatch, model: DUFM, tick: float) -> list[int]:
    """The solver clock reads ``tick`` x (loss evaluations of ``model`` so far); returns the counter."""
    calls = [0]
    loss = model.loss

    def counted():
        calls[0] += 1
        return loss()

    model.loss = counted
    monkeypatch.setattr(time, "perf_counter", lambda: tick * calls[0])
    return calls


# ---------------------------------------------------------------------------------------------- configuration


@pytest.mark.parametrize("opt", ["gd", "lbfgs", "nesterov", "adam"])
def test_config_defaults_per_optimizer(opt):
    cfg = SolverConfig(optimizer=opt)
    assert cfg.lr == {"gd": 0.5, "lbfgs": 1.0, "nesterov": 0.1, "adam": 1e-3}[opt]
    assert cfg.max_steps == DEFAULT_MAX_STEPS[opt]
    given = SolverConfig(optimizer=opt, lr=0.25, max_steps=7)
    assert (given.lr, given.max_steps) == (0.25, 7)


def test_config_keeps_valid_values_and_converts_integers():
    cfg = SolverConfig(
        lr=1e-300,
        max_steps=5.0,
        momentum=0.0,
        lbfgs_iters=3.0,
        lbfgs_history=4.0,
        lbfgs_scale=1e-300,
        history_points=6.0,
    )
    got = (cfg.lr, cfg.max_steps, cfg.momentum, cfg.lbfgs_iters, cfg.lbfgs_history, cfg.lbfgs_scale, cfg.history_points)
    assert got == (1e-300, 5, 0.0, 3, 4, 1e-300, 6)
    assert all(type(v) is int for v in (cfg.max_steps, cfg.lbfgs_iters, cfg.lbfgs_history, cfg.history_points))
    assert SolverConfig(momentum=1.0).momentum == 1.0
    assert SolverConfig(lr=2.0, lbfgs_scale=2.0).to_dict()["lbfgs_scale"] == 2.0


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(optimizer="sgd"), "optimizer must be one of gd, lbfgs, nesterov, adam, got 'sgd'"),
        (dict(lr=0.0), "lr must be > 0.0, got 0.0"),
        (dict(lr=-1.0), "lr must be > 0.0"),
        (dict(max_steps=0), "max_steps must be >= 1"),
        (dict(momentum=-1e-9), "momentum must be >= 0.0"),
        (dict(momentum=1 + 1e-9), "momentum must be <= 1.0"),
        (dict(lbfgs_iters=0), "lbfgs_iters must be >= 1"),
        (dict(lbfgs_history=1.5), "lbfgs_history must be an integer"),
        (dict(lbfgs_scale=0.0), "lbfgs_scale must be > 0.0, got 0.0"),
        (dict(history_points=0), "history_points must be >= 1"),
    ],
)
def test_config_errors_name_the_parameter(kw, message):
    with pytest.raises(DeepCollapseError, match=re.escape(message)):
        SolverConfig(**kw)


# ---------------------------------------------------------------------------------------------- history layout


def test_log_steps():
    assert log_steps(1000, 4) == {0, 1, 10, 100, 1000}
    assert log_steps(100, 2) == {0, 1, 100}
    assert log_steps(50, 1) == {0, 1, 50}
    assert log_steps(1, 5) == {0, 1}


def test_flat_metrics_columns():
    layers = [
        {"layer": 1, "stage": "free", "nc1": 1.0, "nc2_etf": 2.0, "nc2_orth": -1.0, "nc3_span": 3.0, "rank": 4},
        {"layer": 2, "stage": "pre", "nc1": 5.0, "nc2_etf": -1.0, "nc2_orth": -1.0, "rank": 6},
        {"layer": 2, "stage": "post", "nc1": 7.0, "nc2_etf": -1.0, "nc2_orth": 8.0, "nc3_span": 9.0, "rank": 10},
        {"layer": 3, "stage": "post", "nc1": 11.0, "nc2_etf": -1.0, "nc2_orth": 12.0, "rank": 13},
    ]
    assert flat_metrics(layers) == {
        "nc1_l1": 1.0,
        "nc2_etf_l1": 2.0,
        "nc3_span_l1": 3.0,
        "rank_l1": 4,
        "nc1_pre2": 5.0,
        "rank_pre2": 6,
        "nc1_l2": 7.0,
        "nc2_orth_l2": 8.0,
        "nc3_span_l2": 9.0,
        "rank_l2": 10,
        "nc1_l3": 11.0,
        "nc2_orth_l3": 12.0,
        "rank_l3": 13,
    }


# ---------------------------------------------------------------------------------------------- gd, step by step


def test_gd_rows_and_result_match_plain_gd():
    rows: list[dict] = []
    model = DUFM(CFG)
    res = solve(model, gd_config(), dnc_loss=0.05, callback=rows.append)
    assert res.model is model and res.history == rows and [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    for k, row in enumerate(rows):
        ref = plain_gd(CFG, 0.3, k)
        fit, reg = np_parts(ref)
        loss, gn, pn = certificate(ref)
        assert set(row) == BASE_KEYS | METRIC_KEYS | {"gap"}
        assert row["evaluations"] == k + 1
        assert row["fit"] == pytest.approx(fit, rel=1e-12) and row["reg"] == pytest.approx(reg, rel=1e-12)
        assert row["loss"] == pytest.approx(loss, rel=1e-12)
        assert row["grad_norm"] == pytest.approx(gn, rel=1e-10)
        assert row["rel_grad_norm"] == pytest.approx(gn * pn / loss, rel=1e-10)
        assert row["gap"] == pytest.approx((loss - 0.05) / 0.05, rel=1e-12)
        expected = flat_metrics(layer_metrics(ref.h1, list(ref.weights), ref.labels, 3))
        assert {key: row[key] for key in METRIC_KEYS} == pytest.approx(expected, rel=1e-9, abs=1e-12)
    ref = plain_gd(CFG, 0.3, 4)
    for a, b in zip(params(model), params(ref), strict=True):
        assert torch.allclose(a, b, rtol=0, atol=1e-14)
    last = rows[-1]
    assert (res.steps, res.evaluations, res.stop_reason) == (4, 5, "max_steps")
    got = (res.loss, res.fit, res.reg, res.grad_norm, res.rel_grad_norm, res.gap)
    assert got == tuple(last[k] for k in ("loss", "fit", "reg", "grad_norm", "rel_grad_norm", "gap"))
    expected = layer_metrics(ref.h1, list(ref.weights), ref.labels, 3)
    assert [a.keys() for a in res.layers] == [b.keys() for b in expected]
    for a, b in zip(res.layers, expected, strict=True):
        assert (a.pop("layer"), a.pop("stage")) == (b.pop("layer"), b.pop("stage"))
        assert a == pytest.approx(b, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("dnc_loss", [None, 0.0])
def test_no_gap_without_a_positive_dnc_loss(dnc_loss):
    res = solve(DUFM(CFG), gd_config(max_steps=1, metrics=False), dnc_loss=dnc_loss)
    assert res.gap is None
    assert [set(r) for r in res.history] == [BASE_KEYS, BASE_KEYS]


def test_history_rows_at_log_spaced_steps_and_the_last():
    res = solve(DUFM(CFG), gd_config(max_steps=10, history_points=3, metrics=False))
    assert [r["step"] for r in res.history] == [0, 1, 3, 10]
    res = solve(DUFM(CFG), gd_config(max_steps=10, history_points=3, metrics=False, target_loss=res.history[2]["loss"]))
    assert [r["step"] for r in res.history] == [0, 1, 3] and res.stop_reason == "target_loss"


# ---------------------------------------------------------------------------------------------- stop rules


def test_stationary_at_the_boundary_of_tol_grad():
    loss, gn, pn = certificate(DUFM(CFG))
    r0 = gn * pn / loss
    res = solve(DUFM(CFG), gd_config(max_steps=3, tol_grad=r0 * (1 + 1e-10), metrics=False))
    assert (res.steps, res.stop_reason, res.evaluations) == (0, "stationary", 1)
    assert res.rel_grad_norm == pytest.approx(r0, rel=1e-12)
    res = solve(DUFM(CFG), gd_config(max_steps=3, tol_grad=r0 * (1 - 1e-10), metrics=False))
    assert (res.steps, res.stop_reason) == (1, "stationary")  # GD lowers it below tol_grad in one step


def test_certified_gap_at_the_boundary_of_tol_gap():
    loss = sum(np_parts(DUFM(CFG)))
    bound = 0.9 * loss
    gap0 = (loss - bound) / bound
    res = solve(DUFM(CFG), gd_config(max_steps=3, tol_gap=gap0 * (1 + 1e-10), metrics=False), lower_bound=bound)
    assert (res.steps, res.stop_reason) == (0, "gap")
    res = solve(DUFM(CFG), gd_config(max_steps=3, tol_gap=gap0 * (1 - 1e-10), metrics=False), lower_bound=bound)
    assert (res.steps, res.stop_reason) == (1, "gap")
    res = solve(DUFM(CFG), gd_config(max_steps=3, tol_gap=gap0 * (1 + 1e-10), metrics=False))
    assert res.stop_reason == "max_steps"  # no bound, no certificate


def test_stalled_after_patience_tiny_changes():
    # lr 1e-12: the loss changes by ~1e-12 relative per step, below tol_rel = 1e-10 (in float64)
    res = solve(DUFM(CFG), gd_config(lr=1e-12, max_steps=10, tol_rel=1e-10, patience=3, metrics=False))
    assert (res.steps, res.stop_reason) == (3, "stalled")
    res = solve(DUFM(CFG), gd_config(lr=1e-12, max_steps=10, tol_rel=1e-14, patience=3, metrics=False))
    assert res.stop_reason == "max_steps"


def test_target_loss_stops_at_the_first_step_below():
    target = sum(np_parts(plain_gd(CFG, 0.3, 2)))
    res = solve(DUFM(CFG), gd_config(max_steps=10, target_loss=target, metrics=False))
    assert (res.steps, res.stop_reason) == (2, "target_loss")


def test_solver_time_max_seconds_and_rounding(monkeypatch):
    model = DUFM(CFG)
    eval_clock(monkeypatch, model, 10.0)  # each loss evaluation takes 10 s of the solver clock
    res = solve(model, gd_config(max_steps=10, max_seconds=40.0, metrics=False))
    assert (res.steps, res.stop_reason, res.seconds) == (3, "max_seconds", 40.0)
    model = DUFM(CFG)
    eval_clock(monkeypatch, model, 1.23456789e-3)
    res = solve(model, gd_config(max_steps=2, metrics=False))
    assert [r["seconds"] for r in res.history] == [0.001235, 0.002469, 0.003704]  # rounded to the microsecond
    assert res.seconds == pytest.approx(3 * 1.23456789e-3, rel=1e-12)


def test_default_config_is_lbfgs_to_stationarity():
    model = DUFM(CFG)
    res = solve(model)
    assert res.stop_reason == "stationary" and res.rel_grad_norm <= 1e-5
    loss, gn, pn = certificate(model)
    assert res.rel_grad_norm == pytest.approx(gn * pn / loss, rel=1e-8)


# ---------------------------------------------------------------------------------------------- other optimizers


def _hand_optimizer(opt: str, lr: float, steps: int, **kw) -> DUFM:
    """Nesterov SGD (``v ← μv + g``, ``θ ← θ - η(g + μv)``) or Adam (β = 0.9, 0.999, ε = 1e-8), by hand."""
    model = DUFM(CFG)
    ps = params(model)
    state = [dict(v=torch.zeros_like(p), m=torch.zeros_like(p), s=torch.zeros_like(p)) for p in ps]
    for t in range(1, steps + 1):
        grads = torch.autograd.grad(model.loss()[0], ps)
        with torch.no_grad():
            for p, g, st in zip(ps, grads, state, strict=True):
                if opt == "nesterov":
                    mu = kw["momentum"]
                    st["v"] = g.clone() if t == 1 else mu * st["v"] + g
                    p -= lr * (g + mu * st["v"])
                else:
                    st["m"] = 0.9 * st["m"] + 0.1 * g
                    st["s"] = 0.999 * st["s"] + 0.001 * g * g
                    m_hat, s_hat = st["m"] / (1 - 0.9**t), st["s"] / (1 - 0.999**t)
                    p -= lr * m_hat / (s_hat.sqrt() + 1e-8)
    return model


# (both runs have a step that raises the loss: it must not reset the optimizer's state)
@pytest.mark.parametrize("opt, lr, kw", [("nesterov", 0.5, dict(momentum=0.9)), ("adam", 0.2, {})])
def test_nesterov_and_adam_match_the_hand_written_updates(opt, lr, kw):
    model = DUFM(CFG)
    scfg = SolverConfig(
        optimizer=opt, lr=lr, max_steps=10, tol_grad=0, tol_rel=0, history_points=50, metrics=False, **kw
    )
    res = solve(model, scfg)
    losses = [r["loss"] for r in res.history]
    assert any(b > a for a, b in zip(losses, losses[1:], strict=False))
    ref = _hand_optimizer(opt, lr, 10, **kw)
    for a, b in zip(params(model), params(ref), strict=True):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-14)
    assert res.evaluations == 11


LBFGS_CFG = DUFMConfig(num_classes=2, n_per_class=3, num_layers=3, width=4, lambda_h=0.01, lambda_w=0.01, seed=3)


def _reference_lbfgs(cfg: DUFMConfig, steps: int, *, lr: float, iters: int, memory: int, scale: float):
    """torch's L-BFGS (strong Wolfe, no tolerances) on ``scale · L``; a fresh memory whenever the loss at the
    start of a step is not below the loss at the start of the previous one. Returns (model, evaluations)."""
    model = DUFM(cfg)
    ps = params(model)
    count = [0]

    def fresh():
        return torch.optim.LBFGS(
            ps,
            lr=lr,
            max_iter=iters,
            history_size=memory,
            line_search_fn="strong_wolfe",
            tolerance_grad=0.0,
            tolerance_change=0.0,
        )

    def closure():
        for p in ps:
            p.grad = None
        total = model.loss()[0] * scale
        total.backward()
        count[0] += 1
        return total

    opt, prev = fresh(), math.inf
    for _ in range(steps):
        with torch.no_grad():
            now = float(model.loss()[0])
        if now >= prev:
            opt = fresh()
        prev = now
        opt.step(closure)
    return model, count[0] + steps + 1


@pytest.mark.parametrize(
    "cfg, steps, kw",
    [
        (LBFGS_CFG, 10, dict(lr=0.8, iters=3, memory=2, scale=1e3)),  # a short memory, another scale
        # step 3 leaves the loss unchanged (a kink): a restart
        (DUFMConfig(**{**LBFGS_CFG.to_dict(), "seed": 5}), 10, dict(lr=0.8, iters=3, memory=50, scale=1e4)),
        # a scale of 0.01 and 30 steps: tiny scaled gradients and changes, where torch's default tolerances
        # (not the solver's zeros) would end inner loops early
        (DUFMConfig(**{**CFG.to_dict(), "seed": 1}), 30, dict(lr=1.0, iters=5, memory=50, scale=0.01)),
    ],
)
def test_lbfgs_is_torch_lbfgs_on_the_scaled_objective_with_restarts(cfg, steps, kw):
    model = DUFM(cfg)
    scfg = SolverConfig(
        lr=kw["lr"],
        lbfgs_iters=kw["iters"],
        lbfgs_history=kw["memory"],
        lbfgs_scale=kw["scale"],
        max_steps=steps,
        tol_grad=0,
        tol_rel=0,
        patience=1000,  # (equal losses at a kink count as calm even with tol_rel = 0)
        metrics=False,
    )
    res = solve(model, scfg)
    ref, evaluations = _reference_lbfgs(cfg, steps, **kw)
    for a, b in zip(params(model), params(ref), strict=True):
        assert torch.equal(a, b)
    assert res.evaluations == evaluations


# ---------------------------------------------------------------------------------------------- divergence


def test_divergence_raises_with_the_run_so_far(tmp_path):
    steps = 0
    while math.isfinite(sum(np_parts(plain_gd(CFG, 1e3, steps)))):
        steps += 1
    with pytest.raises(DivergenceError) as err:
        solve(DUFM(CFG), gd_config(lr=1e3, max_steps=100), checkpoint=tmp_path / "c.pt", checkpoint_every=1e9)
    assert (
        str(err.value) == f"the loss became nan at step {steps} (gd, lr=1000.0); try a smaller lr"
        or str(err.value) == f"the loss became inf at step {steps} (gd, lr=1000.0); try a smaller lr"
    )
    res = err.value.result
    assert (res.stop_reason, res.steps, res.layers) == ("diverged", steps, [])
    assert res.history[-1]["step"] == steps and set(res.history[-1]) == BASE_KEYS
    assert not math.isfinite(res.history[-1]["loss"])
    assert not (tmp_path / "c.pt").exists()  # a diverged run writes no final checkpoint


# ---------------------------------------------------------------------------------------------- threads


def test_small_problems_run_on_one_thread_and_restore_it(monkeypatch):
    # CFG has 24 + 16 + 12 = 52 parameters: small below SMALL_PROBLEM = 53, not at SMALL_PROBLEM = 52.
    # torch's thread setting is replaced by a plain variable: a real pool of several threads started in this
    # process would hang the forked runners of mutation testing.
    threads = {"now": 3}
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads["now"])
    monkeypatch.setattr(torch, "set_num_threads", lambda n: threads.update(now=n))
    seen: list[int] = []
    for threshold, during in [(53, 1), (52, 3)]:
        monkeypatch.setattr(S, "SMALL_PROBLEM", threshold)
        seen.clear()
        solve(DUFM(CFG), gd_config(max_steps=1, metrics=False), callback=lambda r: seen.append(threads["now"]))
        assert seen == [during, during] and threads["now"] == 3


# ---------------------------------------------------------------------------------------------- progress bar


def _console(monkeypatch, *, terminal: bool) -> io.StringIO:
    import rich
    from rich.console import Console

    buf = io.StringIO()
    monkeypatch.setattr(rich, "_console", Console(file=buf, force_terminal=terminal, color_system=None, width=100))
    return buf


def test_progress_bar_shows_step_loss_and_gap(monkeypatch):
    buf = _console(monkeypatch, terminal=True)
    model = DUFM(CFG)
    eval_clock(monkeypatch, model, 1.0)
    res = solve(model, gd_config(max_steps=3, metrics=False), dnc_loss=0.05, progress=True)
    info = f"loss {res.loss:.8g}  gap {res.gap:.2e}"
    assert re.search(rf"DUFM .* 3/3 {re.escape(info)} ", buf.getvalue())
    buf = _console(monkeypatch, terminal=True)
    solve(DUFM(CFG), gd_config(max_steps=3, metrics=False))
    assert buf.getvalue() == ""  # no bar unless asked


def test_progress_bar_leaves_nothing_in_a_log(monkeypatch):
    buf = _console(monkeypatch, terminal=False)
    solve(DUFM(CFG), gd_config(max_steps=3, metrics=False), progress=True)
    assert buf.getvalue().strip() == ""


def test_progress_bar_updates_at_most_every_tenth_of_a_second(monkeypatch):
    from rich.console import Console

    clock = [0.0]
    monkeypatch.setattr(time, "perf_counter", lambda: clock[0])
    bar = S._Progress(10, enabled=True, start=4)
    task = bar.progress.tasks[0]
    assert (task.description, task.total, task.completed, task.fields["info"]) == ("DUFM", 10, 4, "")
    shown = []
    for t, step in [(0.0, 5), (0.05, 6), (0.1, 7), (0.15, 8)]:
        clock[0] = t
        bar.update(step, 0.5 / step, gap=None if step < 7 else 1e-3 * step)
        shown.append((task.completed, task.fields["info"]))
    seven = (7, "loss 0.071428571  gap 7.00e-03")
    assert shown == [(5, "loss 0.1"), (5, "loss 0.1"), seven, seven]
    out = Console(file=io.StringIO(), width=100, color_system=None)
    out.print(bar.progress.make_tasks_table(bar.progress.tasks))
    assert re.match(r"DUFM +\S+ +7/10 loss 0\.071428571  gap 7\.00e-03 +\S+\n$", out.file.getvalue())
    bar.close()
    off = S._Progress(10, enabled=False, start=0)
    off.update(1, 0.5, gap=None)
    off.close()


# ---------------------------------------------------------------------------------------------- checkpoints


def test_periodic_checkpoints_every_30_solver_seconds(monkeypatch, tmp_path):
    ckpt = tmp_path / "c.pt"
    model = DUFM(CFG)
    eval_clock(monkeypatch, model, 10.0)
    saved: list[int | None] = []

    def look(row):
        saved.append(torch.load(ckpt, weights_only=True)["state"]["step"] if ckpt.exists() else None)

    res = solve(model, gd_config(max_steps=7, metrics=False), checkpoint=ckpt, callback=look)
    assert saved == [None, None, None, 3, 3, 3, 6, 6]
    state = load_checkpoint(ckpt, CFG, gd_config())
    assert state["state"]["step"] == res.steps == 7
    ref = plain_gd(CFG, 0.3, 7)
    for name, p in zip(["h1", "weights.0", "weights.1"], params(ref), strict=True):
        assert torch.allclose(state["model"][name], p, rtol=0, atol=1e-14)


RESUME = {
    "gd": dict(optimizer="gd", lr=0.3),
    "nesterov": dict(optimizer="nesterov", lr=0.05, momentum=0.8),
    "adam": dict(optimizer="adam", lr=0.05),
    "lbfgs": dict(optimizer="lbfgs", lr=0.8, lbfgs_iters=2),
}


@pytest.mark.parametrize("at", [0, 4])
@pytest.mark.parametrize("opt", list(RESUME))
def test_resume_after_an_interrupt_equals_an_unbroken_run(monkeypatch, tmp_path, opt, at):
    # tol_rel = 1e9 with patience 6: the run stalls at step 6 exactly when the stall counter survives the resume
    scfg = SolverConfig(max_steps=9, tol_grad=0, tol_rel=1e9, patience=6, history_points=50, **RESUME[opt])
    full = DUFM(LBFGS_CFG)
    eval_clock(monkeypatch, full, 1.0)
    res_full = solve(full, scfg)
    assert (res_full.steps, res_full.stop_reason) == (6, "stalled")

    def kill(row):
        if row["step"] == at:
            raise KeyboardInterrupt

    ckpt = tmp_path / "c.pt"
    broken = DUFM(LBFGS_CFG)
    eval_clock(monkeypatch, broken, 1.0)
    with pytest.raises(KeyboardInterrupt):
        solve(broken, scfg, checkpoint=ckpt, checkpoint_every=1e9, callback=kill)
    resumed = DUFM(LBFGS_CFG)
    eval_clock(monkeypatch, resumed, 1.0)
    res = solve(resumed, scfg, resume_state=load_checkpoint(ckpt, LBFGS_CFG, scfg))
    for a, b in zip(params(full), params(resumed), strict=True):
        assert torch.equal(a, b)
    assert res.history == res_full.history  # seconds too: the solver clock counts evaluations
    assert (res.steps, res.evaluations, res.seconds) == (res_full.steps, res_full.evaluations, res_full.seconds)


def test_interrupt_inside_a_step_keeps_the_last_periodic_checkpoint(tmp_path):
    scfg = SolverConfig(lr=0.8, lbfgs_iters=2, max_steps=9, tol_grad=0, tol_rel=0, metrics=False, history_points=50)
    model = DUFM(LBFGS_CFG)
    loss, last_row = model.loss, [0]

    def breaks_in_the_third_step():
        if last_row[0] == 2:  # the row of step 2 is out: this evaluation is inside the step from 2 to 3
            raise KeyboardInterrupt
        return loss()

    model.loss = breaks_in_the_third_step
    ckpt = tmp_path / "c.pt"
    with pytest.raises(KeyboardInterrupt):
        solve(model, scfg, checkpoint=ckpt, checkpoint_every=0.0, callback=lambda r: last_row.__setitem__(0, r["step"]))
    state = load_checkpoint(ckpt, LBFGS_CFG, scfg)
    assert state["state"]["step"] == 2
    two = DUFM(LBFGS_CFG)
    solve(two, SolverConfig(**{**scfg.to_dict(), "max_steps": 2}))
    for name, p in zip(["h1", "weights.0", "weights.1", "weights.2"], params(two), strict=True):
        assert torch.equal(state["model"][name], p)
    resumed, full = DUFM(LBFGS_CFG), DUFM(LBFGS_CFG)
    res = solve(resumed, scfg, resume_state=state)  # with the curvature memory of step 2
    res_full = solve(full, scfg)
    for a, b in zip(params(full), params(resumed), strict=True):
        assert torch.equal(a, b)
    assert res.evaluations == res_full.evaluations
    assert [r["loss"] for r in res.history] == [r["loss"] for r in res_full.history]


def test_interrupt_without_a_checkpoint_passes_through():
    def kill(row):
        if row["step"] == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        solve(DUFM(CFG), gd_config(metrics=False), callback=kill)


@pytest.mark.parametrize("kw", [dict(optimizer="gd"), dict(optimizer="nesterov", lr=0.05)])
def test_resume_a_finished_run_with_a_larger_budget(tmp_path, kw):
    ckpt = tmp_path / "c.pt"
    solve(DUFM(CFG), gd_config(max_steps=4, metrics=False, **kw), checkpoint=ckpt)
    longer = gd_config(max_steps=7, metrics=False, **kw)
    res = solve(DUFM(CFG), longer, resume_state=load_checkpoint(ckpt, CFG, longer))
    full = solve(DUFM(CFG), longer)
    assert [r["step"] for r in res.history] == list(range(8))
    assert [r["loss"] for r in res.history] == [r["loss"] for r in full.history]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "c.pt"
    solve(DUFM(CFG), gd_config(max_steps=1, metrics=False), checkpoint=path)
    return path


def test_checkpoint_loads_for_the_same_configuration(saved):
    same = DUFMConfig(**{**CFG.to_dict(), "device": "cuda:0"})  # the device may differ
    state = load_checkpoint(str(saved), same, gd_config(max_steps=99, history_points=7))
    assert state["state"]["step"] == 1 and state["optimizer"] is None


def test_checkpoint_from_another_configuration_names_the_differences(saved):
    other = DUFMConfig(**{**CFG.to_dict(), "lambda_h": 0.5, "seed": 2})
    msg = f"checkpoint {saved} is from a different configuration (differs in: lambda_h, seed, lr)"
    with pytest.raises(DeepCollapseError, match=re.escape(msg)):
        load_checkpoint(saved, other, gd_config(lr=0.2))


@pytest.mark.parametrize(
    "kw, name",
    [
        (dict(optimizer="nesterov"), "optimizer"),
        (dict(lr=0.4), "lr"),
        (dict(momentum=0.5), "momentum"),
        (dict(lbfgs_iters=3), "lbfgs_iters"),
        (dict(lbfgs_history=3), "lbfgs_history"),
    ],
)
def test_checkpoint_with_other_solver_settings_is_refused(saved, kw, name):
    with pytest.raises(DeepCollapseError, match=rf"\(differs in: {name}\)$"):
        load_checkpoint(saved, CFG, gd_config(**kw))


def test_a_foreign_torch_file_is_refused(tmp_path):
    torch.save({"weight": torch.ones(2)}, tmp_path / "model.pt")
    with pytest.raises(DeepCollapseError, match=r"different configuration \(differs in: "):
        load_checkpoint(tmp_path / "model.pt", CFG, gd_config())


def test_checkpoint_from_another_version_is_refused(saved, tmp_path):
    ckpt = torch.load(saved, weights_only=True)
    del ckpt["dufm_config"]["extra"]
    torch.save(ckpt, tmp_path / "old.pt")
    with pytest.raises(DeepCollapseError, match=r"\(differs in: extra\)$"):
        load_checkpoint(tmp_path / "old.pt", CFG, gd_config())


def test_checkpoint_written_on_a_gpu_loads_on_the_cpu(saved, tmp_path):
    with zipfile.ZipFile(saved) as z:
        files = {n: z.read(n) for n in z.namelist()}
    pkl = next(n for n in files if n.endswith("data.pkl"))
    cpu, cuda = b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:0"  # the storages' location tag (pickled)
    assert cpu in files[pkl]
    files[pkl] = files[pkl].replace(cpu, cuda)
    with zipfile.ZipFile(tmp_path / "gpu.pt", "w") as z:
        for n, data in files.items():
            z.writestr(n, data)
    state = load_checkpoint(tmp_path / "gpu.pt", CFG, gd_config())
    assert state["model"]["h1"].device.type == "cpu"


def test_checkpoints_are_read_as_weights_only_even_where_that_is_not_the_default(saved, tmp_path, monkeypatch):
    # torch < 2.6 (still supported) loads full pickles by default; this variable restores that default
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    ckpt = torch.load(saved, weights_only=True)
    ckpt["note"] = fractions.Fraction(1, 3)
    torch.save(ckpt, tmp_path / "pickle.pt")
    with pytest.raises(DeepCollapseError, match="cannot read checkpoint"):
        load_checkpoint(tmp_path / "pickle.pt", CFG, gd_config())


def test_unreadable_checkpoints(saved, tmp_path):
    with pytest.raises(DeepCollapseError, match=re.escape(f"nothing to resume: no checkpoint at {tmp_path / 'no.pt'}")):
        load_checkpoint(tmp_path / "no.pt", CFG, gd_config())
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(DeepCollapseError, match=re.escape(f"cannot read checkpoint {tmp_path / 'bad.pt'}: ")):
        load_checkpoint(tmp_path / "bad.pt", CFG, gd_config())
    ckpt = torch.load(saved, weights_only=True)
    ckpt["note"] = fractions.Fraction(1, 3)  # any Python object: refused (weights only, no code runs)
    torch.save(ckpt, tmp_path / "pickle.pt")
    with pytest.raises(DeepCollapseError, match="cannot read checkpoint"):
        load_checkpoint(tmp_path / "pickle.pt", CFG, gd_config())
