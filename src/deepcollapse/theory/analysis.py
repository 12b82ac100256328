r"""What kind of solution did a DUFM reach? Ranks, spectra and losses against DNC and SRG.

For every layer the class means are taken from :func:`deepcollapse.metrics.class_stats` (uncentred, in
float64): ``H_1``; the pre-activations ``\tilde H_l = W_{l-1} H_{l-1}`` and the post-ReLU ``H_l`` for
``l = 2..L``; and the output ``W_L H_L``. Their singular values, normalized by the largest, give the
spectra, and the numerical rank counts those above ``rank_rtol`` (:func:`deepcollapse.metrics.numerical_rank`).

The verdict (``loss_rtol`` default 1e-3):

- ``"dnc"``: every class-mean matrix of layers 2..L (pre and post) and the output has rank K, and
  ``|loss - L_DNC| <= loss_rtol · L_DNC`` (the DNC optimum of :mod:`deepcollapse.theory`);
- ``"low-rank"``: the output separates the classes (rank K) but the class means before the last ReLU,
  ``\tilde H_L``, have rank below K (the follow-up's low-rank solutions, docs/lowrank.md);
- ``"other"``: anything else (a collapsed or zero output, a full-rank point away from ``L_DNC``, L = 1).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from deepcollapse.dufm.model import DUFMConfig, forward, label_matrix, labels_from_counts, objective
from deepcollapse.measure import metrics as M
from deepcollapse.theory.closed_form import dnc_loss
from deepcollapse.theory.lowrank import srg_loss, srg_order

__all__ = ["analyze_solution", "plot_spectra", "verdict"]


def _means(features: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """Class means (K x d) of column features (d x N)."""
    return M.class_stats(features.T, labels, num_classes, ncc=False).means


def verdict(
    *,
    ranks_pre: Sequence[int],
    ranks_post: Sequence[int],
    rank_out: int,
    num_classes: int,
    ratio_dnc: float | None,
    loss_rtol: float = 1e-3,
) -> str:
    """``"dnc"``, ``"low-rank"`` or ``"other"`` by the rule of the module docstring."""
    K = num_classes
    if not ranks_pre or rank_out < K:
        return "other"
    if min([*ranks_pre, *ranks_post[1:]]) == K:
        if ratio_dnc is not None and abs(ratio_dnc - 1.0) <= loss_rtol:
            return "dnc"
        return "other"
    return "low-rank" if ranks_pre[-1] < K else "other"


def analyze_solution(
    h1: Tensor,
    weights: Sequence[Tensor],
    config: DUFMConfig,
    *,
    rank_rtol: float = 1e-3,
    loss_rtol: float = 1e-3,
) -> dict[str, Any]:
    """Ranks, spectra, loss ratios and a verdict for the DUFM solution ``(h1, weights)`` (JSON-ready).

    Keys: ``ranks_pre`` (rank of the class means of ``\\tilde H_l``, l = 2..L), ``ranks_post`` (of ``H_1``
    and ``H_l``, l = 2..L), ``rank_out``, ``spectra`` (list of ``{layer, stage, singular_values}``,
    normalized by the largest), ``nc1`` (per layer and stage), ``loss``/``fit``/``reg``, ``dnc_loss``,
    ``ratio_dnc`` (``loss / L_DNC``), ``srg_loss``/``ratio_srg`` (``None`` unless K = C(r, 2), L >= 2 and
    the widths fit), ``rank_rtol``, ``loss_rtol``, ``verdict`` and ``verdict_rule``.
    """
    K, L = config.num_classes, config.num_layers
    labels = labels_from_counts(config.counts, device=h1.device)
    h = h1.detach().to(torch.float64)
    ws = [w.detach().to(device=h.device, dtype=torch.float64) for w in weights]
    with torch.no_grad():
        y = label_matrix(config.counts, dtype=torch.float64, device=h.device)
        total, fit, reg = objective(h, ws, y, config.lambda_h, config.lambdas_w)
        pre, post, out = forward(h, ws)
    stages = [(1, "free", h)]
    for i, (z, a) in enumerate(zip(pre, post, strict=True)):
        stages += [(i + 2, "pre", z), (i + 2, "post", a)]
    stages.append((L + 1, "output", out))
    spectra, ranks, nc1 = [], {}, []
    for layer, stage, feats in stages:
        stats = M.class_stats(feats.T, labels, K, ncc=False)
        sv = M.mean_spectrum(stats)
        top = float(sv.max()) if sv.numel() else 0.0
        ranks[(layer, stage)] = M.numerical_rank(sv, rtol=rank_rtol)
        spectra.append(
            {"layer": layer, "stage": stage, "singular_values": [float(v) / top if top > 0 else 0.0 for v in sv]}
        )
        nc1.append({"layer": layer, "stage": stage, "nc1": M.nc1(stats)})
    ranks_pre = [ranks[(l, "pre")] for l in range(2, L + 1)]
    ranks_post = [ranks[(1, "free")]] + [ranks[(l, "post")] for l in range(2, L + 1)]
    rank_out = ranks[(L + 1, "output")]
    loss = float(total)
    d_loss = s_loss = None
    if config.balanced:
        kw = {"num_layers": L, "n": config.n, "lambda_h": config.lambda_h, "lambda_w": config.lambdas_w}
        d_loss = dnc_loss(num_classes=K, **kw)

        r = srg_order(K)
        if r is not None and L >= 2 and all(d >= r for d in config.widths[:-1]) and config.widths[-1] >= K:
            s_loss = srg_loss(num_classes=K, **kw)
    ratio_dnc = loss / d_loss if d_loss else None
    ratio_srg = loss / s_loss if s_loss else None
    return {
        "ranks_pre": ranks_pre,
        "ranks_post": ranks_post,
        "rank_out": rank_out,
        "spectra": spectra,
        "nc1": nc1,
        "loss": loss,
        "fit": float(fit),
        "reg": float(reg),
        "dnc_loss": d_loss,
        "ratio_dnc": ratio_dnc,
        "srg_loss": s_loss,
        "ratio_srg": ratio_srg,
        "rank_rtol": rank_rtol,
        "loss_rtol": loss_rtol,
        "verdict": verdict(
            ranks_pre=ranks_pre,
            ranks_post=ranks_post,
            rank_out=rank_out,
            num_classes=K,
            ratio_dnc=ratio_dnc,
            loss_rtol=loss_rtol,
        ),
        "verdict_rule": (
            "dnc: all class-mean ranks of layers 2..L and the output equal K and |loss/L_DNC - 1| <= loss_rtol; "
            "low-rank: output rank K but the class means before the last ReLU have rank < K; other: the rest"
        ),
    }


def plot_spectra(analysis: dict[str, Any], path: str | Path, *, title: str | None = None) -> Path:
    """Normalized class-mean singular values per layer: before the ReLUs (left) and after them (right).

    The dotted line is ``rank_rtol``: the numerical rank counts the values above it.
    """
    from deepcollapse.plots import _plt

    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    floor = 1e-17
    panels = {"pre": (axes[0], "before ReLU (H̃_l)"), "post": (axes[1], "after ReLU (H_1, H_l, output)")}
    for entry in analysis["spectra"]:
        stage = entry["stage"]
        ax = axes[0] if stage == "pre" else axes[1]
        sv = [max(v, floor) for v in entry["singular_values"]]
        label = {"free": "H1", "output": "output"}.get(stage, f"layer {entry['layer']}")
        ax.plot(range(1, len(sv) + 1), sv, "o-", ms=3, label=label)
    for key, (ax, name) in panels.items():
        ax.axhline(analysis.get("rank_rtol", 1e-3), color="k", ls=":", lw=1)
        ax.set_yscale("log")
        ax.set_xlabel("index")
        ax.set_title(name)
        if ax.lines:
            ax.legend(fontsize=7)
        if key == "pre":
            ax.set_ylabel("σ_i / σ_1 of the class means")
    ratio = analysis.get("ratio_dnc")
    head = f"verdict: {analysis.get('verdict')}"
    if ratio is not None and math.isfinite(ratio):
        head += f", loss/L_DNC = {ratio:.4f}"
    if analysis.get("ratio_srg") is not None:
        head += f", loss/L_SRG = {analysis['ratio_srg']:.4f}"
    fig.suptitle(title or head, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
