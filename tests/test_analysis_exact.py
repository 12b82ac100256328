"""analyze_solution field by field against float64 numpy/autograd computations written here from the
definitions; the diverged points (with a pre-activation that overflows while the loss stays finite); the
rank tolerance; dnc_checks and each branch of verdict at its exact boundary; where L_SRG applies."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from deepcollapse.dufm.model import DUFMConfig
from deepcollapse.theory.analysis import analyze_solution, dnc_checks, verdict
from deepcollapse.theory.closed_form import optimal_parameters
from deepcollapse.theory.lowrank import srg_parameters
from dufm_reference import np_dufm_loss

KEYS_DIVERGED = {"num_classes", "num_layers", "num_samples", "tol", "rank_rtol", "verdict_rule", "loss", "verdict"}
KEYS = KEYS_DIVERGED | {
    *("fit", "reg", "dnc_loss", "gap", "s", "s_theory", "s_rel_err", "h1_cos", "layers", "zero_threshold"),
    *("grad_norm", "rel_grad_norm", "output_norm", "ratio_dnc", "srg_loss", "ratio_srg", "dnc_proven_optimal"),
    *("ranks_pre", "ranks_post", "rank_out", "rank_pre_last", "spectra", "checks"),
}


def _np_forward(h, ws):
    pres, feats = [], [h]
    for w in ws[:-1]:
        pres.append(w @ feats[-1])
        feats.append(np.maximum(pres[-1], 0.0))
    return pres, feats, ws[-1] @ feats[-1]


def _np_means(f, labels, k):
    return np.stack([f[:, labels == c].mean(1) for c in range(k)])


def test_every_field_of_a_float32_point_with_per_layer_lambdas():
    """K = 3, L = 3, widths 5, 4, 6, λ_H ≠ λ_W1 ≠ λ_W2 ≠ λ_W3, float32 parameters offset from the origin,
    non-default tol and rank_rtol: every number of the record from the definitions, in float64."""
    k, n, lam_h, lams = 3, 4, 3e-3, [1e-3, 2e-3, 4e-3]
    cfg = DUFMConfig(num_classes=k, n_per_class=n, num_layers=3, width=[5, 4, 6], lambda_h=lam_h, lambda_w=lams)
    g = torch.Generator().manual_seed(3)
    shapes = [(5, 12), (4, 5), (6, 4), (3, 6)]
    params = [(0.5 + torch.randn(s, generator=g, dtype=torch.float64)).float() for s in shapes]
    a = analyze_solution(params[0], params[1:], cfg, tol=2e-3, rank_rtol=1e-2, srg=False)
    assert set(a) == KEYS
    assert (a["num_classes"], a["num_layers"], a["num_samples"], a["tol"], a["rank_rtol"]) == (3, 3, 12, 2e-3, 1e-2)
    h, *ws = (p.double().numpy() for p in params)
    labels = np.repeat(np.arange(k), n)
    pres, feats, out = _np_forward(h, ws)
    y = np.eye(k)[:, labels]
    fit = ((out - y) ** 2).sum() / 24
    reg = lam_h / 2 * (h**2).sum() + sum(lam / 2 * (w**2).sum() for lam, w in zip(lams, ws, strict=True))
    loss = np_dufm_loss(h, ws, [n] * k, lam_h, lams)
    assert a["loss"] == pytest.approx(loss, rel=1e-12) and a["loss"] == pytest.approx(fit + reg, rel=1e-12)
    assert a["fit"] == pytest.approx(fit, rel=1e-12) and a["reg"] == pytest.approx(reg, rel=1e-12)
    # L_DNC = min_s ½(1-s)² + (K/2)(L+1) C s^{2/(L+1)}, C = (n λ_H λ_1 λ_2 λ_3)^{1/4}: a grid, refined
    c = (n * lam_h * math.prod(lams)) ** 0.25
    grid = np.linspace(0.0, 1.0, 2_000_001)
    dnc = (0.5 * (1 - grid) ** 2 + 0.5 * k * 4 * c * grid**0.5).min()
    assert a["dnc_loss"] == pytest.approx(dnc, rel=1e-9)
    assert a["gap"] == pytest.approx((loss - dnc) / dnc, rel=1e-8)
    assert a["ratio_dnc"] == pytest.approx(loss / dnc, rel=1e-9)
    assert a["srg_loss"] is None and a["ratio_srg"] is None and a["dnc_proven_optimal"] is False
    # gradient by autograd on a float64 copy, the loss written here
    tp = [torch.tensor(p, requires_grad=True) for p in (h, *ws)]
    z = tp[0]
    for w in tp[1:-1]:
        z = torch.relu(w @ z)
    t_loss = ((tp[-1] @ z - torch.tensor(y)) ** 2).sum() / 24 + lam_h / 2 * (tp[0] ** 2).sum()
    t_loss = t_loss + sum(lam / 2 * (w**2).sum() for lam, w in zip(lams, tp[1:], strict=True))
    gn = math.sqrt(sum(float((gr**2).sum()) for gr in torch.autograd.grad(t_loss, tp)))
    pn = math.sqrt(sum(float((p**2).sum()) for p in (h, *ws)))
    assert a["grad_norm"] == pytest.approx(gn, rel=1e-12)
    assert a["rel_grad_norm"] == pytest.approx(gn * pn / loss, rel=1e-12)
    assert a["output_norm"] == pytest.approx(np.linalg.norm(out), rel=1e-12)

    def spectrum(f):
        sv = np.linalg.svd(_np_means(f, labels, k), compute_uv=False)
        return sv / sv.max(), int((sv > 1e-2 * sv.max()).sum())

    stages = [(1, "free", h), (2, "pre", pres[0]), (2, "post", feats[1]), (3, "pre", pres[1])]
    stages += [(3, "post", feats[2]), (4, "output", out)]
    assert [(e["layer"], e["stage"]) for e in a["spectra"]] == [st[:2] for st in stages]
    for e, (_, _, f) in zip(a["spectra"], stages, strict=True):
        assert e["singular_values"] == pytest.approx(list(spectrum(f)[0]), rel=1e-10, abs=1e-14)
    assert a["ranks_pre"] == [spectrum(p)[1] for p in pres] and a["rank_pre_last"] == spectrum(pres[1])[1]
    assert a["ranks_post"] == [spectrum(f)[1] for f in feats] and a["rank_out"] == spectrum(out)[1]
    assert a["checks"]["gap"] is False and a["verdict"] == "other"


def test_rank_rtol_and_the_l1_record():
    """L = 1: no pre-activation; class means of H1 with singular values 1, 0.05, 0.002: rank 3 at the default
    rtol 1e-3, 2 at 1e-2, 1 at 1e-1."""
    cfg = DUFMConfig(num_classes=3, n_per_class=2, num_layers=1, width=3, lambda_h=1e-3, lambda_w=1e-3)
    h = torch.diag(torch.tensor([1.0, 0.05, 0.002], dtype=torch.float64)).repeat_interleave(2, dim=1)
    w = torch.eye(3, dtype=torch.float64)
    a = analyze_solution(h, [w], cfg)
    assert a["rank_rtol"] == 1e-3 and a["tol"] == 1e-3 and a["srg_loss"] is None and a["ratio_srg"] is None
    assert a["ranks_pre"] == [] and a["rank_pre_last"] is None and a["ranks_post"] == [3] and a["rank_out"] == 3
    assert [(e["layer"], e["stage"]) for e in a["spectra"]] == [(1, "free"), (2, "output")]
    for e in a["spectra"]:
        assert e["singular_values"] == pytest.approx([1.0, 0.05, 0.002], rel=1e-14)
    for rtol, rank in ((1e-2, 2), (1e-1, 1)):
        b = analyze_solution(h, [w], cfg, rank_rtol=rtol)
        assert b["ranks_post"] == [rank] and b["rank_out"] == rank and b["rank_rtol"] == rtol


def test_the_zero_point_has_zero_spectra():
    cfg = DUFMConfig(num_classes=3, n_per_class=2, num_layers=2, width=4, lambda_h=1e-3, lambda_w=1e-3)
    h, ws = optimal_parameters(cfg)
    a = analyze_solution(torch.zeros_like(h), [torch.zeros_like(w) for w in ws], cfg, srg=False)
    assert all(e["singular_values"] == [0.0, 0.0, 0.0] for e in a["spectra"]) and len(a["spectra"]) == 4
    assert a["ranks_post"] == [0, 0] and a["output_norm"] == 0.0 and a["grad_norm"] == 0.0


def test_diverged_points():
    """A NaN or infinite parameter, an overflowing loss, and a finite loss whose layer-3 pre-activation
    overflows to -inf (the ReLU hides it from the output): "diverged", with only the keys that exist."""
    cfg = DUFMConfig(num_classes=2, n_per_class=1, num_layers=3, width=2, lambda_h=1e-3, lambda_w=1e-3)
    full = [torch.full((2, 2), v, dtype=torch.float64) for v in (1e80, 1e80, -1e150, 1.0)]
    a = analyze_solution(full[0], full[1:], cfg)
    assert a["verdict"] == "diverged" and set(a) == KEYS_DIVERGED
    with np.errstate(over="ignore"):  # -inf before the second ReLU
        assert math.isfinite(a["loss"]) and a["loss"] == pytest.approx(np_dufm_loss(*_np(full), [1, 1], 1e-3, 1e-3))
    assert a["verdict_rule"].startswith("diverged: non-finite loss") and a["verdict_rule"].endswith("other: the rest")
    for bad, expect in ((math.nan, math.isnan), (math.inf, math.isinf), (1e200, math.isinf)):
        p = [x.clone() for x in full[:2]] + [torch.ones(2, 2, dtype=torch.float64)] * 2
        p[1][0, 0] = bad
        d = analyze_solution(p[0], p[1:], cfg, tol=0.5, rank_rtol=0.25)
        assert d["verdict"] == "diverged" and set(d) == KEYS_DIVERGED and expect(d["loss"])
        assert (d["tol"], d["rank_rtol"], d["num_samples"], d["num_layers"], d["num_classes"]) == (0.5, 0.25, 2, 3, 2)
        assert verdict(d) == "diverged"


def _np(ps):
    return ps[0].numpy(), [p.numpy() for p in ps[1:]]


def test_where_the_srg_reference_applies():
    """K = 3 = C(3, 2), L = 3: the SRG construction at the smallest widths (3, 3, 3) has loss L_SRG;
    a hidden width below r = 3 (before the last layer) or d_L below K leaves no L_SRG, as do unbalanced
    classes and L = 1."""
    base = dict(num_classes=3, n_per_class=3, num_layers=3, lambda_h=2e-3, lambda_w=2e-3)
    cfg = DUFMConfig(width=[3, 3, 3], **base)
    h, ws = srg_parameters(cfg)
    a = analyze_solution(h, ws, cfg)
    assert a["ratio_srg"] == pytest.approx(1.0, abs=1e-9) and a["ratio_srg"] == a["loss"] / a["srg_loss"]
    for width in ([3, 2, 3], [2, 3, 3], [3, 3, 2]):
        c = DUFMConfig(width=width, **base)
        p = [torch.ones(s, dtype=torch.float64) for s in ((width[0], 9), (width[1], width[0]), (width[2], width[1]))]
        b = analyze_solution(p[0], [*p[1:], torch.ones(3, width[2], dtype=torch.float64)], c)
        assert b["srg_loss"] is None and b["ratio_srg"] is None, width
    unbalanced = DUFMConfig(**{**base, "n_per_class": [2, 3, 4]}, width=3)
    one = DUFMConfig(**{**base, "num_layers": 1}, width=3)
    for c in (unbalanced, one):
        hh = torch.ones(3, c.num_samples, dtype=torch.float64)
        b = analyze_solution(hh, [torch.eye(3, dtype=torch.float64)] * c.num_layers, c)
        assert b["srg_loss"] is None and b["ratio_srg"] is None


def _optimum_record():
    cfg = DUFMConfig(num_classes=3, n_per_class=2, num_layers=3, width=5, lambda_h=2e-3, lambda_w=2e-3)
    h, ws = optimal_parameters(cfg)
    return analyze_solution(h, ws, cfg, srg=False)


@pytest.mark.parametrize(
    "field, layer, bound",
    [
        *(("gap", None, "sq"), ("nc1", 2, "sq"), ("nc2_orth", 1, "dist"), ("s_rel_err", None, "dist")),
        *(("mean_norm_rel_err", 0, "dist"), ("weight_norm_rel_err", 2, "dist")),
    ],
)
def test_each_check_at_its_exact_bound(field, layer, bound):
    """tol = 0.25: squared quantities pass at 0.25 and fail just above; distances at √0.25 = 0.5."""
    a = _optimum_record()
    target = a if layer is None else a["layers"][layer]
    name = {"s_rel_err": "norms", "mean_norm_rel_err": "norms", "weight_norm_rel_err": "norms"}.get(field, field)
    edge = 0.25 if bound == "sq" else 0.5
    target[field] = edge
    assert dnc_checks(a, tol=0.25)[name] is True and verdict(a, tol=0.25) == "dnc"
    target[field] = math.nextafter(edge, 1.0)
    assert dnc_checks(a, tol=0.25)[name] is False and verdict(a, tol=0.25) != "dnc"
    target[field] = None if field != "gap" else math.inf
    assert dnc_checks(a, tol=0.25)[name] is False


def _other_record(**changes):
    """A record without a theory (unbalanced classes, K = 2, N = 4), then edited."""
    cfg = DUFMConfig(num_classes=2, n_per_class=[1, 3], num_layers=3, width=3, lambda_h=1e-3, lambda_w=1e-3)
    g = torch.Generator().manual_seed(0)
    ps = [torch.randn(s, generator=g, dtype=torch.float64) for s in ((3, 4), (3, 3), (3, 3), (2, 3))]
    a = analyze_solution(ps[0], ps[1:], cfg, srg=False)
    assert a["checks"] == {"gap": None, "nc1": None, "nc2_orth": None, "norms": None}
    return {**a, "output_norm": 5.0, "reg": 5.0, "rank_out": 0, **changes}


def test_zero_verdict_at_its_exact_bounds():
    """tol = 0.25, N = 4: zero iff ||output|| <= √0.25·√4 = 1 and reg <= 0.125."""
    assert verdict(_other_record(output_norm=1.0, reg=0.125), tol=0.25) == "zero"
    assert verdict(_other_record(output_norm=math.nextafter(1.0, 2.0), reg=0.125), tol=0.25) == "other"
    assert verdict(_other_record(output_norm=1.0, reg=math.nextafter(0.125, 1.0)), tol=0.25) == "other"
    assert verdict(_other_record(output_norm=1.0, reg=0.125), tol=0.24) == "other"
    # the default tol is 1e-3: ||output|| <= √1e-3·2 ≈ 0.0632, reg <= 5e-4
    assert verdict(_other_record(output_norm=0.063, reg=5e-4)) == "zero"
    assert verdict(_other_record(output_norm=0.064, reg=5e-4)) == "other"


@pytest.mark.parametrize(
    "ranks_pre, rank_out, expected",
    [
        ([2, 1], 2, "low-rank"),
        ([2, 2, 0], 2, "low-rank"),
        ([1, 2], 2, "other"),  # the layer-2 pre-activation follows H1's free angle
        ([2, 2], 2, "other"),
        ([2, 1], 1, "other"),
        ([2, 1], 3, "other"),
        ([1], 2, "other"),  # L = 2: never low-rank
    ],
)
def test_low_rank_verdict(ranks_pre, rank_out, expected):
    assert verdict(_other_record(ranks_pre=ranks_pre, rank_out=rank_out)) == expected


@pytest.mark.parametrize("key", ["loss", "grad_norm", "output_norm"])
@pytest.mark.parametrize("value", [math.nan, math.inf, None])
def test_verdict_of_a_record_with_a_non_finite_number(key, value):
    r = _other_record(ranks_pre=[2, 1], rank_out=2)
    assert verdict(r) == "low-rank"
    r[key] = value
    assert verdict(r) == "diverged"
    if key != "loss":  # a diverged record has no gradient nor output norm
        del r[key]
        assert verdict(r) == "diverged"
