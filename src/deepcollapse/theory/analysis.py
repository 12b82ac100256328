r"""What did a DUFM solution reach? One record: the gap to ``L_DNC``, per-layer checks, ranks, a verdict.

:func:`analyze_solution` is the one answer to that question, used by ``deepcollapse dufm`` (``summary.json``),
the sweeps, the real-network head and the atlas. Its record (JSON-ready) holds:

- the loss parts, the gradient norm and the relative gradient norm ``||∇L||·||θ||/L`` at the point (a
  stationarity certificate independent of the solver);
- ``dnc_loss`` and the one gap convention ``gap = (loss - L_DNC)/L_DNC`` (``ratio_dnc = loss/L_DNC``);
  ``srg_loss``/``ratio_srg`` for the low-rank construction where it applies (K = C(r, 2), L >= 2);
- the per-layer comparison with the theory (:func:`deepcollapse.theory.check`): class-mean and weight norms,
  NC1, and for l >= 2 the orthogonal-frame error of the post-ReLU class means;
- ranks and normalized singular values of the class means of ``H_1``, of every pre-activation
  ``\tilde H_l`` and post-ReLU ``H_l`` (l = 2..L), and of the output (:func:`deepcollapse.metrics.numerical_rank`);
- ``verdict``, ``checks`` (which DNC conditions hold) and ``verdict_rule``.

The verdict rests only on what the theory fixes, so it does not depend on the free angle between the
class means of ``H_1`` (nor, through it, on the layer-2 pre-activation):

``"diverged"``
    the loss, a parameter or a pre-activation is NaN or infinite.
``"dnc"``
    (balanced classes, ``L_DNC`` with ``s > 0``) ``|gap| <= tol``; NC1 ``<= tol`` at every layer; the
    post-ReLU class means of every layer l >= 2 form an orthogonal frame (``nc2_orth <= √tol``); and
    every class-mean norm, ``||W_l||_F`` and the output scale ``s`` are within a relative ``√tol`` of the
    theory. Loss gaps and NC1 are quadratic in a parameter error near the optimum, distances linear: hence
    ``tol`` for the first, ``√tol`` for the second.
``"zero"``
    the output and the penalty vanish: ``||W_L H_L||_F <= √tol ||Y||_F`` and ``reg <= tol/2`` (the DNC
    family's optimum past its threshold, :func:`deepcollapse.theory.zero_threshold`).
``"low-rank"``
    the output separates the classes (rank K) but the class means before some ReLU of layer 3..L have rank
    below K (the follow-up's low-rank solutions; for L = 2 the only pre-activation is the layer-2 one,
    whose rank follows H1's free angle, so no L = 2 solution is called low-rank).
``"other"``
    anything else (an unfinished run, another stationary point, unbalanced classes that are not low-rank).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from deepcollapse.dufm.model import DUFMConfig, forward, label_matrix, labels_from_counts, objective
from deepcollapse.dufm.stopping import relative_grad_norm
from deepcollapse.measure import metrics as M
from deepcollapse.theory.closed_form import check
from deepcollapse.theory.lowrank import srg_loss, srg_order

__all__ = ["VERDICTS", "analyze_solution", "dnc_checks", "verdict"]

#: Every verdict :func:`analyze_solution` can give.
VERDICTS = ("dnc", "zero", "low-rank", "other", "diverged")

VERDICT_RULE = (
    "diverged: non-finite loss, parameters or pre-activations; dnc: |gap| <= tol, NC1 <= tol at every layer, "
    "orthogonal post-ReLU frames (l >= 2), class-mean norms, weight norms and s within sqrt(tol) of the theory; zero: "
    "||output|| <= sqrt(tol)||Y|| and reg <= tol/2; low-rank: output rank K but a pre-activation of layer "
    "3..L of rank < K; other: the rest"
)


def analyze_solution(
    h1: Tensor,
    weights: Sequence[Tensor],
    config: DUFMConfig,
    *,
    tol: float = 1e-3,
    rank_rtol: float = 1e-3,
    srg: bool = True,
) -> dict[str, Any]:
    """The one record of what the DUFM solution ``(h1, weights)`` reached (module docstring), JSON-ready.

    Keys: everything of :func:`deepcollapse.theory.check` (``loss``, ``fit``, ``reg``, ``dnc_loss``,
    ``gap``, ``s``, ``s_theory``, ``s_rel_err``, ``h1_cos``, ``layers``, ``zero_threshold``), plus
    ``num_classes``, ``num_layers``, ``num_samples``, ``grad_norm``, ``rel_grad_norm``, ``output_norm``
    (``||W_L H_L||_F``), ``ratio_dnc``, ``srg_loss``, ``ratio_srg``, ``dnc_proven_optimal``
    (K = 2 or L = 1: ``L_DNC`` is the global minimum), ``ranks_pre`` (``\\tilde H_l``, l = 2..L),
    ``ranks_post`` (``H_1``, ``H_l``), ``rank_out``, ``rank_pre_last``, ``spectra`` (``{layer, stage,
    singular_values}``, normalized by the largest), ``tol``, ``rank_rtol``, ``checks`` (``gap``, ``nc1``,
    ``nc2_orth``, ``norms``: each true, false, or ``None`` without a theory), ``verdict`` (one of
    :data:`VERDICTS`) and ``verdict_rule``. A point with a non-finite loss, parameter or pre-activation gets
    only the keys that exist there (``loss``, the sizes, ``tol``, ``rank_rtol``, ``verdict`` ``"diverged"``,
    ``verdict_rule``).
    ``srg=False`` skips ``L_SRG`` (an optimization per setting, cached), leaving ``srg_loss`` ``None``.
    Computed in float64 on the CPU, whatever the parameters' dtype and device.
    """
    K, L = config.num_classes, config.num_layers
    h, *ws = (p.detach().cpu().double() for p in (h1, *weights))  # in float64, on the CPU, like check
    record: dict[str, Any] = {"num_classes": K, "num_layers": L, "num_samples": config.num_samples}
    record.update(tol=tol, rank_rtol=rank_rtol, verdict_rule=VERDICT_RULE)
    y = label_matrix(config.counts)
    with torch.no_grad():
        record["loss"] = float(objective(h, ws, y, config.lambda_h, config.lambdas_w)[0])
        layers = forward(h, ws)  # (pre, post, out): the divergence test here, the ranks below
    pre = layers[0]
    # a finite loss has finite parameters (λ ||θ||² would be inf or nan) and output; a pre-activation can still
    # overflow to -inf, which the next ReLU hides
    if not (math.isfinite(record["loss"]) and all(bool(torch.isfinite(z).all()) for z in pre)):
        return {**record, "verdict": "diverged"}
    record.update(check(h, ws, config))
    record.update(_gradient(h, ws, config))
    record.update(_ranks(h, layers, config, rank_rtol))
    record.update(_low_rank_reference(config, record["loss"]) if srg else {"srg_loss": None, "ratio_srg": None})
    d_loss = record["dnc_loss"]
    record["ratio_dnc"] = record["loss"] / d_loss if d_loss else None
    record["dnc_proven_optimal"] = K == 2 or L == 1
    record["checks"] = dnc_checks(record, tol=tol)
    record["verdict"] = verdict(record, tol=tol)
    return record


def _gradient(h: Tensor, ws: list[Tensor], config: DUFMConfig) -> dict[str, float]:
    """``||∇L||`` and ``||∇L||·||θ||/L`` at the point (float64 autograd)."""
    params = [h.clone().requires_grad_(True), *[w.clone().requires_grad_(True) for w in ws]]
    y = label_matrix(config.counts)
    total, _, _ = objective(params[0], params[1:], y, config.lambda_h, config.lambdas_w)
    grads = torch.autograd.grad(total, params)
    gn = torch.sqrt(sum(g.pow(2).sum() for g in grads))
    pn = torch.sqrt(sum(p.detach().pow(2).sum() for p in params))
    return {"grad_norm": float(gn), "rel_grad_norm": float(relative_grad_norm(gn, pn, total.detach()))}


def _ranks(
    h: Tensor, layers: tuple[list[Tensor], list[Tensor], Tensor], config: DUFMConfig, rank_rtol: float
) -> dict[str, Any]:
    """Class-mean ranks and normalized spectra of ``H_1`` and of ``layers = forward(h, ws)``."""
    L = config.num_layers
    labels = labels_from_counts(config.counts)
    pre, post, out = layers
    stages = [(1, "free", h)]
    for i, z in enumerate(pre):
        stages += [(i + 2, "pre", z), (i + 2, "post", post[i])]
    stages.append((L + 1, "output", out))
    spectra, ranks = [], {}
    for layer, stage, feats in stages:
        # ncc=False skips the nearest-class-centre pass, which nothing here reads: only the cost can change
        sv = M.mean_spectrum(M.class_stats(feats.T, labels, ncc=False))  # pragma: no mutate
        top = float(sv.max())
        ranks[(layer, stage)] = M.numerical_rank(sv, rtol=rank_rtol)
        normed = [float(v) / top if top > 0 else 0.0 for v in sv]
        spectra.append({"layer": layer, "stage": stage, "singular_values": normed})
    ranks_pre = [ranks[(l, "pre")] for l in range(2, L + 1)]
    return {
        "ranks_pre": ranks_pre,
        "ranks_post": [ranks[(1, "free")]] + [ranks[(l, "post")] for l in range(2, L + 1)],
        "rank_out": ranks[(L + 1, "output")],
        "rank_pre_last": ranks_pre[-1] if ranks_pre else None,
        "output_norm": float(torch.linalg.matrix_norm(out)),
        "spectra": spectra,
    }


def _low_rank_reference(config: DUFMConfig, loss: float) -> dict[str, float | None]:
    """``srg_loss`` and ``ratio_srg`` where the SRG construction applies (K = C(r, 2), L >= 2, widths fit)."""
    r = srg_order(config.num_classes)
    fits = r is not None and all(d >= r for d in config.widths[:-1]) and config.widths[-1] >= config.num_classes
    if not config.balanced or not fits:
        return {"srg_loss": None, "ratio_srg": None}
    kw = {"num_layers": config.num_layers, "n": config.n, "lambda_h": config.lambda_h, "lambda_w": config.lambdas_w}
    value = srg_loss(num_classes=config.num_classes, **kw)  # None for L = 1
    return {"srg_loss": value, "ratio_srg": None if value is None else loss / value}


def dnc_checks(record: dict[str, Any], *, tol: float) -> dict[str, bool | None]:
    """Which DNC conditions hold in ``record`` (module docstring); ``None`` where there is no theory
    (unbalanced classes, or the theory's optimum is zero)."""
    if record["dnc_loss"] is None or not record["s_theory"]:
        return {"gap": None, "nc1": None, "nc2_orth": None, "norms": None}
    layers, dist = record["layers"], math.sqrt(tol)
    frames = [e["nc2_orth"] for e in layers[1:]]
    norms = [record["s_rel_err"]] + [e[k] for e in layers for k in ("mean_norm_rel_err", "weight_norm_rel_err")]
    return {
        "gap": _le([abs(record["gap"])], tol),
        "nc1": _le([e["nc1"] for e in layers], tol),
        "nc2_orth": _le(frames, dist),
        "norms": _le(norms, dist),
    }


def _le(values: Sequence[float | None], bound: float) -> bool:
    """All values are finite numbers ``<= bound`` (``None`` and NaN fail)."""
    return all(v is not None and math.isfinite(v) and v <= bound for v in values)


def verdict(record: dict[str, Any], *, tol: float = 1e-3) -> str:
    """The verdict (one of :data:`VERDICTS`, rule in the module docstring) of a record of
    :func:`analyze_solution`; the DNC checks are recomputed with ``tol``."""
    if not _le([record["loss"], record.get("grad_norm"), record.get("output_norm")], math.inf):
        return "diverged"
    checks = dnc_checks(record, tol=tol)
    if all(checks.values()):
        return "dnc"
    y_norm = math.sqrt(record["num_samples"])  # ||Y||_F of the one-hot labels
    if record["output_norm"] <= math.sqrt(tol) * y_norm and record["reg"] <= tol / 2:
        return "zero"
    K = record["num_classes"]
    if record["rank_out"] == K and min(record["ranks_pre"][1:], default=K) < K:
        return "low-rank"
    return "other"
