"""deepcollapse.metrics against the independent numpy reference of each source's definition (tests/reference.py),
in the hard regime: float16/bfloat16/float32 inputs, rank-deficient means, offsets far from the origin, tiny and
huge scales, missing classes."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from deepcollapse import metrics as M
from deepcollapse._validate import DeepCollapseError
from deepcollapse.measure.stats import RTOL_FACTOR, dtype_eps
from reference import np_conventions

pytestmark = pytest.mark.usefixtures("one_thread")

EPS = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7, torch.float32: 2.0**-23, torch.float64: 2.0**-52}


def low_rank(
    seed: int,
    *,
    k: int = 6,
    d: int = 12,
    r: int = 3,
    n: int = 8,
    scale: float = 1.0,
    offset: float = 0.0,
    noise: float = 0.3,
    dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Class means of exact rank ``r`` (equal singular values) plus within-class noise whose per-class mean is
    exactly 0, shifted by ``offset`` along a random unit vector, scaled, then rounded once to ``dtype``."""
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(k, r))
    c -= c.mean(0)
    q, _ = np.linalg.qr(c)
    basis, _ = np.linalg.qr(rng.normal(size=(d, r)))
    means = np.sqrt(k) * q @ basis.T  # centred, rank r, all singular values sqrt(K)
    y = np.arange(k * n) % k
    eps_ = rng.normal(size=(k * n, d)) * noise / np.sqrt(d)
    for cl in range(k):
        eps_[y == cl] -= eps_[y == cl].mean(0)
    shift = rng.normal(size=d)
    h = scale * (means[y] + eps_ + offset * shift / np.linalg.norm(shift))
    return torch.from_numpy(h).to(dtype), torch.from_numpy(y)


def ref_of(h: torch.Tensor, y: torch.Tensor, **kw) -> dict[str, float]:
    """The reference on the float64 cast of the features as given."""
    return np_conventions(h.double().numpy(), y.numpy(), eps_in=EPS[h.dtype], factor=RTOL_FACTOR, **kw)


def assert_close(got: dict, ref: dict, keys, rel: float) -> None:
    for key in keys:
        assert got[key] == pytest.approx(ref[key], rel=rel, abs=1e-13), key


# --------------------------------------------------------------------------- the whole table, exact values

TABLE = (
    "nc1",
    "nc1_quotient",
    "nc2_etf",
    "nc2_orth",
    "nc2_equinorm",
    "nc2_equiangle",
    "nc2_maxangle",
    "cdnv",
    "ncc_accuracy",
    "nc3_span",
    "nc3_duality",
    "nc3_zhu",
    "nc4",
    "rank",
    "rank_centred",
    "mean_norm",
)


@pytest.mark.parametrize("weighting", ["samples", "classes"])
@pytest.mark.parametrize("shape", [(5, 9), (6, 3)])  # K < D (Gram path) and D < K (covariance path)
def test_every_metric_matches_its_definition(weighting: str, shape: tuple[int, int]) -> None:
    k, d = shape
    rng = np.random.default_rng(k + d)
    y = np.concatenate([np.full(4 + 3 * c, c) for c in range(k)])  # unequal classes
    h = rng.normal(size=(k, d))[y] * 2.0 + rng.normal(size=(len(y), d)) + 40.0
    w = rng.normal(size=(k, d))
    logits = h @ w.T
    stats = M.class_stats(torch.from_numpy(h), torch.from_numpy(y), k, predictions=torch.from_numpy(logits))
    got = M.dnc_metrics(stats, weight=torch.from_numpy(w), weighting=weighting)
    ref = np_conventions(
        h, y, eps_in=EPS[torch.float64], factor=RTOL_FACTOR, weighting=weighting, weight=w, pred=logits.argmax(1)
    )
    assert_close(got, ref, TABLE, rel=1e-9)
    assert got["rtol"] == pytest.approx(RTOL_FACTOR * (EPS[torch.float64] + max(np.bincount(y)) * EPS[torch.float64]))
    bias_free = M.dnc_metrics(stats, weight=torch.from_numpy(w), weighting=weighting, bias_free=True)
    assert "nc3_duality" not in bias_free
    assert bias_free["nc3_duality_uncentred"] == pytest.approx(ref["nc3_duality_uncentred"], rel=1e-12)
    unnorm = M.dnc_metrics(stats, normalize=False, weighting=weighting)["nc1_unnormalized"]
    assert unnorm == pytest.approx(ref["nc1_unnormalized"], rel=1e-9)
    assert set(got) <= set(M.METRICS)  # every key is a name of the conventions table


def test_registry_is_the_one_table() -> None:
    assert {"nc1", "nc1_truncated", "nc1_quotient", "nc1_unnormalized", "cdnv", "nc2_etf", "nc2_orth"} <= set(M.METRICS)
    for name, info in M.METRICS.items():
        assert info.name == name and info.formula and info.collapse
        assert info.kind in ("nc", "aux", "meta")
        assert info.source or info.kind != "nc", name


# --------------------------------------------------------------------------- precision-aware rank decisions


def test_issue_case_float32_bottleneck_lifted_to_256() -> None:
    """A float32 rank-4 bottleneck (K = 10) lifted linearly to D = 256 in float32: NC1 of the lift equals NC1 of
    the bottleneck and the float64 answer, on both paths (issue 8: 3.87 and 1.3e17 before)."""
    g = torch.Generator().manual_seed(0)
    k, r, n = 10, 4, 50
    y = torch.arange(k * n) % k
    z64 = torch.randn(k, r, generator=g, dtype=torch.float64)[y] + 0.3 * torch.randn(
        k * n, r, generator=g, dtype=torch.float64
    )
    a64 = torch.randn(r, 256, generator=g, dtype=torch.float64)
    z, a = z64.float(), a64.float()
    up = z @ a  # computed in float32
    exact = np_conventions((z.double() @ a.double()).numpy(), y.numpy(), eps_in=EPS[torch.float64], factor=RTOL_FACTOR)[
        "nc1"
    ]
    assert M.nc1(M.class_stats(z, y, k)) == pytest.approx(exact, rel=1e-6)
    full = M.class_stats(up, y, k, cov="full")
    light = M.class_stats(up, y, k, cov="light")
    assert full.sigma_w is not None and light.sigma_w is None and light.means_sigma_w is not None
    for value in (M.nc1(full, method="full"), M.nc1(full, method="gram"), M.nc1(light)):
        assert value == pytest.approx(exact, rel=1e-6)
    assert M.dnc_metrics(up, y, k)["rank_centred"] == r
    # the float64 rule the issue reported: inverting float32 rounding
    assert M.nc1(light, rtol=256 * EPS[torch.float64]) > 100 * exact


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    k=st.integers(3, 8),
    d=st.integers(2, 24),
    dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32, torch.float64]),
    log_scale=st.floats(-6, 6),
    offset=st.sampled_from([0.0, 1.0, 30.0, 1000.0]),
    data=st.data(),
)
def test_nc1_equals_the_float64_reference(seed, k, d, dtype, log_scale, offset, data) -> None:
    """Property: over K, D, rank r < K - 1, dtype, offsets and scales 1e-6..1e6, NC1 on both paths equals the
    float64 reference (from the float64 cast of the given features) within 1e-6 relative."""
    r = data.draw(st.integers(1, max(1, min(k - 2, d))), label="rank")
    if dtype in (torch.float16, torch.bfloat16):
        offset = min(offset, 1.0)  # a half-precision offset of 30 rounds away the class structure itself
        log_scale = max(min(log_scale, 3.0), -2.0)  # float16's normal range (subnormals round absolutely)
    h, y = low_rank(seed, k=k, d=d, r=r, scale=10.0**log_scale, offset=offset, dtype=dtype)
    ref = ref_of(h, y)
    assert ref["rank_centred"] == r  # the reference resolves exactly the planted rank
    for cov in ("full", "light"):
        stats = M.class_stats(h, y, k, cov=cov)
        assert stats.eps == EPS[dtype]
        assert M.nc1(stats) == pytest.approx(ref["nc1"], rel=1e-6), cov
    if k <= d:  # the covariance path keeps the Gram matrix too: both NC1 paths on the same statistics
        assert M.nc1(M.class_stats(h, y, k, cov="full"), method="gram") == pytest.approx(ref["nc1"], rel=1e-6)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), k=st.integers(3, 10), d=st.integers(8, 64), data=st.data())
def test_nc1_is_invariant_under_an_exact_lift(seed, k, d, data) -> None:
    """NC1(z A) = NC1(z) for A of full row rank, with the lift computed in float32."""
    r = data.draw(st.integers(1, k - 2), label="rank")
    z, y = low_rank(seed, k=k, d=r, r=r, n=6, dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, r, generator=g, dtype=torch.float64))
    a = (q.T * torch.linspace(0.5, 2.0, r, dtype=torch.float64)[:, None]).float()  # full row rank, cond 4
    base = M.nc1(M.class_stats(z, y, k))
    for cov in ("full", "light"):
        assert M.nc1(M.class_stats(z @ a, y, k, cov=cov)) == pytest.approx(base, rel=1e-6)


@pytest.mark.parametrize("dtype", list(EPS))
def test_dtype_table(dtype: torch.dtype) -> None:
    h, y = low_rank(1, dtype=dtype)
    stats = M.class_stats(h, y, 6)
    assert stats.eps == dtype_eps(dtype) == EPS[dtype]
    assert M.dnc_metrics(stats)["rtol"] == pytest.approx(RTOL_FACTOR * (EPS[dtype] + 8 * EPS[torch.float64]))
    assert M.class_stats(h.double(), y, 6).eps == EPS[torch.float64]
    assert M.class_stats((h > 0).to(torch.int32), y, 6).eps == EPS[torch.float64]  # integers convert exactly


def test_user_rtol_is_used_and_checked() -> None:
    h, y = low_rank(2, r=2, dtype=torch.float32)
    stats = M.class_stats(h, y, 6)
    assert M.nc1(stats, rtol=1e-3) == pytest.approx(ref_of(h, y)["nc1"], rel=1e-6)  # the rank-2 part in both
    big = M.nc1(stats, rtol=0.9)  # a cutoff above every singular value: nothing left to invert
    assert big == float("inf")
    for bad in (0.0, 1.0, -1e-3, 2, True, "x"):
        with pytest.raises(DeepCollapseError, match="rtol must be a number in"):
            M.nc1(stats, rtol=bad)


# --------------------------------------------------------------------------- each NC1 path on its own


@pytest.mark.parametrize("method", ["gram", "full"])
@pytest.mark.parametrize("offset", [0.0, 1e4])
def test_each_nc1_path_alone(method: str, offset: float) -> None:
    h, y = low_rank(3, k=5, d=9, r=4, offset=offset)
    stats = M.class_stats(h, y, 5, cov="full")
    assert M.nc1(stats, method=method) == pytest.approx(ref_of(h, y)["nc1"], rel=1e-8)


def test_truncated_and_quotient() -> None:
    rng = np.random.default_rng(4)
    y = torch.arange(48) % 6
    means = rng.normal(size=(6, 10)) * np.arange(1, 11)  # distinct singular values of the means
    h = torch.from_numpy(means)[y] + torch.from_numpy(rng.normal(size=(48, 10)))
    stats = M.class_stats(h, y, 6)
    ref = ref_of(h, y)
    assert M.nc1_truncated(stats) == pytest.approx(ref["nc1"], rel=1e-9)
    # top-2 eigenpairs only, from the definition
    hn, yn = h.numpy(), y.numpy()
    means = np.stack([hn[yn == c].mean(0) for c in range(6)])
    mbar = means - hn.mean(0)
    e = hn - means[yn]
    evals, evecs = np.linalg.eigh(mbar.T @ mbar / 6)
    top = evecs[:, -2:]
    want = np.trace(e.T @ e / len(hn) @ top @ np.diag(1 / evals[-2:]) @ top.T) / 6
    assert M.nc1_truncated(stats, rank=2) == pytest.approx(want, rel=1e-9)
    assert M.nc1_quotient(stats) == pytest.approx(ref["nc1_quotient"], rel=1e-12)
    with pytest.raises(DeepCollapseError, match="rank must be an integer"):
        M.nc1_truncated(stats, rank=0)


# --------------------------------------------------------------------------- NC2 / NC3 / NC4 / CDNV


def test_planted_collapse_gives_zero() -> None:
    k, n, d = 3, 5, 6
    means = torch.eye(d, dtype=torch.float64)[:k] * 2.0  # orthogonal, equal norm
    y = torch.arange(k).repeat_interleave(n)
    s = M.class_stats(means[y], y, k)
    m = M.dnc_metrics(s, weight=means, bias_free=True)
    assert m["nc1"] == 0.0 and m["cdnv"] == 0.0 and m["ncc_accuracy"] == 1.0
    assert m["nc2_orth"] < 1e-7 and m["nc3_span"] < 1e-15 and m["nc3_duality_uncentred"] < 1e-15
    etf = torch.eye(k, dtype=torch.float64) - 1.0 / k
    s = M.class_stats(etf[y] + 7.0, y, k)  # a shifted simplex ETF
    m = M.dnc_metrics(s, weight=etf)
    for key in ("nc2_etf", "nc2_equinorm", "nc2_equiangle", "nc2_maxangle", "nc3_duality", "nc3_zhu"):
        assert m[key] < 1e-7, key
    assert m["nc2_orth"] > 0.1


def test_papyan_nc4_from_predictions() -> None:
    h, y = low_rank(5, k=4, d=6, r=3, noise=3.0)
    w = torch.randn(4, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    b = torch.randn(4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    pred = M.classifier_predictions(h, w, b)
    assert torch.equal(pred, (h @ w.T + b).argmax(1))
    ref = ref_of(h, y, pred=pred.numpy())
    assert 0 < ref["nc4"] < 1
    stats = M.class_stats(h, y, 4, predictions=pred)
    assert M.nc4(stats) == pytest.approx(ref["nc4"], abs=1e-15)
    assert M.nc4_from_predictions(pred, h, stats) == pytest.approx(ref["nc4"], abs=1e-15)
    assert M.nc4_from_predictions(h @ w.T + b, h, stats.means) == pytest.approx(ref["nc4"], abs=1e-15)
    with pytest.raises(DeepCollapseError, match="no classifier predictions"):
        M.nc4(M.class_stats(h, y, 4))


def test_test_set_against_train_means() -> None:
    """Galanti et al.'s protocol: spread and NCC of test features about the training set's class means."""
    h, y = low_rank(6, k=4, d=5, r=3, noise=2.0)
    train, test = slice(0, 20), slice(20, None)
    tr = M.class_stats(h[train], y[train], 4)
    te = M.class_stats(h[test], y[test], 4, means=tr)
    assert torch.equal(te.means, tr.means)
    hn, yn, mu = h[test].numpy(), y[test].numpy(), tr.means.numpy()
    var = np.array([((hn[yn == c] - mu[c]) ** 2).sum(1).mean() for c in range(4)])
    np.testing.assert_allclose(te.within_trace.numpy(), var, rtol=1e-12)
    ncc = ((hn[:, None] - mu[None]) ** 2).sum(-1).argmin(1)
    assert M.ncc_accuracy(te) == pytest.approx((ncc == yn).mean())
    assert torch.equal(M.nearest_centre(h[test], tr), torch.from_numpy(ncc))


def test_tiling_equals_one_block_and_the_reference() -> None:
    """K = 400 classes: pair sweeps with blocks of 3 rows equal one block and the double-loop reference."""
    k, d = 400, 6
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(k), 2)
    h = rng.normal(size=(k, d))[y] + 0.1 * rng.normal(size=(2 * k, d))
    stats = M.class_stats(torch.from_numpy(h), torch.from_numpy(y), k, ncc=False)
    one = M.pair_summary(stats, tile_bytes=8 * k * k)
    tiny = M.pair_summary(stats, tile_bytes=8 * k * 3)
    for key in ("nc2_etf", "nc2_orth", "nc2_equiangle", "nc2_maxangle", "cdnv"):
        assert getattr(tiny, key) == pytest.approx(getattr(one, key), rel=1e-12), key
    torch.testing.assert_close(tiny.cdnv_per_class, one.cdnv_per_class, rtol=1e-12, atol=0)
    sub = M.class_stats(torch.from_numpy(h[:120]), torch.from_numpy(y[:120]), 60)
    ref = np_conventions(h[:120], y[:120], eps_in=EPS[torch.float64], factor=RTOL_FACTOR)
    small = M.pair_summary(sub, tile_bytes=8 * 60 * 7)
    for key in ("nc2_etf", "nc2_orth", "nc2_equiangle", "nc2_maxangle", "cdnv"):
        assert getattr(small, key) == pytest.approx(ref[key], rel=1e-9), key
    mat = M.cdnv_matrix(sub).numpy()
    assert mat[~np.eye(60, dtype=bool)].mean() == pytest.approx(ref["cdnv"], rel=1e-9)
    with pytest.raises(DeepCollapseError, match="tile_bytes=100 cannot hold one tile"):
        M.pair_summary(stats, tile_bytes=100)


# --------------------------------------------------------------------------- class subsets


def test_missing_classes_are_measured_over_those_present() -> None:
    h, y = low_rank(7, k=6, d=8, r=4)
    keep = np.isin(y.numpy(), [0, 2, 3, 5])
    hs, ys = h[keep], y[keep]
    with pytest.warns(UserWarning, match=r"class\(es\) \[1, 4\] have no samples; measuring the 4 classes"):
        stats = M.class_stats(hs, ys, 6)
    assert stats.class_ids == [0, 2, 3, 5] and stats.num_classes == 4
    ref = np_conventions(hs.numpy(), ys.numpy(), eps_in=EPS[torch.float64], factor=RTOL_FACTOR)
    assert_close(M.dnc_metrics(stats), ref, ("nc1", "nc2_etf", "cdnv", "ncc_accuracy"), rel=1e-9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        only = M.class_stats(h, y, 6, classes=[0, 2, 3, 5])  # explicit: no warning, other samples skipped
    assert torch.equal(only.means, stats.means) and only.class_ids == [0, 2, 3, 5]
    with pytest.raises(DeepCollapseError, match="classes must be at least 2 distinct labels"):
        M.class_stats(h, y, 6, classes=[7, 1])
    with pytest.raises(DeepCollapseError, match=r"only class\(es\) \[2\] have samples"):
        M.class_stats(h[y == 2], y[y == 2], 6)


# --------------------------------------------------------------------------- degenerate input and errors


def test_degenerate_layers_are_undefined_not_collapsed() -> None:
    y = torch.arange(12) % 3
    dead = M.class_stats(torch.zeros(12, 4, dtype=torch.float64), y, 3)  # a dead ReLU layer
    assert math.isnan(M.nc1(dead))
    signs = torch.tensor([1.0, 1.0, 1.0, -1.0, -1.0, -1.0] * 2, dtype=torch.float64)[:, None]
    spread = M.class_stats(signs * torch.ones(12, 4, dtype=torch.float64), y, 3)  # every class mean is 0
    assert M.nc1(spread) == float("inf")


def test_nc1_for_tiny_features() -> None:
    h, y = low_rank(2, k=4, d=7, r=2)
    ref = M.nc1(M.class_stats(h, y, 4))
    assert M.nc1(M.class_stats(h * 1e-85, y, 4, cov="full"), method="full") == pytest.approx(ref, rel=1e-9)
    assert math.isnan(M.nc1(M.class_stats(h * 1e-85, y, 4, cov="light")))  # Gram path: says it cannot tell


@pytest.mark.parametrize(
    "features, labels, k, match",
    [
        (torch.randn(6, 3), torch.tensor([0, 0, 0, 1, 1, 5]), 3, "0..2"),
        (torch.randn(6, 3), torch.tensor([0, 0, 0, 1, 1]), 2, "5 entries"),
        (torch.full((4, 2), float("nan")), torch.tensor([0, 1, 0, 1]), 2, "NaN"),
        (torch.randn(4, 2), torch.tensor([0, 0, 0, 0]), 1, "num_classes"),
    ],
)
def test_bad_input_is_named(features, labels, k, match) -> None:
    with pytest.raises(DeepCollapseError, match=match):
        M.class_stats(features, labels, k)


def test_shape_errors_are_named() -> None:
    h, y = low_rank(0, k=4, d=7, r=2)
    stats = M.class_stats(h, y, 4, cov="light")
    with pytest.raises(DeepCollapseError, match="needs sigma_w"):
        M.nc1(stats, method="full")
    with pytest.raises(DeepCollapseError, match="weight must be"):
        M.nc3_span(torch.randn(3, 5), stats)
    with pytest.raises(DeepCollapseError, match="weight must have K = 4 rows"):
        M.nc3_duality(torch.randn(3, 7), stats)
    with pytest.raises(DeepCollapseError, match="predictions has 3 entries"):
        M.nc4_from_predictions(torch.zeros(3, dtype=torch.long), h, stats)


def test_the_centring_direction_is_never_inverted() -> None:
    """rank(M̄) <= K - 1: even with a cutoff far below float64 rounding, the K-th direction (the centring
    one, zero up to rounding) stays out of Σ_B⁺."""
    h, y = low_rank(9, k=5, d=8, r=4, offset=3.0)
    stats = M.class_stats(h, y, 5, cov="full")
    assert M.mean_spectrum(stats, center=True)[-1] > 0  # rounding left something to invert
    assert M.nc1(stats, rtol=1e-300) == pytest.approx(ref_of(h, y)["nc1"], rel=1e-9)


def test_the_docs_table_is_the_registry() -> None:
    """docs/conventions.md lists every name of METRICS, with the registry's formula, in one table."""
    from pathlib import Path

    page = (Path(__file__).resolve().parents[1] / "docs" / "conventions.md").read_text(encoding="utf-8")
    rows = {line.split("|")[1].strip().strip("`"): line for line in page.splitlines() if line.startswith("| `")}
    assert set(rows) == set(M.METRICS)
    for name, info in M.METRICS.items():
        assert info.collapse.split(" ")[0] in rows[name], name
