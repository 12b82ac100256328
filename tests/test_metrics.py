"""deepcollapse.metrics against a plain numpy implementation, invariances and planted collapse."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from deepcollapse import metrics as M
from deepcollapse._validate import DeepCollapseError

# ---------------------------------------------------------------- numpy reference (written from docs/conventions.md)


def np_stats(h: np.ndarray, y: np.ndarray, k: int, weighting: str = "samples"):
    n = h.shape[0]
    means = np.stack([h[y == c].mean(0) for c in range(k)])
    counts = np.array([(y == c).sum() for c in range(k)])
    w = counts / n if weighting == "samples" else np.full(k, 1 / k)
    mu_g = w @ means
    sw = sum(np.outer(h[i] - means[y[i]], h[i] - means[y[i]]) for i in range(n)) / n
    sb = sum(np.outer(means[c] - mu_g, means[c] - mu_g) for c in range(k)) / k
    return means, mu_g, sw, sb


def np_nc1(h, y, k, normalize=True, weighting="samples"):
    _, _, sw, sb = np_stats(h, y, k, weighting)
    tr = np.trace(sw @ np.linalg.pinv(sb, rcond=1e-10, hermitian=True))
    return tr / k if normalize else tr


def np_nc2_etf(h, y, k):
    means, mu_g, _, _ = np_stats(h, y, k)
    m = means - mu_g
    g = m @ m.T
    etf = (np.eye(k) - np.ones((k, k)) / k) / np.sqrt(k - 1)
    return np.linalg.norm(g / np.linalg.norm(g) - etf)


def np_nc2_orth(h, y, k):
    means, _, _, _ = np_stats(h, y, k)
    g = means @ means.T
    return np.linalg.norm(g / np.linalg.norm(g) - np.eye(k) / np.sqrt(k))


def np_nc3_projection(w, h, y, k):
    means, _, _, _ = np_stats(h, y, k)
    p = means.T @ np.linalg.pinv(means.T)  # projector onto span of the means (D x D)
    return np.linalg.norm(w - w @ p) / np.linalg.norm(w)


def np_cdnv(h, y, k):
    means, _, _, _ = np_stats(h, y, k)
    var = [np.mean(np.sum((h[y == c] - means[c]) ** 2, 1)) for c in range(k)]
    vals = [(var[a] + var[b]) / (2 * np.sum((means[a] - means[b]) ** 2)) for a in range(k) for b in range(a + 1, k)]
    return float(np.mean(vals))


def np_ncc(h, y, k):
    means, _, _, _ = np_stats(h, y, k)
    d = ((h[:, None, :] - means[None]) ** 2).sum(-1)
    return float(np.mean(d.argmin(1) == y))


def sample(seed: int, n: int = 60, d: int = 7, k: int = 4, spread: float = 2.0, unequal: bool = False):
    rng = np.random.default_rng(seed)
    if unequal:
        y = np.concatenate([np.full(5 + 3 * c, c) for c in range(k)])
        rng.shuffle(y)
    else:
        y = np.arange(n) % k
    centres = rng.normal(size=(k, d)) * spread
    h = centres[y] + rng.normal(size=(len(y), d))
    return h, y


def stats_of(h, y, k, **kw):
    return M.class_stats(torch.from_numpy(h), torch.from_numpy(y), k, **kw)


# ---------------------------------------------------------------- agreement with numpy


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("unequal", [False, True])
@pytest.mark.parametrize("weighting", ["samples", "classes"])
def test_nc1_matches_numpy(seed, unequal, weighting):
    h, y = sample(seed, unequal=unequal)
    s = stats_of(h, y, 4, full_cov=True)
    ref = np_nc1(h, y, 4, weighting=weighting)
    assert M.nc1(s, weighting=weighting) == pytest.approx(ref, rel=1e-10)
    assert M.nc1(s, weighting=weighting, method="full") == pytest.approx(ref, rel=1e-10)
    assert M.nc1(s, weighting=weighting, normalize=False) == pytest.approx(4 * ref, rel=1e-10)


def test_nc1_with_more_classes_than_dimensions():
    # K - 1 > D: Σ_B has rank D; the pseudo-inverse must only invert that part.
    h, y = sample(3, n=90, d=3, k=6)
    s = stats_of(h, y, 6, full_cov=True)
    ref = np_nc1(h, y, 6)
    assert M.nc1(s) == pytest.approx(ref, rel=1e-9)
    assert M.nc1(s, method="full") == pytest.approx(ref, rel=1e-9)


@pytest.mark.parametrize("seed", [0, 1])
def test_other_metrics_match_numpy(seed):
    h, y = sample(seed, spread=1.0)
    k = 4
    s = stats_of(h, y, k)
    w = np.random.default_rng(seed + 10).normal(size=(5, h.shape[1]))
    assert M.nc2_etf(s) == pytest.approx(np_nc2_etf(h, y, k), rel=1e-10)
    assert M.nc2_orth(s) == pytest.approx(np_nc2_orth(h, y, k), rel=1e-10)
    assert M.nc3(torch.from_numpy(w), s) == pytest.approx(np_nc3_projection(w, h, y, k), rel=1e-9)
    assert M.cdnv(s)[0] == pytest.approx(np_cdnv(h, y, k), rel=1e-10)
    assert M.nc4(s) == pytest.approx(np_ncc(h, y, k))
    assert M.ncc_accuracy(torch.from_numpy(h), torch.from_numpy(y), s.means) == pytest.approx(np_ncc(h, y, k))
    means, mu_g, _, _ = np_stats(h, y, k)
    sv = np.linalg.svd(means - mu_g, compute_uv=False)
    assert M.mean_spectrum(s, center=True).numpy() == pytest.approx(sv, rel=1e-10, abs=1e-12)


def test_nc3_duality_matches_formula():
    h, y = sample(5)
    s = stats_of(h, y, 4)
    means, mu_g, _, _ = np_stats(h, y, 4)
    w = np.random.default_rng(1).normal(size=(4, h.shape[1]))
    mbar = means - mu_g
    ref = np.linalg.norm(w / np.linalg.norm(w) - mbar / np.linalg.norm(mbar))
    got = M.nc3(torch.from_numpy(w), s, method="duality", center=True)
    assert got == pytest.approx(ref, rel=1e-12)


# ---------------------------------------------------------------- planted structure


def test_planted_collapse_gives_zero():
    k, n, d = 3, 5, 6
    means = torch.eye(d, dtype=torch.float64)[:k] * 2.0  # orthogonal, equal norm
    y = torch.arange(k).repeat_interleave(n)
    s = M.class_stats(means[y], y, k)
    assert M.nc1(s) == 0.0
    assert M.nc2_orth(s) < 1e-15
    assert M.nc3(means, s) < 1e-15  # weight rows = class means
    assert M.nc4(s) == 1.0
    assert M.cdnv(s)[0] == 0.0
    assert M.numerical_rank(M.mean_spectrum(s)) == k


def test_simplex_etf_gives_zero_nc2():
    k = 5
    etf = torch.eye(k, dtype=torch.float64) - 1.0 / k
    y = torch.arange(k).repeat_interleave(3)
    s = M.class_stats(etf[y] + 7.0, y, k)  # shifted: NC2-ETF centres the means first
    assert M.nc2_etf(s) < 1e-14
    assert M.nc2_orth(s) > 0.1


def test_rank_deficient_means_are_detected():
    y = torch.arange(4).repeat_interleave(10)
    base = torch.randn(4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    lift = torch.randn(2, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    s = M.class_stats((base @ lift)[y], y, 4)
    assert M.numerical_rank(M.mean_spectrum(s)) == 2


# ---------------------------------------------------------------- invariances (hypothesis)


def _random_orthogonal(d: int, seed: int) -> np.ndarray:
    q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(d, d)))
    return q * np.sign(np.diag(r))


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), scale=st.floats(1e-3, 1e3), k=st.integers(2, 5))
def test_rotation_and_scale_invariance(seed, scale, k):
    h, y = sample(seed, n=12 * k, d=6, k=k)
    q = _random_orthogonal(6, seed + 1)
    w = np.random.default_rng(seed + 2).normal(size=(3, 6))
    a, b = stats_of(h, y, k), stats_of(scale * h @ q, y, k)
    for fa, fb in [
        (M.nc1(a), M.nc1(b)),
        (M.nc2_etf(a), M.nc2_etf(b)),
        (M.nc2_orth(a), M.nc2_orth(b)),
        (M.cdnv(a)[0], M.cdnv(b)[0]),
        (M.nc3(torch.from_numpy(w), a), M.nc3(torch.from_numpy(w @ q), b)),
    ]:
        assert fb == pytest.approx(fa, rel=1e-7, abs=1e-12)
    assert M.nc4(a) == M.nc4(b)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), k=st.integers(2, 5))
def test_sample_order_does_not_matter(seed, k):
    h, y = sample(seed, n=10 * k, d=5, k=k)
    perm = np.random.default_rng(seed).permutation(len(y))
    a, b = stats_of(h, y, k), stats_of(h[perm], y[perm], k)
    assert M.nc1(b) == pytest.approx(M.nc1(a), rel=1e-10)
    assert torch.allclose(a.means, b.means, rtol=1e-12, atol=1e-14)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), shrink=st.floats(0.0, 0.999))
def test_nc1_decreases_as_features_collapse(seed, shrink):
    h, y = sample(seed, spread=3.0)
    means, _, _, _ = np_stats(h, y, 4)
    h2 = means[y] + (1 - shrink) * (h - means[y])  # shrink within-class scatter
    assert M.nc1(stats_of(h2, y, 4)) == pytest.approx((1 - shrink) ** 2 * M.nc1(stats_of(h, y, 4)), rel=1e-8)


# ---------------------------------------------------------------- options and errors


def test_degenerate_layers_are_undefined_not_collapsed():
    y = torch.arange(12) % 3
    dead = M.class_stats(torch.zeros(12, 4, dtype=torch.float64), y, 3)  # a dead ReLU layer
    assert math.isnan(M.nc1(dead))
    signs = torch.tensor([1.0, 1.0, 1.0, -1.0, -1.0, -1.0] * 2, dtype=torch.float64)[:, None]
    spread = M.class_stats(signs * torch.ones(12, 4, dtype=torch.float64), y, 3)  # every class mean is 0
    assert M.nc1(spread) == float("inf")


def test_nc1_for_tiny_features():
    h, y = sample(2)
    ref = M.nc1(stats_of(h, y, 4))
    assert M.nc1(stats_of(h * 1e-85, y, 4)) == pytest.approx(ref, rel=1e-9)  # full path: in range
    assert math.isnan(M.nc1(stats_of(h * 1e-85, y, 4, full_cov=False)))  # Gram path: says it cannot tell


def test_dnc_metrics_keys_and_float64_inside():
    h, y = sample(0)
    out = M.dnc_metrics(torch.from_numpy(h).float(), torch.from_numpy(y), 4, weight=torch.randn(4, 7))
    for key in ("nc1", "nc2_etf", "nc2_orth", "nc3", "nc3_duality", "nc4", "cdnv", "rank", "mean_norm"):
        assert key in out
    assert out["nc1"] == pytest.approx(np_nc1(h.astype(np.float32).astype(np.float64), y, 4), rel=1e-6)


@pytest.mark.parametrize(
    "features, labels, k, match",
    [
        (torch.randn(6, 3), torch.tensor([0, 0, 0, 1, 1, 1]), 3, "class"),  # class 2 empty
        (torch.randn(6, 3), torch.tensor([0, 0, 0, 1, 1, 5]), 3, "0..2"),
        (torch.randn(6, 3), torch.tensor([0, 0, 0, 1, 1]), 2, "5 entries"),
        (torch.full((4, 2), float("nan")), torch.tensor([0, 1, 0, 1]), 2, "NaN"),
        (torch.randn(4, 2), torch.tensor([0, 0, 0, 0]), 1, "num_classes"),
        (torch.randn(0, 2), torch.tensor([], dtype=torch.long), 2, "empty"),
    ],
)
def test_bad_input_is_named(features, labels, k, match):
    with pytest.raises(DeepCollapseError, match=match):
        M.class_stats(features, labels, k)


def test_nc1_full_needs_covariance():
    h, y = sample(0)
    with pytest.raises(DeepCollapseError, match="sigma_w"):
        M.nc1(stats_of(h, y, 4, full_cov=False), method="full")


def test_nc3_shape_mismatch_is_named():
    h, y = sample(0)
    with pytest.raises(DeepCollapseError, match="weight"):
        M.nc3(torch.randn(3, 5), stats_of(h, y, 4))


def test_nc1_is_stable_for_means_far_from_the_origin():
    """Small spread around means far from 0: the Gram path must not cancel catastrophically (nor go < 0)."""
    h, y = sample(7, spread=1e-3)
    h = h * 1e-3 + 1e4  # tiny scatter, tiny class separation, huge offset
    ref = np_nc1(h - h.mean(0), y, 4)
    s = stats_of(h, y, 4, full_cov=True)
    assert M.nc1(s) == pytest.approx(ref, rel=1e-6)
    assert M.nc1(s, method="full") == pytest.approx(ref, rel=1e-6)
    assert M.nc1(s) >= 0
