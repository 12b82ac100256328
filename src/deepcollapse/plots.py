"""Figures drawn from result files (lists of row dicts as read from ``history.csv``/``metrics.json``).

Every function takes plain rows, writes one PNG and returns its path; nothing here trains or measures.
Matplotlib runs on the non-interactive Agg backend.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "plot_epoch_metrics",
    "plot_loss",
    "plot_metric_by_layer",
    "plot_metric_curves",
    "plot_metrics_vs_depth",
    "plot_spectra",
]


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _finite_pos(xs: Sequence[Any], ys: Sequence[Any], logy: bool) -> tuple[list[float], list[float]]:
    px, py = [], []
    for x, y in zip(xs, ys, strict=True):
        if x is None or y is None or not isinstance(y, int | float) or not math.isfinite(y):
            continue
        if logy and y <= 0:
            continue
        px.append(float(x))
        py.append(float(y))
    return px, py


def plot_loss(
    rows: Sequence[Mapping[str, Any]],
    path: str | Path,
    *,
    x: str = "step",
    optimum: float | None = None,
    optimum_label: str = "L_DNC (theory)",
    optimum_name: str = "L_DNC",
    title: str = "DUFM loss",
    extra_lines: Mapping[str, float] | None = None,
) -> Path:
    """Loss (total, fit, reg) against ``x`` on log-log axes, with the theoretical optimum as a line.

    A second panel shows the relative gap ``(loss - optimum)/optimum`` when ``optimum`` is given.
    """
    plt = _plt()
    panels = 2 if optimum else 1
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4), squeeze=False)
    ax = axes[0, 0]
    xs = [r.get(x) for r in rows]
    logx = all(v is not None and v > 0 for v in xs)
    for key, style in (("loss", "-"), ("fit", "--"), ("reg", ":")):
        if any(key in r for r in rows):
            px, py = _finite_pos(xs, [r.get(key) for r in rows], True)
            ax.plot(px, py, style, label=key)
    if optimum:
        ax.axhline(optimum, color="k", lw=1, label=f"{optimum_label} = {optimum:.6g}")
    for label, value in (extra_lines or {}).items():
        ax.axhline(value, color="tab:red", lw=1, ls="-.", label=f"{label} = {value:.6g}")
    ax.set_yscale("log")
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(x)
    ax.set_title(title)
    ax.legend(fontsize=8)
    if optimum:
        ax2 = axes[0, 1]
        gaps = [None if r.get("loss") is None else abs(r["loss"] - optimum) / optimum for r in rows]
        px, py = _finite_pos(xs, gaps, True)
        ax2.plot(px, py, "-", color="tab:purple")
        ax2.set_yscale("log")
        if logx:
            ax2.set_xscale("log")
        ax2.set_xlabel(x)
        ax2.set_title(f"|loss - {optimum_name}| / {optimum_name}")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_metric_curves(
    rows: Sequence[Mapping[str, Any]],
    path: str | Path,
    *,
    metrics: Sequence[str] = ("nc1", "nc2_orth", "nc3_span"),
    layer_keys: Sequence[str] | None = None,
    x: str = "step",
    logx: bool = True,
    title: str = "",
) -> Path:
    """One panel per metric, one line per layer, against ``x``; log y (and log x when possible).

    Columns are named ``<metric>_<layer>`` (e.g. ``nc1_l2``); ``layer_keys`` restricts and orders the
    layer suffixes, otherwise all suffixes found for the metric are drawn.
    """
    plt = _plt()
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.8 * len(metrics), 3.9), squeeze=False)
    xs = [r.get(x) for r in rows]
    use_logx = logx and all(v is not None and v > 0 for v in xs)
    cols = list(rows[0].keys()) if rows else []
    for r in rows[1:]:
        cols += [k for k in r if k not in cols]
    for ax, metric in zip(axes[0], metrics, strict=True):
        prefix = f"{metric}_"
        suffixes = [c[len(prefix) :] for c in cols if c.startswith(prefix)]
        if layer_keys is not None:
            suffixes = [s for s in layer_keys if s in suffixes]
        for sfx in suffixes:
            px, py = _finite_pos(xs, [r.get(prefix + sfx) for r in rows], True)
            if px:
                ax.plot(px, py, "-", label=sfx)
        ax.set_yscale("log")
        if use_logx:
            ax.set_xscale("log")
        ax.set_xlabel(x)
        ax.set_title(metric)
        if suffixes:
            ax.legend(fontsize=7, ncol=2)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_metrics_vs_depth(
    layers: Sequence[Mapping[str, Any]],
    path: str | Path,
    *,
    metrics: Sequence[str] = ("nc1", "nc2_etf", "nc2_orth", "nc3_span", "cdnv"),
    label: str = "name",
    title: str = "DNC metrics by layer",
) -> Path:
    """Each metric against layer depth (log y): one entry per layer, in order, named by ``label``."""
    plt = _plt()
    present = [m for m in metrics if any(isinstance(e.get(m), int | float) for e in layers)]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.6 * len(layers) + 3), 4))
    pos = list(range(len(layers)))
    for m in present:
        px, py = _finite_pos(pos, [e.get(m) for e in layers], True)
        ax.plot(px, py, "o-", label=m)
    ax.set_yscale("log")
    ax.set_xticks(pos)
    ax.set_xticklabels([str(e.get(label, i)) for i, e in enumerate(layers)], rotation=45, ha="right")
    ax.set_xlabel("layer")
    ax.set_title(title)
    if present:
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_metric_by_layer(
    rows: Sequence[Mapping[str, Any]],
    path: str | Path,
    *,
    metric: str,
    x: str,
    group: str,
    logx: bool = False,
    logy: bool = True,
    title: str = "",
    ylabel: str | None = None,
) -> Path:
    """Generic: ``metric`` against ``x``, one line per distinct value of ``group`` (e.g. layer or width)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    groups: dict[Any, list[Mapping[str, Any]]] = {}
    for r in rows:
        groups.setdefault(r.get(group), []).append(r)
    for g, rs in groups.items():
        rs = sorted(rs, key=lambda r: r.get(x) if r.get(x) is not None else 0)
        px, py = _finite_pos([r.get(x) for r in rs], [r.get(metric) for r in rs], logy)
        ax.plot(px, py, "o-", label=f"{group}={g}")
    if logy:
        ax.set_yscale("log")
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(x)
    ax.set_ylabel(ylabel or metric)
    if title:
        ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_epoch_metrics(
    rows: Sequence[Mapping[str, Any]],
    path: str | Path,
    *,
    metrics: Sequence[str],
    x: str = "epoch",
    title: str = "",
) -> Path:
    """Metrics over epochs: one panel per metric, one line per layer (colour), one style per split.

    Columns are named ``<split>/<layer>/<metric>`` (``train/fc/nc1``, as the epoch monitor writes them);
    solid lines are the first split found (``train``), dashed the others. A panel is log-scale when all of
    its values are positive.
    """
    plt = _plt()
    cols = [c for c in dict.fromkeys(k for r in rows for k in r) if c.count("/") >= 2]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.8 * len(metrics), 3.9), squeeze=False)
    xs = [r.get(x) for r in rows]
    splits = list(dict.fromkeys(c.split("/", 1)[0] for c in cols))
    for ax, metric in zip(axes[0], metrics, strict=True):
        mine = [c for c in cols if c.rsplit("/", 1)[1] == metric]
        layers = list(dict.fromkeys(c.split("/", 1)[1].rsplit("/", 1)[0] for c in mine))
        values = [r.get(c) for r in rows for c in mine]
        logy = all(not isinstance(v, int | float) or v > 0 for v in values)
        for i, layer in enumerate(layers):
            for col in (f"{s}/{layer}/{metric}" for s in splits):
                px, py = _finite_pos(xs, [r.get(col) for r in rows], logy)
                if px:
                    split = col.split("/", 1)[0]
                    style = "-" if split == splits[0] else "--"
                    ax.plot(px, py, style, marker=".", color=f"C{i % 10}", label=f"{layer} ({split})")
        if logy:
            ax.set_yscale("log")
        ax.set_xlabel(x)
        ax.set_title(metric)
        if layers:
            ax.legend(fontsize=7, ncol=1 + len(layers) // 6)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_spectra(analysis: Mapping[str, Any], path: str | Path, *, title: str | None = None) -> Path:
    """Normalized class-mean singular values per layer: before the ReLUs (left) and after them (right), from a
    record of :func:`deepcollapse.theory.analysis.analyze_solution` (its ``spectra``, ``rank_rtol``, ``verdict``,
    ``ratio_dnc``, ``ratio_srg``).

    The dotted line is ``rank_rtol``: the numerical rank counts the values above it.
    """
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
