"""`deepcollapse measure`: DNC metrics per layer of saved features, streamed from disk in chunks.

Inputs are read by :mod:`deepcollapse.measure.readers` (``.npz`` with ``features``/``layer_<name>``, ``labels``
and optionally the classifier ``weight``/``bias``; a directory of ``.npy``; one ``.npy`` with ``--labels``).
Everything is checked before the output directory is created, so a bad input leaves no files behind.

Writes ``metrics.json`` (metadata, options and each layer's metrics), ``per_class.csv`` (one row per layer
and class) and ``metrics_vs_depth.png``; see docs/outputs.md.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

import typer

from deepcollapse._validate import DeepCollapseError
from deepcollapse.cli.common import console, handle_errors, print_table, resolve_device
from deepcollapse.files import check_out_dir, prepare_out_dir, write_csv, write_json
from deepcollapse.measure.readers import Measurement, MeasureOptions, load_inputs, measure_saved
from deepcollapse.plots import plot_metrics_vs_depth

DEFAULTS = MeasureOptions()
# metrics shown in the table and the plot, in this order, when a layer has them
TABLE_METRICS = (
    "nc1",
    "nc2_etf",
    "nc3_duality",
    "nc3_duality_uncentred",
    "nc3_zhu",
    "nc4",
    "ncc_accuracy",
    "cdnv",
    "rank",
)
PLOT_METRICS = ("nc1", "nc2_etf", "nc2_orth", "cdnv")


def parse_classes(text: str | None) -> list[int] | None:
    """``"0,3,5"`` or ranges ``"0-4,7"`` -> sorted class labels; ``None`` stays ``None``."""
    if text is None:
        return None
    out: set[int] = set()
    for part in str(text).split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if m is None or (m.group(2) is not None and int(m.group(2)) < int(m.group(1))):
            raise DeepCollapseError(f"--classes takes labels and ranges such as 0,3,5-9; got {part.strip()!r}")
        out.update(range(int(m.group(1)), int(m.group(2) or m.group(1)) + 1))
    return sorted(out)


def write_outputs(out_dir: Path, result: Measurement) -> list[Path]:
    """metrics.json, per_class.csv and the plot of ``result`` into ``out_dir`` (already prepared)."""
    write_json(out_dir / "metrics.json", result.to_dict())
    rows = [{"layer": layer.name, "depth": layer.depth, **row} for layer in result.layers for row in layer.per_class]
    write_csv(out_dir / "per_class.csv", rows)
    flat = [{"name": layer.name, **layer.metrics} for layer in result.layers]
    plot = plot_metrics_vs_depth(flat, out_dir / "metrics_vs_depth.png", metrics=PLOT_METRICS)
    return [out_dir / "metrics.json", out_dir / "per_class.csv", plot]


def print_summary(features: Path, result: Measurement) -> None:
    sel = result.selection
    if sel.missing:
        console.print(
            f"warning: classes {sel.missing} of 0..{sel.num_classes - 1} have no samples; measured over the"
            f" {sel.classes.size} classes present",
            highlight=False,
        )
    present = [m for m in TABLE_METRICS if any(m in layer.metrics for layer in result.layers)]
    rows = [{"name": layer.name, "dim": layer.dim, **layer.metrics} for layer in result.layers]
    title = f"DNC metrics of {features.name} (N={sel.index.size}, K={sel.classes.size} classes measured)"
    print_table(title, rows, ("name", "dim", *present))


@handle_errors
def measure(
    features: Annotated[
        Path,
        typer.Argument(
            help="FEATURES.npz with 'features' or 'layer_<name>' arrays, 'labels' and optionally a classifier"
            " 'weight'/'bias'; a directory of such .npy files; or one .npy file with --labels.",
            show_default=False,
        ),
    ],
    labels: Annotated[Path | None, typer.Option(help="Labels .npy (N,) (needed for a single .npy input).")] = None,
    weight: Annotated[
        Path | None,
        typer.Option(help="Classifier of the last layer: a .npy (K, D) weight or an .npz with 'weight' and 'bias'."),
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Output directory. Default: <input>_dnc next to the input.")] = None,
    num_classes: Annotated[int | None, typer.Option(help="Number of classes K. Default: max label + 1.")] = None,
    classes: Annotated[
        str | None, typer.Option(help="Measure only these classes, e.g. '0,3,5' or '0-9'. Default: all present.")
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Rows read and accumulated at a time.")] = DEFAULTS.batch_size,
    passes: Annotated[int, typer.Option(help="2: exact two-pass; 1: Welford/Chan (no NC4).")] = DEFAULTS.passes,
    light: Annotated[
        bool | None,
        typer.Option(
            "--light/--full",
            help="Keep only O(K·D) state (--light) or the D x D Σ_W (--full). Default: the fastest exact path.",
            show_default=False,
        ),
    ] = None,
    normalize: Annotated[bool, typer.Option(help="NC1 = tr(Σ_W Σ_B⁺)/K (else without 1/K).")] = DEFAULTS.normalize,
    weighting: Annotated[str, typer.Option(help="Global mean over 'samples' or 'classes'.")] = DEFAULTS.weighting,
    rtol: Annotated[
        float | None,
        typer.Option(help="Relative singular-value cutoff in (0, 1). Default: the features' precision."),
    ] = DEFAULTS.rtol,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:N or auto.")] = DEFAULTS.device,
    overwrite: Annotated[bool, typer.Option(help="Replace the results in --out.")] = False,
) -> None:
    """Measure NC1-NC4, CDNV and mean rank per layer of saved features; write metrics.json, per_class.csv, a plot."""
    options = MeasureOptions(
        batch_size=batch_size,
        device=resolve_device(device),
        passes=passes,
        cov=None if light is None else ("light" if light else "full"),
        normalize=normalize,
        weighting=weighting,
        rtol=rtol,
    )
    out_dir = out if out is not None else features.parent / f"{features.stem}_dnc"
    check_out_dir(out_dir, overwrite=overwrite)  # before the work: nothing is created until it is done
    inputs = load_inputs(features, labels=labels, weight=weight)
    result = measure_saved(inputs, num_classes=num_classes, classes=parse_classes(classes), options=options)
    written = write_outputs(prepare_out_dir(out_dir, overwrite=overwrite), result)
    print_summary(features, result)
    typer.echo("wrote " + ", ".join(str(p) for p in written))


def register(app: typer.Typer) -> None:
    """Add ``deepcollapse measure`` to ``app``."""
    app.command("measure")(measure)
