"""`deepcollapse train`: a backbone with a DUFM head on real data, DNC measured every epoch."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from deepcollapse.cli.common import console, handle_errors, parse_list, print_table, resolve_device


def _classes(text: str | None) -> list[int] | None:
    if text is None:
        return None
    v = parse_list("--classes", text, int)
    return v if isinstance(v, list) else [v]


def _print_summary(summary: dict[str, Any], out: Path) -> None:
    from deepcollapse.nets.train import LAYER_METRICS

    layers = summary["layers"]
    print_table(
        f"DNC per layer, whole training set, epoch {summary['epochs']}",
        layers,
        ["layer", *(m for m in LAYER_METRICS if m not in ("cdnv", "mean_norm"))],
    )
    first, last = summary["nc1_first_epoch"], summary["nc1_last_epoch"]
    rows = [
        {"layer": nm, "epoch 1": first[nm], "last": last[nm], "ratio": (first[nm] / last[nm]) if last[nm] else None}
        for nm in first
        if first[nm] is not None and last[nm] is not None
    ]
    print_table("NC1 (measured set): first vs last epoch", rows, ["layer", "epoch 1", "last", "ratio"])
    th = summary["theory"]
    if "skipped" in th:
        console.print(f"theory: skipped ({th['skipped']})")
    else:
        trows = [
            {"quantity": "head DUFM loss vs L_DNC", "measured": th["loss"], "theory": th["dnc_loss"], "gap": th["gap"]},
            {"quantity": "output scale s", "measured": th["s"], "theory": th["s_theory"], "gap": None},
        ]
        for e in th["layers"]:
            trows.append(
                {
                    "quantity": f"layer {e['layer']}: class-mean norm",
                    "measured": e["mean_norm"],
                    "theory": e["mean_norm_theory"],
                    "gap": e["mean_norm_rel_err"],
                }
            )
            trows.append(
                {
                    "quantity": f"layer {e['layer']}: ||W||_F",
                    "measured": e["weight_norm"],
                    "theory": e["weight_norm_theory"],
                    "gap": e["weight_norm_rel_err"],
                }
            )
        print_table(
            f"head vs the DUFM optimum (K={th['num_classes']}, n={th['n']}, L={th['num_layers']}, "
            f"λ_H1={th['lambda_h']:g}, λ_W={th['lambda_w']:g})",
            trows,
            ["quantity", "measured", "theory", "gap"],
        )
        console.print(f"verdict of the head's solution: {th['verdict']}. {th['note']}", highlight=False)
    fit = summary.get("fit_optimal")
    if fit and "skipped" not in fit:
        console.print(
            f"backbone fitted to the optimal H1 ({fit['epochs']} epochs): relative error {fit['rel_error_train']:.3g}"
            f" (train), {fit['rel_error_test']:.3g} (test); DUFM loss under the optimal head {fit['loss']:.6g}"
            f" vs L_DNC {fit['dnc_loss']:.6g}; accuracy {fit['train_accuracy']:.4f} / {fit['test_accuracy']:.4f}",
            highlight=False,
        )
    console.print(
        f"train accuracy {summary['train_accuracy']:.4f}, test accuracy {summary['test_accuracy']:.4f}, "
        f"{summary['time_s']:.0f} s; wrote {out}/summary.json, history.csv, config.json, metrics.png, loss.png",
        highlight=False,
    )


def register(app: typer.Typer) -> None:
    """Add the ``train`` command to ``app``."""

    @app.command("train")
    @handle_errors
    def train_cmd(
        out: Annotated[
            Path, typer.Option(help="Run directory (summary.json, history.csv, checkpoint.pt, plots).")
        ] = Path("runs/train"),
        preset: Annotated[
            str | None, typer.Option(help="Defaults for options not given: cpu-quick, paper-resnet20.")
        ] = None,
        dataset: Annotated[
            str | None,
            typer.Option(
                help="mnist5k (default), fashion-mnist, digits, mnist1d; "
                "mnist, kmnist, idx, cifar10, cifar100, npz (these need --data-dir)."
            ),
        ] = None,
        data_dir: Annotated[str | None, typer.Option(help="Directory (or .npz file) of an on-disk data set.")] = None,
        classes: Annotated[
            str | None, typer.Option(help="Original labels to keep, e.g. 0,1 (the theorem's K = 2).")
        ] = None,
        per_class: Annotated[
            int | None, typer.Option(help="Training samples per class [default: smallest class].", min=1)
        ] = None,
        test_per_class: Annotated[int | None, typer.Option(help="Cap on test samples per class.", min=1)] = None,
        backbone: Annotated[str | None, typer.Option(help="mlp (default), cnn, resnet20.")] = None,
        feature_dim: Annotated[int | None, typer.Option(help="d_1, the dimension of H1 [default: 64].", min=1)] = None,
        head_layers: Annotated[
            int | None, typer.Option(help="L, weight matrices in the DUFM head [default: 3].", min=1)
        ] = None,
        head_width: Annotated[
            int | None, typer.Option(help="Width of the head's hidden layers [default: 64].", min=1)
        ] = None,
        head_bias: Annotated[
            bool | None, typer.Option("--head-bias/--no-head-bias", help="Biases in the head [default: none].")
        ] = None,
        loss: Annotated[str | None, typer.Option(help="mse (the DUFM's, default) or ce.")] = None,
        optimizer: Annotated[str | None, typer.Option(help="sgd (default, momentum 0.9) or adam.")] = None,
        lr: Annotated[
            float | None, typer.Option(help="Peak learning rate [default: mlp 0.05, cnn and resnet20 0.01].")
        ] = None,
        schedule: Annotated[str | None, typer.Option(help="cosine (default), step, constant.")] = None,
        warmup_epochs: Annotated[
            float | None,
            typer.Option(help="Linear learning-rate warm-up, in epochs [default: mlp 0, cnn and resnet20 1].", min=0),
        ] = None,
        epochs: Annotated[int | None, typer.Option(help="Epochs [default: 200].", min=1)] = None,
        batch_size: Annotated[int | None, typer.Option(help="Mini-batch size [default: 32].", min=1)] = None,
        lambda_w: Annotated[
            float | None, typer.Option(help="λ_W, weight decay of each head layer [default: 5e-3].")
        ] = None,
        lambda_h: Annotated[
            float | None, typer.Option(help="λ_H1, penalty on H1 (DUFM units) [default: 1e-4].")
        ] = None,
        backbone_wd: Annotated[float | None, typer.Option(help="Weight decay of the backbone [default: 5e-4].")] = None,
        measure_per_class: Annotated[
            int | None, typer.Option(help="Training samples per class measured each epoch [default: all].", min=1)
        ] = None,
        fit_optimal_epochs: Annotated[
            int | None,
            typer.Option(help="Epochs fitting a fresh backbone to the optimal H1 (0: skip) [default: 30].", min=0),
        ] = None,
        seed: Annotated[int | None, typer.Option(help="Seed of init, data order and data draw [default: 0].")] = None,
        device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
        threads: Annotated[int, typer.Option(help="CPU threads for torch (0: torch's default).", min=0)] = 1,
        overwrite: Annotated[bool, typer.Option(help="Replace a run already in --out.")] = False,
        resume: Annotated[bool, typer.Option(help="Continue the run in --out from its last checkpoint.")] = False,
        progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar.")] = True,
        stop_after: Annotated[int | None, typer.Option(hidden=True, min=1)] = None,
    ) -> None:
        """Train a backbone + L-layer MLP DUFM head on real data, measure DNC per layer every epoch, and
        compare the head with the DUFM optimum (L_DNC)."""
        from deepcollapse.nets.train import make_config, train

        options = {
            "dataset": dataset, "data_dir": data_dir, "classes": _classes(classes), "per_class": per_class,
            "test_per_class": test_per_class, "backbone": backbone, "feature_dim": feature_dim,
            "head_layers": head_layers, "head_width": head_width, "head_bias": head_bias, "loss": loss,
            "optimizer": optimizer, "lr": lr, "schedule": schedule, "warmup_epochs": warmup_epochs,
            "epochs": epochs, "batch_size": batch_size,
            "lambda_w": lambda_w, "lambda_h": lambda_h, "backbone_wd": backbone_wd,
            "measure_per_class": measure_per_class, "fit_optimal_epochs": fit_optimal_epochs, "seed": seed,
        }  # fmt: skip
        config = make_config(options, preset=preset)
        config.device = resolve_device(device)
        result = train(
            config,
            out,
            resume=resume,
            overwrite=overwrite,
            stop_after=stop_after,
            progress=progress,
            num_threads=threads or None,
            log=lambda m: console.print(m, highlight=False),
        )
        if result.stopped_early:
            console.print(f"stopped after epoch {len(result.history)}; continue with --resume", highlight=False)
            return
        _print_summary(result.summary, out)
