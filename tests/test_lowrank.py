"""The SRG construction: explicit parameters, closed forms, and L_SRG against L_DNC."""

from __future__ import annotations

import math

import pytest
import torch

from deepcollapse._validate import DeepCollapseError
from deepcollapse.dufm.model import DUFMConfig, forward, label_matrix, objective
from deepcollapse.theory.closed_form import dnc_constant, dnc_loss
from deepcollapse.theory.lowrank import (
    incidence_matrix,
    reference_kappa,
    reference_theta,
    srg_dufm_loss,
    srg_loss,
    srg_means_objective,
    srg_order,
    srg_parameters,
    srg_solution,
)

LAM, N = 0.004, 5


def test_srg_order():
    assert [srg_order(k) for k in (3, 6, 10, 15, 28)] == [3, 4, 5, 6, 8]
    assert srg_order(2) is None and srg_order(11) is None


@pytest.mark.parametrize("r", [3, 5, 7])
def test_incidence_gram(r):
    b = incidence_matrix(r)
    assert b.shape == (r, r * (r - 1) // 2)
    torch.testing.assert_close(b @ b.T, (r - 2) * torch.eye(r, dtype=b.dtype) + 1.0)


@pytest.mark.parametrize(("r", "L"), [(4, 3), (5, 4), (6, 5)])
def test_reference_point_closed_form(r, L):
    theta, _, loss = reference_theta(r=r, num_layers=L, n=N, lambda_h=LAM, lambda_w=LAM)
    assert float(srg_means_objective(theta, r=r, num_layers=L, n=N, lambda_h=LAM, lambda_w=LAM)) == pytest.approx(
        loss, rel=1e-12
    )
    # (κ / K C)^{L+1} = 2^{L-3} r / (r-1)^{L-2} for equal λ
    k = r * (r - 1) // 2
    kappa = reference_kappa(r=r, num_layers=L, n=N, lambda_h=LAM, lambda_w=LAM)
    assert (kappa / (k * dnc_constant(L, N, LAM, LAM))) ** (L + 1) == pytest.approx(
        2 ** (L - 3) * r / (r - 1) ** (L - 2)
    )


def test_reference_relu_keeps_the_diagonal():
    cfg = DUFMConfig(num_classes=10, n_per_class=2, num_layers=3, width=[5, 10, 10], lambda_h=LAM, lambda_w=LAM)
    theta, s, _ = reference_theta(r=5, num_layers=3, n=2, lambda_h=LAM, lambda_w=LAM)
    h1, ws = srg_parameters(cfg, theta)
    pre, _, out = forward(h1, ws)
    means = pre[-1][:10, ::2]  # one column per class
    off = means - torch.diag(torch.diagonal(means))
    assert float(off.max()) <= 1e-12 and float(torch.diagonal(means).min()) > 0
    assert int(torch.linalg.matrix_rank(means)) == 5
    torch.testing.assert_close(out[:, ::2], s * torch.eye(10, dtype=out.dtype))


@pytest.mark.parametrize(("k", "L", "width"), [(10, 4, 30), (10, 3, [5, 10, 12]), (6, 5, 8)])
def test_dufm_objective_equals_reported_srg_loss(k, L, width):
    cfg = DUFMConfig(num_classes=k, n_per_class=N, num_layers=L, width=width, lambda_h=LAM, lambda_w=LAM)
    reported = srg_loss(num_classes=k, num_layers=L, n=N, lambda_h=LAM, lambda_w=LAM)
    h1, ws = srg_parameters(cfg)
    total, _, _ = objective(h1, ws, label_matrix(cfg.counts), cfg.lambda_h, cfg.lambdas_w)
    assert abs(float(total) - reported) <= 1e-10
    assert srg_dufm_loss(cfg) == pytest.approx(reported, abs=1e-12)


@pytest.mark.parametrize(("r", "L"), [(4, 4), (5, 4), (6, 4), (5, 5), (5, 3)])
def test_srg_beats_dnc(r, L):
    sol = srg_solution(r=r, num_layers=L, n=N, lambda_h=LAM, lambda_w=LAM)
    d = dnc_loss(num_classes=sol.num_classes, num_layers=L, n=N, lambda_h=LAM, lambda_w=LAM)
    assert sol.dnc_loss == d
    assert sol.loss <= sol.reference_loss + 1e-12
    assert sol.loss < d
    assert (sol.rank_pre, sol.rank_post) == (r, sol.num_classes)
    if L >= 4:  # the closed-form reference point alone already beats DNC
        assert sol.reference_loss < d


def test_k10_l4_setting():
    """The follow-up's setting: K = 10 (r = 5), L = 4, λ = 0.004, n = 5."""
    sol = srg_solution(r=5, num_layers=4, n=5, lambda_h=LAM, lambda_w=LAM)
    assert sol.ratio < 0.9
    assert math.isclose(sol.ratio, sol.loss / sol.dnc_loss)


def test_srg_parameters_errors():
    with pytest.raises(DeepCollapseError, match="r\\(r-1\\)/2"):
        srg_parameters(DUFMConfig(num_classes=4, num_layers=3, width=8))
    with pytest.raises(DeepCollapseError, match="widths"):
        srg_parameters(DUFMConfig(num_classes=10, num_layers=3, width=4))
    with pytest.raises(DeepCollapseError, match="num_layers >= 2"):
        srg_parameters(DUFMConfig(num_classes=10, num_layers=1, width=10))
    assert srg_loss(num_classes=4, num_layers=3, n=5, lambda_h=LAM, lambda_w=LAM) is None
