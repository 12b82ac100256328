"""The stopping rules at their boundaries: each solver stops exactly at the first check where a rule holds,
stall counters reset, the certificate is reported, and the vocabulary is the same for every solver."""

from __future__ import annotations

import math

import pytest
import torch

from deepcollapse import theory as T
from deepcollapse._validate import DeepCollapseError
from deepcollapse.dufm.batched import GDOptions, train_batched
from deepcollapse.dufm.model import DUFM, DUFMConfig
from deepcollapse.dufm.solve import SolverConfig, solve
from deepcollapse.dufm.stopping import STOP_REASONS, StopRules, calm_count, relative_gap, stop_codes

F64 = torch.float64
CFG = DUFMConfig(num_classes=2, n_per_class=3, num_layers=3, width=4, lambda_h=0.01, lambda_w=0.01, seed=2)


def _t(v):
    return torch.tensor(v, dtype=F64)


def _codes(rules, **kw):
    base = dict(loss=_t(1.0), grad_norm=_t(1.0), param_norm=_t(1.0), calm=torch.tensor(0), step=0, max_steps=10)
    return (
        STOP_REASONS[int(stop_codes(rules, **{**base, **kw})) - 1] if int(stop_codes(rules, **{**base, **kw})) else ""
    )


def test_each_rule_holds_at_its_boundary_and_not_before():
    r = StopRules(tol_grad=1e-3, tol_gap=1e-6, patience=3)
    # stationary: ||g||·||θ||/L <= tol_grad (equality stops, just above does not)
    assert _codes(r, grad_norm=_t(2e-3), param_norm=_t(0.5), loss=_t(1.0)) == "stationary"
    assert _codes(r, grad_norm=_t(2.0000001e-3), param_norm=_t(0.5), loss=_t(1.0)) == ""
    # the certified gap only with a lower bound: (L - L*)/|L*| <= tol_gap
    assert _codes(r, loss=_t(2.0 * (1 + 1e-6)), lower_bound=2.0) == "gap"
    assert _codes(r, loss=_t(2.0 * (1 + 1.1e-6)), lower_bound=2.0) == ""
    assert _codes(r, loss=_t(2.0)) == ""
    # stall: calm >= patience
    assert _codes(r, calm=torch.tensor(3)) == "stalled" and _codes(r, calm=torch.tensor(2)) == ""
    # budgets
    assert _codes(r, step=10) == "max_steps" and _codes(r, step=9) == ""
    assert _codes(StopRules(max_seconds=2.0), seconds=2.0) == "max_seconds"
    assert _codes(StopRules(target_loss=0.5), loss=_t(0.5)) == "target_loss"
    # priority: divergence first, then the gap, then stationarity
    assert _codes(r, loss=_t(math.nan), step=10) == "diverged"
    assert _codes(r, grad_norm=_t(math.inf)) == "diverged"
    assert _codes(r, loss=_t(2.0), lower_bound=2.0, grad_norm=_t(0.0), step=10) == "gap"
    assert _codes(r, grad_norm=_t(0.0), calm=torch.tensor(5), step=10) == "stationary"


def test_batched_codes_and_calm_counter_reset():
    r = StopRules(tol_rel=1e-3, patience=2)
    calm = torch.zeros(3, dtype=torch.int64)
    prev = torch.full((3,), math.nan, dtype=F64)
    seq = [[1.0, 1.0, 1.0], [1.0, 1.5, 1.0005], [1.0, 1.5, 1.5], [1.0, 1.5, 1.5]]
    got = []
    for losses in seq:
        loss = _t(losses)
        calm = calm_count(calm, loss, prev, r.tol_rel)
        prev = loss
        got.append(calm.tolist())
    # first check: no previous loss -> 0; a change above tol_rel resets the count to 0
    assert got == [[0, 0, 0], [1, 0, 1], [2, 1, 0], [3, 2, 1]]
    one = torch.ones(3, dtype=F64)
    codes = stop_codes(r, loss=one, grad_norm=one, param_norm=one, calm=calm, step=0, max_steps=9)
    assert [STOP_REASONS[int(c) - 1] if int(c) else "" for c in codes] == ["stalled", "stalled", ""]
    assert float(relative_gap(_t(3.0), 2.0)) == 0.5 and float(relative_gap(_t(0.25), 0.0)) == 0.25
    assert float(relative_gap(_t(1.0), -2.0)) == 1.5


def _dnc() -> float:
    return T.dnc_loss(num_classes=2, num_layers=3, n=3, lambda_h=0.01, lambda_w=0.01)


def _every_step(**kw) -> SolverConfig:
    return SolverConfig(optimizer="gd", lr=0.5, metrics=False, history_points=10_000, **kw)


def test_solve_stops_at_the_first_step_where_a_rule_holds():
    """A reference GD run without stopping rules gives rel_grad_norm and gap per step; with a tolerance
    equal to the value at one step, the run stops exactly at the first step whose value is <= it."""
    ref: list[dict] = []
    solve(DUFM(CFG), _every_step(max_steps=400, tol_grad=0, tol_rel=0), callback=ref.append, dnc_loss=_dnc())
    assert [r["step"] for r in ref] == list(range(401))
    tol = ref[250]["rel_grad_norm"]
    first = next(r["step"] for r in ref if r["rel_grad_norm"] <= tol)
    res = solve(DUFM(CFG), _every_step(max_steps=400, tol_grad=tol, tol_rel=0), dnc_loss=_dnc())
    assert res.stop_reason == "stationary" and res.steps == first
    assert res.rel_grad_norm == ref[first]["rel_grad_norm"] and res.grad_norm == ref[first]["grad_norm"]
    assert res.gap == ref[first]["gap"] == pytest.approx((ref[first]["loss"] - _dnc()) / _dnc(), rel=1e-12)
    # the certified gap, with L_DNC as the (K = 2: proven) lower bound
    tol_gap = ref[300]["gap"]
    first = next(r["step"] for r in ref if r["gap"] <= tol_gap)
    res = solve(DUFM(CFG), _every_step(max_steps=400, tol_grad=0, tol_rel=0, tol_gap=tol_gap), lower_bound=_dnc())
    assert res.stop_reason == "gap" and res.steps == first
    # without the bound the gap rule is off
    res = solve(DUFM(CFG), _every_step(max_steps=400, tol_grad=0, tol_rel=0, tol_gap=tol_gap), dnc_loss=_dnc())
    assert res.stop_reason == "max_steps" and res.steps == 400


def test_solve_stall_patience_counts_consecutive_steps():
    """A stall needs `patience` consecutive calm steps: with tol_rel between two step changes the counter
    resets on the larger one; the stop is at the first step ending such a run."""
    ref: list[dict] = []
    solve(DUFM(CFG), _every_step(max_steps=300, tol_grad=0, tol_rel=0), callback=ref.append)
    rel = [math.inf] + [abs(b["loss"] - a["loss"]) / abs(b["loss"]) for a, b in zip(ref, ref[1:], strict=False)]
    tol_rel, patience = rel[120], 5
    calm, expected = 0, None
    for step, v in enumerate(rel):
        calm = calm + 1 if v <= tol_rel else 0
        if calm >= patience:
            expected = step
            break
    assert expected is not None and expected > patience
    res = solve(DUFM(CFG), _every_step(max_steps=300, tol_grad=0, tol_rel=tol_rel, patience=patience))
    assert res.stop_reason == "stalled" and res.steps == expected


def test_batched_stops_on_the_same_rules_at_check_steps():
    """train_batched checks every `check_every` steps; a configuration stops at the first check step where a
    rule holds, with the same vocabulary and certificate as solve."""
    ref: list[dict] = []
    solve(DUFM(CFG), _every_step(max_steps=400, tol_grad=0, tol_rel=0), callback=ref.append)
    tol = ref[205]["rel_grad_norm"]
    first = next(r["step"] for r in ref if r["step"] % 10 == 0 and r["rel_grad_norm"] <= tol)
    other = DUFMConfig(**{**CFG.to_dict(), "seed": 5})
    res = train_batched([CFG, other], GDOptions(lr=0.5, max_steps=400, tol_grad=tol, tol_rel=0, check_every=10))
    assert res[0].stop_reason == "stationary" and res[0].steps == first
    assert res[0].rel_grad_norm == pytest.approx(ref[first]["rel_grad_norm"], rel=1e-9)
    assert {r.stop_reason for r in res} <= set(STOP_REASONS)
    # stall: a huge tol_rel makes every check after the first calm -> stop at check number `patience`
    res = train_batched([CFG], GDOptions(lr=0.5, max_steps=400, tol_grad=0, tol_rel=1.0, patience=4, check_every=10))
    assert res[0].stop_reason == "stalled" and res[0].steps == 40
    # the certified gap with per-configuration bounds (None: off)
    d = _dnc()
    gaps = {r["step"]: (r["loss"] - d) / d for r in ref if r["step"] % 10 == 0}
    tol_gap = gaps[300] * (1 + 1e-9)
    first = min(step for step, g in gaps.items() if g <= tol_gap)
    res = train_batched(
        [CFG, other],
        GDOptions(lr=0.5, max_steps=400, tol_grad=0, tol_rel=0, tol_gap=tol_gap, check_every=10),
        lower_bounds=[d, None],
    )
    assert res[0].stop_reason == "gap" and res[0].steps == first and res[1].stop_reason == "max_steps"
    with pytest.raises(DeepCollapseError, match="lower_bounds"):
        train_batched([CFG], GDOptions(max_steps=2), lower_bounds=[d, d])


def test_default_solve_certifies_its_end_point():
    """L-BFGS on a K = 2 DUFM with L_DNC as the bound stops on the certified gap, and without the bound on
    stationarity, each reporting its certificate."""
    kw = dict(num_classes=2, n_per_class=5, num_layers=3, width=8, lambda_h=5e-3, lambda_w=5e-3)
    d = T.dnc_loss(num_classes=2, num_layers=3, n=5, lambda_h=5e-3, lambda_w=5e-3)
    res = solve(DUFM(DUFMConfig(**kw, seed=0)), SolverConfig(metrics=False, tol_grad=0), dnc_loss=d, lower_bound=d)
    assert res.stop_reason == "gap" and 0 <= res.gap <= SolverConfig().tol_gap and res.steps < 100
    res = solve(DUFM(DUFMConfig(**kw, seed=1)), SolverConfig(metrics=False), dnc_loss=d)
    assert res.stop_reason == "stationary" and res.rel_grad_norm <= SolverConfig().tol_grad
    assert res.steps < 100


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(tol_grad=-1.0), "tol_grad"),
        (dict(tol_gap=float("nan")), "tol_gap"),
        (dict(patience=0), "patience"),
        (dict(max_seconds=-1.0), "max_seconds"),
    ],
)
def test_rule_errors_name_the_parameter(kw, match):
    with pytest.raises(DeepCollapseError, match=match):
        SolverConfig(**kw)
    with pytest.raises(DeepCollapseError, match=match):
        GDOptions(**kw)


def test_certificate_is_the_gradient_at_the_returned_parameters():
    """The result's grad_norm, rel_grad_norm and gap are those of the parameters it returns (autograd on
    the returned model, the parameter norm and L_DNC computed here)."""
    model = DUFM(CFG)
    res = solve(model, SolverConfig(metrics=False), dnc_loss=_dnc())
    total = model.loss()[0]
    grads = torch.autograd.grad(total, [model.h1, *model.weights])
    gn = math.sqrt(sum(float(g.pow(2).sum()) for g in grads))
    pn = math.sqrt(sum(float(p.detach().pow(2).sum()) for p in model.parameters()))
    assert res.grad_norm == pytest.approx(gn, rel=1e-12)
    assert res.rel_grad_norm == pytest.approx(gn * pn / float(total.detach()), rel=1e-12)
    assert res.gap == pytest.approx((float(total.detach()) - _dnc()) / _dnc(), rel=1e-9)
    assert res.stop_reason in STOP_REASONS
