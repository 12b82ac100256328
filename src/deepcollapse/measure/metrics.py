r"""Neural-collapse metrics as pure functions (docs/conventions.md).

Notation. Features ``h_i`` (rows of an ``(N, D)`` tensor) with labels ``y_i`` in ``0..K-1``; ``n_c`` samples
in class ``c``; class means ``μ_c`` (rows of ``M``, shape ``(K, D)``); global mean ``μ_G``;

.. math::

    Σ_W = \frac1N \sum_i (h_i - μ_{y_i})(h_i - μ_{y_i})^T, \qquad
    Σ_B = \frac1K \sum_c (μ_c - μ_G)(μ_c - μ_G)^T = \frac1K \bar M^T \bar M .

Everything is computed in float64 from *sufficient statistics* (:class:`ClassStats`): counts, class
means, per-class variance traces, the ``K x K`` matrix ``M Σ_W M^T`` and optionally ``Σ_W`` itself. The
streaming accumulators build the same statistics batch by batch, so one definition serves both.

Conventions that differ between codebases are explicit options:

* ``normalize`` -- NC1 divides ``tr(Σ_W Σ_B^+)`` by ``K`` (Papyan et al. 2020; Zhu et al. 2021) or not
  (several per-layer DNC papers).
* ``weighting`` -- the global mean is the sample mean (``"samples"``, Papyan) or the plain average of the
  class means (``"classes"``); they coincide for balanced classes.

Pseudo-inverse. ``Σ_B`` has rank at most ``K - 1``. Its pseudo-inverse is built from the SVD of the
centred means ``M̄`` (``K x D``), keeping at most ``K - 1`` singular values and only those above
``rtol * σ_max``; the default ``rtol = max(K, D) * eps(float64)`` is NumPy's ``matrix_rank`` rule. With the
SVD ``M̄ = U S V^T``, ``Σ_B^+ = K V S^{-2} V^T``, hence (the Gram identity, O(K·D) memory)

.. math::

    \operatorname{tr}(Σ_W Σ_B^+) = K \sum_{i} \frac{u_i^T \bar M Σ_W \bar M^T u_i}{s_i^4}.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import torch
from torch import Tensor

from deepcollapse._validate import DeepCollapseError, check_finite, check_labels

__all__ = [
    "ClassStats",
    "cdnv",
    "centred_means",
    "class_stats",
    "dnc_metrics",
    "equinorm",
    "global_mean",
    "mean_spectrum",
    "nc1",
    "nc2_etf",
    "nc2_orth",
    "nc3",
    "nc4",
    "ncc_accuracy",
    "numerical_rank",
]

Weighting = Literal["samples", "classes"]
F64 = torch.float64
FULL_COV_MAX_DIM = 2048  # class_stats keeps the D x D Σ_W by default up to this dimension


@dataclass(frozen=True)
class ClassStats:
    """Sufficient statistics of labelled features, in float64.

    Attributes
    ----------
    counts : (K,) int64, samples per class ``n_c``.
    means : (K, D) class means ``M``.
    within_trace : (K,) per-class variance ``1/n_c Σ_{i in c} ||h_i - μ_c||²``.
    means_sigma_w : (K, K) ``(M - 1r^T) Σ_W (M - 1r^T)^T``: Σ_W seen through the means shifted by the
        reference point ``r`` (``centre``); enough for NC1 under any weighting, since the centred means
        ``M̄ = A M = A (M - 1r^T)`` for the centring matrix ``A = I - 1w^T`` (``A1 = 0``).
    sigma_w : (D, D) ``Σ_W`` or ``None`` (the memory-light path does not keep it).
    ncc_correct : (K,) per class, samples whose nearest class mean is their own, or ``None``.
    centre : (D,) the reference point ``r`` of ``means_sigma_w``; ``None`` means the origin. A point near
        the global mean (``class_stats`` uses the sample mean) avoids the cancellation that uncentred
        means suffer when they lie far from the origin relative to their spread.
    """

    counts: Tensor
    means: Tensor
    within_trace: Tensor
    means_sigma_w: Tensor
    sigma_w: Tensor | None = None
    ncc_correct: Tensor | None = None
    centre: Tensor | None = None

    @property
    def num_classes(self) -> int:
        return int(self.counts.numel())

    @property
    def dim(self) -> int:
        return int(self.means.shape[1])

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    def to(self, device: torch.device | str) -> ClassStats:
        def mv(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device)

        return replace(
            self,
            counts=self.counts.to(device),
            means=self.means.to(device),
            within_trace=self.within_trace.to(device),
            means_sigma_w=self.means_sigma_w.to(device),
            sigma_w=mv(self.sigma_w),
            ncc_correct=mv(self.ncc_correct),
            centre=mv(self.centre),
        )


def _as_features(features: Tensor, name: str = "features") -> Tensor:
    if not isinstance(features, Tensor):
        features = torch.as_tensor(features)
    if features.dim() == 1:
        raise DeepCollapseError(f"{name} must be 2-D (N, D), got a 1-D tensor")
    if features.dim() > 2:
        features = features.reshape(features.shape[0], -1)
    if features.shape[0] == 0:
        raise DeepCollapseError(f"{name} is empty (0 samples)")
    check_finite(name, features)
    return features


def _check_classes(counts: Tensor) -> None:
    empty = (counts == 0).nonzero().flatten().tolist()
    if empty:
        raise DeepCollapseError(
            f"class(es) {empty} have no samples; every class in 0..{counts.numel() - 1} needs at least one"
        )


def class_stats(
    features: Tensor,
    labels: Tensor,
    num_classes: int,
    *,
    full_cov: bool | None = None,
    ncc: bool = True,
) -> ClassStats:
    """Exact two-pass statistics of ``features`` (N, D) with integer ``labels`` (N,), in float64.

    ``full_cov`` also keeps the ``D x D`` within-class covariance ``Σ_W`` (default: when ``D <= 2048``,
    i.e. at most 32 MiB); ``ncc`` counts the samples that the nearest-class-centre rule classifies
    correctly (for NC4).
    """
    if num_classes < 2:
        raise DeepCollapseError(f"num_classes must be >= 2 (collapse compares classes), got {num_classes}")
    h = _as_features(features).to(F64)
    y = check_labels(labels, num_classes, n_samples=h.shape[0]).to(h.device)
    counts = torch.bincount(y, minlength=num_classes)
    _check_classes(counts)
    sums = torch.zeros(num_classes, h.shape[1], dtype=F64, device=h.device).index_add_(0, y, h)
    means = sums / counts[:, None].to(F64)
    centred = h - means[y]
    sq = torch.zeros(num_classes, dtype=F64, device=h.device).index_add_(0, y, centred.pow(2).sum(1))
    within_trace = sq / counts.to(F64)
    centre = (counts.to(F64) @ means) / h.shape[0]  # the sample mean: a well-conditioned reference
    proj = centred @ (means - centre).T  # (N, K): (h_i - μ_{y_i})^T (μ_c - r)
    means_sigma_w = proj.T @ proj / h.shape[0]
    if full_cov is None:
        full_cov = h.shape[1] <= FULL_COV_MAX_DIM
    sigma_w = centred.T @ centred / h.shape[0] if full_cov else None
    ncc_correct = None
    if ncc:
        pred = torch.cdist(h, means).argmin(1)
        ncc_correct = torch.zeros(num_classes, dtype=torch.int64, device=h.device).index_add_(0, y, (pred == y).long())
    return ClassStats(counts, means, within_trace, means_sigma_w, sigma_w, ncc_correct, centre)


def _weights(stats: ClassStats, weighting: Weighting) -> Tensor:
    if weighting == "samples":
        return stats.counts.to(F64) / stats.total
    if weighting == "classes":
        return torch.full_like(stats.within_trace, 1.0 / stats.num_classes)
    raise DeepCollapseError(f"weighting must be 'samples' or 'classes', got {weighting!r}")


def global_mean(stats: ClassStats, *, weighting: Weighting = "samples") -> Tensor:
    """``μ_G = Σ_c w_c μ_c`` with ``w_c = n_c/N`` (``"samples"``) or ``1/K`` (``"classes"``)."""
    return _weights(stats, weighting) @ stats.means


def centred_means(stats: ClassStats, *, weighting: Weighting = "samples") -> Tensor:
    """``M̄ = M - 1 μ_G^T`` (K, D)."""
    return stats.means - global_mean(stats, weighting=weighting)


def _mean_matrix(means: Tensor | ClassStats, *, center: bool, weighting: Weighting) -> Tensor:
    """The (K, D) class means in float64, centred (about μ_G, or their plain average for raw means) if asked."""
    if isinstance(means, ClassStats):
        return centred_means(means, weighting=weighting) if center else means.means
    m = means.to(F64)
    return m - m.mean(0) if center else m


def _rtol(k: int, d: int, rtol: float | None) -> float:
    return max(k, d) * torch.finfo(F64).eps if rtol is None else float(rtol)


def _between_svd(stats: ClassStats, weighting: Weighting, rtol: float | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Kept part of the SVD of the centred means, plus the centring matrix ``A`` (``M̄ = A M``)."""
    k = stats.num_classes
    a = torch.eye(k, dtype=F64, device=stats.means.device) - _weights(stats, weighting)[None, :]
    mbar = a @ stats.means
    u, s, vh = torch.linalg.svd(mbar, full_matrices=False)
    keep = s > _rtol(k, stats.dim, rtol) * s[0] if s.numel() and s[0] > 0 else s > 0
    keep[k - 1 :] = False  # rank(M̄) <= K - 1: the centring direction is never inverted
    return u[:, keep], s[keep], vh[keep], a


def nc1(
    stats: ClassStats,
    *,
    normalize: bool = True,
    weighting: Weighting = "samples",
    method: Literal["auto", "gram", "full"] = "auto",
    rtol: float | None = None,
) -> float:
    """Within-class variability relative to between-class: ``tr(Σ_W Σ_B^+) / K``.

    ``normalize=False`` drops the ``1/K``. ``method="gram"`` uses only ``M Σ_W M^T`` (O(K·D) state, see the
    module docstring); ``"full"`` uses ``Σ_W`` (needs ``stats.sigma_w``); ``"auto"`` takes ``"full"`` when
    ``Σ_W`` is there. Both use the same rank-aware pseudo-inverse. Returns ``0`` on perfect collapse,
    ``inf`` if all class means coincide while features vary, and ``nan`` (undefined) if the features do
    not vary at all (e.g. a dead ReLU layer). The Gram path squares the scale twice: for features
    smaller than about 1e-75 it underflows and returns ``nan``; the full path is good to about 1e-150.
    """
    u, s, vh, a = _between_svd(stats, weighting, rtol)
    k = stats.num_classes
    if s.numel() == 0:
        return float("nan") if float(stats.within_trace.max()) == 0.0 else float("inf")
    if method == "auto":
        method = "full" if stats.sigma_w is not None else "gram"
    if method == "gram":
        if float(s[0]) ** 4 == 0.0:  # M Σ_W M^T has underflowed: the statistics cannot tell
            return float("nan")
        pbar = a @ stats.means_sigma_w @ a.T  # M̄ Σ_W M̄^T (A removes any reference point)
        quad = torch.einsum("ki,kl,li->i", u, pbar, u).clamp_min(0.0)  # PSD: clip round-off below 0
        tr = k * float((quad / s.pow(2) / s.pow(2)).sum())
    elif method == "full":
        if stats.sigma_w is None:
            raise DeepCollapseError("nc1(method='full') needs sigma_w; use method='gram' or full_cov=True")
        quad = torch.einsum("id,de,ie->i", vh, stats.sigma_w, vh).clamp_min(0.0)
        tr = k * float((quad / s.pow(2)).sum())
    else:
        raise DeepCollapseError(f"method must be 'gram' or 'full', got {method!r}")
    return tr / k if normalize else tr


def _gram_distance(gram: Tensor, target: Tensor) -> float:
    norm = torch.linalg.matrix_norm(gram)
    if norm == 0:
        return float("nan")
    return float(torch.linalg.matrix_norm(gram / norm - target / torch.linalg.matrix_norm(target)))


def nc2_etf(stats: ClassStats, *, weighting: Weighting = "samples") -> float:
    """Distance of the centred means' normalized Gram to the simplex ETF.

    ``|| M̄M̄^T/||M̄M̄^T||_F - (I - 11^T/K)/sqrt(K-1) ||_F``; 0 for a simplex equiangular tight frame.
    """
    mbar = centred_means(stats, weighting=weighting)
    k = stats.num_classes
    etf = torch.eye(k, dtype=F64, device=mbar.device) - 1.0 / k
    return _gram_distance(mbar @ mbar.T, etf)


def nc2_orth(means: Tensor | ClassStats) -> float:
    """Distance of the *uncentred* means' normalized Gram to an orthogonal frame.

    ``|| MM^T/||MM^T||_F - I/sqrt(K) ||_F``: the DUFM's target after a ReLU (equal norms, pairwise
    orthogonal means).
    """
    m = means.means if isinstance(means, ClassStats) else means.to(F64)
    return _gram_distance(m @ m.T, torch.eye(m.shape[0], dtype=F64, device=m.device))


def equinorm(stats: ClassStats, *, weighting: Weighting = "samples", center: bool = True) -> float:
    """Coefficient of variation (std/mean) of the class-mean norms, centred or not."""
    m = centred_means(stats, weighting=weighting) if center else stats.means
    norms = m.norm(dim=1)
    return float(norms.std(unbiased=False) / norms.mean()) if norms.mean() > 0 else float("nan")


def nc3(
    weight: Tensor,
    means: Tensor | ClassStats,
    *,
    method: Literal["projection", "duality"] = "projection",
    center: bool = False,
    weighting: Weighting = "samples",
    rtol: float | None = None,
) -> float:
    """Alignment of a layer's weight ``W`` (out, D) with the class means of its input features.

    ``"projection"`` (DNC3, any layer): the fraction of ``W``'s norm outside the span of the means,
    ``||W (I - P_M)||_F / ||W||_F`` with ``P_M`` the projector onto the row span of ``M`` (centred if
    ``center``). ``"duality"`` (last layer, Papyan/Zhu self-duality; needs ``out == K``):
    ``|| W/||W||_F - M̄/||M̄||_F ||_F`` with centred means when ``center`` else uncentred.
    """
    m = _mean_matrix(means, center=center, weighting=weighting)
    w = weight.detach().to(device=m.device, dtype=F64)
    if w.dim() != 2 or w.shape[1] != m.shape[1]:
        raise DeepCollapseError(
            f"weight must be (out, D) with D = {m.shape[1]} (the features' dimension), got {tuple(w.shape)}"
        )
    wn = torch.linalg.matrix_norm(w)
    if wn == 0:
        return float("nan")
    if method == "projection":
        _, s, vh = torch.linalg.svd(m, full_matrices=False)
        keep = s > _rtol(*m.shape, rtol) * s[0] if s[0] > 0 else s > 0
        v = vh[keep]
        resid = w - (w @ v.T) @ v
        return float(torch.linalg.matrix_norm(resid) / wn)
    if method == "duality":
        if w.shape[0] != m.shape[0]:
            raise DeepCollapseError(
                f"nc3(method='duality') needs a weight with K = {m.shape[0]} rows, got {w.shape[0]}"
            )
        return float(torch.linalg.matrix_norm(w / wn - m / torch.linalg.matrix_norm(m)))
    raise DeepCollapseError(f"method must be 'projection' or 'duality', got {method!r}")


def ncc_accuracy(features: Tensor, labels: Tensor, means: Tensor) -> float:
    """Fraction of samples whose nearest class mean (Euclidean) is their own class."""
    h = _as_features(features).to(F64)
    y = check_labels(labels, means.shape[0], n_samples=h.shape[0]).to(h.device)
    pred = torch.cdist(h, means.to(device=h.device, dtype=F64)).argmin(1)
    return float((pred == y).double().mean())


def nc4(stats: ClassStats) -> float:
    """NC4 as nearest-class-centre accuracy on the data the statistics came from."""
    if stats.ncc_correct is None:
        raise DeepCollapseError("these statistics carry no nearest-class-centre counts (ncc=False)")
    return float(stats.ncc_correct.sum()) / stats.total


def cdnv(stats: ClassStats) -> tuple[float, Tensor]:
    """Class-distance normalized variance (Galanti et al. 2022).

    ``CDNV(c, c') = (Var_c + Var_c') / (2 ||μ_c - μ_c'||²)``, ``Var_c`` the mean squared distance of class
    ``c``'s features to ``μ_c``. Returns the mean over pairs ``c < c'`` and the (K, K) matrix (zero diagonal).
    """
    v = stats.within_trace
    dist2 = torch.cdist(stats.means, stats.means).pow(2)
    mat = (v[:, None] + v[None, :]) / (2 * dist2)
    k = stats.num_classes
    mat.fill_diagonal_(0.0)
    iu = torch.triu_indices(k, k, 1)
    return float(mat[iu[0], iu[1]].mean()), mat


def mean_spectrum(means: Tensor | ClassStats, *, center: bool = False, weighting: Weighting = "samples") -> Tensor:
    """Singular values (descending) of the class-mean matrix, centred if ``center``."""
    return torch.linalg.svdvals(_mean_matrix(means, center=center, weighting=weighting))


def numerical_rank(singular_values: Tensor, *, rtol: float = 1e-3) -> int:
    """Number of singular values above ``rtol`` times the largest (0 for an all-zero matrix)."""
    s = singular_values
    if s.numel() == 0 or float(s.max()) == 0.0:
        return 0
    return int((s > rtol * s.max()).sum())


def dnc_metrics(
    features: Tensor | ClassStats,
    labels: Tensor | None = None,
    num_classes: int | None = None,
    *,
    weight: Tensor | None = None,
    normalize: bool = True,
    weighting: Weighting = "samples",
    rank_rtol: float = 1e-3,
) -> dict[str, float | int]:
    """All metrics of one layer as a flat dict of numbers.

    Keys: ``nc1``, ``nc2_etf``, ``nc2_orth``, ``equinorm``, ``nc3`` (projection, when ``weight`` is
    given), ``nc3_duality`` (when ``weight`` has K rows), ``nc4``, ``cdnv``, ``rank`` (numerical rank of
    the uncentred means), ``rank_centred``, ``mean_norm`` (average class-mean norm).
    """
    if isinstance(features, ClassStats):
        stats = features
    else:
        if labels is None or num_classes is None:
            raise DeepCollapseError("dnc_metrics needs labels and num_classes with raw features")
        stats = class_stats(features, labels, num_classes)
    out: dict[str, float | int] = {
        "nc1": nc1(stats, normalize=normalize, weighting=weighting),
        "nc2_etf": nc2_etf(stats, weighting=weighting),
        "nc2_orth": nc2_orth(stats),
        "equinorm": equinorm(stats, weighting=weighting),
    }
    if weight is not None:
        out["nc3"] = nc3(weight, stats)
        if weight.shape[0] == stats.num_classes:
            out["nc3_duality"] = nc3(weight, stats, method="duality", center=True, weighting=weighting)
    if stats.ncc_correct is not None:
        out["nc4"] = nc4(stats)
    out["cdnv"] = cdnv(stats)[0]
    out["rank"] = numerical_rank(mean_spectrum(stats), rtol=rank_rtol)
    out["rank_centred"] = numerical_rank(mean_spectrum(stats, center=True, weighting=weighting), rtol=rank_rtol)
    out["mean_norm"] = float(stats.means.norm(dim=1).mean())
    return out
