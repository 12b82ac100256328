r"""Neural-collapse metrics as pure functions of :class:`ClassStats`, one name per quantity (docs/conventions.md).

Notation. Features ``h_i`` (rows of an ``(N, D)`` tensor) with labels ``y_i``; ``n_c`` samples in class ``c``;
class means ``μ_c`` (rows of ``M``, ``K x D``); global mean ``μ_G = Σ_c w_c μ_c`` with ``w_c = n_c/N``
(``weighting="samples"``, Papyan) or ``1/K`` (``"classes"``); centred means ``M̄ = M - 1μ_G^T``;
``Var_c = 1/n_c Σ_{i∈c} ||h_i - μ_c||²``;

.. math::

    Σ_W = \frac1N \sum_i (h_i - μ_{y_i})(h_i - μ_{y_i})^T, \qquad Σ_B = \frac1K \bar M^T \bar M .

:data:`METRICS` is the table of every name the package writes (metrics.json, summary.json, history.csv,
CLI tables, plot labels): the name, its formula, its source and its value under collapse. Other modules
import their names from it.

Pseudo-inverse and ranks. ``Σ_B^+`` comes from the SVD ``M̄ = U S V^T`` keeping at most ``K - 1`` singular
values, and only those above the precision cutoff of the features as given
(:func:`deepcollapse.measure.stats.singular_cutoff`); then ``Σ_B^+ = K V S^{-2} V^T`` and

.. math::

    \operatorname{tr}(Σ_W Σ_B^+) = K \sum_i \frac{v_i^T Σ_W v_i}{s_i^2}
                               = K \sum_i \frac{u_i^T \bar M Σ_W \bar M^T u_i}{s_i^4}

(the second form, the Gram path, needs only the ``K x K`` matrix ``M Σ_W M^T``). Both paths take the same
decisions, so they agree on every input.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from deepcollapse._validate import DeepCollapseError
from deepcollapse.measure.accumulate import class_stats
from deepcollapse.measure.pairwise import DEFAULT_TILE_BYTES, nearest_rows, row_blocks
from deepcollapse.measure.stats import (
    F64,
    ClassStats,
    Weighting,
    check_rtol,
    class_weights,
    dtype_eps,
    singular_cutoff,
)

__all__ = [
    "METRICS",
    "ClassStats",
    "MetricInfo",
    "PairSummary",
    "cdnv",
    "cdnv_matrix",
    "cdnv_per_class",
    "centred_means",
    "class_stats",
    "classifier_predictions",
    "dnc_metrics",
    "global_mean",
    "mean_spectrum",
    "nc1",
    "nc1_quotient",
    "nc1_truncated",
    "nc1_unnormalized",
    "nc2_equiangle",
    "nc2_equinorm",
    "nc2_etf",
    "nc2_maxangle",
    "nc2_orth",
    "nc3_duality",
    "nc3_span",
    "nc3_zhu",
    "nc4",
    "nc4_from_predictions",
    "ncc_accuracy",
    "nearest_centre",
    "numerical_rank",
    "pair_summary",
]


@dataclass(frozen=True)
class MetricInfo:
    """One row of the conventions table: ``kind`` is ``"nc"`` (a collapse metric), ``"aux"`` or ``"meta"``."""

    name: str
    formula: str
    source: str
    collapse: str
    kind: str = "nc"


METRICS: dict[str, MetricInfo] = {
    m.name: m
    for m in (
        MetricInfo("nc1", "tr(Σ_W Σ_B⁺)/K", "Papyan, Han & Donoho 2020; Zhu et al. 2021", "0"),
        MetricInfo("nc1_unnormalized", "tr(Σ_W Σ_B⁺)", "Rangamani et al. 2023 (per layer)", "0"),
        MetricInfo(
            "nc1_truncated",
            "tr(Σ_W Σ_B⁺ʳ)/K, Σ_B inverted on its top r eigenpairs (r = K−1 by default)",
            "Han, Papyan & Donoho 2022; Parker et al. 2023",
            "0",
        ),
        MetricInfo("nc1_quotient", "tr Σ_W / tr Σ_B", "Tirer, Huang & Niles-Weed 2023; Beaglehole et al. 2024", "0"),
        MetricInfo("cdnv", "mean over c≠c′ of (Var_c + Var_c′)/(2‖μ_c − μ_c′‖²)", "Galanti, György & Hutter 2022", "0"),
        MetricInfo(
            "nc2_etf",
            "‖G/‖G‖_F − (I − 11ᵀ/K)/√(K−1)‖_F, G = M̄M̄ᵀ (centred means)",
            "Papyan, Han & Donoho 2020; Zhu et al. 2021",
            "0",
        ),
        MetricInfo(
            "nc2_orth",
            "‖G/‖G‖_F − I/√K‖_F, G = MMᵀ (uncentred means)",
            "Súkeník, Mondelli & Lampert 2023 (DUFM, after a ReLU)",
            "0",
        ),
        MetricInfo("nc2_equinorm", "std_c ‖μ_c − μ_G‖ / mean_c ‖μ_c − μ_G‖", "Papyan, Han & Donoho 2020", "0"),
        MetricInfo("nc2_equiangle", "std over c≠c′ of cos(μ_c − μ_G, μ_c′ − μ_G)", "Papyan, Han & Donoho 2020", "0"),
        MetricInfo(
            "nc2_maxangle", "mean over c≠c′ of |cos(μ_c − μ_G, μ_c′ − μ_G) + 1/(K−1)|", "Papyan, Han & Donoho 2020", "0"
        ),
        MetricInfo("nc3_duality", "‖W/‖W‖_F − M̄/‖M̄‖_F‖_F (centred means)", "Papyan, Han & Donoho 2020", "0"),
        MetricInfo(
            "nc3_duality_uncentred",
            "‖W/‖W‖_F − M/‖M‖_F‖_F (uncentred means: bias-free classifiers)",
            "Súkeník, Mondelli & Lampert 2023 (DUFM)",
            "0",
        ),
        MetricInfo("nc3_zhu", "‖WM̄ᵀ/‖WM̄ᵀ‖_F − (I − 11ᵀ/K)/√(K−1)‖_F", "Zhu et al. 2021", "0"),
        MetricInfo(
            "nc3_span",
            "‖W(I − P_M)‖_F/‖W‖_F, P_M the projector on the span of the class means of W's input",
            "Súkeník, Mondelli & Lampert 2023 (DUFM, every layer)",
            "0",
        ),
        MetricInfo(
            "nc4",
            "fraction of samples where the classifier's prediction ≠ the nearest class centre argmin_c ‖h − μ_c‖",
            "Papyan, Han & Donoho 2020",
            "0",
        ),
        MetricInfo(
            "ncc_accuracy",
            "fraction of samples whose nearest class centre is their own class",
            "Papyan, Han & Donoho 2020 (NCC rule); Rangamani et al. 2023 (per layer)",
            "training accuracy (1)",
        ),
        MetricInfo("rank", "singular values of M above max(rank_rtol·σ_max, precision cutoff)", "", "—", "aux"),
        MetricInfo("rank_centred", "the same for M̄", "", "K−1 (simplex ETF)", "aux"),
        MetricInfo("mean_norm", "mean_c ‖μ_c‖", "", "—", "aux"),
        MetricInfo("rtol", "relative precision cutoff of the pseudo-inverses and ranks", "", "—", "meta"),
    )
}

NC1Method = Literal["auto", "gram", "full"]


# ----------------------------------------------------------------------------------------- helpers


def _as_stats(means: Tensor | ClassStats) -> ClassStats:
    """A ``ClassStats`` view of a raw (K, D) mean matrix: one sample per class, zero spread."""
    if isinstance(means, ClassStats):
        return means
    if not isinstance(means, Tensor) or means.dim() != 2:
        got = tuple(means.shape) if isinstance(means, Tensor) else type(means).__name__
        raise DeepCollapseError(f"means must be a ClassStats or a (K, D) tensor, got {got}")
    m = means.detach().to(F64)
    k = m.shape[0]
    return ClassStats(m.new_ones(k).long(), m, m.new_zeros(k), None, eps=dtype_eps(means.dtype))


def global_mean(stats: ClassStats, *, weighting: Weighting = "samples") -> Tensor:
    """``μ_G = Σ_c w_c μ_c``."""
    return class_weights(stats, weighting) @ stats.means


def centred_means(stats: ClassStats, *, weighting: Weighting = "samples") -> Tensor:
    """``M̄ = M - 1 μ_G^T`` (K, D)."""
    return stats.means - global_mean(stats, weighting=weighting)


def _above(s: Tensor, cutoff: float) -> Tensor:
    """The singular values that count in every rank decision: those strictly above ``cutoff``."""
    return s > cutoff


def _between_svd(
    stats: ClassStats, weighting: Weighting, rtol: float | None, rank: int | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Kept part ``(U, S, V^T)`` of the SVD of ``M̄``: at most ``min(rank, K-1)`` values, all above the cutoff."""
    u, s, vh = torch.linalg.svd(centred_means(stats, weighting=weighting), full_matrices=False)
    keep = _above(s, singular_cutoff(stats, weighting=weighting, rtol=rtol))
    keep[min(stats.num_classes - 1, stats.num_classes if rank is None else rank) :] = False
    return u[:, keep], s[keep], vh[keep]


def _centre_gram(p: Tensor, w: Tensor) -> Tensor:
    """``A P A^T`` for ``A = I - 1w^T`` in O(K²)."""
    pa = p - (w @ p)[None, :]
    return pa - (pa @ w)[:, None]


def _nc1_trace(
    stats: ClassStats, weighting: Weighting, method: NC1Method, rtol: float | None, rank: int | None
) -> float:
    """``tr(Σ_W Σ_B^+)`` by the full or the Gram path (module docstring)."""
    u, s, vh = _between_svd(stats, weighting, rtol, rank)
    k = stats.num_classes
    if s.numel() == 0:
        return math.nan if float(stats.within_trace.max()) == 0.0 else math.inf
    if method == "auto":
        method = "full" if stats.sigma_w is not None else "gram"
    if method == "full":
        if stats.sigma_w is None:
            raise DeepCollapseError("method='full' needs sigma_w; use method='gram' or cov='full'")
        quad = ((vh @ stats.sigma_w) * vh).sum(1).clamp_min(0.0)  # v_i^T Σ_W v_i
        return k * float((quad / s.pow(2)).sum())
    if method != "gram":
        raise DeepCollapseError(f"method must be 'auto', 'gram' or 'full', got {method!r}")
    if stats.means_sigma_w is None:
        raise DeepCollapseError("method='gram' needs means_sigma_w; use method='full' or cov='light'")
    s4 = float(s[0].pow(4))
    if s4 == 0.0 or math.isinf(s4):  # M Σ_W M^T has under- or overflowed: the statistics cannot tell
        return math.nan
    pbar = _centre_gram(stats.means_sigma_w, class_weights(stats, weighting))  # M̄ Σ_W M̄^T
    quad = ((pbar @ u) * u).sum(0).clamp_min(0.0)  # u_i^T M̄ Σ_W M̄^T u_i; PSD: clip round-off below 0
    return k * float((quad / s.pow(2) / s.pow(2)).sum())


# --------------------------------------------------------------------------------------------- NC1


def nc1(
    stats: ClassStats, *, weighting: Weighting = "samples", method: NC1Method = "auto", rtol: float | None = None
) -> float:
    """NC1 (Papyan et al. 2020): ``tr(Σ_W Σ_B^+) / K``.

    ``method="full"`` uses ``Σ_W``, ``"gram"`` only ``M Σ_W M^T``; ``"auto"`` the full path when ``Σ_W`` is
    there. ``rtol`` is the relative precision cutoff of ``Σ_B^+`` (default: that of the features as given,
    :func:`deepcollapse.measure.stats.default_rtol`). Returns ``0`` on perfect collapse, ``inf`` if all class
    means coincide while features vary, ``nan`` if the features do not vary at all (a dead layer) or, on
    the Gram path, for features below about 1e-75 or above about 1e75 (``s⁴`` under- or overflows).
    """
    return _nc1_trace(stats, weighting, method, rtol, None) / stats.num_classes


def nc1_unnormalized(
    stats: ClassStats, *, weighting: Weighting = "samples", method: NC1Method = "auto", rtol: float | None = None
) -> float:
    """Per-layer NC1 without the ``1/K`` (Rangamani et al. 2023): ``tr(Σ_W Σ_B^+)``."""
    return _nc1_trace(stats, weighting, method, rtol, None)


def nc1_truncated(
    stats: ClassStats,
    *,
    rank: int | None = None,
    weighting: Weighting = "samples",
    method: NC1Method = "auto",
    rtol: float | None = None,
) -> float:
    """``tr(Σ_W Σ_B^{+r}) / K`` with ``Σ_B`` inverted on its top ``rank`` eigenpairs only (default ``K - 1``,
    Han et al. 2022), never below the precision cutoff. Equal to :func:`nc1` at the default rank."""
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise DeepCollapseError(f"rank must be an integer >= 1, got {rank!r}")
    return _nc1_trace(stats, weighting, method, rtol, rank) / stats.num_classes


def nc1_quotient(stats: ClassStats, *, weighting: Weighting = "samples") -> float:
    """``tr Σ_W / tr Σ_B`` (Tirer et al. 2023) with ``tr Σ_W = Σ_c n_c Var_c / N``, ``tr Σ_B = ||M̄||_F² / K``."""
    tw = float(stats.counts.to(F64) @ stats.within_trace) / stats.total
    tb = float(centred_means(stats, weighting=weighting).pow(2).sum()) / stats.num_classes
    if tb == 0.0:
        return math.nan if tw == 0.0 else math.inf
    return tw / tb


# ------------------------------------------------------------------------------- NC2 and CDNV (tiled)


@dataclass(frozen=True)
class PairSummary:
    """Every class-pair metric of one layer, from one tiled sweep over ``G = M̄ M̄^T``."""

    nc2_etf: float
    nc2_orth: float
    nc2_equiangle: float
    nc2_maxangle: float
    cdnv: float
    cdnv_per_class: Tensor
    cdnv_max: Tensor
    cdnv_max_class: Tensor


def _cdnv_block(v_rows: Tensor, v: Tensor, sq_rows: Tensor, sq: Tensor, g: Tensor) -> Tensor:
    """CDNV entries ``(Var_a + Var_b) / (2 ||μ_a - μ_b||²)`` from a Gram block ``g`` of the centred means
    (``||μ_a - μ_b||² = G_aa + G_bb - 2 G_ab``)."""
    twice_d2 = torch.add(sq_rows[:, None], sq[None, :]).sub_(g, alpha=2.0).clamp_min_(0.0).mul_(2.0)
    return torch.add(v_rows[:, None], v[None, :]).div_(twice_d2)


def _frobenius_of_gram(x: Tensor) -> float:
    """``||X X^T||_F = sqrt(Σ σ_i⁴)`` without forming the K x K matrix."""
    return math.sqrt(float(torch.linalg.svdvals(x).pow(4).sum()))


def pair_summary(
    stats: ClassStats, *, weighting: Weighting = "samples", tile_bytes: int = DEFAULT_TILE_BYTES
) -> PairSummary:
    """NC2 (ETF and orthogonal-frame distances, equiangularity, max-angle) and CDNV in one sweep.

    Row blocks of ``G = M̄ M̄^T`` (at most ``tile_bytes`` each) give the uncentred Gram
    ``M M^T = G + a 1^T + 1 a^T + ||μ_G||²`` (``a = M̄ μ_G``), the distances
    ``||μ_c - μ_c'||² = G_cc + G_c'c' - 2 G_cc'``
    and the cosines ``G_cc' / (||μ̄_c|| ||μ̄_c'||)``; the Frobenius norms that normalize the Gram distances
    come first from the singular values. Pair statistics run over ``c ≠ c'``.
    """
    k = stats.num_classes
    mu = global_mean(stats, weighting=weighting)
    mbar = stats.means - mu
    sq = mbar.pow(2).sum(1)
    norms, a, mu2 = sq.sqrt(), mbar @ mu, float(mu @ mu)
    g_c, g_u = _frobenius_of_gram(mbar), _frobenius_of_gram(stats.means)
    t_etf, t_orth, c0 = math.sqrt(k - 1), math.sqrt(k), -1.0 / (k - 1)
    etf2 = orth2 = dev1 = dev2 = absdev = 0.0
    rows_cdnv, row_max, row_arg = mbar.new_zeros(k), mbar.new_zeros(k), mbar.new_zeros(k).long()
    v = stats.within_trace
    for rows, g in row_blocks(mbar, mbar, tile_bytes):
        x = g / g_c + 1.0 / (k * t_etf)  # G/||G|| - (I - 11^T/K)/sqrt(K-1), off the diagonal first
        x.diagonal(rows.start).sub_(1.0 / t_etf)  # the block's entries (c, c)
        etf2 += float(x.pow_(2).sum())
        x = torch.add(g, a[rows, None]).add_(a[None, :]).add_(mu2).div_(g_u)  # M M^T / ||M M^T||
        x.diagonal(rows.start).sub_(1.0 / t_orth)
        orth2 += float(x.pow_(2).sum())
        x = torch.div(g, norms[rows, None]).div_(norms[None, :]).sub_(c0)  # cos - c0, 0 on the diagonal
        x.diagonal(rows.start).zero_()
        dev1, absdev, dev2 = dev1 + float(x.sum()), absdev + float(x.abs().sum()), dev2 + float(x.pow_(2).sum())
        x = _cdnv_block(v[rows], v, sq[rows], sq, g)
        x.diagonal(rows.start).fill_(-math.inf)
        row_max[rows], row_arg[rows] = x.max(1)
        x.diagonal(rows.start).zero_()
        rows_cdnv[rows] = x.sum(1)
    pairs = k * (k - 1)
    mean_dev = dev1 / pairs
    return PairSummary(
        nc2_etf=math.sqrt(etf2) if g_c > 0 else math.nan,
        nc2_orth=math.sqrt(orth2) if g_u > 0 else math.nan,
        nc2_equiangle=math.sqrt(max(dev2 / pairs - mean_dev**2, 0.0)),
        nc2_maxangle=absdev / pairs,
        cdnv=float(rows_cdnv.sum()) / pairs,
        cdnv_per_class=rows_cdnv / (k - 1),
        cdnv_max=row_max,
        cdnv_max_class=row_arg,
    )


def nc2_etf(stats: ClassStats, *, weighting: Weighting = "samples", tile_bytes: int = DEFAULT_TILE_BYTES) -> float:
    """Simplex-ETF distance ``||G/||G||_F - (I - 11^T/K)/sqrt(K-1)||_F``, ``G = M̄ M̄^T`` (Papyan; Zhu)."""
    return pair_summary(stats, weighting=weighting, tile_bytes=tile_bytes).nc2_etf


def nc2_orth(means: Tensor | ClassStats, *, tile_bytes: int = DEFAULT_TILE_BYTES) -> float:
    """Orthogonal-frame distance of the *uncentred* means ``||MM^T/||MM^T||_F - I/sqrt(K)||_F``: the DUFM's
    target after a ReLU (equal norms, pairwise orthogonal means)."""
    return pair_summary(_as_stats(means), tile_bytes=tile_bytes).nc2_orth


def nc2_equinorm(stats: ClassStats, *, weighting: Weighting = "samples") -> float:
    """Equinorm (Papyan): ``std_c ||μ_c - μ_G|| / mean_c ||μ_c - μ_G||`` (population std; nan when the means
    coincide)."""
    norms = centred_means(stats, weighting=weighting).norm(dim=1)
    return float(norms.std(unbiased=False) / norms.mean())


def nc2_equiangle(
    stats: ClassStats, *, weighting: Weighting = "samples", tile_bytes: int = DEFAULT_TILE_BYTES
) -> float:
    """Equiangularity (Papyan): ``std_{c≠c'} cos(μ_c - μ_G, μ_c' - μ_G)``."""
    return pair_summary(stats, weighting=weighting, tile_bytes=tile_bytes).nc2_equiangle


def nc2_maxangle(stats: ClassStats, *, weighting: Weighting = "samples", tile_bytes: int = DEFAULT_TILE_BYTES) -> float:
    """Maximal-angle equiangularity (Papyan): ``mean_{c≠c'} |cos(μ̄_c, μ̄_c') + 1/(K-1)|``."""
    return pair_summary(stats, weighting=weighting, tile_bytes=tile_bytes).nc2_maxangle


def cdnv(stats: ClassStats, *, tile_bytes: int = DEFAULT_TILE_BYTES) -> float:
    """Class-distance normalized variance (Galanti et al. 2022): the mean over ``c ≠ c'`` of
    ``(Var_c + Var_c') / (2 ||μ_c - μ_c'||²)``."""
    return pair_summary(stats, tile_bytes=tile_bytes).cdnv


def cdnv_matrix(stats: ClassStats, *, tile_bytes: int = DEFAULT_TILE_BYTES) -> Tensor:
    """The (K, K) CDNV matrix (zero diagonal), for K small enough that it fits in ``tile_bytes``."""
    k = stats.num_classes
    if 8 * k * k > tile_bytes:
        raise DeepCollapseError(
            f"tile_bytes={tile_bytes} cannot hold the {k} x {k} CDNV matrix; use cdnv_per_class or pair_summary"
        )
    mbar = centred_means(stats)
    sq, v = mbar.pow(2).sum(1), stats.within_trace
    return _cdnv_block(v, v, sq, sq, mbar @ mbar.T).fill_diagonal_(0.0)


def cdnv_per_class(stats: ClassStats, *, tile_bytes: int = DEFAULT_TILE_BYTES) -> Tensor:
    """Row means of the CDNV matrix: ``1/(K-1) Σ_{c'≠c} CDNV(c, c')`` for each class (K,)."""
    return pair_summary(stats, tile_bytes=tile_bytes).cdnv_per_class


# --------------------------------------------------------------------------------------------- NC3


def _weight(weight: Tensor, like: Tensor, rows: int | None = None) -> Tensor:
    """``weight`` checked against the (·, D) float64 matrix ``like`` it acts on, as float64 on its device."""
    dim = like.shape[1]
    if not isinstance(weight, Tensor) or weight.dim() != 2 or weight.shape[1] != dim:
        shape = tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__
        raise DeepCollapseError(f"weight must be (out, D) with D = {dim} (the features' dimension), got {shape}")
    if rows is not None and weight.shape[0] != rows:
        raise DeepCollapseError(f"weight must have K = {rows} rows (one per class), got {weight.shape[0]}")
    return weight.detach().to(like)


def _unit(x: Tensor) -> Tensor:
    """``X/||X||_F``, scaled by ``max|X|`` first so that the norm neither under- nor overflows (nan for X = 0)."""
    x = x / x.abs().max()
    return x / torch.linalg.matrix_norm(x)


def nc3_duality(
    weight: Tensor, means: Tensor | ClassStats, *, center: bool = True, weighting: Weighting = "samples"
) -> float:
    """Self-duality (Papyan): ``||W/||W||_F - M̄/||M̄||_F||_F`` with the centred means; ``center=False`` uses
    the uncentred means (``nc3_duality_uncentred``: classifiers without a bias, such as the DUFM's)."""
    stats = _as_stats(means)
    m = centred_means(stats, weighting=weighting) if center else stats.means
    w = _weight(weight, m, stats.num_classes)
    return float(torch.linalg.matrix_norm(_unit(w) - _unit(m)))


def nc3_zhu(
    weight: Tensor,
    means: Tensor | ClassStats,
    *,
    weighting: Weighting = "samples",
    tile_bytes: int = DEFAULT_TILE_BYTES,
) -> float:
    """Zhu et al. 2021: ``||W M̄^T/||W M̄^T||_F - (I - 11^T/K)/sqrt(K-1)||_F``, tiled over rows of ``W M̄^T``."""
    stats = _as_stats(means)
    mbar = centred_means(stats, weighting=weighting)
    w = _weight(weight, mbar, stats.num_classes)
    k, t = stats.num_classes, math.sqrt(stats.num_classes - 1)
    norm = math.sqrt(sum(float(x.pow(2).sum()) for _, x in row_blocks(w, mbar, tile_bytes)))
    if norm == 0:
        return math.nan
    total = 0.0
    for rows, x in row_blocks(w, mbar, tile_bytes):
        d = x / norm + 1.0 / (k * t)
        d.diagonal(rows.start).sub_(1.0 / t)
        total += float(d.pow(2).sum())
    return math.sqrt(total)


def nc3_span(weight: Tensor, means: Tensor | ClassStats, *, rtol: float | None = None) -> float:
    """DUFM per-layer alignment: ``||W (I - P_M)||_F / ||W||_F``, ``P_M`` the projector onto the span of the
    uncentred class means of W's *input* (singular values above the precision cutoff)."""
    stats = _as_stats(means)
    w = _unit(_weight(weight, stats.means))
    _, s, vh = torch.linalg.svd(stats.means, full_matrices=False)
    v = vh[_above(s, singular_cutoff(stats, weighting=None, rtol=rtol))]
    return float(torch.linalg.matrix_norm(w - (w @ v.T) @ v))


# -------------------------------------------------------------------------------------- NC4 and NCC


def nearest_centre(features: Tensor, means: Tensor | ClassStats, *, tile_bytes: int = DEFAULT_TILE_BYTES) -> Tensor:
    """Row index of the nearest class mean of each feature (N,): ``argmin_c ||h_i - μ_c||²``.

    Computed as ``argmin_c (||m_c||² - 2 g_i·m_c)`` with ``g_i = h_i - r``, ``m_c = μ_c - r`` about the mean of
    the means ``r`` (no cancellation far from the origin), tiled over classes.
    """
    m = _as_stats(means).means
    h = features.detach().reshape(features.shape[0], -1).to(device=m.device)
    r = m.mean(0)
    mr = m - r
    return nearest_rows(h, r, mr, mr.pow(2).sum(1), tile_bytes=tile_bytes)


def classifier_predictions(features: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``argmax_c (W h_i + b)_c`` (N,) of a linear classifier (weight (K, D), bias (K,)), in float64 from the
    given values (ties go to the lowest class)."""
    h = features.detach().reshape(features.shape[0], -1).to(F64)
    logits = h @ _weight(weight, h).T
    if bias is not None:
        logits = logits + bias.detach().to(logits)
    return logits.argmax(1)


def nc4_from_predictions(predictions: Tensor, features: Tensor, means: Tensor | ClassStats) -> float:
    """Papyan's NC4: fraction of samples whose classifier prediction (labels (N,), or logits (N, K) reduced by
    argmax) differs from the nearest class centre. With ``ClassStats`` of a subset of classes the
    predictions are compared in the original labels."""
    pred = predictions.detach()
    pred = pred.argmax(1) if pred.dim() == 2 else pred
    if pred.shape[0] != features.shape[0]:
        raise DeepCollapseError(f"predictions has {pred.shape[0]} entries but the features have {features.shape[0]}")
    ncc = torch.tensor(_as_stats(means).class_ids)[nearest_centre(features, means).cpu()]
    return float((ncc != pred.cpu()).double().mean())


def ncc_accuracy(stats: ClassStats) -> float:
    """Nearest-class-centre accuracy on the data the statistics came from (the accumulators count it)."""
    if stats.ncc_correct is None:
        raise DeepCollapseError("these statistics carry no nearest-class-centre counts (ncc=False or one pass)")
    return float(stats.ncc_correct.sum()) / stats.total


def nc4(stats: ClassStats) -> float:
    """Papyan's NC4 from statistics accumulated with classifier ``predictions``: the fraction of samples whose
    prediction differs from the nearest class centre (→ 0 under collapse)."""
    if stats.nc4_disagree is None:
        raise DeepCollapseError(
            "these statistics carry no classifier predictions (pass predictions= when accumulating)"
        )
    return float(stats.nc4_disagree.sum()) / stats.total


# ------------------------------------------------------------------------------------------- ranks


def mean_spectrum(means: Tensor | ClassStats, *, center: bool = False, weighting: Weighting = "samples") -> Tensor:
    """Singular values (descending) of the class-mean matrix, centred if ``center``."""
    stats = _as_stats(means)
    return torch.linalg.svdvals(centred_means(stats, weighting=weighting) if center else stats.means)


def numerical_rank(singular_values: Tensor, *, rtol: float = 1e-3, floor: float = 0.0) -> int:
    """Number of singular values above ``max(rtol · σ_max, floor)`` (0 for an all-zero matrix); ``floor`` is
    the precision cutoff (:func:`deepcollapse.measure.stats.singular_cutoff`)."""
    s = singular_values
    if s.numel() == 0:
        return 0
    return int(_above(s, max(rtol * float(s.max()), floor)).sum())


# -------------------------------------------------------------------------------------- all at once


def dnc_metrics(
    features: Tensor | ClassStats,
    labels: Tensor | None = None,
    num_classes: int | None = None,
    *,
    weight: Tensor | None = None,
    bias_free: bool = False,
    normalize: bool = True,
    weighting: Weighting = "samples",
    rtol: float | None = None,
    rank_rtol: float = 1e-3,
    tile_bytes: int = DEFAULT_TILE_BYTES,
    pairs: PairSummary | None = None,
) -> dict[str, float | int]:
    """Every metric of one layer as a flat dict, keyed by the names of :data:`METRICS`.

    Always: ``nc1`` (``nc1_unnormalized`` instead when ``normalize=False``), ``nc1_quotient``, ``nc2_etf``,
    ``nc2_orth``, ``nc2_equinorm``, ``nc2_equiangle``, ``nc2_maxangle``, ``cdnv``, ``rank``, ``rank_centred``,
    ``mean_norm`` and ``rtol`` (the cutoff used). ``ncc_accuracy`` and ``nc4`` when the statistics carry them.
    With a ``weight`` (out, D) acting on these features: ``nc3_span``; when it has K rows also ``nc3_zhu`` and
    ``nc3_duality`` (``nc3_duality_uncentred`` instead when ``bias_free``). ``pairs``: the
    :func:`pair_summary` of the same statistics and ``weighting``, when the caller already has it (the
    O(K²·D) sweep then runs once for this and the per-class table).
    """
    if isinstance(features, ClassStats):
        stats = features
    else:
        if labels is None:
            raise DeepCollapseError("dnc_metrics needs labels with raw features")
        stats = class_stats(features, labels, num_classes)
    tol = check_rtol(rtol, stats)
    trace = _nc1_trace(stats, weighting, "auto", tol, None)
    out: dict[str, float | int] = {"nc1": trace / stats.num_classes} if normalize else {"nc1_unnormalized": trace}
    if pairs is None:
        pairs = pair_summary(stats, weighting=weighting, tile_bytes=tile_bytes)
    out |= {
        "nc1_quotient": nc1_quotient(stats, weighting=weighting),
        "nc2_etf": pairs.nc2_etf,
        "nc2_orth": pairs.nc2_orth,
        "nc2_equinorm": nc2_equinorm(stats, weighting=weighting),
        "nc2_equiangle": pairs.nc2_equiangle,
        "nc2_maxangle": pairs.nc2_maxangle,
        "cdnv": pairs.cdnv,
    }
    if weight is not None:
        out["nc3_span"] = nc3_span(weight, stats, rtol=tol)
        if weight.shape[0] == stats.num_classes:
            key = "nc3_duality_uncentred" if bias_free else "nc3_duality"
            out[key] = nc3_duality(weight, stats, center=not bias_free, weighting=weighting)
            out["nc3_zhu"] = nc3_zhu(weight, stats, weighting=weighting, tile_bytes=tile_bytes)
    if stats.ncc_correct is not None:
        out["ncc_accuracy"] = ncc_accuracy(stats)
    if stats.nc4_disagree is not None:
        out["nc4"] = nc4(stats)
    floor_u = singular_cutoff(stats, weighting=None, rtol=tol)
    floor_c = singular_cutoff(stats, weighting=weighting, rtol=tol)
    out["rank"] = numerical_rank(mean_spectrum(stats), rtol=rank_rtol, floor=floor_u)
    spec_c = mean_spectrum(stats, center=True, weighting=weighting)
    out["rank_centred"] = numerical_rank(spec_c, rtol=rank_rtol, floor=floor_c)
    out["mean_norm"] = float(stats.means.norm(dim=1).mean())
    out["rtol"] = tol
    return out
