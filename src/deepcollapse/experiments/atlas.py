r"""The DNC-optimality atlas: for every cell (K, L, λ) of a grid, is deep neural collapse the best solution found?

For each cell (balanced classes, ``n`` per class, every width ``d``, all λ's equal):

- ``dnc_loss``: ``L_DNC``, the closed form of the DNC family (:func:`deepcollapse.theory.dnc_loss`);
- ``srg_loss``: ``L_SRG``, the low-rank SRG construction optimized over its scales, where ``K = C(r, 2)``
  and ``L >= 2`` (:func:`deepcollapse.theory.lowrank.srg_solution`), else empty;
- ``best_loss``: the lowest DUFM loss of a search (:mod:`deepcollapse.dufm.multistart`): random and
  low-rank starts, the DNC optimum, the SRG point (``K = C(r, 2)``) or an SRG-like point (``K`` of the
  ``C(r, 2)`` classes of the next SRG, for other ``K >= 3``), then continuation along the grid's λ's.
  ``best_source`` names the start that won. Every best point is an explicit DUFM point (its loss is the
  DUFM objective there), so ``best_loss`` is an upper bound on the DUFM optimum of the cell;
- the record of :func:`deepcollapse.theory.analysis.analyze_solution` at the best point: ``verdict``,
  ranks (``rank_pre_last``: the class means before the last ReLU), the relative gradient norm.

For ``K = 2`` the DNC optimum is proven global (any L), so ``best_loss < L_DNC`` there would be a bug: the
row then gets ``theorem_violation`` true and the run ends with an error after writing it.

Rows are appended to ``DIR/atlas.csv`` (fsynced) as each (K, L) group finishes; ``DIR/atlas.json`` keeps
the search options; ``DIR/points/<key>.pt`` holds each cell's best point (``torch.load`` gives ``{"h1",
"weights", "config"}``), so every reported loss can be recomputed from explicit parameters.
``resume=True`` skips the cells already in the table (a torn last line, from a crash in the middle of a
write, is dropped with a warning and its cell rerun).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from deepcollapse._validate import DeepCollapseError, check_positive_int, check_real
from deepcollapse.dufm.model import DUFMConfig, labels_from_counts
from deepcollapse.dufm.multistart import SearchOptions, SearchResult, Start, continuation, multistart
from deepcollapse.files import append_csv_rows, prepare_out_dir, read_csv, read_json, save_torch, write_json

__all__ = ["ATLAS_COLUMNS", "AtlasOptions", "atlas_cells", "plot_atlas", "read_atlas", "run_atlas", "search_group"]

TABLE, META, POINTS = "atlas.csv", "atlas.json", "points"
ATLAS_COLUMNS = (
    "key",
    "num_classes",
    "num_layers",
    "lambda",
    "n_per_class",
    "width",
    "dnc_loss",
    "srg_loss",
    "best_loss",
    "ratio_dnc",
    "ratio_srg",
    "best_source",
    "rank_pre_last",
    "ranks_pre",
    "ranks_post",
    "verdict",
    "stop_reason",
    "rel_grad_norm",
    "theorem_violation",
    "starts",
    "seconds",
)


@dataclass(frozen=True)
class AtlasOptions:
    """The cell shape and the search budget (``width=None``: ``3K``, the follow-up's 30 for K = 10)."""

    n_per_class: int = 5
    width: int | None = None
    random: int = 6  # random starts per cell
    low_rank: int = 6  # low-rank starts per cell
    adam_steps: int = SearchOptions.adam_steps  # Adam steps of every start before the L-BFGS polish
    seed: int = 0

    def width_for(self, num_classes: int) -> int:
        return 3 * num_classes if self.width is None else self.width

    def search(self) -> SearchOptions:
        return SearchOptions(adam_steps=self.adam_steps)


def atlas_cells(
    classes: Sequence[int], layers: Sequence[int], lambdas: Sequence[float], options: AtlasOptions
) -> list[dict[str, Any]]:
    """Every cell ``{num_classes, num_layers, lambda, n_per_class, width, key}``, checked before anything runs.

    Raises :class:`DeepCollapseError` for ``K < 2``, ``L < 1``, ``λ <= 0``, a width below K, or an empty list.
    """
    for name, values in (("classes", classes), ("layers", layers), ("lambdas", lambdas)):
        if not values:
            raise DeepCollapseError(f"{name} is empty")
    ks = [check_positive_int("classes", k, minimum=2) for k in classes]
    ls = [check_positive_int("layers", v, minimum=1) for v in layers]
    lams = [check_real("lambdas", v, low=0.0, low_inclusive=False) for v in lambdas]
    n = check_positive_int("n_per_class", options.n_per_class)
    for name in ("random", "low_rank", "seed"):
        check_positive_int(name, getattr(options, name), minimum=0)
    check_positive_int("adam_steps", options.adam_steps, minimum=0)
    if options.width is not None:
        check_positive_int("width", options.width)
        if options.width < max(ks):
            raise DeepCollapseError(f"width {options.width} is below the number of classes K = {max(ks)}")
    cells = []
    for k in sorted(set(ks)):
        for L in sorted(set(ls)):
            for lam in sorted(set(lams)):
                cell = {"num_classes": k, "num_layers": L, "lambda": lam, "n_per_class": n,
                        "width": options.width_for(k)}  # fmt: skip
                cells.append({**cell, "key": _key(cell, options)})
    return cells


def _key(cell: dict[str, Any], options: AtlasOptions) -> str:
    text = json.dumps({**cell, **asdict(options)}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _config(cell: dict[str, Any]) -> DUFMConfig:
    lam = cell["lambda"]
    return DUFMConfig(num_classes=cell["num_classes"], n_per_class=cell["n_per_class"], num_layers=cell["num_layers"],
                      width=cell["width"], lambda_h=lam, lambda_w=lam)  # fmt: skip


def _means_start(source: str, h1: torch.Tensor, weights: Sequence[torch.Tensor], config: DUFMConfig) -> Start:
    """A start from full DUFM parameters whose samples equal their class means: keep one column per class."""
    first = torch.searchsorted(labels_from_counts(config.counts), torch.arange(config.num_classes))
    return Start(source, h1[:, first].to(torch.float64), tuple(w.to(torch.float64) for w in weights), polish_only=True)


def _theory_starts(config: DUFMConfig) -> list[Start]:
    """The DNC optimum, and the SRG point (K = C(r, 2)) or an SRG-like point (other K >= 3), when L >= 2."""
    from deepcollapse.theory.closed_form import optimal_parameters
    from deepcollapse.theory.lowrank import srg_parameters, srg_solution

    h1, ws = optimal_parameters(config)
    starts = [_means_start("dnc", h1, ws, config)]
    K, L = config.num_classes, config.num_layers
    if L < 2 or K < 3:
        return starts
    r = 3
    while r * (r - 1) // 2 < K:
        r += 1
    kp = r * (r - 1) // 2
    if min(config.widths[:-1], default=r) < r:
        return starts
    lam = config.lambda_h
    theta = srg_solution(r=r, num_layers=L, n=config.n, lambda_h=lam, lambda_w=config.lambdas_w).theta
    big = DUFMConfig(num_classes=kp, n_per_class=1, num_layers=L, width=[*config.widths[:-1], kp], lambda_h=lam,
                     lambda_w=config.lambdas_w)  # fmt: skip
    m1, ws = srg_parameters(big, theta)
    keep = torch.arange(K)  # K = C(r, 2): every class; else the first K edges of the complete graph
    last_in = torch.zeros(config.widths[-1], ws[-2].shape[1], dtype=torch.float64)
    last_in[:K] = ws[-2][keep]
    last = torch.zeros(K, config.widths[-1], dtype=torch.float64)
    last[:, :K] = ws[-1][keep][:, keep]
    source = "srg" if kp == K else f"srg-like(r={r})"
    return [*starts, Start(source, m1[:, keep], (*ws[:-2], last_in, last), polish_only=kp == K)]


def search_group(cells: Sequence[dict[str, Any]], options: AtlasOptions) -> list[SearchResult]:
    """The search for cells that share K, L, n and the width (any λ's), in one batch, then continuation."""
    configs = [_config(c) for c in cells]
    extra = [_theory_starts(c) for c in configs]
    opts = options.search()
    res = multistart(configs, random=options.random, low_rank=options.low_rank, extra=extra, seed=options.seed,
                     options=opts)  # fmt: skip
    return continuation(res, options=opts) if len(res) > 1 else res


def _row(cell: dict[str, Any], res: SearchResult, seconds: float) -> dict[str, Any]:
    from deepcollapse.theory.analysis import analyze_solution
    from deepcollapse.theory.lowrank import srg_loss

    cfg = res.config
    rec = analyze_solution(res.h1, res.weights, cfg, srg=False)
    kw = {"num_layers": cfg.num_layers, "n": cfg.n, "lambda_h": cfg.lambda_h, "lambda_w": cfg.lambdas_w}
    s_loss = srg_loss(num_classes=cfg.num_classes, **kw)
    d_loss = rec["dnc_loss"]
    return {
        **cell,
        "dnc_loss": d_loss,
        "srg_loss": s_loss,
        "best_loss": rec["loss"],
        "ratio_dnc": rec["loss"] / d_loss if d_loss else None,
        "ratio_srg": rec["loss"] / s_loss if s_loss else None,
        "best_source": res.source,
        "rank_pre_last": rec.get("rank_pre_last"),
        "ranks_pre": rec.get("ranks_pre"),
        "ranks_post": rec.get("ranks_post"),
        "verdict": rec["verdict"],
        "stop_reason": res.stop_reason,
        "rel_grad_norm": rec.get("rel_grad_norm"),
        "theorem_violation": cfg.num_classes == 2 and rec["loss"] < d_loss * (1 - 1e-9),
        "starts": len(res.starts),
        "seconds": round(seconds, 2),
        "_point": {"h1": res.h1, "weights": res.weights, "config": cfg.to_dict()},  # saved, not a column
    }


def _group_rows(cells: list[dict[str, Any]], options: AtlasOptions, threads: int | None = None) -> list[dict]:
    if threads:
        torch.set_num_threads(threads)
    start = time.perf_counter()
    results = search_group(cells, options)
    per = (time.perf_counter() - start) / len(cells)
    return [_row(c, r, per) for c, r in zip(cells, results, strict=True)]


def _run_local(
    groups: list[list[dict[str, Any]]],
    options: AtlasOptions,
    save: Callable[[list[dict]], None],
    workers: int | None,
    threads: int | None,
) -> None:
    """Each group's rows to ``save`` as it finishes: here (one worker) or in a process pool (spawned)."""
    workers = min(len(groups), workers or os.cpu_count() or 1)
    if workers <= 1:
        old = torch.get_num_threads()
        torch.set_num_threads(threads or os.cpu_count() or 1)
        try:
            for group in groups:
                save(_group_rows(group, options))
        finally:
            torch.set_num_threads(old)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(_group_rows, g, options, 1) for g in groups]
        try:
            for fut in as_completed(futures):
                save(fut.result())
        except BaseException:
            for fut in futures:
                fut.cancel()
            raise


def _groups(cells: Sequence[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for c in cells:
        groups.setdefault((c["num_classes"], c["num_layers"]), []).append(c)
    return list(groups.values())


def _finished(out: Path, digest: str) -> set[str]:
    """Keys of the cells already in ``out/atlas.csv`` (after dropping a torn last line)."""
    from deepcollapse.experiments.sweep import repair_table

    if not (out / TABLE).exists():
        return set()
    meta = read_json(out / META) if (out / META).exists() else {}
    if meta.get("hash") != digest:
        raise DeepCollapseError(f"{out / TABLE} was written for other search options; use another out or overwrite")
    repair_table(out / TABLE)
    return {str(r["key"]) for r in read_csv(out / TABLE)}


def run_atlas(
    classes: Sequence[int],
    layers: Sequence[int],
    lambdas: Sequence[float],
    out: str | Path,
    *,
    options: AtlasOptions | None = None,
    resume: bool = False,
    overwrite: bool = False,
    backend: str = "local",
    ray_address: str | None = None,
    threads: int | None = None,
    workers: int | None = None,
    on_row: Callable[[dict[str, Any]], None] | None = None,
    on_start: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Search every cell of the grid not yet in ``out/atlas.csv``; write the table and the phase diagram.

    The local backend searches the (K, L) groups in ``workers`` processes (default: one per core, at most
    one per group), each on one thread; ``workers=1`` searches them here, on ``threads`` threads. Ray
    sends one task per group.

    Returns ``{"out", "total", "ran", "skipped", "seconds", "violations"}``. Raises after writing when a
    K = 2 cell went below ``L_DNC`` (a bug: the theorem forbids it).
    """
    if backend not in ("local", "ray"):
        raise DeepCollapseError(f"backend must be 'local' or 'ray', got {backend!r}")
    options = options or AtlasOptions()
    cells = atlas_cells(classes, layers, lambdas, options)
    digest = hashlib.sha256(json.dumps(asdict(options), sort_keys=True).encode()).hexdigest()[:16]
    out = Path(out)
    prepare_out_dir(out, overwrite=overwrite, resume=resume)
    if overwrite and not resume:
        for name in (TABLE, META):
            (out / name).unlink(missing_ok=True)
    done = _finished(out, digest) if resume else set()
    write_json(out / META, {"options": asdict(options), "hash": digest, "columns": list(ATLAS_COLUMNS)})
    todo = [c for c in cells if c["key"] not in done]
    if on_start is not None:
        on_start(len(cells), len(cells) - len(todo))
    start = time.perf_counter()
    violations = []

    def save(rows: list[dict[str, Any]]) -> None:
        for row in rows:
            save_torch(out / POINTS / f"{row['key']}.pt", row.pop("_point"))
        append_csv_rows(out / TABLE, rows, ATLAS_COLUMNS)
        for row in rows:
            if row["theorem_violation"]:
                violations.append(row)
            if on_row is not None:
                on_row(row)

    if todo and backend == "local":
        _run_local(_groups(todo), options, save, workers, threads)
    elif todo:
        from deepcollapse.experiments.sweep import _connect_ray

        ray = _connect_ray(ray_address)
        task = ray.remote(num_cpus=1)(_group_rows)
        refs = [task.remote(g, options, threads or 1) for g in _groups(todo)]
        while refs:
            ready, refs = ray.wait(refs, num_returns=1)
            save(ray.get(ready[0]))
    rows = read_atlas(out)
    plot_atlas(rows, out / "atlas.png")
    summary = {"out": str(out / TABLE), "total": len(cells), "ran": len(todo), "skipped": len(cells) - len(todo),
               "seconds": time.perf_counter() - start, "violations": len(violations)}  # fmt: skip
    if violations:
        v = violations[0]
        raise DeepCollapseError(
            f"K = 2, L = {v['num_layers']}, λ = {v['lambda']}: best loss {v['best_loss']!r} is below L_DNC "
            f"{v['dnc_loss']!r}, which the theorem forbids (a bug; see {out / TABLE})"
        )
    return summary


def read_atlas(out: str | Path) -> list[dict[str, Any]]:
    """The rows of ``out/atlas.csv`` sorted by (K, L, λ)."""
    path = Path(out)
    rows = read_csv(path / TABLE if path.is_dir() else path)
    return sorted(rows, key=lambda r: (r["num_classes"], r["num_layers"], r["lambda"]))


def plot_atlas(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """The phase diagram: ``best_loss / L_DNC`` over L (x) and λ (y), one panel per K; cells below 1 are
    where the search found a solution better than DNC (value printed in each cell)."""
    from deepcollapse.plots import _plt

    plt = _plt()
    ks = sorted({r["num_classes"] for r in rows})
    fig, axes = plt.subplots(
        1, max(1, len(ks)), figsize=(2.2 + 2.6 * max(1, len(ks)), 3.4), squeeze=False, constrained_layout=True
    )
    for ax, k in zip(axes[0], ks, strict=False):
        sub = [r for r in rows if r["num_classes"] == k]
        ls = sorted({r["num_layers"] for r in sub})
        lams = sorted({r["lambda"] for r in sub})
        grid = [[math.nan] * len(ls) for _ in lams]
        for r in sub:
            ratio = r.get("ratio_dnc")
            grid[lams.index(r["lambda"])][ls.index(r["num_layers"])] = ratio if isinstance(ratio, float) else math.nan
        im = ax.imshow(grid, origin="lower", cmap="RdBu", vmin=0.7, vmax=1.3, aspect="auto")
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                if math.isfinite(v):
                    ax.text(j, i, f"{v:.3f}", ha="center", va="center", fontsize=7)
        ax.set_xticks(range(len(ls)), [str(v) for v in ls])
        ax.set_yticks(range(len(lams)), [f"{v:g}" for v in lams])
        ax.set_xlabel("L")
        if ax is axes[0][0]:
            ax.set_ylabel("λ")
        ax.set_title(f"K = {k}: best / L_DNC", fontsize=9)
    fig.colorbar(im, ax=list(axes[0]), shrink=0.8, label="best / L_DNC")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
