"""`deepcollapse measure`: DNC metrics per layer of saved features, streamed from disk in chunks.

Inputs (each layer an ``(N, ...)`` array, flattened per sample; ``labels`` an ``(N,)`` integer array):

* ``FEATURES.npz`` holding ``features`` and/or ``layer_<name>`` arrays (depth = order in the file) and
  ``labels``. Members are read chunk by chunk from the archive (compressed or not), never whole.
* a directory holding ``labels.npy`` and ``features.npy`` and/or ``layer_<name>.npy`` (depth = natural
  order of the names), or one ``.npy`` file with ``--labels LABELS.npy``. ``.npy`` files are memory-mapped
  (``np.load(mmap_mode="r")``) and read in chunks of ``--batch-size`` rows.

Writes ``metrics.json`` and ``metrics_vs_depth.png`` (each metric against layer depth, log scale).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from deepcollapse._validate import DeepCollapseError
from deepcollapse.cli.common import handle_errors, print_table, resolve_device
from deepcollapse.files import prepare_out_dir, write_json
from deepcollapse.measure.readers import label_tensor, load_inputs, measure_layer
from deepcollapse.plots import plot_metrics_vs_depth

TABLE_COLUMNS = ("name", "dim", "nc1", "nc2_etf", "nc2_orth", "nc4", "cdnv", "rank")
PLOT_METRICS = ("nc1", "nc2_etf", "nc2_orth", "cdnv")


@handle_errors
def measure(
    features: Annotated[
        Path,
        typer.Argument(
            help="FEATURES.npz with 'features' or 'layer_<name>' arrays and 'labels'; a directory of such .npy"
            " files; or one .npy file with --labels.",
            show_default=False,
        ),
    ],
    labels: Annotated[Path | None, typer.Option(help="Labels .npy (N,) for a .npy input.")] = None,
    out: Annotated[Path | None, typer.Option(help="Output directory. Default: <input>_dnc next to the input.")] = None,
    num_classes: Annotated[int | None, typer.Option(min=2, help="Number of classes K. Default: max label + 1.")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Rows read and accumulated at a time.")] = 4096,
    passes: Annotated[int, typer.Option(min=1, max=2, help="2: exact two-pass; 1: Welford/Chan (no NC4).")] = 2,
    light: Annotated[
        bool | None,
        typer.Option(
            "--light/--full",
            help="Keep only O(K·D) state (--light) or the D x D Σ_W (--full). Default: auto, full while it fits"
            " in 64 MiB.",
            show_default=False,
        ),
    ] = None,
    normalize: Annotated[bool, typer.Option(help="NC1 = tr(Σ_W Σ_B⁺)/K (else without 1/K).")] = True,
    weighting: Annotated[str, typer.Option(help="Global mean over 'samples' or 'classes'.")] = "samples",
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:N or auto.")] = "cpu",
    overwrite: Annotated[bool, typer.Option(help="Replace the results in --out.")] = False,
) -> None:
    """Measure NC1-NC4, CDNV and mean rank per layer of saved features; write metrics.json and a plot."""
    if weighting not in ("samples", "classes"):
        raise DeepCollapseError(f"--weighting must be 'samples' or 'classes', got {weighting!r}")
    dev = resolve_device(device)
    layers, label_arr = load_inputs(features, labels)
    y, k = label_tensor(label_arr, num_classes)
    cov = "auto" if light is None else ("light" if light else "full")
    out_dir = prepare_out_dir(out if out is not None else features.parent / f"{features.stem}_dnc", overwrite=overwrite)
    rows = []
    for depth, layer in enumerate(layers):
        m = measure_layer(
            layer,
            y,
            k,
            batch_size=batch_size,
            device=dev,
            passes=passes,
            cov=cov,
            normalize=normalize,
            weighting=weighting,
        )
        rows.append({"name": layer.name, "depth": depth, **m})
    options = {"passes": passes, "cov": cov, "normalize": normalize, "weighting": weighting, "batch_size": batch_size}
    write_json(
        out_dir / "metrics.json",
        {"input": str(features), "num_classes": k, "samples": int(y.numel()), "options": options, "layers": rows},
    )
    plot_metrics_vs_depth(rows, out_dir / "metrics_vs_depth.png", metrics=PLOT_METRICS)
    print_table(f"DNC metrics of {features.name} (N={y.numel()}, K={k})", rows, TABLE_COLUMNS)
    typer.echo(f"wrote {out_dir / 'metrics.json'} and {out_dir / 'metrics_vs_depth.png'}")


def register(app: typer.Typer) -> None:
    """Add ``deepcollapse measure`` to ``app``."""
    app.command("measure")(measure)
