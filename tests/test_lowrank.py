"""The SRG construction: explicit parameters, closed forms, and L_SRG against L_DNC."""

from __future__ import annotations

import pytest
import torch

from deepcollapse._validate import DeepCollapseError
from deepcollapse.dufm.model import DUFMConfig, forward
from deepcollapse.theory.closed_form import dnc_constant, zero_threshold
from deepcollapse.theory.lowrank import (
    incidence_matrix,
    reference_kappa,
    reference_theta,
    srg_loss,
    srg_means_objective,
    srg_order,
    srg_parameters,
    srg_solution,
)
from dufm_reference import np_dnc_loss, np_dufm_loss

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
def test_reported_srg_loss_is_the_loss_of_explicit_parameters(k, L, width):
    """The reported L_SRG is the DUFM loss, recomputed by a numpy forward pass, at explicit parameters."""
    cfg = DUFMConfig(num_classes=k, n_per_class=N, num_layers=L, width=width, lambda_h=LAM, lambda_w=LAM)
    reported = srg_loss(num_classes=k, num_layers=L, n=N, lambda_h=LAM, lambda_w=LAM)
    h1, ws = srg_parameters(cfg)
    assert np_dufm_loss(h1.numpy(), [w.numpy() for w in ws], cfg.counts, LAM, LAM) == pytest.approx(reported, rel=1e-12)


# (r, L) -> L_SRG / L_DNC at n = 5, λ = 0.004, as the optimizer reached it (2026-11-28). A search that
# loses one of its starting points lands higher (e.g. 0.84 instead of 0.78 at r = 6, L = 4).
SRG_RATIOS = {(4, 4): 0.94428, (5, 4): 0.81542, (6, 4): 0.78121, (5, 5): 0.75231, (5, 3): 0.91912}


@pytest.mark.parametrize(("r", "L"), sorted(SRG_RATIOS))
def test_srg_beats_dnc(r, L):
    sol = srg_solution(r=r, num_layers=L, n=N, lambda_h=LAM, lambda_w=LAM)
    d = np_dnc_loss(sol.num_classes, L, N, LAM)
    assert sol.dnc_loss == pytest.approx(d, rel=1e-9)
    assert sol.loss <= sol.reference_loss + 1e-12
    assert sol.loss / d <= SRG_RATIOS[(r, L)] + 1e-5  # never worse than the recorded optimum
    assert sol.loss / d >= SRG_RATIOS[(r, L)] - 2e-3  # a much lower value is news: re-record it
    assert (sol.rank_pre, sol.rank_post) == (r, sol.num_classes)
    if L >= 4:  # the closed-form reference point alone already beats DNC
        assert sol.reference_loss < d


def _past_threshold(r, L, lam):
    """L_SRG at λ where the balanced reference point has s = 0, checked on explicit parameters."""
    sol = srg_solution(r=r, num_layers=L, n=N, lambda_h=lam, lambda_w=lam)
    k = r * (r - 1) // 2
    cfg = DUFMConfig(num_classes=k, n_per_class=N, num_layers=L, width=k, lambda_h=lam, lambda_w=lam)
    h1, ws = srg_parameters(cfg, sol.theta)
    assert np_dufm_loss(h1.numpy(), [w.numpy() for w in ws], cfg.counts, lam, lam) == pytest.approx(sol.loss, rel=1e-10)
    return sol


def test_srg_past_the_reference_threshold():
    """r = 5, L = 3, λ = 0.02: the reference point is zero (loss 0.5), the family reaches 0.4875."""
    sol = _past_threshold(5, 3, 0.02)
    assert sol.reference_loss == 0.5
    assert sol.loss == pytest.approx(0.48747, abs=2e-5)
    assert sol.s > 0.5 and sol.rank_pre == 5


def test_srg_past_the_dnc_threshold():
    """K = 10, L = 4 at 1.05 x the DNC family's zero threshold: zero (0.5) is not the DUFM optimum."""
    lam = 1.05 * zero_threshold(num_classes=10, num_layers=4, n=N, lambda_h=1.0, lambda_w=1.0).lambda_equal
    assert np_dnc_loss(10, 4, N, lam) == pytest.approx(0.5, abs=1e-12)  # DNC's best is the zero solution
    sol = _past_threshold(5, 4, lam)
    assert sol.loss == pytest.approx(0.42448, abs=2e-5)


def test_srg_parameters_errors():
    with pytest.raises(DeepCollapseError, match="r\\(r-1\\)/2"):
        srg_parameters(DUFMConfig(num_classes=4, num_layers=3, width=8))
    with pytest.raises(DeepCollapseError, match="widths"):
        srg_parameters(DUFMConfig(num_classes=10, num_layers=3, width=4))
    with pytest.raises(DeepCollapseError, match="num_layers >= 2"):
        srg_parameters(DUFMConfig(num_classes=10, num_layers=1, width=10))
    assert srg_loss(num_classes=4, num_layers=3, n=5, lambda_h=LAM, lambda_w=LAM) is None
