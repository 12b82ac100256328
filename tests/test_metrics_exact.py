"""Exact values of every public function of deepcollapse.metrics under each of its options (weighting, method,
rtol, rank, rank_rtol, tile_bytes, center), against the float64 numpy reference of the definitions
(tests/reference.py) or hand-derived numbers; the boundaries of each rule; each error message whole.

The data have very unequal classes (``||I - 1w^T||_2 > 1.5`` under sample weighting), so the two weightings
give different centred means and different precision cutoffs, and a planted spectrum whose smallest direction
can be put on either side of a cutoff on purpose."""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np
import pytest
import torch

from deepcollapse import metrics as M
from deepcollapse._validate import DeepCollapseError
from deepcollapse.measure.stats import RTOL_FACTOR
from reference import np_conventions, np_cutoff

pytestmark = pytest.mark.usefixtures("one_thread")

EPS64 = 2.0**-52
COUNTS = (2, 3, 2, 30)
K, D = len(COUNTS), 6
WEIGHTINGS = ("samples", "classes")


def planted(seed: int = 0, *, spectrum=(4.0, 1.0, 0.02), offset: float = 3.0, noise: float = 0.3):
    """Features of K = 4 unequal classes in D = 6 whose class means, centred with equal weights, have the
    singular values ``spectrum``, shifted by ``offset`` along a random direction; within-class noise with
    per-class mean exactly 0. Returns float64 ``(h, y)``."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(K), COUNTS)
    c = rng.normal(size=(K, K - 1))
    q, _ = np.linalg.qr(c - c.mean(0))
    basis, _ = np.linalg.qr(rng.normal(size=(D, K - 1)))
    shift = rng.normal(size=D)
    means = q @ np.diag(spectrum) @ basis.T + offset * shift / np.linalg.norm(shift)
    e = rng.normal(size=(len(y), D)) * noise
    for cl in range(K):
        e[y == cl] -= e[y == cl].mean(0)
    return torch.from_numpy(means[y] + e), torch.from_numpy(y)


def ref(h, y, *, rtol: float | None = None, **kw) -> dict[str, float]:
    """The reference of the conventions table; ``rtol`` given: the cutoff ``rtol·||A||·R`` with that rtol."""
    hn, yn = h.double().numpy(), y.numpy()
    if rtol is None:
        return np_conventions(hn, yn, eps_in=EPS64, factor=RTOL_FACTOR, **kw)
    n_max = int(np.bincount(yn).max())
    return np_conventions(hn, yn, eps_in=rtol - n_max * EPS64, factor=1.0, **kw)


def scales(h, y, weighting: str | None):
    """``(s, ||A||_2 R)``: the singular values of the means (centred with ``weighting``; uncentred for None) and
    the factor that turns an rtol into the cutoff, by dense numpy."""
    hn, yn = h.numpy(), y.numpy()
    classes = list(range(K))
    means = np.stack([hn[yn == c].mean(0) for c in classes])
    w = None if weighting is None else (np.bincount(yn) / len(yn) if weighting == "samples" else np.full(K, 1 / K))
    m = means if w is None else means - w @ means
    return np.linalg.svd(m, compute_uv=False), np_cutoff(hn, yn, classes, w, 1.0, 1.0)


def full_match(message: str) -> str:
    return "^" + re.escape(message) + "$"


@pytest.fixture(scope="module")
def case():
    h, y = planted()
    w = torch.from_numpy(np.random.default_rng(1).normal(size=(K, D)))
    stats = M.class_stats(h, y, K, cov="full")
    assert stats.sigma_w is not None and stats.means_sigma_w is not None  # both NC1 paths on one statistics
    return h, y, w, stats


# ------------------------------------------------------------------------ every option of every function


@pytest.mark.parametrize("weighting", WEIGHTINGS)
def test_each_function_under_each_weighting(case, weighting: str) -> None:
    h, y, w, stats = case
    r = ref(h, y, weighting=weighting, weight=w.numpy())
    other = ref(h, y, weighting=WEIGHTINGS[weighting == "samples"], weight=w.numpy())
    tile = 8 * K  # one row per block: the sweeps add up several blocks
    got = {
        "nc1_unnormalized": M.nc1_unnormalized(stats, weighting=weighting, method="gram"),
        "nc2_etf": M.nc2_etf(stats, weighting=weighting, tile_bytes=tile),
        "nc2_equinorm": M.nc2_equinorm(stats, weighting=weighting),
        "nc2_equiangle": M.nc2_equiangle(stats, weighting=weighting, tile_bytes=tile),
        "nc2_maxangle": M.nc2_maxangle(stats, weighting=weighting, tile_bytes=tile),
        "nc3_duality": M.nc3_duality(w, stats, weighting=weighting),
        "nc3_zhu": M.nc3_zhu(w, stats, weighting=weighting, tile_bytes=tile),
        "nc1_quotient": M.nc1_quotient(stats, weighting=weighting),
    }
    for key, value in got.items():
        assert value == pytest.approx(r[key], rel=1e-10), key
        assert r[key] != pytest.approx(other[key], rel=1e-3), key  # the weighting matters for this quantity
    for method in ("gram", "full"):
        assert M.nc1(stats, weighting=weighting, method=method) == pytest.approx(r["nc1"], rel=1e-10), method
        assert M.nc1_truncated(stats, weighting=weighting, method=method) == pytest.approx(r["nc1"], rel=1e-10)
    hn, yn = h.numpy(), y.numpy()
    means = np.stack([hn[yn == c].mean(0) for c in range(K)])
    wts = np.bincount(yn) / len(yn) if weighting == "samples" else np.full(K, 1 / K)
    np.testing.assert_allclose(M.global_mean(stats, weighting=weighting).numpy(), wts @ means, rtol=1e-13)
    mbar = means - wts @ means
    np.testing.assert_allclose(M.centred_means(stats, weighting=weighting).numpy(), mbar, rtol=1e-12, atol=1e-14)
    spec = M.mean_spectrum(stats, center=True, weighting=weighting).numpy()
    np.testing.assert_allclose(spec, np.linalg.svd(mbar, compute_uv=False), rtol=1e-12, atol=1e-13 * spec[0])


@pytest.mark.parametrize("weighting", WEIGHTINGS)
def test_rank_centred_of_each_weighting(case, weighting: str) -> None:
    """The two weightings' centred means have σ_3/σ_1 = 0.0034 (samples) and 0.005 (classes): a rank_rtol
    between them gives rank_centred 2 and 3."""
    h, y, _, stats = case
    ratio = {wt: scales(h, y, wt)[0][2] / scales(h, y, wt)[0][0] for wt in WEIGHTINGS}
    assert ratio["classes"] > 1.3 * ratio["samples"]
    rank_rtol = math.sqrt(ratio["samples"] * ratio["classes"])
    r = ref(h, y, weighting=weighting, rank_rtol=rank_rtol)
    assert r["rank_centred"] == (2 if weighting == "samples" else 3)
    assert M.dnc_metrics(stats, weighting=weighting, rank_rtol=rank_rtol)["rank_centred"] == r["rank_centred"]


@pytest.mark.parametrize("weighting", WEIGHTINGS)
def test_gram_path_with_statistics_about_the_origin(weighting: str) -> None:
    """``means_sigma_w`` about any reference point (here the origin, ``centre=None``, with the data far from
    it) gives NC1 under either weighting: ``M̄ Σ_W M̄ᵀ = A (M Σ_W Mᵀ) Aᵀ`` with ``A = I - 1wᵀ``."""
    h, y = planted(12, offset=20.0)
    hn, yn = h.numpy(), y.numpy()
    means = np.stack([hn[yn == c].mean(0) for c in range(K)])
    e = hn - means[yn]
    sw = e.T @ e / len(hn)
    var = np.array([(e[yn == c] ** 2).sum(1).mean() for c in range(K)])
    t = torch.from_numpy
    stats = M.ClassStats(t(np.bincount(yn)), t(means), t(var), t(means @ sw @ means.T))
    assert M.nc1(stats, weighting=weighting) == pytest.approx(ref(h, y, weighting=weighting)["nc1"], rel=1e-8)


def test_defaults_are_sample_weighting_and_centred(case) -> None:
    h, y, w, stats = case
    r = ref(h, y, weight=w.numpy())
    assert M.nc1(stats) == pytest.approx(r["nc1"], rel=1e-10)
    assert M.nc1_unnormalized(stats) == pytest.approx(r["nc1_unnormalized"], rel=1e-10)
    assert M.nc1_truncated(stats) == pytest.approx(r["nc1"], rel=1e-10)
    assert M.nc1_quotient(stats) == pytest.approx(r["nc1_quotient"], rel=1e-12)
    for key in ("nc2_etf", "nc2_equinorm", "nc2_equiangle", "nc2_maxangle", "cdnv"):
        assert getattr(M, key)(stats) == pytest.approx(r[key], rel=1e-10), key
    assert M.nc3_duality(w, stats) == pytest.approx(r["nc3_duality"], rel=1e-12)  # centred by default
    assert M.nc3_duality(w, stats, center=False) == pytest.approx(r["nc3_duality_uncentred"], rel=1e-12)
    assert r["nc3_duality"] != pytest.approx(r["nc3_duality_uncentred"], rel=1e-3)
    assert M.nc3_zhu(w, stats) == pytest.approx(r["nc3_zhu"], rel=1e-10)
    assert M.nc3_span(w, stats) == pytest.approx(r["nc3_span"], rel=1e-10)
    hn, yn = h.numpy(), y.numpy()
    means = np.stack([hn[yn == c].mean(0) for c in range(K)])
    np.testing.assert_allclose(M.global_mean(stats).numpy(), hn.mean(0), rtol=1e-13)
    np.testing.assert_allclose(M.centred_means(stats).numpy(), means - hn.mean(0), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(M.mean_spectrum(stats).numpy(), np.linalg.svd(means, compute_uv=False), rtol=1e-12)
    spec = M.mean_spectrum(stats, center=True).numpy()
    want = np.linalg.svd(means - hn.mean(0), compute_uv=False)
    np.testing.assert_allclose(spec, want, rtol=1e-12, atol=1e-13 * spec[0])


def test_raw_means_in_float32_are_measured_in_float64() -> None:
    """Functions that take a raw (K, D) mean matrix: exact float64 answers from the float32 values as given,
    the float32 precision cutoff, and the K rows taken as the classes (K != D)."""
    h, y = planted(2, offset=1.0)
    means = torch.stack([h[y == c].mean(0) for c in range(K)]).float()  # (4, 6) float32
    w = torch.from_numpy(np.random.default_rng(3).normal(size=(K, D))).float()
    m64, w64 = means.double().numpy(), w.double().numpy()
    r = np_conventions(m64, np.arange(K), eps_in=2.0**-23, factor=RTOL_FACTOR, weight=w64)
    assert M.nc2_orth(means, tile_bytes=8 * K) == pytest.approx(r["nc2_orth"], rel=1e-12)
    assert M.nc3_duality(w, means) == pytest.approx(r["nc3_duality"], rel=1e-12)
    assert M.nc3_zhu(w, means, tile_bytes=8 * K) == pytest.approx(r["nc3_zhu"], rel=1e-12)
    assert M.nc3_span(w, means) == pytest.approx(r["nc3_span"], rel=1e-12)
    np.testing.assert_allclose(M.mean_spectrum(means).numpy(), np.linalg.svd(m64, compute_uv=False), rtol=1e-12)


def test_raw_float32_means_take_the_float32_cutoff() -> None:
    """A float32 rank-2 mean matrix in D = 6: its rounding directions (about 1e-7 of the norm) are not part of
    the span, so a weight inside the exact rank-2 span has nc3_span 0 up to rounding, and one along the
    rounding directions has nc3_span 1 (the float64 cutoff would keep them)."""
    rng = np.random.default_rng(4)
    basis, _ = np.linalg.qr(rng.normal(size=(D, D)))
    coef = rng.normal(size=(K, 2))
    means = torch.from_numpy(coef @ basis[:2]).float()  # rounds off the rank-2 span by ~1e-8
    s = np.linalg.svd(means.double().numpy(), compute_uv=False)
    assert 1e-12 < s[2] < 1e-6  # rounding left directions the float64 cutoff would keep
    inside = torch.from_numpy(rng.normal(size=(3, 2)) @ basis[:2])
    outside = torch.from_numpy(rng.normal(size=(3, D - 2)) @ basis[2:])
    assert M.nc3_span(inside, means) < 1e-6
    assert M.nc3_span(outside, means) == pytest.approx(1.0, abs=1e-6)
    assert M.nc3_span(outside, means.double()) < 0.9  # the same values given in float64: rounding is signal


@pytest.mark.parametrize(
    "call",
    [
        lambda s, w: M.nc2_etf(s, tile_bytes=16),
        lambda s, w: M.nc2_orth(s, tile_bytes=16),
        lambda s, w: M.nc2_equiangle(s, tile_bytes=16),
        lambda s, w: M.nc2_maxangle(s, tile_bytes=16),
        lambda s, w: M.cdnv(s, tile_bytes=16),
        lambda s, w: M.cdnv_per_class(s, tile_bytes=16),
        lambda s, w: M.pair_summary(s, tile_bytes=16),
        lambda s, w: M.nc3_zhu(w, s, tile_bytes=16),
        lambda s, w: M.nearest_centre(torch.zeros(30, D), s, tile_bytes=16),
        lambda s, w: M.dnc_metrics(s, tile_bytes=16),
    ],
)
def test_tile_bytes_reaches_the_sweep(case, call) -> None:
    """Each function passes its ``tile_bytes`` on: one that cannot hold a row of the tile is refused, by name."""
    _, _, w, stats = case
    with pytest.raises(DeepCollapseError, match=r"^tile_bytes=16 cannot hold one tile"):
        call(stats, w)


# ------------------------------------------------------------------------ pair statistics


def test_pair_summary_fields_equal_the_pair_matrix(case) -> None:
    h, y, _, stats = case
    hn, yn = h.numpy(), y.numpy()
    means = np.stack([hn[yn == c].mean(0) for c in range(K)])
    var = np.array([((hn[yn == c] - means[c]) ** 2).sum(1).mean() for c in range(K)])
    d2 = ((means[:, None] - means[None]) ** 2).sum(-1)
    off = ~np.eye(K, dtype=bool)
    mat = np.where(off, (var[:, None] + var[None]) / (2 * np.where(off, d2, 1.0)), 0.0)
    for tile in (8 * K, 8 * K * K):  # one row per block, one block
        p = M.pair_summary(stats, tile_bytes=tile)
        np.testing.assert_allclose(p.cdnv_per_class.numpy(), mat.sum(1) / (K - 1), rtol=1e-10)
        masked = np.where(off, mat, -np.inf)
        np.testing.assert_allclose(p.cdnv_max.numpy(), masked.max(1), rtol=1e-10)
        assert p.cdnv_max_class.dtype == torch.int64
        assert p.cdnv_max_class.tolist() == masked.argmax(1).tolist()
        assert p.cdnv == pytest.approx(mat[off].mean(), rel=1e-10)
    np.testing.assert_allclose(M.cdnv_per_class(stats, tile_bytes=8 * K).numpy(), mat.sum(1) / (K - 1), rtol=1e-10)
    assert M.cdnv(stats, tile_bytes=8 * K) == pytest.approx(mat[off].mean(), rel=1e-10)
    np.testing.assert_allclose(M.cdnv_matrix(stats).numpy(), mat, rtol=1e-10, atol=0)
    assert np.all(np.diag(M.cdnv_matrix(stats).numpy()) == 0.0)


def test_cdnv_matrix_tile_boundary(case) -> None:
    *_, stats = case
    assert M.cdnv_matrix(stats, tile_bytes=8 * K * K).shape == (K, K)  # exactly one K x K float64 matrix
    msg = f"tile_bytes={8 * K * K - 1} cannot hold the {K} x {K} CDNV matrix; use cdnv_per_class or pair_summary"
    with pytest.raises(DeepCollapseError, match=full_match(msg)):
        M.cdnv_matrix(stats, tile_bytes=8 * K * K - 1)


def test_nc2_of_small_and_coincident_means() -> None:
    """Scale-free at ||G||_F < 1; nan (undefined) when the means coincide or ||G||_F underflows (below about
    1e-81), never a number from 0/0 or x/0."""
    h, y = planted(5)
    r = ref(h, y)
    for scale in (1e-3, 1e-30):
        p = M.pair_summary(M.class_stats(h * scale, y, K))
        for key in ("nc2_etf", "nc2_orth", "nc2_equiangle", "nc2_maxangle", "cdnv"):
            assert getattr(p, key) == pytest.approx(r[key], rel=1e-9), (key, scale)
    tiny = M.pair_summary(M.class_stats(h * 1e-100, y, K))
    assert math.isnan(tiny.nc2_etf) and math.isnan(tiny.nc2_orth)
    same = M.class_stats(torch.zeros(8, 3, dtype=torch.float64), torch.arange(8) % 2, 2)
    p = M.pair_summary(same)
    assert math.isnan(p.nc2_etf) and math.isnan(p.nc2_orth)
    assert math.isnan(M.nc2_equinorm(same))


# ------------------------------------------------------------------------ NC1: cutoffs, rtol, rank, paths


def test_user_rtol_reaches_every_rank_decision(case) -> None:
    """An rtol whose cutoff falls between the two smallest centred singular values drops the smallest
    direction in NC1 (all three functions, both paths), the ranks and nc3_span; dnc_metrics reports it."""
    h, y, w, stats = case
    s, scale = scales(h, y, "samples")
    rtol = math.sqrt(s[1] * s[2]) / scale  # the cutoff at the geometric middle of s_2 and s_3
    assert s[2] * 3 < rtol * scale < s[1] / 3 and rtol < 0.5
    r, default = ref(h, y, rtol=rtol, weight=w.numpy(), rank_rtol=1e-12), ref(h, y, weight=w.numpy())
    assert r["nc1"] != pytest.approx(default["nc1"], rel=1e-2)
    for method in ("gram", "full"):
        assert M.nc1(stats, method=method, rtol=rtol) == pytest.approx(r["nc1"], rel=1e-10)
        assert M.nc1_unnormalized(stats, method=method, rtol=rtol) == pytest.approx(r["nc1_unnormalized"], rel=1e-10)
        assert M.nc1_truncated(stats, method=method, rtol=rtol) == pytest.approx(r["nc1"], rel=1e-10)
    got = M.dnc_metrics(stats, weight=w, rtol=rtol, rank_rtol=1e-12)
    assert got["rtol"] == rtol
    for key in ("nc1", "rank", "rank_centred"):
        assert got[key] == pytest.approx(r[key], rel=1e-10), key
    assert got["rank_centred"] == 2 and got["rank"] < D
    su, scale_u = scales(h, y, None)
    rtol_u = math.sqrt(su[2] * su[3]) / scale_u  # drop the smallest direction of the uncentred means
    assert su[3] * 3 < rtol_u * scale_u < su[2] / 3
    ru, default = ref(h, y, rtol=rtol_u, weight=w.numpy(), rank_rtol=1e-12), ref(h, y, weight=w.numpy())
    assert ru["nc3_span"] != pytest.approx(default["nc3_span"], rel=1e-2)
    assert M.nc3_span(w, stats, rtol=rtol_u) == pytest.approx(ru["nc3_span"], rel=1e-10)
    got = M.dnc_metrics(stats, weight=w, rtol=rtol_u, rank_rtol=1e-12)
    assert got["nc3_span"] == pytest.approx(ru["nc3_span"], rel=1e-10)
    assert got["rank"] == ru["rank"] == 3


@pytest.mark.parametrize("weighting", WEIGHTINGS)
def test_the_centred_cutoff_carries_the_norm_of_the_centring(case, weighting: str) -> None:
    """``τ = rtol·||A||_2·R`` for the centred means with ``A = I - 1w^T`` of the weighting in use (||A|| > 1.5
    for these sample weights, 1 for equal weights), ``rtol·R`` for the uncentred means: each rtol below puts
    the smallest singular value between the cutoff with the right ||A|| and the cutoff with the other one."""
    h, y, w, stats = case
    s, scale = scales(h, y, weighting)
    _, scale_s = scales(h, y, "samples")
    _, scale_c = scales(h, y, "classes")
    assert scale_s / scale_c > 1.5  # ||A||_2 of the sample weights (||A||_2 = 1 for equal weights)
    wrong = scale_c if weighting == "samples" else scale_s
    rtol = s[2] / math.sqrt(scale * wrong)  # the cutoff with the right ||A|| on one side, the wrong on the other
    r = ref(h, y, rtol=rtol, weighting=weighting, rank_rtol=1e-12)
    drops = weighting == "samples"  # the right cutoff is the larger one
    assert r["rank_centred"] == (2 if drops else 3)
    assert M.nc1(stats, weighting=weighting, rtol=rtol) == pytest.approx(r["nc1"], rel=1e-10)
    got = M.dnc_metrics(stats, weighting=weighting, rtol=rtol, rank_rtol=1e-12)
    assert got["nc1"] == pytest.approx(r["nc1"], rel=1e-10)
    assert got["rank_centred"] == r["rank_centred"]
    su, _ = scales(h, y, None)
    _, scale_u = scales(h, y, None)
    rtol_u = su[3] / math.sqrt(scale_u * scale_s)  # uncentred: the cutoff has no ||A||
    ru = ref(h, y, rtol=rtol_u, weighting=weighting, weight=w.numpy(), rank_rtol=1e-12)
    assert ru["rank"] == 4
    got = M.dnc_metrics(stats, weighting=weighting, weight=w, rtol=rtol_u, rank_rtol=1e-12)
    assert got["rank"] == 4
    assert got["nc3_span"] == pytest.approx(ru["nc3_span"], rel=1e-10)
    assert M.nc3_span(w, stats, rtol=rtol_u) == pytest.approx(ru["nc3_span"], rel=1e-10)


def test_rank_rtol_and_the_precision_floor() -> None:
    """``rank`` counts singular values above ``max(rank_rtol·σ_max, τ)``: a float32 rank-3 lift to D = 40 has
    rounding singular values near 1e-7·σ_max, below τ (float32's) but above a ``rank_rtol`` of 1e-12."""
    g = torch.Generator().manual_seed(7)
    y = torch.arange(60) % 5
    z = torch.randn(5, 3, generator=g, dtype=torch.float64)[y] + 0.1 * torch.randn(60, 3, generator=g).double()
    up = z.float() @ torch.randn(3, 40, generator=g)  # float32 rounding: full numerical rank in float64
    stats = M.class_stats(up, y, 5)
    assert M.numerical_rank(M.mean_spectrum(stats), rtol=1e-12) == 5  # the rounding, counted without a floor
    assert M.numerical_rank(M.mean_spectrum(stats, center=True), rtol=1e-12) == 4
    r = np_conventions(up.double().numpy(), y.numpy(), eps_in=2.0**-23, factor=RTOL_FACTOR, rank_rtol=1e-12)
    got = M.dnc_metrics(stats, rank_rtol=1e-12)
    assert got["rank"] == r["rank"] == 3 and got["rank_centred"] == r["rank_centred"] == 3
    spec = M.mean_spectrum(stats, center=True).numpy()
    rank_rtol = float(math.sqrt(spec[1] / spec[0]))  # between σ_2/σ_1 and 1: keeps σ_1 only
    r = np_conventions(up.double().numpy(), y.numpy(), eps_in=2.0**-23, factor=RTOL_FACTOR, rank_rtol=rank_rtol)
    got = M.dnc_metrics(stats, rank_rtol=rank_rtol)
    assert got["rank_centred"] == r["rank_centred"] == 1
    assert got["rank"] == r["rank"]


def test_numerical_rank_by_hand() -> None:
    t = torch.tensor
    assert M.numerical_rank(t([], dtype=torch.float64)) == 0
    assert M.numerical_rank(t([0.0, 0.0])) == 0
    assert M.numerical_rank(t([2.0])) == 1
    assert M.numerical_rank(t([1.0, 0.5e-3, 2e-3])) == 2  # default rtol 1e-3 of σ_max
    assert M.numerical_rank(t([1.0, 1e-3], dtype=torch.float64)) == 1  # strictly above: 1e-3·1.0 is out
    assert M.numerical_rank(t([10.0, 0.005], dtype=torch.float64)) == 1  # 1e-3·σ_max = 0.01, not 1e-3/σ_max
    assert M.numerical_rank(t([0.5, 0.1], dtype=torch.float64)) == 2  # no floor by default
    assert M.numerical_rank(t([0.5, 0.1], dtype=torch.float64), floor=0.2) == 1
    assert M.numerical_rank(t([0.5, 0.1], dtype=torch.float64), floor=0.1) == 1  # strictly above the floor
    assert M.numerical_rank(t([0.5, 0.1], dtype=torch.float64), rtol=0.5) == 1


def test_nc1_truncated_rank_one_and_clamping(case) -> None:
    h, y, _, stats = case
    for weighting in WEIGHTINGS:
        hn, yn = h.numpy(), y.numpy()
        means = np.stack([hn[yn == c].mean(0) for c in range(K)])
        wts = np.bincount(yn) / len(yn) if weighting == "samples" else np.full(K, 1 / K)
        mbar = means - wts @ means
        e = hn - means[yn]
        _, s, vt = np.linalg.svd(mbar)
        sw = e.T @ e / len(hn)
        want = float(vt[0] @ sw @ vt[0] / s[0] ** 2)  # tr(Σ_W Σ_B^{+1}) / K with Σ_B = M̄ᵀM̄/K
        for method in ("gram", "full"):
            got = M.nc1_truncated(stats, rank=1, weighting=weighting, method=method)
            assert got == pytest.approx(want, rel=1e-10), (weighting, method)
    assert M.nc1_truncated(stats, rank=K + 3) == pytest.approx(M.nc1(stats), rel=1e-13)  # at most K - 1
    for bad in (0, -1, True, 2.5, "2"):
        with pytest.raises(DeepCollapseError, match=full_match(f"rank must be an integer >= 1, got {bad!r}")):
            M.nc1_truncated(stats, rank=bad)


def test_gram_path_at_extreme_scales() -> None:
    """The Gram path works while ``s⁴`` is a float64 number: features at 1e62 and 1e-62 give the scale-free
    value; at 1e80 it says it cannot tell (nan)."""
    h, y = planted(6)
    r = ref(h, y)["nc1"]
    for scale in (1e62, 1e-62):
        assert M.nc1(M.class_stats(h * scale, y, K, cov="light")) == pytest.approx(r, rel=1e-9), scale
    assert math.isnan(M.nc1(M.class_stats(h * 1e80, y, K, cov="light")))


def test_nc1_path_errors_whole(case) -> None:
    *_, stats = case
    with pytest.raises(DeepCollapseError, match=full_match("method must be 'auto', 'gram' or 'full', got 'fast'")):
        M.nc1(stats, method="fast")
    light = dataclasses.replace(stats, sigma_w=None)
    msg = "method='full' needs sigma_w; use method='gram' or cov='full'"
    with pytest.raises(DeepCollapseError, match=full_match(msg)):
        M.nc1(light, method="full")
    no_gram = dataclasses.replace(stats, means_sigma_w=None)
    msg = "method='gram' needs means_sigma_w; use method='full' or cov='light'"
    with pytest.raises(DeepCollapseError, match=full_match(msg)):
        M.nc1_unnormalized(no_gram, method="gram")
    assert M.nc1(no_gram) == pytest.approx(M.nc1(stats, method="gram"), rel=1e-10)  # auto: the full path


def test_nc1_quotient_by_hand() -> None:
    """Two classes at (±1, 0) with samples ±0.5 along the first axis: tr Σ_B = ||M̄||²/K = 1 exactly and
    tr Σ_W = 0.25, so the quotient is 0.25; coinciding means give inf (features vary) or nan (they don't)."""
    h = torch.tensor([[1.5, 0.0], [0.5, 0.0], [-1.5, 0.0], [-0.5, 0.0]], dtype=torch.float64)
    y = torch.tensor([0, 0, 1, 1])
    assert M.nc1_quotient(M.class_stats(h, y, 2)) == 0.25
    spread = M.class_stats(torch.tensor([[1.0], [-1.0], [2.0], [-2.0]], dtype=torch.float64), y, 2)
    assert M.nc1_quotient(spread) == math.inf
    dead = M.class_stats(torch.zeros(4, 2, dtype=torch.float64), y, 2)
    assert math.isnan(M.nc1_quotient(dead))
    assert math.isnan(M.nc1(dead)) and M.nc1(spread) == math.inf


# ------------------------------------------------------------------------ NC3 by hand


def test_nc3_by_hand() -> None:
    """K = 2 means ±(0.5, 0.5, 0) (centred, ||M̄||_F = 1) and W = [[0.5, 0, 0.5], [0.5, 0, -0.5]] (||W||_F = 1):
    ||W - M̄||_F² = (0 + 0.25 + 0.25) + (1 + 0.25 + 0.25) = 2; W M̄ᵀ = [[0.25, -0.25], [0.25, -0.25]]
    has norm 1/2 and distance sqrt(2 - sqrt(2)) from the ETF (I - 11ᵀ/2)/1 = [[.5, -.5], [-.5, .5]]; the span
    of the means is the line (1, 1, 0), and W loses sqrt(3/4) of its norm projected on it."""
    means = torch.tensor([[0.5, 0.5, 0.0], [-0.5, -0.5, 0.0]], dtype=torch.float64)
    w = torch.tensor([[0.5, 0.0, 0.5], [0.5, 0.0, -0.5]], dtype=torch.float64)
    assert M.nc3_duality(w, means) == pytest.approx(math.sqrt(2.0), rel=1e-15)
    x = np.array([[0.5, -0.5], [0.5, -0.5]])  # W M̄ᵀ / ||W M̄ᵀ||
    etf = np.array([[0.5, -0.5], [-0.5, 0.5]])
    assert M.nc3_zhu(2.0 * w, means) == pytest.approx(float(np.linalg.norm(x - etf)), rel=1e-15)
    assert M.nc3_zhu(w, means, tile_bytes=16) == pytest.approx(float(np.linalg.norm(x - etf)), rel=1e-15)
    assert M.nc3_span(w, means) == pytest.approx(math.sqrt(0.75), rel=1e-15)  # rows lose (0.25,-0.25,0)
    zero = torch.zeros(2, 3, dtype=torch.float64)
    for value in (M.nc3_duality(zero, means), M.nc3_duality(w, zero), M.nc3_zhu(zero, means), M.nc3_span(zero, means)):
        assert math.isnan(value)
    assert M.nc3_span(w, zero) == 1.0  # zero means span nothing: none of W lies in their span
    assert M.nc3_span(w.float(), means) == pytest.approx(math.sqrt(0.75), rel=1e-15)  # a float32 weight
    for scale in (1e-200, 1e200):  # scale-free where ||W||_F itself under- or overflows
        assert M.nc3_duality(scale * w, scale * means) == pytest.approx(math.sqrt(2.0), rel=1e-15)
        assert M.nc3_span(scale * w, means) == pytest.approx(math.sqrt(0.75), rel=1e-15)


def test_weight_and_means_errors_whole() -> None:
    h, y = planted(8)
    stats = M.class_stats(h, y, K)
    msg = "weight must be (out, D) with D = 6 (the features' dimension), got "
    for bad, shown in ((torch.zeros(3, 5), "(3, 5)"), (torch.zeros(6), "(6,)"), ([[0.0] * 6], "list")):
        with pytest.raises(DeepCollapseError, match=full_match(msg + shown)):
            M.nc3_span(bad, stats)
    with pytest.raises(DeepCollapseError, match=full_match("weight must have K = 4 rows (one per class), got 3")):
        M.nc3_duality(torch.zeros(3, D), stats)
    with pytest.raises(DeepCollapseError, match=full_match("weight must have K = 4 rows (one per class), got 3")):
        M.nc3_zhu(torch.zeros(3, D), stats)
    for bad, shown in (([[1.0, 2.0]], "list"), (torch.ones(3), "(3,)")):
        with pytest.raises(
            DeepCollapseError, match=full_match(f"means must be a ClassStats or a (K, D) tensor, got {shown}")
        ):
            M.nc2_orth(bad)
    with pytest.raises(DeepCollapseError, match=full_match("dnc_metrics needs labels with raw features")):
        M.dnc_metrics(h)
    msg = "predictions has 3 entries but the features have 37"
    with pytest.raises(DeepCollapseError, match=full_match(msg)):
        M.nc4_from_predictions(torch.zeros(3, dtype=torch.long), h, stats)
    msg = "these statistics carry no nearest-class-centre counts (ncc=False or one pass)"
    with pytest.raises(DeepCollapseError, match=full_match(msg)):
        M.ncc_accuracy(M.class_stats(h, y, K, ncc=False))
    msg = "these statistics carry no classifier predictions (pass predictions= when accumulating)"
    with pytest.raises(DeepCollapseError, match=full_match(msg)):
        M.nc4(stats)


# ------------------------------------------------------------------------ predictions, NC4, dnc_metrics


def test_classifier_predictions_of_integer_features() -> None:
    """Integer features against fractional weights and bias: the argmax of the exact logits (no truncation
    of the weights to integers)."""
    rng = np.random.default_rng(9)
    h = rng.integers(-3, 4, size=(50, 5))
    w, b = rng.uniform(-1, 1, size=(4, 5)), rng.uniform(-1, 1, size=4)
    want = (h @ w.T + b).argmax(1)
    got = M.classifier_predictions(torch.from_numpy(h), torch.from_numpy(w), torch.from_numpy(b))
    assert got.tolist() == want.tolist()
    got = M.classifier_predictions(torch.from_numpy(h).float(), torch.from_numpy(w).float())
    assert got.tolist() == (h @ w.astype(np.float32).astype(np.float64).T).argmax(1).tolist()


def test_nc4_over_a_class_subset() -> None:
    """Statistics of the classes {1, 3, 4} of labels 0..4: the nearest centre is compared in the original
    labels."""
    h, y = planted(10)
    y = torch.tensor([1, 3, 4, 4])[y]
    stats = M.class_stats(h, y, 5, classes=[1, 3, 4])
    pred = torch.where(torch.arange(len(y)) % 3 == 0, torch.tensor(3), y)
    hn, yn = h.numpy(), y.numpy()
    mu = np.stack([hn[yn == c].mean(0) for c in (1, 3, 4)])
    ncc = np.array([1, 3, 4])[((hn[:, None] - mu[None]) ** 2).sum(-1).argmin(1)]
    want = float((ncc != pred.numpy()).mean())
    assert 0 < want < 1
    assert M.nc4_from_predictions(pred, h, stats) == pytest.approx(want, abs=1e-15)


def test_dnc_metrics_passes_num_classes() -> None:
    h, y = planted(11)
    with pytest.warns(UserWarning, match=r"class\(es\) \[4, 5\] have no samples"):
        got = M.dnc_metrics(h, y, 6)
    assert got["nc1"] == pytest.approx(ref(h, y)["nc1"], rel=1e-10)


def test_dnc_metrics_and_per_class_rows_use_a_given_pair_summary() -> None:
    """``pairs=`` is used as given (the sweep is not run again): a summary of *other* statistics shows up in
    every pair metric and CDNV column; without it both compute their own, equal to the reference."""
    from deepcollapse.measure.readers import per_class_rows

    h, y = planted()
    stats = M.class_stats(h, y, K)
    other = M.pair_summary(M.class_stats(h * torch.linspace(1, 2, D, dtype=torch.float64), y, K))
    own = M.dnc_metrics(stats)
    given = M.dnc_metrics(stats, pairs=other)
    names = ("nc2_etf", "nc2_orth", "nc2_equiangle", "nc2_maxangle", "cdnv")
    assert all(given[n] == getattr(other, n) != own[n] for n in names)
    assert {k: v for k, v in given.items() if k not in names} == {k: v for k, v in own.items() if k not in names}
    assert own["cdnv"] == pytest.approx(ref(h, y)["cdnv"], rel=1e-12)
    rows, rows_given = per_class_rows(stats), per_class_rows(stats, pairs=other)
    assert [r["cdnv_mean"] for r in rows_given] == other.cdnv_per_class.tolist() != [r["cdnv_mean"] for r in rows]
    assert [r["cdnv_max"] for r in rows_given] == other.cdnv_max.tolist()
