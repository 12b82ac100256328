"""analyze_solution, the one record of what a DUFM solution reached: verdicts on known solutions (every
geometry of H1 at the optimum, zero, the SRG construction, unfinished and diverged runs) and the record's
values against independent numpy computations."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from deepcollapse.dufm.model import DUFM, DUFMConfig
from deepcollapse.dufm.solve import SolverConfig, solve
from deepcollapse.files import to_jsonable
from deepcollapse.plots import plot_spectra
from deepcollapse.theory.analysis import VERDICTS, analyze_solution, dnc_checks, verdict
from deepcollapse.theory.closed_form import optimal_parameters, zero_threshold
from deepcollapse.theory.lowrank import srg_parameters


def _cfg(K: int, L: int, **kw) -> DUFMConfig:
    base = dict(num_classes=K, n_per_class=3, num_layers=L, width=K + 2, lambda_h=2e-3, lambda_w=2e-3)
    return DUFMConfig(**{**base, **kw})


OPTIMA = [
    (K, L, h1)
    for K in (2, 3, 10)
    for L in (1, 2, 3, 4)
    for h1 in ("orthogonal", "antipodal", "etf")
    if not (h1 == "antipodal" and (K != 2 or L < 2)) and not (h1 == "etf" and L < 2)
]


@pytest.mark.parametrize("K, L, h1", OPTIMA, ids=lambda v: str(v))
def test_every_optimum_is_dnc_whatever_the_h1_angle(K, L, h1):
    """The orthogonal, antipodal and simplex-ETF H1 optima differ in H1's free angle (and so in the rank of
    the layer-2 pre-activation: K, 1, K-1) and are all DNC."""
    cfg = _cfg(K, L)
    h, ws = optimal_parameters(cfg, h1=h1, generator=torch.Generator().manual_seed(K + L))
    a = analyze_solution(h, ws, cfg, srg=False)
    assert a["verdict"] == "dnc", a["checks"]
    assert a["checks"] == {"gap": True, "nc1": True, "nc2_orth": True, "norms": True}
    assert abs(a["gap"]) < 1e-13 and a["rel_grad_norm"] < 1e-10
    if L >= 2:
        assert a["ranks_pre"][0] == {"orthogonal": K, "antipodal": 1, "etf": K - 1}[h1]
        assert a["ranks_pre"][1:] == [K] * (L - 2) and a["ranks_post"][1:] == [K] * (L - 1)
    assert a["rank_out"] == K and a["dnc_proven_optimal"] == (K == 2 or L == 1)
    json.dumps(to_jsonable(a), allow_nan=False)


def test_zero_solution_past_the_threshold():
    lam = 1.2 * zero_threshold(num_classes=3, num_layers=3, n=3).lambda_equal
    cfg = _cfg(3, 3, lambda_h=lam, lambda_w=lam)
    h, ws = optimal_parameters(cfg)
    a = analyze_solution(h, ws, cfg, srg=False)
    assert a["verdict"] == "zero" and a["loss"] == 0.5 and a["gap"] == 0.0
    assert a["checks"] == {"gap": None, "nc1": None, "nc2_orth": None, "norms": None}
    assert a["ranks_pre"] == [0, 0] and a["rank_out"] == 0
    # below the threshold the zero point is not the DNC optimum: not "dnc", still "zero"
    below = _cfg(3, 3)
    assert (
        analyze_solution(torch.zeros_like(h), [torch.zeros_like(w) for w in ws], below, srg=False)["verdict"] == "zero"
    )


def test_srg_construction_and_a_solver_solution_from_it_are_low_rank():
    """The follow-up's setting (K = 10, L = 4, λ = 0.004, n = 5, width 30): the SRG construction, and plain
    GD (lr 0.5) from a perturbation of it, end low-rank below L_DNC."""
    cfg = DUFMConfig(num_classes=10, n_per_class=5, num_layers=4, width=30, lambda_h=4e-3, lambda_w=4e-3)
    h, ws = srg_parameters(cfg)
    a = analyze_solution(h, ws, cfg)
    assert a["verdict"] == "low-rank"
    assert a["ranks_pre"] == [5, 5, 5] and a["ranks_post"][-1] == 10 and a["rank_out"] == 10
    assert a["ratio_srg"] == pytest.approx(1.0, abs=1e-10) and a["ratio_dnc"] < 0.85
    g = torch.Generator().manual_seed(0)
    start = [p + 1e-2 * torch.randn(p.shape, generator=g, dtype=p.dtype) for p in (h, *ws)]
    model = DUFM.from_parameters(cfg, start[0], start[1:])
    solve(model, SolverConfig(optimizer="gd", lr=0.5, max_steps=200, metrics=False))
    b = analyze_solution(model.h1, list(model.weights), cfg)
    assert b["verdict"] == "low-rank" and b["ratio_dnc"] < 0.85 and b["rank_pre_last"] == 5


def test_unfinished_and_diverged_runs_are_not_dnc():
    cfg = _cfg(2, 3)
    model = DUFM(cfg)  # the random start
    assert analyze_solution(model.h1, list(model.weights), cfg, srg=False)["verdict"] == "other"
    solve(model, SolverConfig(optimizer="gd", lr=0.5, max_steps=30, metrics=False))  # far from done
    a = analyze_solution(model.h1, list(model.weights), cfg, srg=False)
    assert a["verdict"] == "other" and a["gap"] > 1e-3 and a["checks"]["gap"] is False
    bad = [model.h1.detach() * math.inf, *[w.detach() for w in model.weights]]
    d = analyze_solution(bad[0], bad[1:], cfg)
    assert d["verdict"] == "diverged" and math.isnan(d["loss"])


@pytest.mark.parametrize("h1, eps", [("orthogonal", 3e-3), ("antipodal", 3e-3), ("antipodal", 3e-2)])
def test_verdict_tolerance_boundaries(h1, eps):
    """A perturbed optimum: DNC at a tolerance above its errors, not below; never "low-rank" (for the
    antipodal H1 the layer-2 pre-activation has rank 1, which the theory leaves free)."""
    cfg = _cfg(2, 3)
    h, ws = optimal_parameters(cfg, h1=h1)
    g = torch.Generator().manual_seed(1)
    h = h + eps * torch.randn(h.shape, generator=g, dtype=h.dtype)
    a = analyze_solution(h, ws, cfg, srg=False)
    worst_sq = max(abs(a["gap"]), *(e["nc1"] for e in a["layers"]))
    worst_dist = max(
        a["s_rel_err"],
        *(e[k] for e in a["layers"] for k in ("mean_norm_rel_err", "weight_norm_rel_err")),
        *(e["nc2_orth"] for e in a["layers"][1:]),
    )
    need = max(worst_sq, worst_dist**2)  # the smallest tolerance that accepts it
    assert 1e-8 < need < 1e-1
    assert verdict(a, tol=need * 1.01) == "dnc"
    assert verdict(a, tol=need * 0.99) == "other"
    assert a["verdict"] == ("dnc" if need <= 1e-3 else "other")  # the default tol is 1e-3
    assert (need <= 1e-3) == (eps == 3e-3)
    assert analyze_solution(h, ws, cfg, tol=need * 0.99, srg=False)["verdict"] == "other"


def test_record_values_against_numpy():
    """Gap, loss ratio, gradient norm, ranks, spectra and output norm of a random point, computed by hand."""
    cfg = _cfg(3, 3, n_per_class=4)
    model = DUFM(cfg)
    a = analyze_solution(model.h1, list(model.weights), cfg, srg=False)
    h = model.h1.detach().numpy()
    ws = [w.detach().numpy() for w in model.weights]
    labels = np.repeat(np.arange(3), 4)

    def means(f):
        return np.stack([f[:, labels == c].mean(1) for c in range(3)])

    feats, pres = [h], []
    for w in ws[:-1]:
        pres.append(w @ feats[-1])
        feats.append(np.maximum(pres[-1], 0))
    out = ws[-1] @ feats[-1]
    c = (4 * 2e-3 * 2e-3**3) ** 0.25  # L_DNC from its definition: minimize f(s) on a fine grid
    s = np.linspace(0, 1, 2_000_001)
    dnc = (0.5 * (1 - s) ** 2 + 1.5 * 4 * c * s**0.5).min()
    assert a["dnc_loss"] == pytest.approx(dnc, rel=1e-9)
    assert a["gap"] == pytest.approx((a["loss"] - dnc) / dnc, rel=1e-8)
    assert a["ratio_dnc"] == pytest.approx(a["loss"] / dnc, rel=1e-9)

    def rank(f):
        sv = np.linalg.svd(means(f), compute_uv=False)
        return int((sv > 1e-3 * sv.max()).sum())

    assert a["ranks_pre"] == [rank(p) for p in pres] and a["rank_pre_last"] == rank(pres[-1])
    assert a["ranks_post"] == [rank(f) for f in feats] and a["rank_out"] == rank(out)
    sv = np.linalg.svd(means(pres[-1]), compute_uv=False)
    spec = {(e["layer"], e["stage"]): e["singular_values"] for e in a["spectra"]}
    assert spec[(3, "pre")] == pytest.approx(list(sv / sv.max()), rel=1e-10)
    assert a["output_norm"] == pytest.approx(np.linalg.norm(out), rel=1e-12)
    # the gradient norm by autograd on the module (the objective itself is held to numpy in test_dufm)
    model.loss()[0].backward()
    gn = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in model.parameters()))
    assert a["grad_norm"] == pytest.approx(gn, rel=1e-12)
    pn = math.sqrt(float(np.sum(h**2)) + sum(float(np.sum(w**2)) for w in ws))
    assert a["rel_grad_norm"] == pytest.approx(gn * pn / a["loss"], rel=1e-12)
    assert a["verdict"] in VERDICTS and a["num_classes"] == 3 and a["num_samples"] == 12


def test_unbalanced_classes_have_no_theory():
    cfg = DUFMConfig(num_classes=3, n_per_class=[2, 3, 4], num_layers=3, width=5)
    model = DUFM(cfg)
    a = analyze_solution(model.h1, list(model.weights), cfg)
    assert a["dnc_loss"] is None and a["gap"] is None and a["srg_loss"] is None
    assert a["checks"]["gap"] is None and a["verdict"] == "other"


def test_plot_spectra(tmp_path):
    cfg = _cfg(3, 3)
    h1, ws = optimal_parameters(cfg)
    path = plot_spectra(analyze_solution(h1, ws, cfg, srg=False), tmp_path / "s.png")
    assert path.exists() and path.stat().st_size > 1000


@pytest.mark.parametrize(
    "field, layer, value, check",
    [
        ("gap", None, 2e-3, "gap"),
        ("gap", None, -2e-3, "gap"),
        ("nc1", 0, 2e-3, "nc1"),
        ("nc1", 3, 2e-3, "nc1"),
        ("nc1", 2, math.nan, "nc1"),
        ("nc2_orth", 1, 0.04, "nc2_orth"),
        ("nc2_orth", 3, 0.04, "nc2_orth"),
        ("mean_norm_rel_err", 0, 0.04, "norms"),
        ("weight_norm_rel_err", 3, 0.04, "norms"),
        ("s_rel_err", None, 0.04, "norms"),
    ],
)
def test_each_dnc_condition_is_checked(field, layer, value, check):
    """One quantity of an exact optimum's record pushed past its bound (tol 1e-3; distances √tol ≈ 0.0316)
    fails its check and the verdict; just inside the bound it passes."""
    cfg = _cfg(3, 4)
    h, ws = optimal_parameters(cfg)
    a = analyze_solution(h, ws, cfg, srg=False)
    target = a if layer is None else a["layers"][layer]
    target[field] = value
    assert dnc_checks(a, tol=1e-3)[check] is False and verdict(a) == "other"
    if math.isfinite(value):
        target[field] = value / 2 if check in ("gap", "nc1") else 0.031
        assert dnc_checks(a, tol=1e-3)[check] is True and verdict(a) == "dnc"
