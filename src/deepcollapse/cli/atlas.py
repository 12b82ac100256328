"""`deepcollapse atlas`: a thin wrapper over :func:`deepcollapse.experiments.atlas.run_atlas`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from deepcollapse.cli.common import console, handle_errors, parse_list, print_table
from deepcollapse.cli.sweep import progress_bar
from deepcollapse.experiments.atlas import AtlasOptions

DEFAULTS = AtlasOptions()

COLUMNS = ["num_classes", "num_layers", "lambda", "dnc_loss", "srg_loss", "best_loss", "ratio_dnc", "best_source",
           "rank_pre_last", "verdict"]  # fmt: skip


def _ints(name: str, text: str) -> list:
    v = parse_list(name, text, int)
    return v if isinstance(v, list) else [v]


def _floats(name: str, text: str) -> list:
    v = parse_list(name, text, float)
    return v if isinstance(v, list) else [v]


@handle_errors
def atlas_cmd(
    classes: Annotated[str, typer.Option("--classes", help="K values, comma-separated (each >= 2)")] = "2,3,4,6,10",
    layers: Annotated[str, typer.Option("--layers", help="L values, comma-separated (each >= 1)")] = "2,3,4,5",
    lambdas: Annotated[str, typer.Option("--lambda", help="λ values (all λ equal), comma-separated")] = "0.001,0.004",
    n_per_class: Annotated[int, typer.Option("--n-per-class", help="samples per class n")] = DEFAULTS.n_per_class,
    width: Annotated[int | None, typer.Option("--width", help="every width d_l (default 3K)")] = None,
    random: Annotated[int, typer.Option("--random", help="random starts per cell")] = DEFAULTS.random,
    low_rank: Annotated[int, typer.Option("--low-rank", help="low-rank starts per cell")] = DEFAULTS.low_rank,
    adam_steps: Annotated[int, typer.Option("--adam-steps", help="Adam steps of every start")] = DEFAULTS.adam_steps,
    seed: Annotated[int, typer.Option("--seed")] = DEFAULTS.seed,
    out: Annotated[Path, typer.Option("--out", "-o", help="directory for atlas.csv and atlas.png")] = Path(
        "runs/atlas"
    ),
    resume: Annotated[bool, typer.Option(help="skip cells already in the table")] = False,
    overwrite: Annotated[bool, typer.Option(help="replace an existing table")] = False,
    backend: Annotated[str, typer.Option(help="local or ray")] = "local",
    ray_address: Annotated[str | None, typer.Option(help="Ray cluster host:port")] = None,
    threads: Annotated[
        int | None, typer.Option(min=1, help="torch threads with --workers 1 (default: all cores)")
    ] = None,
    workers: Annotated[
        int | None, typer.Option(min=1, help="processes, one (K, L) group each (default: one per core)")
    ] = None,
) -> None:
    """Is DNC the best solution found? L_DNC, L_SRG and a multi-start search for every (K, L, λ) cell."""
    from deepcollapse.experiments.atlas import read_atlas, run_atlas

    options = AtlasOptions(n_per_class=n_per_class, width=width, random=random, low_rank=low_rank,
                           adam_steps=adam_steps, seed=seed)  # fmt: skip
    ks, ls, lams = _ints("--classes", classes), _ints("--layers", layers), _floats("--lambda", lambdas)
    with progress_bar("cells") as bar:
        summary = run_atlas(ks, ls, lams, out, options=options, resume=resume, overwrite=overwrite, backend=backend,
                            ray_address=ray_address, threads=threads, workers=workers, on_row=bar.row,
                            on_start=bar.start)  # fmt: skip
    print_table(
        f"atlas: {summary['total']} cells, {summary['ran']} run, {summary['skipped']} resumed",
        read_atlas(out),
        COLUMNS,
    )
    console.print(f"table and phase diagram: {out}/atlas.csv, {out}/atlas.png")


def register(app: typer.Typer) -> None:
    """Add ``atlas`` to ``app``."""
    app.command("atlas")(atlas_cmd)
