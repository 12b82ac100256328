r"""Streaming float64 sufficient statistics for the NC metrics (docs/conventions.md).

Features arrive batch by batch as ``(B, ...)`` tensors (flattened to ``(B, D)``) with integer labels in
``0..K-1``. The accumulators keep only sufficient statistics, in float64 on the features' device, and end
in a :class:`~deepcollapse.measure.stats.ClassStats`, so every metric keeps its one definition in
:mod:`deepcollapse.measure.metrics`.

Two passes (exact; the default). Pass 1 sums per class, ``n_c`` and ``s_c = Σ_{i∈c} h_i`` (float64), giving
``μ_c = s_c / n_c``. Pass 2 streams the same data again and accumulates moments of the *centred* features
``e_i = h_i - μ_{y_i}`` (formed in float64, so no cancellation however far the features sit from the origin):
the per-class sums ``Σ_{i∈c} ||e_i||²``, the nearest-class-centre counts, and one of

* the **Gram path** (``cov="light"``): ``p_i = M_r e_i`` (``M_r = M - 1r^T``, ``r`` the sample mean) and the
  ``K x K`` matrix ``Σ_i p_i p_i^T = N · M_r Σ_W M_r^T``: ``O(N·D·K)`` work, ``O(K·D)`` memory;
* the **covariance path** (``cov="full"``): the ``D x D`` scatter ``Σ_i e_i e_i^T = N Σ_W``: ``O(N·D²)`` work,
  of which only the blocks on and below the diagonal are computed (:func:`add_scatter`; about half)
  (plus the Gram matrix when ``K <= D``, so that both NC1 paths can be compared).

``cov="auto"`` (the default) takes the cheaper exact one: the Gram path when ``K < D``, the covariance path
when ``D <= K`` -- ``O(N·D·min(D, K))`` in all. The nearest-class-centre rule adds ``O(N·D·K)`` (its
``B x K`` scores are tiled in ``tile_bytes``). The products NC1 needs run in float64: the error analysis in
docs/conventions.md shows that float32 products cannot meet a ``1e-6`` relative guarantee when the
within-class scatter along the means is much smaller than across them. Only the nearest-class-centre argmin
of features of 32 bits or fewer takes float32 products, certified row by row
(:func:`~deepcollapse.measure.pairwise.nearest_rows`).

One pass (Welford/Chan). Each batch's exact statistics (count, mean, centred scatter) are merged into the
running ones with Chan et al.'s pairwise update ``M2 = M2_a + M2_b + δ δ^T n_a n_b / n``, pooled over
classes; it needs the ``D x D`` scatter and carries no nearest-class-centre counts.

Classes. Labels need not cover ``0..K-1``: classes without samples are dropped with a warning and the
measured ones are recorded in ``ClassStats.classes``; ``classes=`` restricts the measurement explicitly.
Fixed means (``means=``, e.g. the training set's): a single pass measures spread, NCC and NC4 about them
(the protocol of Galanti et al. for test sets). Classifier ``predictions`` given in pass 2 give NC4.

Merging. Two-pass states merge by summation, so batches, shards and ranks combine exactly;
:meth:`ClassAccumulator.sync` all-reduces them over ``torch.distributed`` when it is initialized. One-pass
states merge pairwise (:func:`merge_welford`); across ranks they are first re-centred on the global class
means (parallel-axis theorem), which again makes the reduction a sum.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal

import torch
from torch import Tensor

from deepcollapse._validate import DeepCollapseError, check_finite, check_labels
from deepcollapse.measure.pairwise import DEFAULT_TILE_BYTES, LOW_PRECISION, block_rows, nearest_rows, scaled_means
from deepcollapse.measure.stats import EPS64, ClassStats, dtype_eps

__all__ = [
    "DEFAULT_MAX_COV_BYTES",
    "Centres",
    "ClassAccumulator",
    "MomentState",
    "SpreadState",
    "WelfordState",
    "accumulate_stats",
    "add_scatter",
    "batch_welford",
    "centres",
    "choose_cov",
    "class_stats",
    "full_scatter",
    "init_moments",
    "init_spread",
    "init_welford",
    "means_of",
    "merge_moments",
    "merge_spread",
    "merge_welford",
    "prepare_batch",
    "recentre_welford",
    "spread_stats",
    "update_moments",
    "update_spread",
    "update_welford",
    "welford_stats",
]

F64 = torch.float64
I64 = torch.int64
Cov = Literal["auto", "full", "light"]
DEFAULT_MAX_COV_BYTES = 64 * 2**20  # one-pass mode refuses a D x D float64 scatter above this (D = 2896)
# Batches are processed in row chunks of about CHUNK_ELEMENTS values (2 MiB in float64), so that the float64
# temporaries of a chunk stay in cache, but at least MIN_CHUNK_ROWS rows, so that the products stay compute-bound.
CHUNK_ELEMENTS = 2**18
MIN_CHUNK_ROWS = 64
SCATTER_BLOCK = 128  # row-block width of the covariance path's lower block triangle (add_scatter)


def choose_cov(num_classes: int, dim: int, cov: Cov = "auto") -> Literal["full", "light"]:
    """The pass-2 path: ``"light"`` (Gram, O(N·D·K)) when ``K < D``, else ``"full"`` (covariance, O(N·D²))."""
    if cov == "auto":
        return "light" if num_classes < dim else "full"
    return cov


# --------------------------------------------------------------------------------------------- input


def _where(name: str, batch: int | None) -> str:
    return name if batch is None else f"{name}, batch {batch}"


def prepare_batch(
    features: Any,
    labels: Any,
    num_classes: int,
    *,
    name: str = "features",
    batch: int | None = None,
    dim: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Validate one batch; return ``(h, y)``: ``h`` (B, D) in its own dtype and device, ``y`` (B,) int64 there.

    Features of shape ``(B, ...)`` are flattened per sample. Raises :class:`DeepCollapseError` naming
    ``name`` and ``batch`` for NaN/inf, labels outside ``0..num_classes-1``, a label count that differs
    from ``B``, or a feature dimension that differs from ``dim`` (the earlier batches').
    """
    where = _where(name, batch)
    if not isinstance(features, Tensor):
        features = torch.as_tensor(features)
    if features.dim() < 2:
        raise DeepCollapseError(
            f"{where}: features must be (batch, ...) with at least one feature, got shape {tuple(features.shape)}"
        )
    h = features.detach().reshape(features.shape[0], -1)
    if not (h.is_floating_point() or h.is_complex()):
        h = h.to(F64)  # bool and integer features (e.g. binary codes) are measured as numbers
    elif h.is_complex():
        raise DeepCollapseError(f"{where}: complex features are not supported")
    if dim is not None and h.shape[1] != dim:
        raise DeepCollapseError(
            f"{where}: {h.shape[1]} features per sample (shape {tuple(features.shape)}), but earlier batches had {dim}"
        )
    if h.numel() and not bool(torch.isfinite(h.sum())):  # one cheap reduction; locate only when needed
        check_finite(f"{where}: features", h)
    if not isinstance(labels, Tensor):
        labels = torch.as_tensor(labels)
    y = check_labels(labels.detach(), num_classes, name=f"{where}: labels", n_samples=h.shape[0])
    return h, y.to(h.device)


def _check_classes(counts: Tensor, name: str) -> None:
    empty = (counts == 0).nonzero().flatten().tolist()
    if empty:
        raise DeepCollapseError(
            f"{name}: class(es) {empty} have no samples; every class in 0..{counts.numel() - 1} needs at least one"
            " (pass num_classes to match the labels)"
        )


# ------------------------------------------------------------------------------ pass 1: class sums


@dataclass(frozen=True)
class MomentState:
    """Pass-1 statistics: ``counts`` (K,) int64 ``n_c`` and ``sums`` (K, D) float64 ``s_c = Σ_{i∈c} h_i``."""

    counts: Tensor
    sums: Tensor


def init_moments(num_classes: int, dim: int, *, device: torch.device | str | None = None) -> MomentState:
    """Zero pass-1 state."""
    return MomentState(
        torch.zeros(num_classes, dtype=I64, device=device), torch.zeros(num_classes, dim, dtype=F64, device=device)
    )


def update_moments(state: MomentState, h: Tensor, y: Tensor) -> MomentState:
    """``n_c += |{i: y_i = c}|``, ``s_c += Σ_{y_i = c} h_i`` for a prepared batch (see :func:`prepare_batch`).

    Adds into ``state``'s tensors in place (a copy of the K x D sums per batch costs more than the batch) and
    returns it."""
    state.counts.add_(torch.bincount(y, minlength=state.counts.numel()))
    state.sums.index_add_(0, y, h.to(F64))
    return state


def merge_moments(a: MomentState, b: MomentState) -> MomentState:
    """Statistics of the union of two disjoint sample sets: a sum."""
    return MomentState(a.counts + b.counts, a.sums + b.sums)


def means_of(state: MomentState, *, name: str = "features") -> Tensor:
    """Class means ``μ_c = s_c / n_c`` (K, D); every class needs a sample."""
    _check_classes(state.counts, name)
    return state.sums / state.counts[:, None].to(F64)


# ----------------------------------------------------------------------- pass 2: centred moments


@dataclass(frozen=True)
class Centres:
    """Fixed class means for pass 2: ``means`` (K, D), the reference point ``centre`` (D,) ``r``,
    ``shifted`` (K, D) ``M_r = M - 1r^T``, ``sqnorm`` (K,) ``||μ_c - r||²`` and, for the Gram path's NCC rule,
    ``dist2`` (K, K) ``||μ_a - μ_b||²`` (else ``None``); ``cache`` holds what the nearest-class-centre rule
    derives from them once (the float32 copy, :func:`~deepcollapse.measure.pairwise.scaled_means`)."""

    means: Tensor
    centre: Tensor
    shifted: Tensor
    sqnorm: Tensor
    dist2: Tensor | None = None
    cache: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)


def centres(means: Tensor, counts: Tensor | None = None, *, pairwise: bool = False) -> Centres:
    """Pass-2 reference built once from the final class means.

    ``r`` is the sample mean ``Σ_c n_c μ_c / N`` (the plain average of the means without ``counts``); any
    ``r`` gives the same NC1, a central one avoids cancellation. ``pairwise`` also computes the ``K x K`` distances
    (without the Gram trick) for the Gram path's NCC rule: O(K²) memory, so off by default.
    """
    m = means.to(F64)
    w = torch.full((m.shape[0],), 1.0 / m.shape[0], dtype=F64, device=m.device)
    if counts is not None:
        w = counts.to(device=m.device, dtype=F64) / counts.sum()
    r = w @ m
    d = None
    if pairwise:
        d = torch.cdist(m[None], m[None], compute_mode="donot_use_mm_for_euclid_dist")[0].pow(2)
    shifted = m - r
    return Centres(m, r, shifted, shifted.pow(2).sum(1), d)


@dataclass(frozen=True)
class SpreadState:
    """Pass-2 statistics about fixed means ``M``, with ``e_i = h_i - μ_{y_i}``.

    ``counts`` (K,) ``n_c``; ``within_sq`` (K,) ``Σ_{i∈c} ||e_i||²``; ``proj`` (K, K) ``Σ_i (M_r e_i)(M_r e_i)^T``
    or ``None``; ``scatter`` (D, D) ``Σ_i e_i e_i^T`` on and below the diagonal blocks (above them zeros;
    :func:`full_scatter` mirrors it), or ``None``; ``ncc_correct`` (K,) samples whose nearest
    class mean is their own, or ``None``; ``nc4_disagree`` (K,) samples whose classifier prediction differs
    from the nearest class mean, or ``None``.
    """

    counts: Tensor
    within_sq: Tensor
    proj: Tensor | None = None
    scatter: Tensor | None = None
    ncc_correct: Tensor | None = None
    nc4_disagree: Tensor | None = None


def init_spread(
    num_classes: int,
    dim: int,
    *,
    cov: Cov = "auto",
    ncc: bool = True,
    nc4: bool = False,
    device: torch.device | str | None = None,
) -> SpreadState:
    """Zero pass-2 state for the path ``cov`` (:func:`choose_cov`); ``ncc`` and ``nc4`` keep those counts."""
    k, path = num_classes, choose_cov(num_classes, dim, cov)

    def zeros(*shape: int, dtype: torch.dtype = F64) -> Tensor:
        return torch.zeros(*shape, dtype=dtype, device=device)

    return SpreadState(
        counts=zeros(k, dtype=I64),
        within_sq=zeros(k),
        proj=zeros(k, k) if path == "light" or k <= dim else None,
        scatter=zeros(dim, dim) if path == "full" else None,
        ncc_correct=zeros(k, dtype=I64) if ncc else None,
        nc4_disagree=zeros(k, dtype=I64) if nc4 else None,
    )


def _nearest(h: Tensor, p: Tensor | None, y: Tensor, ref: Centres, tile_bytes: int) -> Tensor:
    """Nearest class mean of each row (B,). With the Gram path's ``p = e M_r^T``:
    ``||h_i - μ_c||² - ||e_i||² = 2 (p_{i,y_i} - p_{i,c}) + ||μ_{y_i} - μ_c||²``; otherwise
    :func:`~deepcollapse.measure.pairwise.nearest_rows` about ``r``."""
    if p is not None and ref.dist2 is not None:
        own = p.gather(1, y[:, None])
        return (2.0 * (own - p) + ref.dist2.index_select(0, y)).argmin(1)
    if "f32" not in ref.cache and h.dtype in LOW_PRECISION:
        ref.cache["f32"] = scaled_means(ref.shifted, ref.sqnorm)  # once per set of means, not per batch
    return nearest_rows(h, ref.centre, ref.shifted, ref.sqnorm, tile_bytes=tile_bytes, scaled=ref.cache.get("f32"))


def update_spread(
    state: SpreadState,
    h: Tensor,
    y: Tensor,
    ref: Centres,
    *,
    predictions: Tensor | None = None,
    tile_bytes: int = DEFAULT_TILE_BYTES,
) -> SpreadState:
    """Add a prepared batch's centred moments about ``ref.means``, into ``state``'s tensors in place (the
    ``K x K`` and ``D x D`` sums are not copied per batch); returns the updated state.

    ``predictions`` (B,), in the same class indices as ``y``, are compared with the nearest class mean for NC4.
    """
    e = torch.sub(h, ref.means.index_select(0, y))  # float64 by type promotion, one pass over h
    p = None if state.proj is None else e @ ref.shifted.T  # (B, K)
    ncc, nc4 = state.ncc_correct, state.nc4_disagree
    if ncc is not None or nc4 is not None:
        pred = _nearest(h, p, y, ref, tile_bytes)
        if nc4 is not None and predictions is None:
            raise DeepCollapseError("predictions are needed for every batch of the pass once given for one")
        if ncc is not None:
            ncc.index_add_(0, y, (pred == y).to(I64))
        if nc4 is not None:
            nc4.index_add_(0, y, (pred != predictions).to(I64))
    state.counts.add_(torch.bincount(y, minlength=state.counts.numel()))
    state.within_sq.index_add_(0, y, torch.linalg.vecdot(e, e))
    if p is not None and state.proj is not None:
        state.proj.addmm_(p.T, p)
    if state.scatter is not None:
        add_scatter(state.scatter, e)
    return state


def add_scatter(scatter: Tensor, e: Tensor, *, block: int = SCATTER_BLOCK) -> Tensor:
    """``scatter += e^T e`` on the blocks on and below the diagonal only (``block``-wide row blocks), in place.

    ``e^T e`` is symmetric, so its lower block triangle holds it whole, for ``(D² + D·block)/2`` multiply-adds
    per row instead of ``D²``; :func:`full_scatter` mirrors the sum once at the end. Returns ``scatter``."""
    d = e.shape[1]
    for r0 in range(0, d, block):
        r1 = min(r0 + block, d)
        scatter[r0:r1, :r1].addmm_(e[:, r0:r1].T, e[:, :r1])
    return scatter


def full_scatter(scatter: Tensor) -> Tensor:
    """The symmetric matrix whose lower triangle is that of ``scatter`` (see :func:`add_scatter`)."""
    return torch.tril(scatter) + torch.tril(scatter, -1).T


def merge_spread(a: SpreadState, b: SpreadState) -> SpreadState:
    """Union of two disjoint sample sets measured about the same means: a sum."""
    return SpreadState(*(None if x is None else x + z for x, z in zip(_tensors(a), _tensors(b), strict=True)))


def spread_stats(state: SpreadState, ref: Centres, *, eps: float = EPS64, classes: Tensor | None = None) -> ClassStats:
    """``ClassStats`` from pass 2: ``within_trace = Σ||e||²/n_c``, ``M_r Σ_W M_r^T = proj/N``, ``Σ_W = scatter/N``."""
    n = float(state.counts.sum())
    return ClassStats(
        counts=state.counts,
        means=ref.means,
        within_trace=state.within_sq / state.counts.to(F64),
        means_sigma_w=None if state.proj is None else state.proj / n,
        sigma_w=None if state.scatter is None else full_scatter(state.scatter) / n,
        ncc_correct=state.ncc_correct,
        centre=ref.centre,
        eps=eps,
        classes=classes,
        nc4_disagree=state.nc4_disagree,
    )


# ------------------------------------------------------------------------- one pass: Welford/Chan


@dataclass(frozen=True)
class WelfordState:
    """One-pass statistics: ``counts`` (K,), running ``means`` (K, D), ``within_sq`` (K,)
    ``Σ_{i∈c} ||h_i - μ_c||²`` and the pooled ``scatter`` (D, D) ``Σ_i (h_i - μ_{y_i})(h_i - μ_{y_i})^T``,
    all about the current means."""

    counts: Tensor
    means: Tensor
    within_sq: Tensor
    scatter: Tensor


def init_welford(num_classes: int, dim: int, *, device: torch.device | str | None = None) -> WelfordState:
    """Zero one-pass state (classes with no samples yet have mean 0 and weight 0)."""
    k = num_classes
    return WelfordState(
        torch.zeros(k, dtype=I64, device=device),
        torch.zeros(k, dim, dtype=F64, device=device),
        torch.zeros(k, dtype=F64, device=device),
        torch.zeros(dim, dim, dtype=F64, device=device),
    )


def batch_welford(h: Tensor, y: Tensor, num_classes: int) -> WelfordState:
    """Exact (two-pass within the batch) statistics of one prepared batch."""
    h = h.to(F64)
    counts = torch.bincount(y, minlength=num_classes)
    sums = torch.zeros(num_classes, h.shape[1], dtype=F64, device=h.device).index_add_(0, y, h)
    means = sums / counts.clamp(min=1)[:, None].to(F64)
    e = h - means.index_select(0, y)
    within = torch.zeros(num_classes, dtype=F64, device=h.device).index_add_(0, y, torch.linalg.vecdot(e, e))
    return WelfordState(counts, means, within, e.T @ e)


def merge_welford(a: WelfordState, b: WelfordState) -> WelfordState:
    """Chan et al.'s pairwise merge, per class, pooled over classes.

    ``n = n_a + n_b``, ``δ = μ_b - μ_a``, ``μ = μ_a + δ n_b/n``,
    ``within_sq = q_a + q_b + (n_a n_b/n) ||δ||²``, ``scatter = S_a + S_b + Σ_c (n_a n_b/n)_c δ_c δ_c^T``.
    """
    na, nb = a.counts.to(F64), b.counts.to(F64)
    n = (na + nb).clamp(min=1.0)
    delta = b.means - a.means
    w = na * nb / n
    used = (w > 0).nonzero().flatten()
    dw = delta.index_select(0, used)
    return WelfordState(
        counts=a.counts + b.counts,
        means=a.means + delta * (nb / n)[:, None],
        within_sq=a.within_sq + b.within_sq + w * torch.linalg.vecdot(delta, delta),
        scatter=torch.addmm(a.scatter + b.scatter, (dw * w.index_select(0, used)[:, None]).T, dw),
    )


def update_welford(state: WelfordState, h: Tensor, y: Tensor) -> WelfordState:
    """Merge a prepared batch into the running one-pass state."""
    return merge_welford(state, batch_welford(h, y, state.counts.numel()))


def recentre_welford(state: WelfordState, means: Tensor) -> tuple[Tensor, Tensor]:
    """``(within_sq, scatter)`` re-expressed about other class ``means`` (parallel-axis theorem):

    ``q'_c = q_c + n_c ||μ_c - m_c||²``, ``S' = S + Σ_c n_c (μ_c - m_c)(μ_c - m_c)^T``. About the *global*
    means these add up across shards, which makes a distributed reduction a sum.
    """
    delta = state.means - means
    n = state.counts.to(F64)
    return (
        state.within_sq + n * torch.linalg.vecdot(delta, delta),
        torch.addmm(state.scatter, (delta * n[:, None]).T, delta),
    )


def welford_stats(
    state: WelfordState, *, name: str = "features", eps: float = EPS64, classes: Tensor | None = None
) -> ClassStats:
    """``ClassStats`` (no NC4 counts) from one-pass state: ``Σ_W = S/N`` and, when ``K <= D``, ``M_r Σ_W M_r^T``
    from the final means, ``r`` the sample mean."""
    _check_classes(state.counts, name)
    n = float(state.counts.sum())
    sigma_w = state.scatter / n
    ref = centres(state.means, state.counts, pairwise=False)
    k, d = state.means.shape
    return ClassStats(
        counts=state.counts,
        means=state.means,
        within_trace=state.within_sq / state.counts.to(F64),
        means_sigma_w=ref.shifted @ sigma_w @ ref.shifted.T if k <= d else None,
        sigma_w=sigma_w,
        ncc_correct=None,
        centre=ref.centre,
        eps=eps,
        classes=classes,
    )


def _select_welford(state: WelfordState, keep: Tensor) -> WelfordState:
    """The classes ``keep`` of a one-pass state (the pooled scatter is unchanged: empty classes add nothing)."""
    return WelfordState(
        state.counts.index_select(0, keep),
        state.means.index_select(0, keep),
        state.within_sq.index_select(0, keep),
        state.scatter,
    )


# ----------------------------------------------------------------------------------- distributed


def _tensors(state: Any) -> list[Tensor | None]:
    return [getattr(state, f.name) for f in fields(state)]


def _dist_ready() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _dist_device() -> torch.device:
    """Where collectives run: the current CUDA device for NCCL, the CPU otherwise (gloo)."""
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_reduce(state: Any) -> Any:
    """Sum every tensor of a dataclass state over all processes (in place on copies)."""
    out = {}
    for f in fields(state):
        t = getattr(state, f.name)
        if t is not None:
            t = t.clone()
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
        out[f.name] = t
    return replace(state, **out)


def _agree_nc4(state: SpreadState) -> SpreadState:
    """NC4 counts start with the first batch that has predictions: a rank without one joins with zeros."""
    flag = torch.tensor([state.nc4_disagree is not None], dtype=I64, device=_dist_device())
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    if bool(flag) and state.nc4_disagree is None:
        return replace(state, nc4_disagree=torch.zeros_like(state.within_sq, dtype=I64))
    return state


def _all_reduce_welford(state: WelfordState) -> WelfordState:
    counts = state.counts.clone()
    sums = state.means * state.counts[:, None].to(F64)
    torch.distributed.all_reduce(counts)
    torch.distributed.all_reduce(sums)
    means = sums / counts.clamp(min=1)[:, None].to(F64)
    within, scatter = recentre_welford(state, means)
    torch.distributed.all_reduce(within)
    torch.distributed.all_reduce(scatter)
    return WelfordState(counts, means, within, scatter)


# --------------------------------------------------------------------------------------- the shell


def _class_list(classes: Sequence[int] | Tensor | None, num_classes: int, name: str) -> list[int] | None:
    if classes is None:
        return None
    ids = [int(c) for c in (classes.tolist() if isinstance(classes, Tensor) else classes)]
    bad = [c for c in ids if not 0 <= c < num_classes]
    if bad or len(set(ids)) != len(ids) or len(ids) < 2:
        raise DeepCollapseError(
            f"{name}: classes must be at least 2 distinct labels in 0..{num_classes - 1}, got {ids[:10]}"
        )
    return sorted(ids)


class ClassAccumulator:
    """Streaming per-class statistics of one feature stream (one layer), ending in a ``ClassStats``.

    Parameters
    ----------
    num_classes : int
        ``K >= 2``; labels must lie in ``0..K-1``. Classes without samples are dropped with a warning.
    passes : 1 or 2
        2 (default): exact two-pass statistics; call :meth:`end_pass` after the first pass over the data
        and stream the same data again. 1: Welford/Chan one-pass statistics (needs the ``D x D`` state;
        no NCC counts).
    cov : "auto", "full" or "light"
        The pass-2 path (module docstring): ``"auto"`` is the Gram path when ``K < D``, else the covariance.
    ncc : bool
        Count nearest-class-centre hits in pass 2 (``ncc_accuracy``).
    classes : sequence of int, optional
        Measure only these labels (samples of other classes are skipped).
    means : Tensor (K, D) or ClassStats, optional
        Fixed class means (e.g. the training set's): one pass about them, no pass 1.
    max_cov_bytes : int
        One-pass mode refuses a ``D x D`` float64 scatter larger than this.
    tile_bytes : int
        Largest float64 block of per-sample class scores (``B x K``).
    name : str
        Used in error messages (e.g. the layer name).
    dist_sync : bool
        Sum the state over ``torch.distributed`` at the end of each pass when a process group is initialized.

    Examples
    --------
    >>> acc = ClassAccumulator(3)
    >>> h, y = torch.randn(30, 4), torch.arange(30) % 3
    >>> for _ in range(acc.passes):
    ...     for i in range(0, 30, 8):
    ...         acc.update(h[i:i + 8], y[i:i + 8])
    ...     acc.end_pass()
    >>> acc.compute().counts.tolist()
    [10, 10, 10]
    """

    def __init__(
        self,
        num_classes: int,
        *,
        passes: int = 2,
        cov: Cov = "auto",
        ncc: bool = True,
        classes: Sequence[int] | Tensor | None = None,
        means: Tensor | ClassStats | None = None,
        max_cov_bytes: int = DEFAULT_MAX_COV_BYTES,
        tile_bytes: int = DEFAULT_TILE_BYTES,
        name: str = "features",
        dist_sync: bool = True,
    ) -> None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise DeepCollapseError(
                f"num_classes must be an integer >= 2 (collapse compares classes), got {num_classes!r}"
            )
        if passes not in (1, 2):
            raise DeepCollapseError(f"passes must be 1 or 2, got {passes!r}")
        if cov not in ("auto", "full", "light"):
            raise DeepCollapseError(f"cov must be 'auto', 'full' or 'light', got {cov!r}")
        if passes == 1 and cov == "light" and means is None:
            raise DeepCollapseError(
                "cov='light' needs passes=2: one pass cannot form M Σ_W M^T before the final means are known"
            )
        block_rows(num_classes, tile_bytes)  # one row of K scores must fit
        self.num_classes, self.cov, self.ncc, self.name = num_classes, cov, ncc, name
        self.passes = 1 if means is not None else passes
        self.max_cov_bytes, self.tile_bytes, self.dist_sync = int(max_cov_bytes), tile_bytes, dist_sync
        self.classes = _class_list(classes, num_classes, name)
        self._fixed = means
        self.reset()

    def reset(self) -> None:
        """Forget all data (back to pass 1)."""
        self.pass_index = 1
        self.dim: int | None = None
        self.full_cov: bool | None = None
        self.batches = 0
        self.eps = 0.0
        self._synced = False
        self._done = False
        self._moments: MomentState | None = None
        self._ref: Centres | None = None
        self._spread: SpreadState | None = None
        self._welford: WelfordState | None = None
        self._kept: list[int] | None = None  # labels measured in pass 2 (positions = rows of the statistics)
        self._lut: Tensor | None = None  # label -> row, -1 for classes not measured
        if self._fixed is not None:
            self._fix_means(self._fixed)

    def _fix_means(self, means: Tensor | ClassStats) -> None:
        stats = means if isinstance(means, ClassStats) else None
        m = (stats.means if stats else means).detach().to(F64)
        ids = stats.class_ids if stats else list(range(m.shape[0]))
        if m.dim() != 2 or len(ids) != m.shape[0] or max(ids) >= self.num_classes:
            raise DeepCollapseError(f"means must be (K, D) for the {self.num_classes} classes, got {tuple(m.shape)}")
        counts = None if stats is None else stats.counts
        if self.classes is not None:  # measure only the requested rows of the given means
            pick = [i for i, c in enumerate(ids) if c in set(self.classes)]
            if len(pick) < 2:
                raise DeepCollapseError(f"{self.name}: classes {self.classes[:10]} name fewer than 2 rows of means")
            rows = torch.tensor(pick, device=m.device)
            m, ids = m.index_select(0, rows), [ids[i] for i in pick]
            counts = None if counts is None else counts.index_select(0, rows.to(counts.device))
        self.dim, self.pass_index = int(m.shape[1]), 2
        self._set_kept(ids, m, counts)

    def _set_kept(self, ids: list[int], means: Tensor, counts: Tensor | None) -> None:
        self._kept = ids
        self._lut = torch.full((self.num_classes,), -1, dtype=I64, device=means.device)
        self._lut[torch.tensor(ids, device=means.device)] = torch.arange(len(ids), device=means.device)
        assert self.dim is not None
        path = choose_cov(len(ids), self.dim, self.cov)
        self._ref = centres(means, counts, pairwise=path == "light" or len(ids) <= self.dim)
        self.full_cov = path == "full"
        self._spread = init_spread(len(ids), self.dim, cov=path, ncc=self.ncc, device=means.device)

    @property
    def means(self) -> Tensor:
        """Class means (K, D), available once pass 1 has ended (two passes) or after :meth:`end_pass` (one)."""
        if self._ref is not None:
            return self._ref.means
        if self.passes == 1 and self._done and self._welford is not None:
            return self._welford_kept()[0].means
        raise DeepCollapseError(f"{self.name}: the class means are known only after end_pass()")

    @property
    def counts(self) -> Tensor:
        """Samples per class seen so far in pass 1 (or in the single pass); after pass 1, of the classes
        measured (the rows of :attr:`means`)."""
        if self._moments is not None and self._kept is not None:
            return self._moments.counts.index_select(0, torch.tensor(self._kept, device=self._moments.counts.device))
        state = self._welford if self._welford is not None else self._moments
        if state is None and self._spread is not None:
            return self._spread.counts
        if state is None:
            raise DeepCollapseError(f"{self.name}: no batches were seen yet")
        return state.counts

    def _check_one_pass(self, dim: int) -> None:
        if self.passes == 1 and self._fixed is None and 8 * dim * dim > self.max_cov_bytes:
            raise DeepCollapseError(
                f"{self.name}: one-pass mode needs a {dim} x {dim} float64 scatter ({8 * dim * dim / 2**20:.0f} MiB)"
                f" above max_cov_bytes={self.max_cov_bytes}; use passes=2 (the light path) or raise max_cov_bytes"
            )

    # -- streaming
    def update(self, features: Any, labels: Any, *, predictions: Any = None, batch: int | None = None) -> None:
        """Add one batch: ``features`` (B, ...) any float dtype, ``labels`` (B,) ints in ``0..K-1``.

        ``predictions`` (B,) labels or (B, K) logits of the model's classifier, in the last pass, give NC4.
        ``batch`` (default: the running batch index of this pass) is only used in error messages.
        """
        if self._done:
            raise DeepCollapseError(f"{self.name}: all passes are finished; call reset() to start again")
        if self._synced:
            raise DeepCollapseError(f"{self.name}: update() after sync() in the same pass")
        b = self.batches if batch is None else batch
        h, y = prepare_batch(features, labels, self.num_classes, name=self.name, batch=b, dim=self.dim)
        pred = self._predictions(predictions, h.shape[0], b)
        if self.classes is not None:
            mask = torch.isin(y, torch.tensor(self.classes, device=y.device))
            h, y, pred = h[mask], y[mask], None if pred is None else pred[mask]
        if self.dim is None:
            self.dim = int(h.shape[1])
            self._check_one_pass(self.dim)
        self.eps = max(self.eps, dtype_eps(h.dtype))
        k = self.num_classes if self._kept is None else len(self._kept)
        rows = min(max(MIN_CHUNK_ROWS, CHUNK_ELEMENTS // max(self.dim, 1)), block_rows(k, self.tile_bytes))
        for start in range(0, h.shape[0], rows):
            chunk = slice(start, start + rows)
            self._update(h[chunk], y[chunk], None if pred is None else pred[chunk], b)
        self.batches += 1

    def _predictions(self, predictions: Any, n: int, batch: int) -> Tensor | None:
        if predictions is None:
            return None
        if self.pass_index != 2 and self.passes == 2:
            return None  # only the last pass uses them
        p = torch.as_tensor(predictions).detach()
        p = p.argmax(1) if p.dim() == 2 else p
        if p.shape != (n,):
            raise DeepCollapseError(
                f"{_where(self.name, batch)}: predictions must be (B,) labels or (B, K) logits for B = {n}"
            )
        return p.to(I64)

    def _update(self, h: Tensor, y: Tensor, pred: Tensor | None, batch: int) -> None:
        k, dev = self.num_classes, h.device
        assert self.dim is not None
        if self.passes == 1 and self._fixed is None:
            self._welford = update_welford(self._welford or init_welford(k, self.dim, device=dev), h, y)
        elif self.pass_index == 1:
            self._moments = update_moments(self._moments or init_moments(k, self.dim, device=dev), h, y)
        else:
            assert self._spread is not None and self._ref is not None and self._lut is not None
            dev = self._ref.means.device
            pos = self._lut[y.to(dev)]
            if bool((pos < 0).any()):
                missing = sorted(set(y[pos.to(y.device) < 0].tolist()))
                raise DeepCollapseError(
                    f"{_where(self.name, batch)}: labels {missing[:10]} have no class mean (absent from pass 1);"
                    " the loader must yield the same data in both passes"
                )
            if pred is not None and self._spread.nc4_disagree is None:
                if self.batches or int(self._spread.counts.sum()):
                    raise DeepCollapseError(f"{self.name}: predictions must be given for every batch of the pass")
                self._spread = replace(self._spread, nc4_disagree=torch.zeros_like(self._spread.within_sq, dtype=I64))
            if pred is not None:
                pred = self._lut[pred.to(dev).clamp(0, self.num_classes - 1)].where(
                    (pred.to(dev) >= 0) & (pred.to(dev) < self.num_classes), torch.tensor(-1, device=dev)
                )
            self._spread = update_spread(
                self._spread, h.to(dev), pos, self._ref, predictions=pred, tile_bytes=self.tile_bytes
            )

    def sync(self) -> None:
        """Sum this pass's state over ``torch.distributed`` (no-op when not initialized or already synced).

        Every rank must call it, also one that saw no batch: the ranks first agree on ``K`` and ``D`` (an
        all-reduce), and a rank without data joins every reduction with a zero state.
        """
        if self._synced or not _dist_ready():
            return
        self._agree_shape()
        if self._current() is None:
            self._zero_state(_dist_device())
        state = self._current()
        if isinstance(state, WelfordState):
            self._welford = _all_reduce_welford(state)
        elif isinstance(state, MomentState):
            self._moments = _all_reduce(state)
        else:
            self._spread = _all_reduce(_agree_nc4(state))
        self._synced = True

    def _agree_shape(self) -> None:
        """All-reduce (max) of ``[D, -D, K, -K]`` (``D = -1`` / ``-big`` on a rank without data): equal on all ranks."""
        big = 2**62
        mine = [-1, -big] if self.dim is None else [self.dim, -self.dim]
        t = torch.tensor([*mine, self.num_classes, -self.num_classes], dtype=I64, device=_dist_device())
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        dmax, dmin, kmax, kmin = int(t[0]), -int(t[1]), int(t[2]), -int(t[3])
        if kmax != kmin:
            raise DeepCollapseError(f"{self.name}: num_classes differs between ranks ({kmin} to {kmax})")
        if dmax < 0:
            raise DeepCollapseError(f"{self.name}: no rank saw a batch (empty loader on every rank?)")
        if dmin != dmax:
            raise DeepCollapseError(f"{self.name}: the feature dimension differs between ranks ({dmin} to {dmax})")
        if self.dim is None:
            self.dim = dmax
            self._check_one_pass(dmax)

    def _zero_state(self, device: torch.device) -> None:
        assert self.dim is not None
        if self.passes == 1:
            self._welford = init_welford(self.num_classes, self.dim, device=device)
        else:  # pass 2 starts from init_spread in end_pass, so only pass 1 can be empty here
            self._moments = init_moments(self.num_classes, self.dim, device=device)

    def _current(self) -> MomentState | SpreadState | WelfordState | None:
        if self.passes == 1 and self._fixed is None:
            return self._welford
        return self._moments if self.pass_index == 1 else self._spread

    def _present(self, counts: Tensor) -> list[int]:
        """Labels measured: the requested (or all) classes that have samples; warns about the others."""
        wanted = torch.arange(self.num_classes) if self.classes is None else torch.tensor(self.classes)
        seen = counts.cpu()[wanted] > 0
        have, missing = wanted[seen].tolist(), wanted[~seen].tolist()
        if len(have) < 2:
            raise DeepCollapseError(
                f"{self.name}: only class(es) {have} have samples; collapse needs at least 2 classes"
            )
        if missing:
            warnings.warn(
                f"{self.name}: class(es) {missing[:20]} have no samples; measuring the {len(have)} classes present",
                stacklevel=3,
            )
        return have

    def _sync_eps(self) -> None:
        if self.dist_sync and _dist_ready():
            t = torch.tensor([self.eps], dtype=F64, device=_dist_device())
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
            self.eps = float(t)

    def end_pass(self) -> None:
        """Close the current pass (syncing ranks first when ``dist_sync``); after pass 1 the means are fixed."""
        if self._done:
            raise DeepCollapseError(f"{self.name}: all {self.passes} pass(es) are already finished")
        if self._current() is None and self.pass_index == 1 and not (self.dist_sync and _dist_ready()):
            raise DeepCollapseError(f"{self.name}: no batches were seen (empty loader?)")
        if self.dist_sync:
            self.sync()
        self._sync_eps()
        if self.passes == 2 and self.pass_index == 1:
            assert self._moments is not None and self.dim is not None
            keep = self._present(self._moments.counts)
            idx = torch.tensor(keep, device=self._moments.counts.device)
            sel = MomentState(self._moments.counts.index_select(0, idx), self._moments.sums.index_select(0, idx))
            self._set_kept(keep, means_of(sel, name=self.name), sel.counts)
            self.pass_index, self.batches, self._synced = 2, 0, False
        else:
            self._done = True

    def _classes_tensor(self) -> Tensor | None:
        kept = self._kept
        return None if kept is None or kept == list(range(self.num_classes)) else torch.tensor(kept)

    def _welford_kept(self) -> tuple[WelfordState, list[int]]:
        assert self._welford is not None
        keep = self._present(self._welford.counts)
        idx = torch.tensor(keep, device=self._welford.counts.device)
        return _select_welford(self._welford, idx), keep

    def compute(self) -> ClassStats:
        """The statistics, after every pass has been ended with :meth:`end_pass`."""
        if not self._done:
            raise DeepCollapseError(
                f"{self.name}: compute() before the end of pass {self.pass_index} of {self.passes}; call end_pass()"
                + (" and stream the data again" if self.passes == 2 and self.pass_index == 1 else "")
            )
        eps = self.eps or EPS64
        if self.passes == 1 and self._fixed is None:
            state, keep = self._welford_kept()
            self._kept = keep
            return welford_stats(state, name=self.name, eps=eps, classes=self._classes_tensor())
        assert self._spread is not None and self._ref is not None
        if self._moments is not None:
            c1 = self._moments.counts.index_select(0, torch.tensor(self._kept, device=self._moments.counts.device))
            c2 = self._spread.counts.to(c1.device)
            if not torch.equal(c1, c2):
                raise DeepCollapseError(
                    f"{self.name}: pass 2 saw {int(c2.sum())} samples (per class {c2.tolist()[:10]}...) but pass 1"
                    f" saw {int(c1.sum())} ({c1.tolist()[:10]}...); the loader must yield the same data in both passes"
                )
        stats = spread_stats(self._spread, self._ref, eps=eps, classes=self._classes_tensor())
        if self._fixed is not None and bool((stats.counts == 0).any()):
            empty = [c for c, n in zip(stats.class_ids, stats.counts.tolist(), strict=True) if n == 0]
            raise DeepCollapseError(
                f"{self.name}: classes {empty[:10]} of the given means have no samples; pass classes= for a subset"
            )
        return stats


def accumulate_stats(
    batches: Callable[[], Iterable[tuple[Any, ...]]],
    num_classes: int,
    **options: Any,
) -> ClassStats:
    """Stream ``batches()`` (called once per pass, yielding ``(features, labels)`` or
    ``(features, labels, predictions)``) into a ``ClassStats``; ``options`` are those of :class:`ClassAccumulator`.
    """
    acc = ClassAccumulator(num_classes, **options)
    for _ in range(acc.passes):
        for i, item in enumerate(batches()):
            acc.update(item[0], item[1], predictions=item[2] if len(item) > 2 else None, batch=i)
        acc.end_pass()
    return acc.compute()


def class_stats(
    features: Tensor,
    labels: Tensor,
    num_classes: int | None = None,
    *,
    cov: Cov = "auto",
    full_cov: bool | None = None,
    ncc: bool = True,
    classes: Sequence[int] | Tensor | None = None,
    means: Tensor | ClassStats | None = None,
    predictions: Tensor | None = None,
    tile_bytes: int = DEFAULT_TILE_BYTES,
) -> ClassStats:
    """Exact two-pass statistics of ``features`` (N, ...) with integer ``labels`` (N,), in float64.

    ``num_classes`` defaults to ``max(labels) + 1``. ``full_cov=True``/``False`` is ``cov="full"``/``"light"``.
    The other options are those of :class:`ClassAccumulator`; ``predictions`` (N,) or (N, K) give NC4.
    """
    if num_classes is None:
        y = torch.as_tensor(labels)
        num_classes = int(y.max()) + 1 if y.numel() else 0
    if full_cov is not None:
        cov = "full" if full_cov else "light"
    item = (features, labels) if predictions is None else (features, labels, predictions)
    return accumulate_stats(
        lambda: [item],
        num_classes,
        cov=cov,
        ncc=ncc,
        classes=classes,
        means=means,
        tile_bytes=tile_bytes,
        dist_sync=False,
    )
