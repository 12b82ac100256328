"""The numpy reference for the metric tests: docs/conventions.md on all features at once, in float64."""

from __future__ import annotations

import numpy as np


def _gram_dist(g: np.ndarray, t: np.ndarray) -> float:
    return float(np.linalg.norm(g / np.linalg.norm(g) - t / np.linalg.norm(t)))


def np_dnc(
    h: np.ndarray, y: np.ndarray, k: int, *, weight: np.ndarray | None = None, inp: np.ndarray | None = None
) -> dict[str, object]:
    """Sufficient statistics (``counts``, ``means``, ``sigma_w``, ``within_trace``, ``means_sigma_w`` about the
    sample mean, ``ncc_correct``) and metrics (``nc1``, ``nc2_etf``, ``nc2_orth``, ``nc4``, ``cdnv``, ``rank``,
    ``dim``; ``nc3``/``nc3_duality`` when a layer ``weight`` and its input features ``inp`` are given)."""
    h = np.asarray(h, dtype=np.float64).reshape(len(h), -1)
    n = len(h)
    means = np.stack([h[y == c].mean(0) for c in range(k)])
    e = h - means[y]
    sw = e.T @ e / n
    mbar = means - h.mean(0)
    sb = mbar.T @ mbar / k
    var = np.array([(e[y == c] ** 2).sum(1).mean() for c in range(k)])
    dist2 = ((means[:, None] - means[None]) ** 2).sum(-1)
    iu = np.triu_indices(k, 1)
    pred = ((h[:, None, :] - means[None]) ** 2).sum(-1).argmin(1)
    s = np.linalg.svd(means, compute_uv=False)
    out: dict[str, object] = {
        "counts": np.bincount(y, minlength=k),
        "means": means,
        "sigma_w": sw,
        "within_trace": var,
        "means_sigma_w": mbar @ sw @ mbar.T,
        "ncc_correct": np.bincount(y[pred == y], minlength=k),
        "nc1": float(np.trace(sw @ np.linalg.pinv(sb, rtol=1e-10, hermitian=True)) / k),
        "nc2_etf": _gram_dist(mbar @ mbar.T, np.eye(k) - 1.0 / k),
        "nc2_orth": _gram_dist(means @ means.T, np.eye(k)),
        "nc4": float((pred == y).mean()),
        "cdnv": float(((var[:, None] + var[None])[iu] / (2 * dist2[iu])).mean()),
        "rank": float((s > 1e-3 * s.max()).sum()),
        "dim": float(h.shape[1]),
    }
    if weight is not None and inp is not None:
        inp, weight = inp.reshape(len(inp), -1).astype(np.float64), weight.astype(np.float64)
        mi = np.stack([inp[y == c].mean(0) for c in range(k)])
        proj = weight @ np.linalg.pinv(mi, rtol=1e-10) @ mi
        out["nc3"] = float(np.linalg.norm(weight - proj) / np.linalg.norm(weight))
        if weight.shape[0] == k:
            mib = mi - inp.mean(0)
            out["nc3_duality"] = float(np.linalg.norm(weight / np.linalg.norm(weight) - mib / np.linalg.norm(mib)))
    return out


# ------------------------------------------------------------------ the conventions table, from each definition

EPS64 = float(np.finfo(np.float64).eps)


def np_cutoff(h: np.ndarray, y: np.ndarray, classes: list[int], w: np.ndarray | None, eps_in: float, factor: float):
    """The documented precision cutoff ``τ = factor·(ε_in + max n_c ε_64)·||I - 1w^T||_2·R`` (``w=None``: no
    centring), ``R² = Σ_c mean_{i∈c} ||h_i||²``; ``||A||_2`` by a dense SVD here."""
    r = np.sqrt(sum((h[y == c] ** 2).sum(1).mean() for c in classes))
    n_max = max((y == c).sum() for c in classes)
    a = 1.0 if w is None else np.linalg.norm(np.eye(len(classes)) - np.outer(np.ones(len(classes)), w), 2)
    return factor * (eps_in + n_max * EPS64) * a * r


def np_conventions(
    h: np.ndarray,
    y: np.ndarray,
    *,
    eps_in: float,
    factor: float,
    weighting: str = "samples",
    weight: np.ndarray | None = None,
    pred: np.ndarray | None = None,
    rank_rtol: float = 1e-3,
) -> dict[str, float]:
    """Every metric of the conventions table over the classes present in ``y``, straight from its source's
    definition: D x D Σ_W and Σ_B from all samples, Σ_B⁺ from the SVD of the centred means with the
    documented cutoff, pair statistics by explicit double loops."""
    h = np.asarray(h, dtype=np.float64).reshape(len(h), -1)
    classes = sorted(set(y.tolist()))
    k, n = len(classes), len(h)
    means = np.stack([h[y == c].mean(0) for c in classes])
    counts = np.array([(y == c).sum() for c in classes])
    w = counts / n if weighting == "samples" else np.full(k, 1.0 / k)
    mu_g = w @ means
    mbar = means - mu_g
    e = h - means[np.searchsorted(classes, y)]
    sw = e.T @ e / n
    sb = mbar.T @ mbar / k
    var = np.array([(e[y == c] ** 2).sum(1).mean() for c in classes])
    _, s, vt = np.linalg.svd(mbar, full_matrices=False)
    tau = np_cutoff(h, y, classes, w, eps_in, factor)
    keep = (s > tau) & (np.arange(len(s)) < k - 1)
    sb_pinv = (vt[keep].T / s[keep] ** 2) @ vt[keep] * k
    out: dict[str, float] = {}
    tr = float(np.trace(sw @ sb_pinv)) if keep.any() else float("inf")
    out["nc1"], out["nc1_unnormalized"] = tr / k, tr
    out["nc1_quotient"] = float(np.trace(sw) / np.trace(sb))
    etf = (np.eye(k) - np.ones((k, k)) / k) / np.sqrt(k - 1)
    g = mbar @ mbar.T
    out["nc2_etf"] = float(np.linalg.norm(g / np.linalg.norm(g) - etf))
    gu = means @ means.T
    out["nc2_orth"] = float(np.linalg.norm(gu / np.linalg.norm(gu) - np.eye(k) / np.sqrt(k)))
    norms = np.linalg.norm(mbar, axis=1)
    out["nc2_equinorm"] = float(norms.std() / norms.mean())
    cos, cdnv = [], []
    for a in range(k):
        for b in range(k):
            if a != b:
                cos.append(mbar[a] @ mbar[b] / (norms[a] * norms[b]))
                cdnv.append((var[a] + var[b]) / (2 * np.sum((means[a] - means[b]) ** 2)))
    cos = np.array(cos)
    out["nc2_equiangle"] = float(cos.std())
    out["nc2_maxangle"] = float(np.abs(cos + 1.0 / (k - 1)).mean())
    out["cdnv"] = float(np.mean(cdnv))
    dist = ((h[:, None, :] - means[None]) ** 2).sum(-1)
    ncc = np.array(classes)[dist.argmin(1)]
    out["ncc_accuracy"] = float((ncc == y).mean())
    if pred is not None:
        out["nc4"] = float((ncc != pred).mean())
    if weight is not None:
        wt = np.asarray(weight, dtype=np.float64)
        _, su, vu = np.linalg.svd(means, full_matrices=False)
        basis = vu[su > np_cutoff(h, y, classes, None, eps_in, factor)]
        out["nc3_span"] = float(np.linalg.norm(wt - wt @ basis.T @ basis) / np.linalg.norm(wt))
        if wt.shape[0] == k:
            out["nc3_duality"] = float(np.linalg.norm(wt / np.linalg.norm(wt) - mbar / np.linalg.norm(mbar)))
            out["nc3_duality_uncentred"] = float(
                np.linalg.norm(wt / np.linalg.norm(wt) - means / np.linalg.norm(means))
            )
            x = wt @ mbar.T
            out["nc3_zhu"] = float(np.linalg.norm(x / np.linalg.norm(x) - etf))
    su = np.linalg.svd(means, compute_uv=False)
    out["rank"] = float((su > max(rank_rtol * su.max(), np_cutoff(h, y, classes, None, eps_in, factor))).sum())
    out["rank_centred"] = float((s > max(rank_rtol * s.max(), tau)).sum())
    out["mean_norm"] = float(np.linalg.norm(means, axis=1).mean())
    return out


def batches(x, y, size: int = 100) -> list:
    """``(x, y)`` split into consecutive loader batches of ``size`` rows (the last may be shorter)."""
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(x), size)]


# ------------------------------------------------------------------ the DNC loss of one output scale, in decimals


def dec_dnc_objective(s, kc, num_layers: int):
    """``f(s) = ½(1-s)² + ½(L+1)·kc·s^{2/(L+1)}`` (the DNC loss at output scale ``s``, ``kc = K C``) in the
    current decimal context (``s``, ``kc`` any numbers; the result a ``Decimal``)."""
    from decimal import Decimal

    s, kc, big_l = Decimal(s), Decimal(kc), Decimal(num_layers)
    penalty = 0 if s == 0 else (big_l + 1) * kc * s ** (2 / (big_l + 1))
    return ((1 - s) ** 2 + penalty) / 2


def dec_optimal_scale(kc: float, num_layers: int, *, digits: int = 60, grid: int = 2000) -> tuple[float, float]:
    """``(s, f(s))``: the minimizer over ``s ∈ [0, 1]`` of :func:`dec_dnc_objective`, found from ``f`` alone: the
    best of ``grid`` equally spaced points in ``(0, 1]``, refined by golden-section search between its two
    neighbours in ``digits``-digit decimals, then compared with the end point ``f(0) = 1/2`` (which wins ties).
    Near a minimum ``f`` is flat to second order, so ``s`` gets about half the digits: 60 give ``s`` to ~1e-25."""
    from decimal import Decimal, localcontext

    with localcontext() as ctx:
        ctx.prec = digits
        e = 2 / (num_layers + 1)
        values = [0.5 * (1 - i / grid) ** 2 + 0.5 * (num_layers + 1) * kc * (i / grid) ** e for i in range(1, grid + 1)]
        best = 1 + min(range(grid), key=values.__getitem__)  # the bracket, from float64 values
        a, b = Decimal(best - 1) / grid, Decimal(min(best + 1, grid)) / grid
        inv_phi = (Decimal(5).sqrt() - 1) / 2
        x1, x2 = b - inv_phi * (b - a), a + inv_phi * (b - a)
        f1, f2 = dec_dnc_objective(x1, kc, num_layers), dec_dnc_objective(x2, kc, num_layers)
        while b - a > Decimal(10) ** (-(digits // 2 + 4)):
            if f1 <= f2:
                b, x2, f2 = x2, x1, f1
                x1 = b - inv_phi * (b - a)
                f1 = dec_dnc_objective(x1, kc, num_layers)
            else:
                a, x1, f1 = x1, x2, f2
                x2 = a + inv_phi * (b - a)
                f2 = dec_dnc_objective(x2, kc, num_layers)
        s = (a + b) / 2
        f = dec_dnc_objective(s, kc, num_layers)
        if f >= Decimal("0.5"):
            return 0.0, 0.5
        return float(s), float(f)
