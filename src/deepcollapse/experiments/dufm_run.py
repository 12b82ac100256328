"""One DUFM run end to end: build, solve, compare with the theory, write the result files.

``run_dufm`` is what ``deepcollapse dufm`` calls; it is also the Python entry point for a full run with
files. Result files in ``out``: ``config.json`` (both configs, versions), ``history.csv`` (loss parts
and per-layer metrics at log-spaced steps), ``summary.json``, ``checkpoint.pt`` (the solver state, for
``resume``), ``loss.png``, ``metrics.png`` and ``spectra.png``.
"""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from deepcollapse import plots
from deepcollapse._validate import DeepCollapseError, DivergenceError
from deepcollapse.dufm.model import DUFM, DUFMConfig
from deepcollapse.dufm.solve import SolverConfig, SolveResult, load_checkpoint, solve
from deepcollapse.files import prepare_out_dir, write_csv, write_json
from deepcollapse.plots import plot_spectra
from deepcollapse.theory import closed_form as theory
from deepcollapse.theory.analysis import analyze_solution

__all__ = ["RunOutput", "run_dufm", "summarize"]


@dataclass
class RunOutput:
    out: Path
    summary: dict[str, Any]
    result: SolveResult


def _theory_block(cfg: DUFMConfig) -> dict[str, Any] | None:
    if not cfg.balanced:
        return None
    sol = theory.dnc_solution(
        num_classes=cfg.num_classes,
        num_layers=cfg.num_layers,
        n=cfg.n,
        lambda_h=cfg.lambda_h,
        lambda_w=cfg.lambdas_w,
    )
    block = sol.to_dict()
    block["dnc_proven_optimal"] = cfg.num_classes == 2 or cfg.num_layers == 1
    block["note"] = (
        "L_DNC is the global optimum of the DUFM (proven for K = 2 at any depth and for L = 1)"
        if block["dnc_proven_optimal"]
        else "L_DNC is the loss of the best DNC configuration; for K > 2 it is not proven optimal, and "
        "lower-rank solutions can beat it (shown for some K = C(r, 2) with L >= 4)"
    )
    return block


#: The registry names (:data:`deepcollapse.measure.metrics.METRICS`) of each ``summary.json`` layer entry.
SUMMARY_METRICS = ("nc1", "nc2_etf", "nc2_orth", "nc2_equinorm", "nc3_span", "nc3_duality", "cdnv", "ncc_accuracy",
                   "rank", "mean_norm")  # fmt: skip


def _layer_entries(layers: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Split :func:`dufm.layer_metrics` rows into per-layer (H1, post-ReLU) and pre-activation entries."""
    main, pre = [], []
    for e in layers:
        # H1's means have no fixed frame: nc2_orth (the DUFM's target after a ReLU) only from layer 2 on
        names = [k for k in SUMMARY_METRICS if k in e and not (k == "nc2_orth" and e["stage"] == "free")]
        entry = {"layer": e["layer"], "stage": e["stage"], **{k: e[k] for k in names}}
        if e["stage"] == "pre":
            pre.append(entry)
        else:
            main.append(entry)
    return main, pre


def summarize(model: DUFM, result: SolveResult, solver: SolverConfig) -> dict[str, Any]:
    """The ``summary.json`` content of a finished run.

    ``analysis`` is the one record of what the run reached (:func:`deepcollapse.theory.analysis.analyze_solution`:
    gap, per-layer checks, ranks, verdict); ``certificate`` is the solver's own stopping certificate.
    """
    cfg = model.config
    th = _theory_block(cfg)
    main, pre = _layer_entries(result.layers)
    analysis = analyze_solution(model.h1, list(model.weights), cfg)
    return {
        "status": "finished",
        "final_loss": result.loss,
        "fit": result.fit,
        "reg": result.reg,
        "steps": result.steps,
        "evaluations": result.evaluations,
        "seconds": result.seconds,
        "stop_reason": result.stop_reason,
        "certificate": {
            "grad_norm": result.grad_norm,
            "rel_grad_norm": result.rel_grad_norm,
            "gap": result.gap,
        },
        "optimizer": solver.optimizer,
        "theory": th,
        "gap": analysis["gap"],  # the record's (float64) gap; the certificate's is the solver's own
        "verdict": analysis["verdict"],
        "layers": main,
        "pre_activation": pre,
        "analysis": analysis,
    }


def _versions() -> dict[str, str]:
    from deepcollapse import __version__

    return {"deepcollapse": __version__, "torch": torch.__version__, "python": platform.python_version()}


def run_dufm(
    config: DUFMConfig,
    solver: SolverConfig,
    out: str | Path,
    *,
    overwrite: bool = False,
    resume: bool = False,
    allow_narrow: bool = False,
    progress: bool = False,
    plots_enabled: bool = True,
    checkpoint_every: float = 30.0,
) -> RunOutput:
    """Train one DUFM and write its result files into ``out`` (see the module docstring).

    Raises
    ------
    DeepCollapseError : bad configuration, an occupied ``out`` (without ``overwrite``/``resume``), a
        checkpoint from another configuration, or a diverged run (after its files are written).
    """
    _check_request(config, allow_narrow=allow_narrow)
    ckpt_path = Path(out) / "checkpoint.pt"
    if resume and not ckpt_path.exists():
        raise DeepCollapseError(f"nothing to resume: no checkpoint at {ckpt_path}")
    out = prepare_out_dir(out, overwrite=overwrite, resume=resume)
    resume_state = load_checkpoint(ckpt_path, config, solver) if resume else None
    if overwrite and not resume:
        ckpt_path.unlink(missing_ok=True)
    write_json(
        out / "config.json",
        {"dufm": config.to_dict(), "solver": solver.to_dict(), "versions": _versions(), "created": time.time()},
    )
    model = DUFM(config)
    th = _theory_block(config)
    dnc = th["dnc_loss"] if th else None
    try:
        result = solve(
            model,
            solver,
            dnc_loss=dnc,
            lower_bound=dnc if th and th["dnc_proven_optimal"] else None,
            progress=progress,
            checkpoint=ckpt_path,
            checkpoint_every=checkpoint_every,
            resume_state=resume_state,
        )
    except DivergenceError as e:
        _write_diverged(out, e, th)
    write_csv(out / "history.csv", result.history)
    summary = summarize(model, result, solver)
    write_json(out / "summary.json", summary)
    if plots_enabled:
        draw_plots(out, result.history, summary, config.num_layers)
    return RunOutput(out=out, summary=summary, result=result)


def _check_request(config: DUFMConfig, *, allow_narrow: bool) -> None:
    """Refuse widths below K (unless ``allow_narrow``) and an unavailable CUDA device, before any file."""
    K = config.num_classes
    narrow = [(i + 1, d) for i, d in enumerate(config.widths) if d < K]
    if narrow and not allow_narrow:
        layers = ", ".join(f"d_{i} = {d}" for i, d in narrow)
        raise DeepCollapseError(
            f"width below K = {K} ({layers}): DNC needs K orthogonal class means per layer, so the theory's "
            "optimum is out of reach; pass allow_narrow=True to train anyway (L_DNC is then a lower bound for K = 2)"
        )
    if config.device.startswith("cuda") and not torch.cuda.is_available():
        raise DeepCollapseError(f"device {config.device}: CUDA is not available on this machine")


def _write_diverged(out: Path, err: DivergenceError, theory_block: dict[str, Any] | None) -> None:
    """Keep the history of a diverged run and a ``"diverged"`` summary, then raise a one-line error."""
    partial: SolveResult = err.result  # type: ignore[attr-defined]
    write_csv(out / "history.csv", partial.history)
    write_json(
        out / "summary.json",
        {
            "status": "diverged",
            "stop_reason": "diverged",
            "message": str(err),
            "steps": partial.steps,
            "theory": theory_block,
        },
    )
    raise DeepCollapseError(f"{err} (history so far kept in {out})") from None


def draw_plots(out: Path, history: list[dict[str, Any]], summary: dict[str, Any], num_layers: int) -> None:
    """``loss.png``, ``metrics.png`` and ``spectra.png`` from result rows and the summary."""
    th = summary.get("theory")
    # GD starts at step 0; shift by one so that log axes keep the first point.
    rows = [{**r, "step": r["step"] + 1} for r in history]
    srg = summary["analysis"]["srg_loss"]
    plots.plot_loss(
        rows,
        out / "loss.png",
        optimum=th["dnc_loss"] if th else None,
        x="step",
        extra_lines={"L_SRG (low-rank construction)": srg} if srg else None,
    )
    plots.plot_metric_curves(
        rows,
        out / "metrics.png",
        metrics=("nc1", "nc2_orth", "nc3_span"),
        layer_keys=[f"l{i}" for i in range(1, num_layers + 1)],
        x="step",
        title="per-layer DNC metrics (nc2_orth: layers >= 2)",
    )
    plot_spectra(summary["analysis"], out / "spectra.png")
