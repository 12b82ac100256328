"""The nearest-class-centre rule: float32 products certified row by row == a numpy float64 argmin."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import deepcollapse.measure.pairwise as pw
from deepcollapse.measure.accumulate import class_stats
from deepcollapse.measure.metrics import nearest_centre

pytestmark = pytest.mark.usefixtures("one_thread")

LOW = [torch.float32, torch.float16, torch.bfloat16]


def np_nearest(h: np.ndarray, means: np.ndarray) -> np.ndarray:
    """The reference: ``argmin_c ||h_i - μ_c||²`` from the definition, in float64 (ties to the lowest index)."""
    h = np.asarray(h, dtype=np.float64).reshape(len(h), -1)
    return ((h[:, None, :] - np.asarray(means, dtype=np.float64)[None]) ** 2).sum(-1).argmin(1)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.to(torch.float64).numpy()


def rule(h: torch.Tensor, means: torch.Tensor, **options) -> torch.Tensor:
    r = means.mean(0)
    m = means - r
    return pw.nearest_rows(h, r, m, m.pow(2).sum(1), **options)


@pytest.fixture
def recomputed(monkeypatch):
    """Rows handed to the float64 rule by the certified path (a list of row counts, one per call)."""
    calls: list[int] = []
    f64 = pw.nearest_rows_f64

    def spy(h, *args, **kw):
        calls.append(h.shape[0])
        return f64(h, *args, **kw)

    monkeypatch.setattr(pw, "nearest_rows_f64", spy)
    return calls


def random_case(seed: int, n: int, d: int, k: int, scale: float, offset: float, noise: float, dtype):
    g = torch.Generator().manual_seed(seed)
    means = scale * torch.randn(k, d, generator=g, dtype=torch.float64) + offset
    y = torch.randint(0, k, (n,), generator=g)
    h = (means[y] + noise * scale * torch.randn(n, d, generator=g, dtype=torch.float64)).to(dtype)
    return h, y, means


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    dtype=st.sampled_from(LOW),
    d=st.integers(1, 40),
    k=st.integers(2, 12),
    log_scale=st.sampled_from([-3, 0, 3]),
    offset=st.sampled_from([0.0, 1.0, -1e3, 1e3]),
    noise=st.sampled_from([1e-3, 0.3, 1.0, 3.0]),
    tiled=st.booleans(),
)
def test_certified_equals_numpy(seed, dtype, d, k, log_scale, offset, noise, tiled) -> None:
    h, _, means = random_case(seed, 60, d, k, 10.0**log_scale, offset, noise, dtype)
    tile = 8 * 60 if tiled else pw.DEFAULT_TILE_BYTES  # one class per tile, or one tile
    got = rule(h, means, tile_bytes=tile)
    assert np.array_equal(got.numpy(), np_nearest(_np(h), means.numpy()))


@pytest.mark.parametrize("scale", [1e-25, 1e25])
def test_float32_extreme_scales(scale: float, recomputed) -> None:
    """Squares of 1e25 overflow float32 and of 1e-25 underflow: after the power-of-two scaling the float32
    scores still decide almost every row."""
    h, _, means = random_case(3, 200, 16, 7, scale, 0.0, 1.0, torch.float32)
    assert np.array_equal(rule(h, means).numpy(), np_nearest(_np(h), means.numpy()))
    assert sum(recomputed) < 20


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_overflow_after_scaling_goes_to_float64(sign: float, recomputed) -> None:
    """Means spread over 1e-30 and samples 1e10 away: scaled to the means, the samples overflow float32, so
    the float32 scores are infinite or NaN and the float64 rule decides every row. (In float64,
    ``||h - μ_c||²`` is the same number for every class here, so the reference is the expanded form
    ``||μ_c||² - 2 h·μ_c``, which differs from it by ``||h||²`` only.)"""
    g = torch.Generator().manual_seed(4)
    means = 1e-30 * torch.randn(6, 5, generator=g, dtype=torch.float64)
    h = (sign * 1e10 * torch.rand(30, 5, generator=g, dtype=torch.float64)).to(torch.float32)
    m, x = means.numpy(), _np(h)
    want = ((m**2).sum(1)[None] - 2.0 * x @ m.T).argmin(1)
    assert np.array_equal(rule(h, means).numpy(), want)
    assert recomputed == [30]


def dyadic_ties(dtype, *, seed: int = 0, n: int = 64, d: int = 24, k: int = 8, nudge: float = 0.0):
    """Samples exactly (``nudge = 0``) or almost equidistant from two class means.

    Everything is a multiple of 2^-9 below 2^11 (features near 1e3 included), so the float64 rule computes
    every score exactly and breaks an exact tie like numpy: to the lower class index. Sample ``i`` has
    ``μ_{a} = h_i + v`` and ``μ_{b} = h_i + (1 + nudge) reverse(v)`` (``a < b``) as its two nearest means."""
    g = torch.Generator().manual_seed(seed)
    h = (torch.randint(-64 * 16, 64 * 16, (n, d), generator=g) / 64.0 + 1000.0).to(dtype).to(torch.float64)
    a = torch.randint(0, k - 1, (n,), generator=g)
    b = a + 1 + (torch.randint(0, 2**20, (n,), generator=g) % (k - 1 - a))
    rows, means_all = [], []
    for i in range(n):
        v = torch.randint(-128, 128, (d,), generator=g) / 64.0
        far = h[i] + 16.0 * torch.randint(-4, 5, (k, d), generator=g).to(torch.float64)  # the other means
        far[a[i]] = h[i] + v
        far[b[i]] = h[i] + (1.0 + nudge) * v.flip(0)
        means_all.append(far)
        rows.append(h[i])
    return torch.stack(rows).to(dtype), torch.stack(means_all), a, b


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("nudge", [0.0, 2.0**-20, -(2.0**-20)])
@pytest.mark.parametrize("tile", [8, pw.DEFAULT_TILE_BYTES])
def test_ties_are_recomputed_in_float64(dtype, nudge: float, tile: int, recomputed) -> None:
    """Near-ties (relative gap 2^-19, below float32's resolution of D products) and exact ties, with all
    classes in one tile or one class per tile."""
    h, means_all, a, b = dyadic_ties(dtype, nudge=nudge)
    for i in range(h.shape[0]):  # one sample per set of means: ties against the numpy argmin
        got = int(rule(h[i : i + 1], means_all[i], tile_bytes=tile)[0])
        want = int(np_nearest(_np(h[i : i + 1]), means_all[i].numpy())[0])
        assert got == want == (int(a[i]) if nudge >= 0 else int(b[i]))
    assert len(recomputed) == h.shape[0] and all(c == 1 for c in recomputed)  # every row was in doubt


def test_tied_batch_through_the_accumulator(recomputed) -> None:
    """Fixed dyadic means (4 classes > D = 3: the covariance path's fallback rule; and the Gram path): sample 0 is
    exactly equidistant from μ_0 and μ_5 and labelled 5 (the tie goes to 0: wrong); sample 1 is closer to μ_6
    than to μ_1 by a relative 2^-20 and labelled 6 (right); samples 2 and 3 sit near μ_1 and μ_0 (right)."""
    far = [[0, 0, 0], [0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1], [0, 0, 0], [0, 0, 0], [-1, -1, -1]]
    means = 1000.0 + 50.0 * torch.tensor(far, dtype=torch.float64)
    b0, b1 = means[0] + 0.0, means[0] + 20.0
    v, w = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64), torch.tensor([0.5, 1.5, -3.0], dtype=torch.float64)
    means[0], means[5] = b0 + v, b0 + v.flip(0)
    means[1], means[6] = b1 + w, b1 + (1.0 - 2.0**-21) * w.flip(0)
    h = torch.stack([b0, b1, means[1] + 0.25, means[0] + 0.125]).to(torch.float32)
    y = torch.tensor([5, 6, 1, 0])
    kept = [0, 1, 5, 6]
    pos = np.array([kept.index(int(c)) for c in y])
    pred = np_nearest(_np(h), means[kept].numpy())
    want = np.bincount(pos[pred == pos], minlength=4)
    assert want.tolist() == [1, 1, 0, 1]
    stats = class_stats(h, y, 8, cov="full", means=means, classes=kept)
    assert stats.ncc_correct.tolist() == want.tolist()
    assert sum(recomputed) >= 2  # the two ties went to the float64 rule
    # The Gram path's float64 rule reads ||μ_a - μ_b||² off a rounded distance, so it may break the exact tie
    # either way (sample 0, class 5); the near tie it decides like numpy.
    light = class_stats(h, y, 8, cov="light", means=means, classes=kept).ncc_correct.tolist()
    assert light[:2] + light[3:] == want[:2].tolist() + want[3:].tolist() and light[2] in (0, 1)


@settings(max_examples=12, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    dtype=st.sampled_from(LOW),
    cov=st.sampled_from(["full", "light"]),
    offset=st.sampled_from([0.0, 1e3]),
    shape=st.sampled_from([(6, 9), (12, 5), (20, 3)]),  # (D, K): Gram path K < D, fallback K > D
)
def test_accumulated_counts_equal_numpy(seed, dtype, cov, offset, shape) -> None:
    d, k = shape
    h, y, _ = random_case(seed, 150, d, k, 1.0, offset, 1.5, dtype)
    y[:k] = torch.arange(k)
    hn, yn = _np(h), y.numpy()
    means = np.stack([hn[yn == c].mean(0) for c in range(k)])
    pred = np_nearest(hn, means)
    want = np.bincount(yn[pred == yn], minlength=k)
    for tile in (8 * k, pw.DEFAULT_TILE_BYTES):  # one row of scores per tile, or one tile
        stats = class_stats(h, y, k, cov=cov, tile_bytes=tile)
        assert stats.ncc_correct.tolist() == want.tolist()


@pytest.mark.parametrize("dtype", LOW)
def test_metrics_nearest_centre_low_precision(dtype) -> None:
    h, _, means = random_case(11, 300, 8, 30, 1.0, 1e3, 1.0, dtype)
    assert np.array_equal(nearest_centre(h, means).numpy(), np_nearest(_np(h), means.numpy()))


def test_bound_holds_without_the_safety_factor() -> None:
    """Same-sign entries (no cancellation, the worst case for rounding): the float32 scores' error stays
    within the bound divided by its safety factor."""
    g = torch.Generator().manual_seed(0)
    d, k = 2048, 50
    gs = torch.rand(200, d, generator=g, dtype=torch.float64) / d**0.5
    ms = torch.rand(k, d, generator=g, dtype=torch.float64) / d**0.5
    sq = ms.pow(2).sum(1)
    exact = sq.numpy()[None] - 2.0 * (gs.numpy() @ ms.numpy().T)
    f32 = (gs.float() @ ms.float().T).mul_(-2.0).add_(sq.float())
    err = np.abs(f32.double().numpy() - exact).max(1)
    bound = pw.score_error_bound(gs.norm(dim=1), float(sq.max().sqrt()), d).numpy() / pw.SAFETY
    assert (err <= bound).all() and err.max() > 0


def test_reduced_precision_products_take_the_float64_rule(recomputed) -> None:
    """With TF32/bf16 float32 products allowed, the bound would not hold: the float64 rule decides every row."""
    h, _, means = random_case(1, 50, 8, 5, 1.0, 0.0, 1.0, torch.float32)
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")
        got = rule(h, means)
    finally:
        torch.set_float32_matmul_precision(before)
    assert recomputed == [50]
    assert np.array_equal(got.numpy(), np_nearest(_np(h), means.numpy()))


def test_float64_features_take_the_float64_rule(recomputed) -> None:
    h, _, means = random_case(2, 40, 8, 5, 1.0, 0.0, 1.0, torch.float64)
    assert np.array_equal(rule(h, means).numpy(), np_nearest(h.numpy(), means.numpy()))
    assert recomputed == [40]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", LOW)
def test_cuda_certified_equals_numpy(dtype, recomputed) -> None:
    """cuBLAS float32 products obey the same bound; with TF32 allowed, the float64 rule decides every row."""
    h, _, means = random_case(8, 500, 64, 40, 1.0, 1e3, 1.0, dtype)
    want = np_nearest(_np(h), means.numpy())
    got = rule(h.cuda(), means.cuda())
    assert np.array_equal(got.cpu().numpy(), want)
    before = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        recomputed.clear()
        got = rule(h.cuda(), means.cuda())
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
    assert np.array_equal(got.cpu().numpy(), want) and recomputed == [500]
