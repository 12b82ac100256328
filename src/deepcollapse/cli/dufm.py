"""``deepcollapse dufm``: train one DUFM, compare it with the theory, write results and plots."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from deepcollapse.cli.common import console, fmt, handle_errors, parse_list, print_table, resolve_device
from deepcollapse.dufm.model import DUFMConfig
from deepcollapse.dufm.solve import OPTIMIZERS, SolverConfig
from deepcollapse.experiments.dufm_run import run_dufm

DEFAULT_STEPS = {"gd": 100_000, "lbfgs": 2_000, "nesterov": 50_000, "adam": 50_000}


def register(app: typer.Typer) -> None:
    """Add ``dufm`` and ``theory`` to ``app``."""
    app.command("dufm")(dufm)
    app.command("theory")(theory_cmd)


@handle_errors
def theory_cmd(
    classes: Annotated[int, typer.Option("--classes", "-K", help="Number of classes K (>= 2).")] = 2,
    n_per_class: Annotated[int, typer.Option("--n-per-class", "-n", help="Samples per class n.")] = 10,
    layers: Annotated[int, typer.Option("--layers", "-L", help="Weight matrices L.")] = 3,
    lambda_h: Annotated[float, typer.Option("--lambda-h", help="λ_H1.")] = 2e-3,
    lambda_w: Annotated[str, typer.Option("--lambda-w", help="λ_W: one number or one per layer.")] = "2e-3",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")] = False,
) -> None:
    """Closed forms for the DNC optimum: L_DNC, s, C, per-layer norms and the zero-solution threshold."""
    import json

    from deepcollapse.files import to_jsonable
    from deepcollapse.theory import closed_form as theory

    sol = theory.dnc_solution(
        num_classes=classes,
        num_layers=layers,
        n=n_per_class,
        lambda_h=lambda_h,
        lambda_w=parse_list("--lambda-w", lambda_w, float),
    )
    if as_json:
        typer.echo(json.dumps(to_jsonable(sol.to_dict()), indent=2))
        return
    zt = sol.zero_threshold
    console.print(f"L_DNC = {sol.dnc_loss:.12g}   s = {sol.s:.12g}   C = {sol.c:.6g}", highlight=False)
    console.print(
        f"H1 class-mean norm t = {fmt(sol.t)}; post-ReLU class-mean norms q_2..q_L = {[fmt(v) for v in sol.q]}; "
        f"||W_l||_F = {[fmt(v) for v in sol.weight_norms]}",
        highlight=False,
    )
    where = "past it: the zero solution is optimal" if zt.zero_is_optimal else f"{zt.scale:.4g}x below it"
    console.print(
        f"zero-solution threshold: K·C* = {zt.kc:.6g} (common λ* = {zt.lambda_equal:.6g}); these λ's are {where}",
        highlight=False,
    )
    if classes > 2 and layers > 1:
        console.print("note: for K > 2 this is the best DNC configuration; lower-rank solutions can do better")


@handle_errors
def dufm(
    classes: Annotated[int, typer.Option("--classes", "-K", help="Number of classes K (>= 2).")] = 2,
    n_per_class: Annotated[
        str, typer.Option("--n-per-class", "-n", help="Samples per class n, or one count per class: 5,10,7.")
    ] = "10",
    layers: Annotated[int, typer.Option("--layers", "-L", help="Weight matrices L (L = 1: plain UFM).")] = 3,
    width: Annotated[str, typer.Option("--width", "-d", help="Width d_1..d_L: one number or a list.")] = "16",
    lambda_h: Annotated[float, typer.Option("--lambda-h", help="λ_H1, penalty on the free features.")] = 2e-3,
    lambda_w: Annotated[str, typer.Option("--lambda-w", help="λ_W: one number or one per layer.")] = "2e-3",
    optimizer: Annotated[
        str, typer.Option("--optimizer", "-o", help=f"One of {', '.join(OPTIMIZERS)}; gd is the paper's.")
    ] = "lbfgs",
    lr: Annotated[float | None, typer.Option("--lr", help="Learning rate (default per optimizer).")] = None,
    steps: Annotated[
        int | None, typer.Option("--steps", min=1, help="Max steps (default: gd 100k, lbfgs 2k, others 50k).")
    ] = None,
    tol_grad: Annotated[float, typer.Option("--tol-grad", help="Stop when ||grad|| <= this.")] = 1e-10,
    tol_rel: Annotated[float, typer.Option("--tol-rel", help="Stop when |ΔL|/L <= this, 20 steps running.")] = 1e-15,
    init_std: Annotated[float, typer.Option("--init-std", help="Initial scale of H1 and W_l.")] = 1.0,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the initialization.")] = 0,
    device: Annotated[str, typer.Option("--device", help="cpu, cuda, cuda:N or auto.")] = "cpu",
    dtype: Annotated[str, typer.Option("--dtype", help="float64 or float32.")] = "float64",
    out: Annotated[Path | None, typer.Option("--out", help="Result directory (default runs/dufm-<time>).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a run already in --out.")] = False,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out from its checkpoint.")] = False,
    allow_narrow: Annotated[
        bool, typer.Option("--allow-narrow", help="Allow widths below K (no DNC optimum exists then).")
    ] = False,
    plots: Annotated[bool, typer.Option("--plots/--no-plots", help="Write PNG plots.")] = True,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar.")] = True,
) -> None:
    """Train an L-layer deep unconstrained features model and compare it with the DNC theory.

    Writes config.json, history.csv, summary.json, checkpoint.pt and loss/metrics plots into --out.
    """
    config = DUFMConfig(
        num_classes=classes,
        n_per_class=parse_list("--n-per-class", n_per_class, int),
        num_layers=layers,
        width=parse_list("--width", width, int),
        lambda_h=lambda_h,
        lambda_w=parse_list("--lambda-w", lambda_w, float),
        init_std=init_std,
        dtype=dtype,
        device=resolve_device(device),
        seed=seed,
    )
    solver = SolverConfig(
        optimizer=optimizer,
        lr=lr,
        max_steps=steps if steps is not None else DEFAULT_STEPS.get(optimizer, 2000),
        tol_grad=tol_grad,
        tol_rel=tol_rel,
    )
    out = out or Path("runs") / time.strftime("dufm-%Y%m%d-%H%M%S")
    res = run_dufm(
        config, solver, out, overwrite=overwrite, resume=resume, allow_narrow=allow_narrow, progress=progress
    )
    report(res.summary, res.out)


def report(summary: dict, out: Path) -> None:
    """The short human summary printed at the end of a run."""
    th = summary.get("theory")
    console.print(
        f"[bold]DUFM[/bold] finished: {summary['stop_reason']} after {summary['steps']} steps "
        f"({summary['evaluations']} evaluations, {summary['seconds']:.2f} s)"
    )
    line = f"loss {summary['final_loss']:.10g}"
    if th is not None:
        line += f"   L_DNC {th['dnc_loss']:.10g}   gap {fmt(summary['gap'])}"
        check = summary.get("check")
        measured = f"{check['s']:.6f} " if check is not None else ""
        line += f"   s {measured}(theory {th['s']:.6f})"
    console.print(line, highlight=False)
    rows = []
    for e in summary["layers"]:
        rows.append({**e, "layer": f"{e['layer']} ({'H1' if e['stage'] == 'free' else 'post-ReLU'})"})
    print_table("per-layer DNC metrics", rows, ["layer", "nc1", "nc2", "nc3", "rank", "mean_norm"])
    check = summary.get("check")
    if check is not None:
        verdict = "matches the DNC optimum" if check["dnc"] else "does NOT match the DNC optimum"
        cos = ", ".join(f"{c:+.3f}" for c in check["h1_cos"][:6])
        console.print(f"theory check (tol {check['tol']:g}): {verdict}; H1 class-mean cosines: {cos}")
    analysis = summary.get("analysis")
    if analysis is not None:
        console.print(
            f"solution analysis: verdict {analysis.get('verdict')}, ranks before ReLU {analysis.get('ranks_pre')}, "
            f"loss/L_DNC {fmt(analysis.get('ratio_dnc'))}",
            highlight=False,
        )
    console.print(f"results in {out}/")
