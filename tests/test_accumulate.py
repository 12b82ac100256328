"""Streaming accumulators: streamed == one shot == a plain numpy reference, in any batching."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from deepcollapse._validate import DeepCollapseError
from deepcollapse.measure.accumulate import (
    ClassAccumulator,
    accumulate_stats,
    add_scatter,
    batch_welford,
    centres,
    full_scatter,
    init_moments,
    init_spread,
    init_welford,
    means_of,
    merge_moments,
    merge_spread,
    merge_welford,
    prepare_batch,
    spread_stats,
    update_moments,
    update_spread,
    welford_stats,
)
from deepcollapse.measure.metrics import cdnv, class_stats, dnc_metrics, nc1, nc2_etf, nc2_orth, ncc_accuracy
from reference import np_dnc

RTOL = 1e-8


pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- numpy reference


def np_reference(h: np.ndarray, y: np.ndarray, k: int) -> dict[str, object]:
    """Direct full-data formulas (docs/conventions.md) in float64 numpy."""
    return np_dnc(h, y, k)


def planted(n: int = 240, d: int = 12, k: int = 5, *, seed: int = 0, noise: float = 1.0, offset: float = 0.0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, k, (n,), generator=g)
    y[:k] = torch.arange(k)  # every class present
    means = 3.0 * torch.randn(k, d, generator=g, dtype=torch.float64)
    h = means[y] + noise * torch.randn(n, d, generator=g, dtype=torch.float64) + offset
    return h, y


def batches(h: torch.Tensor, y: torch.Tensor, size: int, order: torch.Tensor | None = None):
    idx = torch.arange(len(h)) if order is None else order
    return lambda: [(h[idx[i : i + size]], y[idx[i : i + size]]) for i in range(0, len(h), size)]


def assert_stats_close(stats, ref: dict, *, rtol: float = RTOL, ncc: bool = True) -> None:
    np.testing.assert_array_equal(stats.counts.numpy(), ref["counts"])
    for key in ("means", "within_trace", "means_sigma_w"):
        if key == "means_sigma_w" and stats.means_sigma_w is None:  # the covariance path at K > D
            continue
        np.testing.assert_allclose(getattr(stats, key).numpy(), ref[key], rtol=rtol, atol=1e-12, err_msg=key)
    if stats.sigma_w is not None:
        np.testing.assert_allclose(stats.sigma_w.numpy(), ref["sigma_w"], rtol=rtol, atol=1e-12)
    if ncc:
        np.testing.assert_array_equal(stats.ncc_correct.numpy(), ref["ncc_correct"])
    for name, fn in (("nc1", nc1), ("nc2_etf", nc2_etf), ("nc2_orth", nc2_orth), ("nc4", ncc_accuracy)):
        if name == "nc4" and not ncc:
            continue
        assert fn(stats) == pytest.approx(ref[name], rel=rtol), name
    assert cdnv(stats) == pytest.approx(ref["cdnv"], rel=rtol)


# ------------------------------------------------------------------------------------ agreement


@pytest.mark.parametrize("size", [1, 7, 64, 240])
@pytest.mark.parametrize("cov", ["full", "light"])
def test_two_pass_equals_numpy(size: int, cov: str) -> None:
    h, y = planted()
    stats = accumulate_stats(batches(h, y, size), 5, cov=cov)
    assert (stats.sigma_w is not None) == (cov == "full")
    assert_stats_close(stats, np_reference(h.numpy(), y.numpy(), 5))
    if cov == "full":
        assert nc1(stats, method="full") == pytest.approx(nc1(stats, method="gram"), rel=1e-10)


@pytest.mark.parametrize("size", [1, 13, 240])
def test_one_pass_equals_numpy(size: int) -> None:
    h, y = planted(seed=1)
    stats = accumulate_stats(batches(h, y, size), 5, passes=1)
    assert stats.ncc_correct is None
    assert_stats_close(stats, np_reference(h.numpy(), y.numpy(), 5), ncc=False)


@pytest.mark.parametrize("d", [1, 7, 12, 13])
@pytest.mark.parametrize("block", [1, 5, 128])
def test_block_triangle_scatter_equals_numpy(d: int, block: int) -> None:
    """The covariance path computes only the blocks on and below the diagonal, then mirrors them."""
    e = torch.randn(9, d, generator=torch.Generator().manual_seed(d), dtype=torch.float64) + 100.0
    s = add_scatter(add_scatter(torch.zeros(d, d, dtype=torch.float64), e[:4], block=block), e[4:], block=block)
    x = e.numpy()
    np.testing.assert_allclose(full_scatter(s).numpy(), x.T @ x, rtol=1e-12)
    assert torch.equal(full_scatter(s), full_scatter(s).T)


def test_covariance_path_at_a_dimension_off_the_block() -> None:
    """D = 300 (two 128-wide blocks and a 44-wide one), float32 features far from the origin."""
    h, y = planted(n=400, d=300, k=4, seed=6, offset=1e3)
    h = h.to(torch.float32)
    stats = accumulate_stats(batches(h, y, 150), 4, cov="full")
    assert stats.sigma_w is not None and stats.sigma_w.shape == (300, 300)
    assert_stats_close(stats, np_reference(h.to(torch.float64).numpy(), y.numpy(), 4))


def test_equals_metrics_class_stats() -> None:
    h, y = planted(seed=2)
    one_shot = class_stats(h, y, 5, full_cov=True)
    streamed = accumulate_stats(batches(h, y, 17), 5, cov="full")
    a, b = dnc_metrics(one_shot), dnc_metrics(streamed)
    assert a.keys() == b.keys()
    for key in a:
        assert b[key] == pytest.approx(a[key], rel=1e-10), key


def test_one_pass_is_stable_far_from_the_origin() -> None:
    """Features at 1e6 with unit spread: E[hh^T] - E[h]E[h]^T would lose every digit; Chan does not."""
    h, y = planted(n=400, d=6, k=4, seed=3, offset=1e6)
    ref = np_reference(h.numpy(), y.numpy(), 4)
    stats = accumulate_stats(batches(h, y, 32), 4, passes=1)
    np.testing.assert_allclose(stats.sigma_w.numpy(), ref["sigma_w"], rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(stats.within_trace.numpy(), ref["within_trace"], rtol=1e-8)
    two = accumulate_stats(batches(h, y, 32), 4, cov="light")
    for st_ in (stats, two):
        assert nc1(st_) == pytest.approx(ref["nc1"], rel=1e-8)
        np.testing.assert_allclose(st_.means_sigma_w.numpy(), ref["means_sigma_w"], rtol=1e-7, atol=1e-8)
    # the naive raw-moment formula really fails here (so this test has teeth)
    hn = h.numpy()
    naive = np.zeros((6, 6))
    for c in range(4):
        hc = hn[y.numpy() == c]
        naive += hc.T @ hc - len(hc) * np.outer(hc.mean(0), hc.mean(0))
    assert np.abs(naive / len(hn) - ref["sigma_w"]).max() > 1e-4


def test_shards_merge_like_ranks() -> None:
    """Simulated ranks: pass-1 sums add, pass-2 sums about the merged means add, Chan merges one-pass."""
    h, y = planted(n=300, seed=4)
    k, d = 5, h.shape[1]
    shards = [(h[:90], y[:90]), (h[90:200], y[90:200]), (h[200:], y[200:])]
    moments = [update_moments(init_moments(k, d), *prepare_batch(a, b, k)) for a, b in shards]
    merged = moments[0]
    for m in moments[1:]:
        merged = merge_moments(merged, m)
    ref_c = centres(means_of(merged), merged.counts)
    spreads = [update_spread(init_spread(k, d, cov="full"), *prepare_batch(a, b, k), ref_c) for a, b in shards]
    spread = spreads[0]
    for s in spreads[1:]:
        spread = merge_spread(spread, s)
    assert_stats_close(spread_stats(spread, ref_c), np_reference(h.numpy(), y.numpy(), k))
    wel = init_welford(k, d)
    for a, b in shards:
        wel = merge_welford(wel, batch_welford(*prepare_batch(a, b, k), k))
    assert_stats_close(welford_stats(wel), np_reference(h.numpy(), y.numpy(), k), ncc=False)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), size=st.integers(1, 80), passes=st.sampled_from([1, 2]))
def test_batch_size_and_order_invariance(seed: int, size: int, passes: int) -> None:
    h, y = planted(n=160, d=7, k=4, seed=seed % 7)
    order = torch.randperm(160, generator=torch.Generator().manual_seed(seed))
    base = class_stats(h, y, 4, full_cov=True)
    stats = accumulate_stats(batches(h, y, size, order), 4, passes=passes, cov="full")
    for key in ("means", "within_trace", "means_sigma_w", "sigma_w"):
        torch.testing.assert_close(getattr(stats, key), getattr(base, key), rtol=1e-9, atol=1e-11)
    assert nc1(stats) == pytest.approx(nc1(base), rel=1e-9)
    if passes == 2:
        assert torch.equal(stats.ncc_correct, base.ncc_correct)


@settings(max_examples=20, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    scale=st.floats(1e-3, 1e3),
    shift=st.floats(-50, 50),
)
def test_invariances(seed: int, scale: float, shift: float) -> None:
    """Rotation and scaling leave every metric unchanged; a translation leaves NC1/NC2-ETF/NC4/CDNV."""
    h, y = planted(n=120, d=6, k=4, seed=seed % 11)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    keys = ("nc1", "nc2_etf", "nc2_orth", "ncc_accuracy", "cdnv", "nc2_equinorm", "nc2_equiangle", "nc2_maxangle")
    base = dnc_metrics(accumulate_stats(batches(h, y, 50), 4))
    rotated = dnc_metrics(accumulate_stats(batches(scale * h @ q, y, 50), 4))
    moved = dnc_metrics(accumulate_stats(batches(h + shift, y, 50), 4))
    for key in keys:
        assert rotated[key] == pytest.approx(base[key], rel=1e-7), key
    for key in ("nc1", "nc2_etf", "ncc_accuracy", "cdnv"):
        assert moved[key] == pytest.approx(base[key], rel=1e-7), key


def test_planted_collapse() -> None:
    """Features at a simplex ETF plus tiny noise: NC1 ~ 0, NC2-ETF ~ 0, NC4 = 1."""
    k, d = 4, 10
    etf = torch.zeros(k, d, dtype=torch.float64)
    etf[:, :k] = torch.eye(k) - 1.0 / k
    y = torch.arange(200) % k
    h = etf[y] + 1e-6 * torch.randn(200, d, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    m = dnc_metrics(accumulate_stats(batches(h, y, 33), k))
    assert m["nc1"] < 1e-9
    assert m["nc2_etf"] < 1e-5
    assert m["ncc_accuracy"] == 1.0


def test_auto_picks_the_cheaper_exact_path() -> None:
    """K < D: the Gram path (no D x D state); D <= K: the covariance path (no K x K state); both exact."""
    h, y = planted(n=60, d=40, k=3)
    gram = accumulate_stats(batches(h, y, 16), 3)
    assert gram.sigma_w is None and gram.means_sigma_w is not None
    assert_stats_close(gram, np_reference(h.numpy(), y.numpy(), 3))
    h, y = planted(n=120, d=4, k=12, seed=3)
    cov = accumulate_stats(batches(h, y, 16), 12, tile_bytes=8 * 12 * 5)  # NCC scores in class tiles of 5
    assert cov.sigma_w is not None and cov.means_sigma_w is None
    assert_stats_close(cov, np_reference(h.numpy(), y.numpy(), 12))


def test_nc4_predictions_are_streamed() -> None:
    h, y = planted(n=200, d=8, k=4, noise=3.0, seed=5)
    w = torch.randn(4, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    logits = h @ w.T
    ref = np_reference(h.numpy(), y.numpy(), 4)
    ncc = ((h.numpy()[:, None] - ref["means"][None]) ** 2).sum(-1).argmin(1)
    want = float((ncc != logits.argmax(1).numpy()).mean())
    assert 0 < want < 1
    for cov in ("full", "light"):
        data = lambda: [(h[i : i + 30], y[i : i + 30], logits[i : i + 30]) for i in range(0, 200, 30)]  # noqa: E731
        stats = accumulate_stats(data, 4, cov=cov)
        assert stats.nc4_disagree is not None
        assert float(stats.nc4_disagree.sum()) / stats.total == pytest.approx(want, abs=1e-15)


def test_fixed_means_one_pass() -> None:
    h, y = planted(n=200, d=6, k=4, seed=6)
    train = accumulate_stats(batches(h[:100], y[:100], 32), 4)
    test = accumulate_stats(batches(h[100:], y[100:], 32), 4, means=train)
    mu, hn, yn = train.means.numpy(), h[100:].numpy(), y[100:].numpy()
    var = np.array([((hn[yn == c] - mu[c]) ** 2).sum(1).mean() for c in range(4)])
    np.testing.assert_allclose(test.within_trace.numpy(), var, rtol=1e-12)
    assert torch.equal(test.means, train.means) and test.total == 100
    sub = accumulate_stats(batches(h[100:], y[100:], 32), 4, means=train, classes=[1, 3])
    assert sub.class_ids == [1, 3] and torch.equal(sub.means, train.means[[1, 3]])
    np.testing.assert_allclose(sub.within_trace.numpy(), var[[1, 3]], rtol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_states_stay_float64(dtype: torch.dtype) -> None:
    h, y = planted(n=60, d=5, k=3)
    low = h.to(dtype)
    stats = accumulate_stats(batches(low, y, 16), 3, cov="full")
    assert stats.means.dtype == stats.sigma_w.dtype == stats.means_sigma_w.dtype == torch.float64
    ref = np_reference(low.double().numpy(), y.numpy(), 3)
    np.testing.assert_allclose(stats.means.numpy(), ref["means"], rtol=1e-12)


def test_conv_maps_are_flattened() -> None:
    g = torch.Generator().manual_seed(0)
    h, y = torch.randn(40, 2, 3, 3, generator=g), torch.arange(40) % 4
    stats = accumulate_stats(batches(h, y, 9), 4)
    assert stats.dim == 18
    np.testing.assert_allclose(stats.means.numpy(), np_reference(h.numpy(), y.numpy(), 4)["means"], rtol=1e-12)


# ----------------------------------------------------------------------------------- bad input


def _feed(acc: ClassAccumulator, data: list) -> None:
    for i, (h, y) in enumerate(data):
        acc.update(h, y, batch=i)


def test_nan_names_layer_and_batch() -> None:
    h, y = planted(n=40)
    h[25, 3] = float("nan")
    acc = ClassAccumulator(5, name="layer 'fc2'")
    with pytest.raises(DeepCollapseError, match=r"layer 'fc2', batch 2: features contains NaN or inf"):
        _feed(acc, batches(h, y, 10)())


def test_inf_is_reported() -> None:
    h, y = planted(n=40)
    h[3, 0] = float("inf")
    with pytest.raises(DeepCollapseError, match=r"batch 0.*NaN or inf"):
        accumulate_stats(batches(h, y, 10), 5)


def test_labels_out_of_range() -> None:
    h, y = planted(n=40)
    y[15] = 5
    with pytest.raises(DeepCollapseError, match=r"batch 1: labels must lie in 0\.\.4 .*found 5"):
        accumulate_stats(batches(h, y, 10), 5)


@pytest.mark.parametrize("passes", [1, 2])
def test_empty_class_is_dropped_with_a_warning(passes: int) -> None:
    h, y = planted(n=60, k=5)
    y[y == 3] = 2
    with pytest.warns(UserWarning, match=r"class\(es\) \[3\] have no samples; measuring the 4 classes present"):
        stats = accumulate_stats(batches(h, y, 10), 5, passes=passes, cov="full")
    assert stats.class_ids == [0, 1, 2, 4]
    keep = [0, 1, 2, 4]
    yn = y.numpy()
    ref = np_reference(h.numpy(), np.searchsorted(keep, yn), 4)
    assert_stats_close(stats, ref, ncc=passes == 2)
    with pytest.warns(UserWarning, match="measuring the 3 classes"):
        two = accumulate_stats(batches(h, y, 10), 5, classes=[0, 1, 3, 4])  # 3 requested but empty
    assert two.class_ids == [0, 1, 4]
    np.testing.assert_allclose(two.means.numpy(), ref["means"][[0, 1, 3]], rtol=1e-12)


@pytest.mark.parametrize("k", [0, 1, 2.5, True])
def test_single_class_rejected(k: object) -> None:
    with pytest.raises(DeepCollapseError, match="num_classes must be an integer >= 2"):
        ClassAccumulator(k)  # type: ignore[arg-type]


def test_shape_mismatch_between_batches() -> None:
    acc = ClassAccumulator(2, name="layer 'x'")
    acc.update(torch.randn(4, 3), torch.tensor([0, 1, 0, 1]))
    with pytest.raises(DeepCollapseError, match=r"layer 'x', batch 1: 4 features per sample .* earlier batches had 3"):
        acc.update(torch.randn(4, 4), torch.tensor([0, 1, 0, 1]))


def test_label_count_mismatch() -> None:
    with pytest.raises(DeepCollapseError, match="has 3 entries but the features have 4 samples"):
        ClassAccumulator(2).update(torch.randn(4, 3), torch.tensor([0, 1, 0]))


def test_empty_stream() -> None:
    with pytest.raises(DeepCollapseError, match="no batches were seen"):
        accumulate_stats(lambda: [], 3)


def test_bad_options() -> None:
    with pytest.raises(DeepCollapseError, match="passes must be 1 or 2"):
        ClassAccumulator(3, passes=3)
    with pytest.raises(DeepCollapseError, match="cov must be"):
        ClassAccumulator(3, cov="huge")  # type: ignore[arg-type]
    with pytest.raises(DeepCollapseError, match="cov='light' needs passes=2"):
        ClassAccumulator(3, passes=1, cov="light")
    acc = ClassAccumulator(3, passes=1, max_cov_bytes=100, name="layer 'big'")
    with pytest.raises(DeepCollapseError, match=r"layer 'big': one-pass mode needs a 10 x 10"):
        acc.update(torch.randn(3, 10), torch.tensor([0, 1, 2]))


def test_protocol_errors() -> None:
    h, y = planted(n=30, k=3)
    acc = ClassAccumulator(3)
    acc.update(h, y)
    with pytest.raises(DeepCollapseError, match="compute\\(\\) before the end of pass 1 of 2"):
        acc.compute()
    acc.end_pass()
    acc.update(h[:20], y[:20])  # pass 2 sees less data than pass 1
    acc.end_pass()
    with pytest.raises(DeepCollapseError, match=r"pass 2 saw 20 samples .* pass 1 saw 30"):
        acc.compute()
    with pytest.raises(DeepCollapseError, match="all passes are finished"):
        acc.update(h, y)
    acc.reset()
    _feed(acc, [(h, y)])
    acc.end_pass()
    _feed(acc, [(h, y)])
    acc.end_pass()
    assert acc.compute().total == 30


def test_sync_without_process_group_is_a_no_op() -> None:
    h, y = planted(n=30, k=3)
    acc = ClassAccumulator(3)
    acc.update(h, y)
    acc.sync()
    acc.update(h, y)  # not synced, so still open
    assert int(acc.counts.sum()) == 60


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("passes", [1, 2])
def test_cuda_matches_cpu(passes: int) -> None:
    h, y = planted(n=500, d=30, k=6, seed=5)
    cpu = accumulate_stats(batches(h, y, 64), 6, passes=passes, cov="full")
    gpu = accumulate_stats(batches(h.float().cuda(), y.cuda(), 64), 6, passes=passes, cov="full")
    assert gpu.means.device.type == "cuda" and gpu.means.dtype == torch.float64
    ref = accumulate_stats(batches(h.float().double(), y, 64), 6, passes=passes, cov="full")
    for key in ("means", "within_trace", "means_sigma_w", "sigma_w"):
        torch.testing.assert_close(getattr(gpu, key).cpu(), getattr(ref, key), rtol=1e-9, atol=1e-10)
    assert nc1(gpu) == pytest.approx(nc1(cpu), rel=1e-5)


@settings(max_examples=15, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    size=st.integers(1, 50),
    cov=st.sampled_from(["auto", "full", "light"]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
)
def test_streamed_low_precision_low_rank_equals_reference(seed: int, size: int, cov: str, dtype: torch.dtype) -> None:
    """Streamed in any batch size, low-rank class means of low-precision features far from the origin give the
    float64 reference's NC1 (from the float64 cast of the features as given) to 1e-6."""
    from deepcollapse.measure.stats import RTOL_FACTOR
    from reference import np_conventions

    rng = np.random.default_rng(seed)
    k, d, r = 6, 10, 2
    base = rng.normal(size=(k, r))
    base -= base.mean(0)
    means = base @ np.linalg.qr(rng.normal(size=(d, r)))[0].T * 3.0
    y = np.arange(60) % k
    noise = rng.normal(size=(60, d)) * 0.2
    for c in range(k):
        noise[y == c] -= noise[y == c].mean(0)
    offset = 1000.0 if dtype == torch.float32 else 1.0
    h = torch.from_numpy(means[y] + noise + offset * rng.normal(size=d) / np.sqrt(d)).to(dtype)
    ref = np_conventions(h.double().numpy(), y, eps_in=float(torch.finfo(dtype).eps), factor=RTOL_FACTOR)
    assert ref["rank_centred"] == r
    stats = accumulate_stats(batches(h, torch.from_numpy(y), size), k, cov=cov)
    assert nc1(stats) == pytest.approx(ref["nc1"], rel=1e-6)
