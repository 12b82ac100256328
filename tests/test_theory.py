"""Closed forms of deepcollapse.theory against checked values (docs/theory.md), the DUFM objective and GD."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from deepcollapse import theory as T
from deepcollapse._validate import DeepCollapseError
from deepcollapse.dufm.model import DUFM, DUFMConfig, objective
from reference import np_dnc

# docs/theory.md: values checked against gradient descent to 6+ digits.
CHECKED_VALUES = [
    # K, L, n, lambda, L_DNC, digits
    (2, 3, 5, 0.005, 0.029794, 6),
    (2, 4, 5, 0.004, 0.027533, 6),
    (2, 5, 5, 0.003, 0.023507, 6),
    (2, 1, 10, 0.002, 0.0125691106, 10),
    (3, 3, 10, 0.002, 0.0212821250, 10),
]


@pytest.mark.parametrize("K, L, n, lam, value, digits", CHECKED_VALUES)
def test_dnc_loss_matches_paper(K, L, n, lam, value, digits):
    got = T.dnc_loss(num_classes=K, num_layers=L, n=n, lambda_h=lam, lambda_w=lam)
    assert round(got, digits) == pytest.approx(value, abs=10 ** (-digits))


def test_l1_is_the_known_ufm_optimum():
    for K, n, lam in [(2, 10, 0.002), (5, 3, 0.01), (10, 50, 1e-4)]:
        c = math.sqrt(n * lam * lam)
        s = max(0.0, 1 - K * c)
        assert T.dnc_scale(num_classes=K, num_layers=1, n=n, lambda_h=lam, lambda_w=lam) == pytest.approx(s)
        expected = 0.5 * (1 - s) ** 2 + K * c * s
        assert T.dnc_loss(num_classes=K, num_layers=1, n=n, lambda_h=lam, lambda_w=lam) == pytest.approx(expected)


@pytest.mark.parametrize("K, L", [(2, 2), (2, 3), (3, 4), (10, 4), (4, 6)])
def test_scale_is_stationary_and_minimizes_on_a_grid(K, L):
    lam_w = [0.003 * (1 + 0.3 * i) for i in range(L)]
    kw = dict(num_classes=K, num_layers=L, n=5, lambda_h=0.002, lambda_w=lam_w)
    s = T.dnc_scale(**kw)
    c = T.dnc_constant(L, 5, 0.002, lam_w)
    assert 0 < s < 1
    assert (1 - s) * s ** ((L - 1) / (L + 1)) == pytest.approx(K * c, rel=1e-12)
    grid = [i / 20000 for i in range(20001)]
    best = min(T.dnc_objective(x, num_classes=K, num_layers=L, c=c) for x in grid)
    assert T.dnc_loss(**kw) <= best + 1e-12
    assert T.dnc_loss(**kw) == pytest.approx(best, abs=1e-8)


@pytest.mark.parametrize("K, L", [(2, 2), (2, 3), (3, 5), (10, 4)])
def test_zero_threshold_is_where_zero_wins(K, L):
    n = 5
    zt = T.zero_threshold(num_classes=K, num_layers=L, n=n)
    lam = zt.lambda_equal
    below = dict(num_classes=K, num_layers=L, n=n, lambda_h=lam * 0.999, lambda_w=lam * 0.999)
    above = dict(num_classes=K, num_layers=L, n=n, lambda_h=lam * 1.001, lambda_w=lam * 1.001)
    assert T.dnc_scale(**below) > 0.9 * zt.s  # just below: the non-zero optimum, near s* = (L-1)/L
    assert T.dnc_loss(**below) < 0.5
    assert T.dnc_scale(**above) == 0.0 and T.dnc_loss(**above) == 0.5
    # At the threshold f(s*) = f(0) = 1/2 and f'(s*) = 0.
    f = T.dnc_objective(zt.s, num_classes=K, num_layers=L, c=zt.c)
    assert f == pytest.approx(0.5, rel=1e-12)
    assert (1 - zt.s) * zt.s ** ((L - 1) / (L + 1)) == pytest.approx(K * zt.c, rel=1e-12)
    scaled = T.zero_threshold(num_classes=K, num_layers=L, n=n, lambda_h=lam / 2, lambda_w=lam / 2)
    assert scaled.scale == pytest.approx(2.0) and not scaled.zero_is_optimal


def test_zero_threshold_l1_is_continuous():
    zt = T.zero_threshold(num_classes=4, num_layers=1, n=10)
    assert zt.kc == 1.0
    just_below = zt.lambda_equal * 0.99
    assert T.dnc_scale(num_classes=4, num_layers=1, n=10, lambda_h=just_below, lambda_w=just_below) == pytest.approx(
        0.01, rel=1e-9
    )


CONFIGS = [
    dict(num_classes=2, n_per_class=5, num_layers=1, width=3, lambda_h=0.01, lambda_w=0.02),
    dict(num_classes=2, n_per_class=5, num_layers=3, width=16, lambda_h=0.005, lambda_w=0.005),
    dict(
        num_classes=2,
        n_per_class=3,
        num_layers=4,
        width=[2, 5, 3, 7],
        lambda_h=0.004,
        lambda_w=[1e-3, 2e-3, 5e-3, 8e-3],
    ),
    dict(num_classes=3, n_per_class=10, num_layers=3, width=16, lambda_h=0.002, lambda_w=0.002),
    dict(num_classes=10, n_per_class=5, num_layers=4, width=30, lambda_h=0.004, lambda_w=0.004),
    dict(num_classes=2, n_per_class=5, num_layers=3, width=4, lambda_h=0.3, lambda_w=0.3),  # zero solution
]


@pytest.mark.parametrize("kw", CONFIGS)
@pytest.mark.parametrize("h1", ["orthogonal", "antipodal", "etf"])
def test_dufm_loss_at_optimal_parameters_equals_dnc_loss(kw, h1):
    cfg = DUFMConfig(**kw)
    if (h1 == "antipodal" and (cfg.num_classes != 2 or cfg.num_layers < 2)) or (h1 == "etf" and cfg.num_layers < 2):
        with pytest.raises(DeepCollapseError, match=h1):
            T.optimal_parameters(cfg, h1=h1)
        return
    h, ws = T.optimal_parameters(cfg, h1=h1, generator=torch.Generator().manual_seed(3))
    total, _fit, _reg = objective(h, ws, DUFM(cfg).y, cfg.lambda_h, cfg.lambdas_w)
    expected = T.dnc_loss(
        num_classes=cfg.num_classes, num_layers=cfg.num_layers, n=cfg.n, lambda_h=cfg.lambda_h, lambda_w=cfg.lambdas_w
    )
    assert float(total) == pytest.approx(expected, rel=1e-12, abs=1e-15)
    report = T.check(h, ws, cfg)
    assert report["gap"] == pytest.approx(0.0, abs=1e-12)
    if expected == 0.5:  # past the threshold: the zero solution
        assert report["s"] == 0.0 and all(e["mean_norm"] == 0.0 for e in report["layers"])
        return
    for e in report["layers"]:
        assert e["mean_norm_rel_err"] < 1e-12 and e["weight_norm_rel_err"] < 1e-12 and e["nc1"] < 1e-20
        assert e["nc2_orth"] is None if e["layer"] == 1 else e["nc2_orth"] < 1e-7
    K = cfg.num_classes
    cos = {"orthogonal": 0.0, "antipodal": -1.0, "etf": -1.0 / (K - 1)}[h1]
    assert report["h1_cos"] == pytest.approx([cos] * (K * (K - 1) // 2), abs=1e-12)


@pytest.mark.parametrize("K, L", [(2, 2), (3, 3), (10, 4)])
def test_etf_h1_optimum_is_stationary(K, L):
    """The simplex-ETF H1 reaches L_DNC and is a stationary point: the ReLU removes the negative parts of
    the layer-2 pre-activations, and no parameter can move to lower the loss to first order."""
    cfg = DUFMConfig(num_classes=K, n_per_class=3, num_layers=L, width=K + 1, lambda_h=2e-3, lambda_w=2e-3)
    h, ws = T.optimal_parameters(cfg, h1="etf")
    model = DUFM.from_parameters(cfg, h, ws)
    model.loss()[0].backward()
    grad = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert float(grad.norm()) < 1e-12
    # the H1 class means: norm t, pairwise cosine -1/(K-1), summing to zero
    means = h.reshape(h.shape[0], K, 3)[:, :, 0]
    _, t, _ = T.balanced_scales(num_classes=K, num_layers=L, n=3, lambda_h=2e-3, lambda_w=2e-3)
    assert torch.allclose(means.norm(dim=0), torch.full((K,), t, dtype=torch.float64), rtol=1e-13, atol=0)
    assert float(means.sum(1).norm()) < 1e-14


def test_optimal_parameters_are_balanced():
    cfg = DUFMConfig(**CONFIGS[2])
    s, t, q = T.balanced_scales(num_classes=2, num_layers=4, n=3, lambda_h=cfg.lambda_h, lambda_w=cfg.lambdas_w)
    norms = [t, *q, s]
    terms = [cfg.n * cfg.lambda_h * t**2] + [
        lam * (norms[i + 1] / norms[i]) ** 2 for i, lam in enumerate(cfg.lambdas_w)
    ]
    assert max(terms) == pytest.approx(min(terms), rel=1e-12)


def test_optimum_is_a_stationary_point_of_the_dufm():
    """The explicit parameters have zero gradient (H1 orthogonal: no ReLU kinks are active)."""
    cfg = DUFMConfig(**CONFIGS[3])
    h, ws = T.optimal_parameters(cfg, generator=torch.Generator().manual_seed(0))
    model = DUFM.from_parameters(cfg, h, ws)
    model.loss()[0].backward()
    grad = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert float(grad.norm()) < 1e-12


def test_perturbations_do_not_lower_the_loss_k2():
    cfg = DUFMConfig(num_classes=2, n_per_class=4, num_layers=3, width=6, lambda_h=0.004, lambda_w=0.004)
    h, ws = T.optimal_parameters(cfg, h1="antipodal")
    base = float(objective(h, ws, DUFM(cfg).y, cfg.lambda_h, cfg.lambdas_w)[0])
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        hp = h + 1e-4 * torch.randn(h.shape, generator=g, dtype=h.dtype)
        wp = [w + 1e-4 * torch.randn(w.shape, generator=g, dtype=w.dtype) for w in ws]
        assert float(objective(hp, wp, DUFM(cfg).y, cfg.lambda_h, cfg.lambdas_w)[0]) >= base - 1e-14


def test_check_reports_measured_values_of_a_random_point():
    """``check`` at a non-optimal point: every reported quantity against a numpy computation."""
    cfg = DUFMConfig(num_classes=3, n_per_class=4, num_layers=3, width=6, lambda_h=0.004, lambda_w=0.004)
    model = DUFM(cfg)  # random initialization
    h = model.h1.detach().numpy()
    ws = [w.detach().numpy() for w in model.weights]
    report = T.check(model.h1, list(model.weights), cfg)
    sol = T.dnc_solution(num_classes=3, num_layers=3, n=4, lambda_h=0.004, lambda_w=0.004)
    feats = [h]
    for w in ws[:-1]:
        feats.append(np.maximum(w @ feats[-1], 0))
    out = ws[-1] @ feats[-1]
    fit = ((out - np.kron(np.eye(3), np.ones((1, 4)))) ** 2).sum() / 24
    assert report["fit"] == pytest.approx(fit, rel=1e-12)
    assert report["gap"] == pytest.approx((report["loss"] - sol.dnc_loss) / sol.dnc_loss, rel=1e-12)
    assert report["s"] == pytest.approx(np.mean([out[c, 4 * c : 4 * c + 4].mean() for c in range(3)]), rel=1e-12)
    predicted = [sol.t, *sol.q]
    for e, f, w, q, wq in zip(report["layers"], feats, ws, predicted, sol.weight_norms, strict=True):
        means = np.stack([f[:, 4 * c : 4 * c + 4].mean(1) for c in range(3)])
        norms = np.linalg.norm(means, axis=1)
        assert e["mean_norm"] == pytest.approx(norms.mean(), rel=1e-12)
        assert e["mean_norm_rel_err"] == pytest.approx(np.abs(norms - q).max() / q, rel=1e-12)
        assert e["weight_norm_rel_err"] == pytest.approx(abs(np.linalg.norm(w) - wq) / wq, rel=1e-12)
        ref = np_dnc(f.T, np.repeat(np.arange(3), 4), 3)
        # post-ReLU means of a random point are ill-conditioned: the pseudo-inverse cut-offs of the metric and
        # of the reference differ there in the 7th digit (a layer mix-up changes nc1 by far more)
        assert e["nc1"] == pytest.approx(ref["nc1"], rel=1e-9 if e["layer"] == 1 else 1e-5)
        if e["layer"] > 1:
            assert e["nc2_orth"] == pytest.approx(ref["nc2_orth"], rel=1e-9)
    means_h1 = np.stack([h[:, 4 * c : 4 * c + 4].mean(1) for c in range(3)])
    unit = means_h1 / np.linalg.norm(means_h1, axis=1, keepdims=True)
    assert report["h1_cos"] == pytest.approx([unit[0] @ unit[1], unit[0] @ unit[2], unit[1] @ unit[2]], rel=1e-12)


def test_theory_input_errors():
    with pytest.raises(DeepCollapseError, match="num_classes"):
        T.dnc_loss(num_classes=1, num_layers=2, n=5, lambda_h=0.1, lambda_w=0.1)
    with pytest.raises(DeepCollapseError, match="lambda_h"):
        T.dnc_loss(num_classes=2, num_layers=2, n=5, lambda_h=-0.1, lambda_w=0.1)
    with pytest.raises(DeepCollapseError, match="lambda_w"):
        T.dnc_loss(num_classes=2, num_layers=2, n=5, lambda_h=0.1, lambda_w=[0.1, 0.1, 0.1])
    with pytest.raises(DeepCollapseError, match="width"):
        T.optimal_parameters(DUFMConfig(num_classes=3, width=2))
    with pytest.raises(DeepCollapseError, match="balanced"):
        T.optimal_parameters(DUFMConfig(num_classes=2, n_per_class=[3, 4]))
    with pytest.raises(DeepCollapseError, match="not unique"):
        T.optimal_parameters(DUFMConfig(num_classes=2, lambda_h=0.0))


def test_no_regularization_gives_zero_loss():
    assert T.dnc_loss(num_classes=3, num_layers=3, n=4, lambda_h=0.0, lambda_w=0.0) == 0.0
