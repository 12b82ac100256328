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
