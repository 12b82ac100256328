"""The follow-up's experiments (docs/lowrank.md), CPU-sized by default, one function each.

- :func:`srg_table_experiment`: ``L_SRG / L_DNC`` against r for several depths (theory, no training).
- :func:`gd_lowrank`: plain GD on K = 10, L = 4, λ = 0.004, width 30 from several seeds; loss against
  ``L_DNC`` and ``L_SRG``, class-mean ranks per layer, spectra.
- :func:`rank_vs_wd`: average rank of the class means before the last ReLU against the weight decay.
- :func:`dnc_vs_width`: the fraction of seeds whose solution is DNC against the width.

The last two are sweeps (:mod:`deepcollapse.experiments.sweep`), so they are resumable; every function writes its
table and a PNG into ``out`` and returns the rows.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from deepcollapse.dufm.batched import GDOptions, train_batched
from deepcollapse.dufm.model import DUFMConfig
from deepcollapse.experiments.sweep import read_results, run_sweep
from deepcollapse.files import prepare_out_dir, write_csv, write_json
from deepcollapse.plots import plot_spectra
from deepcollapse.theory.analysis import analyze_solution
from deepcollapse.theory.lowrank import srg_table

__all__ = ["dnc_vs_width", "gd_lowrank", "rank_vs_wd", "srg_table_experiment"]


def _plt():
    from deepcollapse.plots import _plt as plt

    return plt()


def srg_table_experiment(
    out: str | Path,
    *,
    rs: Sequence[int] = (4, 5, 6, 7, 8),
    layers: Sequence[int] = (3, 4, 5),
    n: int = 5,
    lam: float = 0.004,
) -> list[dict[str, Any]]:
    """``srg_table`` written to ``out/srg_table.csv`` and plotted (``L_SRG/L_DNC`` against r, one line per L)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = srg_table(rs=rs, layers=layers, n=n, lambda_h=lam, lambda_w=lam)
    write_csv(out / "srg_table.csv", rows)
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.2, 3.8))
    for L in layers:
        rs_l = [r for r in rows if r["L"] == L]
        ax.plot([r["r"] for r in rs_l], [r["ratio"] for r in rs_l], "o-", label=f"L = {L}")
    ax.axhline(1.0, color="k", lw=1, ls=":")
    ax.set_xlabel("r  (K = r(r-1)/2)")
    ax.set_ylabel("L_SRG / L_DNC")
    ax.set_title(f"SRG vs DNC, n = {n}, λ = {lam}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "srg_table.png", dpi=90)
    plt.close(fig)
    return rows


def gd_lowrank(
    out: str | Path,
    *,
    seeds: Sequence[int] = (0, 1, 2, 3),
    steps: int = 40000,
    num_classes: int = 10,
    num_layers: int = 4,
    width: int = 30,
    n: int = 5,
    lam: float = 0.004,
    lr: float = 0.5,
    overwrite: bool = False,
) -> list[dict[str, Any]]:
    """Plain GD from every seed (trained as one batch); one row per seed, ``summary.json`` with analyses.

    Row keys: ``seed, loss, ratio_dnc, ratio_srg, ranks_pre, ranks_post, verdict, steps``. An ``out``
    that already holds a run is refused unless ``overwrite``.
    """
    out = prepare_out_dir(out, overwrite=overwrite)
    configs = [
        DUFMConfig(
            num_classes=num_classes,
            n_per_class=n,
            num_layers=num_layers,
            width=width,
            lambda_h=lam,
            lambda_w=lam,
            seed=s,
        )
        for s in seeds
    ]
    results = train_batched(configs, GDOptions(lr=lr, max_steps=steps, tol_grad=0.0, tol_rel=0.0))
    rows, analyses = [], []
    for res in results:
        a = analyze_solution(res.h1, res.weights, res.config)
        analyses.append({"seed": res.config.seed, **a})
        rows.append(
            {
                "seed": res.config.seed,
                "loss": a["loss"],
                "ratio_dnc": a["ratio_dnc"],
                "ratio_srg": a["ratio_srg"],
                "ranks_pre": a["ranks_pre"],
                "ranks_post": a["ranks_post"],
                "verdict": a["verdict"],
                "steps": res.steps,
            }
        )
    write_csv(out / "gd_lowrank.csv", rows)
    write_json(out / "summary.json", {"config": configs[0].to_dict(), "lr": lr, "steps": steps, "runs": analyses})
    best = min(range(len(rows)), key=lambda i: rows[i]["loss"])
    plot_spectra(analyses[best], out / "gd_lowrank_spectra.png", title=None)
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.2, 3.8))
    for a in analyses:
        sv = [
            max(v, 1e-17)
            for v in next(e for e in a["spectra"] if e["stage"] == "pre" and e["layer"] == num_layers)[
                "singular_values"
            ]
        ]
        ax.plot(range(1, len(sv) + 1), sv, "o-", ms=3, label=f"seed {a['seed']}: {a['ratio_dnc']:.3f} L_DNC")
    ax.axhline(1e-3, color="k", ls=":", lw=1)
    ax.set_yscale("log")
    ax.set_xlabel("index")
    ax.set_ylabel("σ_i / σ_1")
    ax.set_title(f"class means before the last ReLU (K={num_classes}, L={num_layers}, λ={lam})", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "gd_lowrank.png", dpi=90)
    plt.close(fig)
    return rows


def _gd_spec(grid: dict[str, Any], fixed: dict[str, Any], steps: int) -> dict[str, Any]:
    """A sweep spec of plain GD runs for exactly ``steps`` steps (no early stop), as the follow-up trains."""
    return {"grid": grid, "fixed": {**fixed, "max_steps": steps, "tol_grad": 0.0, "tol_rel": 0.0}}


def _sweep(
    out: Path,
    spec: dict[str, Any],
    resume: bool,
    on_row: Callable | None,
    on_start: Callable | None,
    overwrite: bool = False,
) -> list:
    run_sweep(spec, out, resume=resume, overwrite=overwrite, on_row=on_row, on_start=on_start)
    return read_results(out)


def _by(rows: Sequence[dict[str, Any]], key: str) -> dict[Any, list[dict[str, Any]]]:
    groups: dict[Any, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(r[key], []).append(r)
    return dict(sorted(groups.items()))


def _line_plot(
    path: Path, xs: list, ys: list, errs: list | None, *, xlabel: str, ylabel: str, title: str, logx: bool
) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.2, 3.8))
    ax.errorbar(xs, ys, yerr=errs, fmt="o-", capsize=3)
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def rank_vs_wd(
    out: str | Path,
    *,
    lambdas: Sequence[float] = (0.001, 0.002, 0.003, 0.004, 0.005, 0.006),
    seeds: Sequence[int] = (0, 1, 2, 3),
    steps: int = 20000,
    num_classes: int = 10,
    num_layers: int = 4,
    width: int = 30,
    n: int = 5,
    lr: float = 0.5,
    resume: bool = False,
    overwrite: bool = False,
    on_row: Callable | None = None,
    on_start: Callable | None = None,
) -> list[dict[str, Any]]:
    """Mean (and std over seeds) rank of the class means before the last ReLU against λ (all λ equal)."""
    out = Path(out)
    grid = {"lambda": list(lambdas), "seed": list(seeds)}
    fixed = {"num_classes": num_classes, "num_layers": num_layers, "width": width, "n_per_class": n, "lr": lr}
    rows = _sweep(out, _gd_spec(grid, fixed, steps), resume, on_row, on_start, overwrite)
    summary = []
    for lam, rs in _by(rows, "lambda_h").items():
        ranks = [r["rank_pre_last"] for r in rs if r.get("rank_pre_last") is not None]
        ratios = [r["ratio_dnc"] for r in rs if r.get("ratio_dnc") is not None]
        summary.append(
            {
                "lambda": lam,
                "runs": len(rs),
                "mean_rank": statistics.fmean(ranks) if ranks else math.nan,
                "std_rank": statistics.pstdev(ranks) if ranks else math.nan,
                "mean_ratio_dnc": statistics.fmean(ratios) if ratios else math.nan,
                "dnc_fraction": sum(r.get("verdict") == "dnc" for r in rs) / len(rs),
            }
        )
    write_csv(out / "rank_vs_wd.csv", summary)
    _line_plot(
        out / "rank_vs_wd.png",
        [s["lambda"] for s in summary],
        [s["mean_rank"] for s in summary],
        [s["std_rank"] for s in summary],
        xlabel="weight decay λ",
        ylabel="rank before the last ReLU",
        title=f"K={num_classes}, L={num_layers}, width {width}, {len(seeds)} seeds",
        logx=True,
    )
    return summary


def dnc_vs_width(
    out: str | Path,
    *,
    widths: Sequence[int] = (10, 20, 30, 60, 120),
    seeds: Sequence[int] = tuple(range(6)),
    steps: int = 30000,
    num_classes: int = 10,
    num_layers: int = 4,
    n: int = 5,
    lam: float = 0.004,
    lr: float = 0.5,
    resume: bool = False,
    overwrite: bool = False,
    on_row: Callable | None = None,
    on_start: Callable | None = None,
) -> list[dict[str, Any]]:
    """The fraction of seeds that reach DNC (verdict ``"dnc"``) against the width (diverged runs count as not)."""
    out = Path(out)
    grid = {"width": list(widths), "seed": list(seeds)}
    fixed = {"num_classes": num_classes, "num_layers": num_layers, "lambda": lam, "n_per_class": n, "lr": lr}
    rows = _sweep(out, _gd_spec(grid, fixed, steps), resume, on_row, on_start, overwrite)
    summary = []
    for w, rs in _by(rows, "width").items():
        ratios = [r["ratio_dnc"] for r in rs if r.get("ratio_dnc") is not None]
        summary.append(
            {
                "width": w,
                "runs": len(rs),
                "diverged": sum(r.get("stop_reason") == "diverged" for r in rs),
                "dnc_fraction": sum(r.get("verdict") == "dnc" for r in rs) / len(rs),
                "low_rank_fraction": sum(r.get("verdict") == "low-rank" for r in rs) / len(rs),
                "mean_ratio_dnc": statistics.fmean(ratios) if ratios else math.nan,
                "min_ratio_dnc": min(ratios) if ratios else math.nan,
            }
        )
    write_csv(out / "dnc_vs_width.csv", summary)
    _line_plot(
        out / "dnc_vs_width.png",
        [s["width"] for s in summary],
        [s["dnc_fraction"] for s in summary],
        None,
        xlabel="width",
        ylabel="fraction of seeds reaching DNC",
        title=f"K={num_classes}, L={num_layers}, λ={lam}, {len(seeds)} seeds, {steps} GD steps",
        logx=True,
    )
    return summary
