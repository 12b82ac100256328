"""`deepcollapse sweep` and `deepcollapse lowrank ...`: thin wrappers over sweep/lowrank/experiments."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from deepcollapse._validate import DeepCollapseError
from deepcollapse.cli.common import console, handle_errors, parse_list, print_table

lowrank_app = typer.Typer(
    name="lowrank",
    help="The follow-up's low-rank experiments: SRG table, GD below L_DNC, rank vs weight decay, DNC vs width.",
    no_args_is_help=True,
)


def apply_overrides(spec: dict[str, Any], sets: list[str]) -> dict[str, Any]:
    """``--set fixed.max_steps=100 --set grid.seed=[0,1]``: dotted path = JSON value (plain text if not JSON)."""
    spec = json.loads(json.dumps(spec))
    for item in sets:
        path, sep, raw = item.partition("=")
        if not sep or not path:
            raise DeepCollapseError(f"--set needs PATH=VALUE (e.g. fixed.max_steps=100), got {item!r}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        node = spec
        parts = path.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise DeepCollapseError(f"--set {path}: {p} is not an object in the spec")
        node[parts[-1]] = value
    return spec


class _Bar:
    """A rich progress bar over configurations (or cells), fed by the runner's callbacks."""

    def __init__(self, progress: Progress, description: str) -> None:
        self.progress, self.description = progress, description
        self.task: Any = None

    def start(self, total: int, done: int) -> None:
        self.task = self.progress.add_task(self.description, total=total, completed=done)

    def row(self, row: dict[str, Any]) -> None:
        if self.task is not None:
            self.progress.advance(self.task)


@contextmanager
def progress_bar(description: str) -> Iterator[_Bar]:
    """A rich progress bar whose ``start(total, done)`` and ``row(row)`` are the runners' callbacks."""
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )
    with progress:
        yield _Bar(progress, description)


def _summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    counts = Counter(r.get("verdict") or "-" for r in rows)
    out = []
    for verdict, count in sorted(counts.items()):
        rs = [r for r in rows if (r.get("verdict") or "-") == verdict]
        ratios = [r["ratio_dnc"] for r in rs if isinstance(r.get("ratio_dnc"), float)]
        out.append(
            {
                "verdict": verdict,
                "runs": count,
                "min loss/L_DNC": min(ratios) if ratios else None,
                "max loss/L_DNC": max(ratios) if ratios else None,
            }
        )
    return out


@handle_errors
def sweep_cmd(
    spec: Annotated[str, typer.Argument(help="JSON spec file (or inline JSON): grid/random/fixed")],
    out: Annotated[Path, typer.Option("--out", "-o", help="directory for results.csv and sweep.json")] = Path(
        "runs/sweep"
    ),
    resume: Annotated[bool, typer.Option(help="skip configurations already in the table")] = False,
    overwrite: Annotated[bool, typer.Option(help="replace an existing table")] = False,
    backend: Annotated[str, typer.Option(help="local (batched, all cores) or ray")] = "local",
    ray_address: Annotated[
        str | None, typer.Option(help="Ray cluster host:port (default: start/attach locally)")
    ] = None,
    threads: Annotated[int | None, typer.Option(min=1, help="torch threads (default: all cores)")] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="override: PATH=JSON, e.g. fixed.max_steps=100")
    ] = None,
) -> None:
    """Train every configuration of SPEC, appending one row per configuration to OUT/results.csv."""
    from deepcollapse.experiments.sweep import load_spec, read_results, run_sweep

    if backend not in ("local", "ray"):
        raise DeepCollapseError(f"--backend must be local or ray, got {backend!r}")
    data = apply_overrides(load_spec(spec), set_ or [])
    with progress_bar("configurations") as bar:
        summary = run_sweep(
            data,
            out,
            resume=resume,
            overwrite=overwrite,
            backend=backend,
            ray_address=ray_address,
            threads=threads,
            on_row=bar.row,
            on_start=bar.start,
        )
    rows = read_results(out)
    print_table(
        f"sweep: {summary['total']} configurations, {summary['ran']} run, {summary['skipped']} resumed",
        _summarize(rows),
        ["verdict", "runs", "min loss/L_DNC", "max loss/L_DNC"],
    )
    console.print(f"results: {summary['out']}")


@handle_errors
def table_cmd(
    layers: Annotated[str, typer.Option(help="depths L, comma-separated")] = "3,4,5",
    r: Annotated[str, typer.Option("--r", help="graph orders r (K = r(r-1)/2), comma-separated")] = "4,5,6,7,8",
    n: Annotated[int, typer.Option(min=1, help="samples per class")] = 5,
    lam: Annotated[float, typer.Option("--lambda", min=0.0, help="all λ (λ_H1 = λ_Wl)")] = 0.004,
    out: Annotated[Path, typer.Option("--out", "-o")] = Path("runs/lowrank_table"),
) -> None:
    """L_SRG / L_DNC against r for each depth (the SRG construction, optimized over its scales)."""
    from deepcollapse.experiments.lowrank import srg_table_experiment

    ls, rs = parse_list("--layers", layers, int), parse_list("--r", r, int)
    ls, rs = ls if isinstance(ls, list) else [ls], rs if isinstance(rs, list) else [rs]
    if min(ls) < 2:
        raise DeepCollapseError(f"--layers must be >= 2 (the construction needs a ReLU), got {min(ls)}")
    if min(rs) < 3:
        raise DeepCollapseError(f"--r must be >= 3, got {min(rs)}")
    rows = srg_table_experiment(out, rs=rs, layers=ls, n=n, lam=lam)
    print_table(
        f"L_SRG / L_DNC (n = {n}, λ = {lam})",
        rows,
        ["L", "r", "K", "dnc_loss", "srg_loss", "ratio", "reference_ratio", "rank_pre", "rank_post"],
    )
    console.print(f"table and plot: {out}/srg_table.csv, {out}/srg_table.png")


@handle_errors
def gd_cmd(
    seeds: Annotated[int, typer.Option(min=1, help="number of seeds 0..S-1")] = 4,
    steps: Annotated[int, typer.Option(min=1, help="plain GD steps")] = 40000,
    classes: Annotated[int, typer.Option(min=2)] = 10,
    layers: Annotated[int, typer.Option(min=2)] = 4,
    width: Annotated[int, typer.Option(min=1)] = 30,
    n: Annotated[int, typer.Option(min=1)] = 5,
    lam: Annotated[float, typer.Option("--lambda", min=0.0)] = 0.004,
    lr: Annotated[float, typer.Option(min=0.0)] = 0.5,
    out: Annotated[Path, typer.Option("--out", "-o")] = Path("runs/lowrank_gd"),
    overwrite: Annotated[bool, typer.Option(help="replace a run already in --out")] = False,
) -> None:
    """GD on the follow-up's setting: loss against L_DNC and L_SRG, class-mean ranks per layer."""
    from deepcollapse.experiments.lowrank import gd_lowrank

    with console.status(f"training {seeds} DUFMs for {steps} GD steps (batched)"):
        rows = gd_lowrank(
            out,
            seeds=range(seeds),
            steps=steps,
            num_classes=classes,
            num_layers=layers,
            width=width,
            n=n,
            lam=lam,
            lr=lr,
            overwrite=overwrite,
        )
    print_table(
        f"plain GD, K={classes}, L={layers}, width {width}, λ={lam}, lr {lr}, {steps} steps",
        rows,
        ["seed", "loss", "ratio_dnc", "ratio_srg", "ranks_pre", "ranks_post", "verdict"],
    )
    console.print(f"results: {out}/gd_lowrank.csv, {out}/summary.json, {out}/gd_lowrank.png")


def _sweep_experiment(
    fn: Any, out: Path, resume: bool, overwrite: bool, title: str, columns: list[str], **kw: Any
) -> None:
    with progress_bar("configurations") as bar:
        rows = fn(out, resume=resume, overwrite=overwrite, on_row=bar.row, on_start=bar.start, **kw)
    print_table(title, rows, columns)
    console.print(f"results: {out}")


@handle_errors
def rank_wd_cmd(
    lambdas: Annotated[
        str, typer.Option(help="weight decays, comma-separated")
    ] = "0.001,0.002,0.003,0.004,0.005,0.006",
    seeds: Annotated[int, typer.Option(min=1)] = 4,
    steps: Annotated[int, typer.Option(min=1)] = 20000,
    width: Annotated[int, typer.Option(min=1)] = 30,
    out: Annotated[Path, typer.Option("--out", "-o")] = Path("runs/rank_vs_wd"),
    resume: Annotated[bool, typer.Option(help="continue a killed run")] = False,
    overwrite: Annotated[bool, typer.Option(help="replace a run already in --out")] = False,
) -> None:
    """Average rank of the class means before the last ReLU against the weight decay (K=10, L=4)."""
    from deepcollapse.experiments.lowrank import rank_vs_wd

    lams = parse_list("--lambdas", lambdas, float)
    _sweep_experiment(
        rank_vs_wd,
        out,
        resume,
        overwrite,
        "rank before the last ReLU vs weight decay",
        ["lambda", "runs", "mean_rank", "std_rank", "mean_ratio_dnc", "dnc_fraction"],
        lambdas=lams if isinstance(lams, list) else [lams],
        seeds=list(range(seeds)),
        steps=steps,
        width=width,
    )


@handle_errors
def dnc_width_cmd(
    widths: Annotated[str, typer.Option(help="widths, comma-separated")] = "10,20,30,60,120",
    seeds: Annotated[int, typer.Option(min=1)] = 6,
    steps: Annotated[int, typer.Option(min=1)] = 30000,
    lam: Annotated[float, typer.Option("--lambda", min=0.0)] = 0.004,
    out: Annotated[Path, typer.Option("--out", "-o")] = Path("runs/dnc_vs_width"),
    resume: Annotated[bool, typer.Option(help="continue a killed run")] = False,
    overwrite: Annotated[bool, typer.Option(help="replace a run already in --out")] = False,
) -> None:
    """The fraction of seeds whose GD solution is DNC against the width (K=10, L=4)."""
    from deepcollapse.experiments.lowrank import dnc_vs_width

    ws = parse_list("--widths", widths, int)
    _sweep_experiment(
        dnc_vs_width,
        out,
        resume,
        overwrite,
        "DNC found by GD vs width",
        ["width", "runs", "diverged", "dnc_fraction", "low_rank_fraction", "mean_ratio_dnc", "min_ratio_dnc"],
        widths=ws if isinstance(ws, list) else [ws],
        seeds=list(range(seeds)),
        steps=steps,
        lam=lam,
    )


def register(app: typer.Typer) -> None:
    """Add ``sweep`` and the ``lowrank`` sub-app to ``app``."""
    app.command("sweep")(sweep_cmd)
    commands = {"table": table_cmd, "gd": gd_cmd, "rank-vs-wd": rank_wd_cmd, "dnc-vs-width": dnc_width_cmd}
    for name, fn in commands.items():
        lowrank_app.command(name)(fn)
    app.add_typer(lowrank_app, name="lowrank")
