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
from deepcollapse.dufm.stopping import (
    DEFAULT_MAX_STEPS,
    STOP_REASONS,
    StopRules,
    calm_count,
    relative_gap,
    relative_grad_norm,
    stop_codes,
)

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


def test_documented_defaults_and_vocabulary():
    """The defaults and step budgets the docs (docs/theory.md, the stop-reason table) promise."""
    r = StopRules()
    assert (r.tol_gap, r.tol_grad, r.tol_rel, r.patience) == (1e-9, 1e-5, 1e-13, 20)
    assert r.target_loss is None and r.max_seconds is None
    assert DEFAULT_MAX_STEPS == {"gd": 100_000, "lbfgs": 2_000, "nesterov": 50_000, "adam": 50_000}
    assert STOP_REASONS == ("diverged", "gap", "stationary", "stalled", "target_loss", "max_seconds", "max_steps")


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(tol_gap=-1e-3), "tol_gap must be >= 0.0, got -0.001"),
        (dict(tol_gap="x"), "tol_gap must be a number, got 'x'"),
        (dict(tol_grad=-1e-3), "tol_grad must be >= 0.0, got -0.001"),
        (dict(tol_grad=math.inf), "tol_grad must be finite, got inf"),
        (dict(tol_rel=-1e-3), "tol_rel must be >= 0.0, got -0.001"),
        (dict(tol_rel=math.nan), "tol_rel must be finite, got nan"),
        (dict(patience=0), "patience must be >= 1, got 0"),
        (dict(patience=2.5), "patience must be an integer, got 2.5"),
        (dict(target_loss=math.nan), "target_loss must be finite, got nan"),
        (dict(target_loss="low"), "target_loss must be a number, got 'low'"),
        (dict(max_seconds=-1.0), "max_seconds must be >= 0.0, got -1.0"),
        (dict(max_seconds=math.inf), "max_seconds must be finite, got inf"),
    ],
)
def test_rules_reject_bad_values_with_a_one_line_message(kw, message):
    with pytest.raises(DeepCollapseError) as info:
        StopRules(**kw)
    assert str(info.value) == message


def test_rules_accept_values_at_and_above_their_bounds():
    """Zero tolerances (a rule switched off) and any positive tolerance are valid; numbers are stored as
    Python floats/ints; a target loss may be negative (the rule only compares)."""
    for v in (0, 0.5, 3.0):
        r = StopRules(tol_gap=v, tol_grad=v, tol_rel=v, max_seconds=v, target_loss=-v)
        assert (r.tol_gap, r.tol_grad, r.tol_rel, r.max_seconds, r.target_loss) == (v, v, v, v, -v)
        assert all(type(x) is float for x in (r.tol_gap, r.tol_grad, r.tol_rel, r.max_seconds, r.target_loss))
    r = StopRules(patience=1)
    assert r.patience == 1
    r = StopRules(patience=4.0)
    assert r.patience == 4 and type(r.patience) is int


def test_relative_grad_norm_uses_the_absolute_loss_floored_at_1e_300():
    """||g||·||θ||/|L|: exact on small and negative losses; 0 at the zero solution; 1e300·||g||·||θ|| at L = 0."""
    assert float(relative_grad_norm(_t(2.0), _t(3.0), _t(0.5))) == 12.0
    assert float(relative_grad_norm(_t(2.0), _t(3.0), _t(-0.25))) == 24.0
    assert float(relative_grad_norm(_t(0.0), _t(0.0), _t(0.0))) == 0.0
    assert float(relative_grad_norm(_t(1.0), _t(1.0), _t(0.0))) == pytest.approx(1e300, rel=1e-15)
    assert float(relative_grad_norm(_t(1.0), _t(1.0), _t(1e-300))) == pytest.approx(1e300, rel=1e-15)


def test_relative_gap_keeps_float64_and_the_loss_dtype():
    """A Python float loss is read in float64 (a gap of 2^-40 survives); a float reference is cast to the
    loss's dtype (0.1 vs 0.1 is exactly 0); a float32 loss gives a float32 gap; a negative reference uses
    its absolute value."""
    assert float(relative_gap(1.0 + 2.0**-40, 1.0)) == 2.0**-40
    assert relative_gap(1.0, 1.0).dtype == F64
    assert float(relative_gap(_t(0.1), 0.1)) == 0.0
    assert float(relative_gap(torch.tensor(0.1, dtype=torch.float32), 0.1)) == 0.0
    g32 = relative_gap(torch.tensor([3.0, 1.0], dtype=torch.float32), 2.0)
    assert g32.dtype == torch.float32 and g32.tolist() == [0.5, -0.5]
    assert float(relative_gap(_t(-3.0), -2.0)) == -0.5
    assert float(relative_gap(_t(-0.5), 0.0)) == -0.5
    # per-configuration references as a tensor
    assert relative_gap(_t([3.0, 1.0, 2.0]), _t([2.0, 0.0, -4.0])).tolist() == [0.5, 1.0, 1.5]


def test_rules_follow_the_device_of_the_losses():
    """Losses on another device (the meta device stands in for an accelerator) with CPU references and
    CPU-built budget flags: gaps and codes land on the losses' device (a device mix would raise)."""
    meta = torch.device("meta")
    loss = torch.ones(3, dtype=F64, device=meta)
    assert relative_gap(loss, _t([1.0, 2.0, 3.0])).device == meta
    calm = torch.zeros(3, dtype=torch.int64, device=meta)
    kw = dict(loss=loss, grad_norm=loss, param_norm=loss, calm=calm, step=0, max_steps=3)
    codes = stop_codes(StopRules(), **kw)
    assert codes.device == meta and codes.dtype == torch.int64
    assert stop_codes(StopRules(target_loss=0.0), **kw, lower_bound=_t([1.0, 1.0, 1.0])).device == meta


def test_calm_count_at_its_boundary():
    """|L - L_prev|/|L| <= tol_rel: equality is calm; the count grows by one from any value; negative
    losses use absolute values; a loss stuck at exactly 0 is calm (|L| floored at 1e-300)."""
    c = torch.tensor([7, 7, 7, 7, 7])
    loss = _t([2.0, 2.0, -2.0, -2.0, 0.0])
    prev = _t([1.0, 0.9, -3.0, -0.9, 0.0])
    assert calm_count(c, loss, prev, 0.5).tolist() == [8, 0, 8, 0, 8]
    assert calm_count(torch.tensor([7]), _t([0.0]), _t([1e-290]), 1.0).tolist() == [0]


def test_stop_codes_are_integers_in_priority_order():
    """With every rule holding, removing the winner one by one yields the codes 1..7 in the order of
    STOP_REASONS; the certified gap holds at equality (gap = tol_gap exactly)."""
    rules = StopRules(tol_gap=0.5, tol_grad=1.0, patience=2, target_loss=5.0, max_seconds=1.0)
    state = dict(loss=_t(3.0), grad_norm=_t(0.5), param_norm=_t(1.0), calm=torch.tensor(2), step=4, max_steps=4)
    state.update(seconds=1.0, lower_bound=2.0)
    got = []
    steps = [
        dict(loss=_t(math.inf)),
        dict(loss=_t(3.0)),
        dict(lower_bound=None),
        dict(grad_norm=_t(4.0)),
        dict(calm=torch.tensor(1)),
        dict(target_loss=None),
        dict(seconds=0.5),
        dict(step=3),
    ]
    for change in steps:
        if "target_loss" in change:
            rules = StopRules(tol_gap=0.5, tol_grad=1.0, patience=2, max_seconds=1.0)
        else:
            state.update(change)
        codes = stop_codes(rules, **state)
        assert codes.dtype == torch.int64 and codes.shape == ()
        got.append(int(codes))
    assert got == [1, 2, 3, 4, 5, 6, 7, 0]
    # with the seconds left at their default (0 s spent), a positive time budget does not stop
    assert _codes(StopRules(max_seconds=0.5)) == "" and _codes(StopRules(max_seconds=0.5), seconds=0.49) == ""
    assert _codes(StopRules(max_seconds=0.0)) == "max_seconds"
    assert _codes(StopRules(target_loss=0.5), loss=_t(0.5000001)) == ""
    assert _codes(StopRules(), loss=_t(-math.inf)) == "diverged"
    assert _codes(StopRules(), grad_norm=_t(math.nan)) == "diverged"
