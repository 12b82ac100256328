"""``deepcollapse dufm``: train one DUFM, compare it with the theory, write results and plots."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from deepcollapse.cli.common import console, fmt, handle_errors, parse_list, print_table, resolve_device
from deepcollapse.dufm.model import DUFMConfig
from deepcollapse.dufm.solve import OPTIMIZERS, SolverConfig
from deepcollapse.dufm.stopping import DEFAULT_MAX_STEPS, StopRules
from deepcollapse.experiments.dufm_run import run_dufm

_RULES = StopRules()  # the defaults shown in --help; the library applies them
_STEPS = ", ".join(f"{k} {v:,}" for k, v in DEFAULT_MAX_STEPS.items())


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
    if zt.zero_is_global_optimum:
        where = "past it: zero is the global optimum (proven for K = 2 and for L = 1)"
    elif zt.zero_is_optimal:
        where = "past it: zero beats every DNC configuration (not proven globally optimal for K > 2)"
    else:
        where = f"{zt.scale:.4g}x below it"
    console.print(
        f"DNC family's zero threshold: K·C* = {zt.kc:.6g} (common λ* = {zt.lambda_equal:.6g}); these λ's are {where}",
        highlight=False,
    )
    if classes > 2 and layers > 1:
        console.print(
            "note: for K > 2 this is the best DNC configuration, not a proven optimum; lower-rank solutions "
            "can do better (the SRG construction, shown for some K = C(r, 2) with L >= 4)"
        )


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
    steps: Annotated[int | None, typer.Option("--steps", min=1, help=f"Max steps (default: {_STEPS}).")] = None,
    tol_grad: Annotated[
        float | None,
        typer.Option("--tol-grad", help=f"Stop when ||grad||·||θ||/L <= this (default {_RULES.tol_grad:g})."),
    ] = None,
    tol_gap: Annotated[
        float | None,
        typer.Option(
            "--tol-gap",
            help=f"Stop when (L - L_DNC)/L_DNC <= this, where L_DNC is proven optimal (default {_RULES.tol_gap:g}).",
        ),
    ] = None,
    tol_rel: Annotated[
        float | None,
        typer.Option(
            "--tol-rel", help=f"Stop when |ΔL|/L <= this, {_RULES.patience} steps running (default {_RULES.tol_rel:g})."
        ),
    ] = None,
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
    given = {"lr": lr, "max_steps": steps, "tol_grad": tol_grad, "tol_gap": tol_gap, "tol_rel": tol_rel}
    solver = SolverConfig(optimizer=optimizer, **{k: v for k, v in given.items() if v is not None})
    out = out or Path("runs") / time.strftime("dufm-%Y%m%d-%H%M%S")
    res = run_dufm(
        config, solver, out, overwrite=overwrite, resume=resume, allow_narrow=allow_narrow, progress=progress
    )
    report(res.summary, res.out)


def report(summary: dict, out: Path) -> None:
    """The short human summary printed at the end of a run: one verdict, from ``summary["analysis"]``."""
    th, a, cert = summary.get("theory"), summary["analysis"], summary["certificate"]
    console.print(
        f"[bold]DUFM[/bold] finished: {summary['stop_reason']} after {summary['steps']} steps "
        f"({summary['evaluations']} evaluations, {summary['seconds']:.2f} s); "
        f"||grad|| {fmt(cert['grad_norm'])}, ||grad||·||θ||/L {fmt(cert['rel_grad_norm'])}",
        highlight=False,
    )
    line = f"loss {summary['final_loss']:.10g}"
    if th is not None:
        line += f"   L_DNC {th['dnc_loss']:.10g}   gap {fmt(a['gap'])}   s {a['s']:.6f} (theory {th['s']:.6f})"
    console.print(line, highlight=False)
    rows = []
    for e in summary["layers"]:
        rows.append({**e, "layer": f"{e['layer']} ({'H1' if e['stage'] == 'free' else 'post-ReLU'})"})
    print_table("per-layer DNC metrics", rows, ["layer", "nc1", "nc2_orth", "nc3_span", "rank", "mean_norm"])
    failed = [k for k, ok in a["checks"].items() if ok is False]
    why = f" (fails: {', '.join(failed)})" if failed and a["verdict"] != "dnc" else ""
    cos = ", ".join(f"{c:+.3f}" for c in a["h1_cos"][:6])
    console.print(
        f"verdict: {a['verdict']}{why}; ranks before each ReLU {a['ranks_pre']}; H1 class-mean cosines (free): {cos}",
        highlight=False,
    )
    console.print(f"results in {out}/")
