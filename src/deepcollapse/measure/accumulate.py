r"""Streaming float64 sufficient statistics for the NC metrics (docs/conventions.md).

Features arrive batch by batch as ``(B, ...)`` tensors (flattened to ``(B, D)``) with integer labels in
``0..K-1``. The accumulators keep only sufficient statistics, in float64 on the features' device, and end
in a :class:`~deepcollapse.metrics.ClassStats`, so every metric keeps its one definition in
:mod:`deepcollapse.metrics`.

Two modes.

* **Two passes** (exact; the default). Pass 1 sums per class, ``n_c`` and ``s_c = Σ_{i∈c} h_i``, giving
  ``μ_c = s_c / n_c``. Pass 2 streams the same data again and accumulates moments of the *centred*
  features ``e_i = h_i - μ_{y_i}``: the per-class sums ``Σ_{i∈c} ||e_i||²``, the ``K x K`` matrix
  ``Σ_i (M_r e_i)(M_r e_i)^T = N · M_r Σ_W M_r^T`` with the means shifted by the sample mean ``r``
  (``M_r = M - 1r^T``, the ``centre`` of :class:`~deepcollapse.metrics.ClassStats`: no cancellation when
  the features sit far from the origin) and the nearest-class-centre counts (NC4), plus, on the full path
  only, the ``D x D`` scatter ``Σ_i e_i e_i^T = N Σ_W``.
* **One pass** (Welford/Chan). Each batch's own exact statistics (count, mean, centred scatter) are merged
  into the running ones with Chan et al.'s pairwise update,
  ``M2 = M2_a + M2_b + δ δ^T n_a n_b / n`` with ``δ = μ_b - μ_a``, pooled over classes. No
  ``E[hh^T] - E[h]E[h]^T`` cancellation occurs. One pass always needs the ``D x D`` scatter:
  ``M_r Σ_W M_r^T`` depends on the *final* means, unknown until the data end. NC4 also needs the final
  means, so one-pass statistics carry no nearest-class-centre counts (``ncc_correct=None``; use two passes
  for NC4).

Memory. The full path holds ``D²`` doubles per layer; the light path ``O(K·D)`` and gets NC1 from the
``K x K`` Gram identity (:func:`deepcollapse.metrics.nc1`, ``method="gram"``), so flattened conv maps
with ``D`` in the tens of thousands fit. ``cov="auto"`` keeps ``Σ_W`` only while ``8 D²`` bytes stay
within ``max_cov_bytes``. In two-pass mode both paths give the same metrics; the light path is also
much faster (``O(N·D·K)`` instead of ``O(N·D²)``).

Merging. Two-pass states (:class:`MomentState`, :class:`SpreadState`) merge by summation, so batches,
shards and ranks combine exactly; :meth:`ClassAccumulator.sync` all-reduces them over
``torch.distributed`` when it is initialized. One-pass states (:class:`WelfordState`) merge pairwise
(:func:`merge_welford`); across ranks they are first re-centred on the global class means (parallel-axis
theorem), which again makes the reduction a sum.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields, replace
from typing import Any, Literal

import torch
from torch import Tensor

from deepcollapse._validate import DeepCollapseError, check_finite, check_labels
from deepcollapse.measure.metrics import ClassStats

__all__ = [
    "DEFAULT_MAX_COV_BYTES",
    "Centres",
    "ClassAccumulator",
    "MomentState",
    "SpreadState",
    "WelfordState",
    "accumulate_stats",
    "batch_welford",
    "centres",
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
DEFAULT_MAX_COV_BYTES = 64 * 2**20  # a D x D float64 Σ_W is kept up to D = 2896
# Batches are processed in row chunks of about CHUNK_ELEMENTS values (2 MiB in float64), so that the float64
# temporaries of a chunk stay in cache (2-3x faster than whole batches on a CPU), but at least MIN_CHUNK_ROWS
# rows, so that the (rows x D) @ (D x K) product stays compute-bound for large D.
CHUNK_ELEMENTS = 2**18
MIN_CHUNK_ROWS = 64


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
    """``n_c += |{i: y_i = c}|``, ``s_c += Σ_{y_i = c} h_i`` for a prepared batch (see :func:`prepare_batch`)."""
    k = state.counts.numel()
    return MomentState(state.counts + torch.bincount(y, minlength=k), state.sums.index_add(0, y, h.to(F64)))


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
    ``shifted`` (K, D) ``M_r = M - 1r^T`` and ``dist2`` (K, K) ``||μ_a - μ_b||²``."""

    means: Tensor
    centre: Tensor
    shifted: Tensor
    dist2: Tensor


def centres(means: Tensor, counts: Tensor | None = None) -> Centres:
    """Pass-2 reference built once from the final class means.

    ``r`` is the sample mean ``Σ_c n_c μ_c / N`` (the plain average of the means without ``counts``); any
    ``r`` gives the same NC1, a central one avoids cancellation. Distances are computed without the Gram trick.
    """
    m = means.to(F64)
    w = torch.full((m.shape[0],), 1.0 / m.shape[0], dtype=F64, device=m.device)
    if counts is not None:
        w = counts.to(device=m.device, dtype=F64) / counts.sum()
    r = w @ m
    d = torch.cdist(m[None], m[None], compute_mode="donot_use_mm_for_euclid_dist")[0]
    return Centres(m, r, m - r, d.pow(2))


@dataclass(frozen=True)
class SpreadState:
    """Pass-2 statistics about fixed means ``M``, with ``e_i = h_i - μ_{y_i}``.

    ``counts`` (K,) ``n_c``; ``within_sq`` (K,) ``Σ_{i∈c} ||e_i||²``; ``proj`` (K, K) ``Σ_i (M_r e_i)(M_r e_i)^T``;
    ``scatter`` (D, D) ``Σ_i e_i e_i^T`` or ``None`` (light path); ``ncc_correct`` (K,) samples whose
    nearest class mean is their own, or ``None``.
    """

    counts: Tensor
    within_sq: Tensor
    proj: Tensor
    scatter: Tensor | None = None
    ncc_correct: Tensor | None = None


def init_spread(
    num_classes: int,
    dim: int,
    *,
    full_cov: bool = False,
    ncc: bool = True,
    device: torch.device | str | None = None,
) -> SpreadState:
    """Zero pass-2 state; ``full_cov`` keeps the ``D x D`` scatter, ``ncc`` the NC4 counts."""
    k = num_classes
    return SpreadState(
        counts=torch.zeros(k, dtype=I64, device=device),
        within_sq=torch.zeros(k, dtype=F64, device=device),
        proj=torch.zeros(k, k, dtype=F64, device=device),
        scatter=torch.zeros(dim, dim, dtype=F64, device=device) if full_cov else None,
        ncc_correct=torch.zeros(k, dtype=I64, device=device) if ncc else None,
    )


def update_spread(state: SpreadState, h: Tensor, y: Tensor, ref: Centres) -> SpreadState:
    """Add a prepared batch's centred moments about ``ref.means``.

    With ``e_i = h_i - μ_{y_i}`` and ``p_i = M_r e_i`` (one ``B x D x K`` product serves NC1 and NC4):
    ``proj += Σ p_i p_i^T``; NC4's nearest centre minimises (``r`` cancels)
    ``||h_i - μ_c||² - ||e_i||² = 2 (p_{i,y_i} - p_{i,c}) + ||μ_{y_i} - μ_c||²`` (no large-norm cancellation).
    """
    e = torch.sub(h, ref.means.index_select(0, y))  # float64 by type promotion, one pass over h
    p = e @ ref.shifted.T  # (B, K)
    k = state.counts.numel()
    ncc = state.ncc_correct
    if ncc is not None:
        own = p.gather(1, y[:, None])
        pred = (2.0 * (own - p) + ref.dist2.index_select(0, y)).argmin(1)
        ncc = ncc.index_add(0, y, (pred == y).to(I64))
    return SpreadState(
        counts=state.counts + torch.bincount(y, minlength=k),
        within_sq=state.within_sq.index_add(0, y, torch.linalg.vecdot(e, e)),
        proj=torch.addmm(state.proj, p.T, p),
        scatter=None if state.scatter is None else torch.addmm(state.scatter, e.T, e),
        ncc_correct=ncc,
    )


def merge_spread(a: SpreadState, b: SpreadState) -> SpreadState:
    """Union of two disjoint sample sets measured about the same means: a sum."""
    return SpreadState(*(None if x is None else x + z for x, z in zip(_tensors(a), _tensors(b), strict=True)))


def spread_stats(state: SpreadState, ref: Centres) -> ClassStats:
    """``ClassStats`` from pass 2: ``within_trace = Σ||e||²/n_c``, ``M_r Σ_W M_r^T = proj/N``, ``Σ_W = scatter/N``."""
    n = float(state.counts.sum())
    return ClassStats(
        counts=state.counts,
        means=ref.means,
        within_trace=state.within_sq / state.counts.to(F64),
        means_sigma_w=state.proj / n,
        sigma_w=None if state.scatter is None else state.scatter / n,
        ncc_correct=state.ncc_correct,
        centre=ref.centre,
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


def welford_stats(state: WelfordState, *, name: str = "features") -> ClassStats:
    """``ClassStats`` (no NC4 counts) from one-pass state: ``Σ_W = S/N`` and ``M_r Σ_W M_r^T`` from the final
    means, ``r`` the sample mean."""
    _check_classes(state.counts, name)
    n = float(state.counts.sum())
    sigma_w = state.scatter / n
    ref = centres(state.means, state.counts)
    return ClassStats(
        counts=state.counts,
        means=state.means,
        within_trace=state.within_sq / state.counts.to(F64),
        means_sigma_w=ref.shifted @ sigma_w @ ref.shifted.T,
        sigma_w=sigma_w,
        ncc_correct=None,
        centre=ref.centre,
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


class ClassAccumulator:
    """Streaming per-class statistics of one feature stream (one layer), ending in a ``ClassStats``.

    Parameters
    ----------
    num_classes : int
        ``K >= 2``; labels must lie in ``0..K-1`` and every class needs a sample.
    passes : 1 or 2
        2 (default): exact two-pass statistics; call :meth:`end_pass` after the first pass over the data
        and stream the same data again. 1: Welford/Chan one-pass statistics (needs the ``D x D`` state;
        no NC4).
    cov : "auto", "full" or "light"
        Keep the ``D x D`` ``Σ_W`` (``"full"``) or only ``O(K·D)`` state (``"light"``); ``"auto"`` keeps it
        while ``8 D²`` bytes fit in ``max_cov_bytes``.
    ncc : bool
        Count nearest-class-centre hits in pass 2 (NC4).
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
        max_cov_bytes: int = DEFAULT_MAX_COV_BYTES,
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
        if passes == 1 and cov == "light":
            raise DeepCollapseError(
                "cov='light' needs passes=2: one pass cannot form M Σ_W M^T before the final means are known"
            )
        self.num_classes = num_classes
        self.passes = passes
        self.cov = cov
        self.ncc = ncc
        self.max_cov_bytes = int(max_cov_bytes)
        self.name = name
        self.dist_sync = dist_sync
        self.reset()

    def reset(self) -> None:
        """Forget all data (back to pass 1)."""
        self.pass_index = 1
        self.dim: int | None = None
        self.full_cov: bool | None = None
        self.batches = 0
        self._synced = False
        self._done = False
        self._moments: MomentState | None = None
        self._ref: Centres | None = None
        self._spread: SpreadState | None = None
        self._welford: WelfordState | None = None

    @property
    def means(self) -> Tensor:
        """Class means (K, D), available once pass 1 has ended (two passes) or after :meth:`end_pass` (one)."""
        if self._ref is not None:
            return self._ref.means
        if self.passes == 1 and self._done and self._welford is not None:
            _check_classes(self._welford.counts, self.name)
            return self._welford.means
        raise DeepCollapseError(f"{self.name}: the class means are known only after end_pass()")

    @property
    def counts(self) -> Tensor:
        """Samples per class (K,) seen so far in pass 1 (or in the single pass)."""
        state = self._welford if self.passes == 1 else self._moments
        if state is None:
            raise DeepCollapseError(f"{self.name}: no batches were seen yet")
        return state.counts

    # -- decisions
    def _use_full_cov(self, dim: int) -> bool:
        fits = 8 * dim * dim <= self.max_cov_bytes
        if self.passes == 1 and not fits and self.cov != "full":
            raise DeepCollapseError(
                f"{self.name}: one-pass mode needs a {dim} x {dim} float64 scatter ({8 * dim * dim / 2**20:.0f} MiB)"
                f" above max_cov_bytes={self.max_cov_bytes}; use passes=2 (the light path) or raise max_cov_bytes"
            )
        return self.cov == "full" or (self.cov == "auto" and fits)

    # -- streaming
    def update(self, features: Any, labels: Any, *, batch: int | None = None) -> None:
        """Add one batch: ``features`` (B, ...) any float dtype, ``labels`` (B,) ints in ``0..K-1``.

        ``batch`` (default: the running batch index of this pass) is only used in error messages.
        """
        if self._done:
            raise DeepCollapseError(f"{self.name}: all passes are finished; call reset() to start again")
        if self._synced:
            raise DeepCollapseError(f"{self.name}: update() after sync() in the same pass")
        b = self.batches if batch is None else batch
        h, y = prepare_batch(features, labels, self.num_classes, name=self.name, batch=b, dim=self.dim)
        if self.dim is None:
            self.dim = int(h.shape[1])
            self.full_cov = self._use_full_cov(self.dim)
        rows = max(MIN_CHUNK_ROWS, CHUNK_ELEMENTS // max(self.dim, 1))
        for start in range(0, h.shape[0], rows):
            self._update(h[start : start + rows], y[start : start + rows])
        self.batches += 1

    def _update(self, h: Tensor, y: Tensor) -> None:
        k, dev = self.num_classes, h.device
        assert self.dim is not None
        if self.passes == 1:
            self._welford = update_welford(self._welford or init_welford(k, self.dim, device=dev), h, y)
        elif self.pass_index == 1:
            self._moments = update_moments(self._moments or init_moments(k, self.dim, device=dev), h, y)
        else:
            assert self._spread is not None and self._ref is not None
            dev = self._ref.means.device
            self._spread = update_spread(self._spread, h.to(dev), y.to(dev), self._ref)

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
            self._spread = _all_reduce(state)
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
            self.full_cov = self._use_full_cov(dmax)

    def _zero_state(self, device: torch.device) -> None:
        assert self.dim is not None
        if self.passes == 1:
            self._welford = init_welford(self.num_classes, self.dim, device=device)
        else:  # pass 2 starts from init_spread in end_pass, so only pass 1 can be empty here
            self._moments = init_moments(self.num_classes, self.dim, device=device)

    def _current(self) -> MomentState | SpreadState | WelfordState | None:
        if self.passes == 1:
            return self._welford
        return self._moments if self.pass_index == 1 else self._spread

    def end_pass(self) -> None:
        """Close the current pass (syncing ranks first when ``dist_sync``); after pass 1 the means are fixed."""
        if self._done:
            raise DeepCollapseError(f"{self.name}: all {self.passes} pass(es) are already finished")
        if self._current() is None and self.pass_index == 1 and not (self.dist_sync and _dist_ready()):
            raise DeepCollapseError(f"{self.name}: no batches were seen (empty loader?)")
        if self.dist_sync:
            self.sync()
        if self.passes == 2 and self.pass_index == 1:
            assert self._moments is not None and self.dim is not None
            self._ref = centres(means_of(self._moments, name=self.name), self._moments.counts)
            self._spread = init_spread(
                self.num_classes, self.dim, full_cov=bool(self.full_cov), ncc=self.ncc, device=self._ref.means.device
            )
            self.pass_index, self.batches, self._synced = 2, 0, False
        else:
            self._done = True

    def compute(self) -> ClassStats:
        """The statistics, after every pass has been ended with :meth:`end_pass`."""
        if not self._done:
            raise DeepCollapseError(
                f"{self.name}: compute() before the end of pass {self.pass_index} of {self.passes}; call end_pass()"
                + (" and stream the data again" if self.passes == 2 and self.pass_index == 1 else "")
            )
        if self.passes == 1:
            assert self._welford is not None
            return welford_stats(self._welford, name=self.name)
        assert self._moments is not None and self._spread is not None and self._ref is not None
        c1, c2 = self._moments.counts, self._spread.counts.to(self._moments.counts.device)
        if not torch.equal(c1, c2):
            raise DeepCollapseError(
                f"{self.name}: pass 2 saw {int(c2.sum())} samples (per class {c2.tolist()[:10]}...) but pass 1 saw"
                f" {int(c1.sum())} ({c1.tolist()[:10]}...); the loader must yield the same data in both passes"
            )
        return spread_stats(self._spread, self._ref)


def accumulate_stats(
    batches: Callable[[], Iterable[tuple[Any, Any]]],
    num_classes: int,
    **options: Any,
) -> ClassStats:
    """Stream ``batches()`` (called once per pass, yielding ``(features, labels)``) into a ``ClassStats``.

    ``options`` are those of :class:`ClassAccumulator` (``passes``, ``cov``, ``ncc``, ``max_cov_bytes``,
    ``name``, ``dist_sync``).
    """
    acc = ClassAccumulator(num_classes, **options)
    for _ in range(acc.passes):
        for i, (h, y) in enumerate(batches()):
            acc.update(h, y, batch=i)
        acc.end_pass()
    return acc.compute()
