"""analyze_solution on known solutions: the DNC optimum, the SRG construction, zeros."""

from __future__ import annotations

import json

import pytest
import torch

from deepcollapse.dufm.model import DUFMConfig
from deepcollapse.files import to_jsonable
from deepcollapse.theory.analysis import analyze_solution, plot_spectra, verdict
from deepcollapse.theory.closed_form import dnc_loss, optimal_parameters
from deepcollapse.theory.lowrank import srg_loss, srg_parameters


def test_dnc_optimum_is_dnc():
    cfg = DUFMConfig(num_classes=3, n_per_class=4, num_layers=3, width=6, lambda_h=2e-3, lambda_w=2e-3)
    h1, ws = optimal_parameters(cfg)
    a = analyze_solution(h1, ws, cfg)
    assert a["verdict"] == "dnc"
    assert a["ranks_pre"] == [3, 3] and a["ranks_post"] == [3, 3, 3] and a["rank_out"] == 3
    assert a["ratio_dnc"] == pytest.approx(1.0, abs=1e-10)
    assert a["dnc_loss"] == dnc_loss(num_classes=3, num_layers=3, n=4, lambda_h=2e-3, lambda_w=2e-3)
    assert a["srg_loss"] is not None  # K = 3 = C(3, 2)
    json.dumps(to_jsonable(a), allow_nan=False)


def test_srg_solution_is_low_rank():
    cfg = DUFMConfig(num_classes=10, n_per_class=5, num_layers=4, width=30, lambda_h=4e-3, lambda_w=4e-3)
    h1, ws = srg_parameters(cfg)
    a = analyze_solution(h1, ws, cfg)
    assert a["verdict"] == "low-rank"
    assert a["ranks_pre"][-1] == 5 and a["ranks_post"][-1] == 10 and a["rank_out"] == 10
    assert a["ratio_srg"] == pytest.approx(1.0, abs=1e-10)
    assert a["ratio_dnc"] < 1.0
    assert a["srg_loss"] == srg_loss(num_classes=10, num_layers=4, n=5, lambda_h=4e-3, lambda_w=4e-3)
    spec = {(e["layer"], e["stage"]): e["singular_values"] for e in a["spectra"]}
    assert spec[(4, "pre")][0] == 1.0 and len(spec[(4, "pre")]) == 10


def test_zero_solution_and_no_srg():
    cfg = DUFMConfig(num_classes=4, n_per_class=2, num_layers=2, width=5)
    a = analyze_solution(torch.zeros(5, 8, dtype=torch.float64), [torch.zeros(5, 5), torch.zeros(4, 5)], cfg)
    assert a["verdict"] == "other" and a["ranks_pre"] == [0] and a["rank_out"] == 0
    assert a["srg_loss"] is None and a["ratio_srg"] is None


def test_verdict_rule():
    kw = {"num_classes": 4, "ratio_dnc": 1.0}
    assert verdict(ranks_pre=[4, 4], ranks_post=[4, 4, 4], rank_out=4, **kw) == "dnc"
    assert verdict(ranks_pre=[4, 4], ranks_post=[4, 4, 4], rank_out=4, num_classes=4, ratio_dnc=1.1) == "other"
    assert verdict(ranks_pre=[3, 3], ranks_post=[4, 3, 4], rank_out=4, **kw) == "low-rank"
    assert verdict(ranks_pre=[3, 3], ranks_post=[4, 3, 4], rank_out=3, **kw) == "other"
    assert verdict(ranks_pre=[], ranks_post=[4], rank_out=4, **kw) == "other"  # L = 1


def test_plot_spectra(tmp_path):
    cfg = DUFMConfig(num_classes=3, n_per_class=2, num_layers=3, width=4, lambda_h=2e-3, lambda_w=2e-3)
    h1, ws = optimal_parameters(cfg)
    path = plot_spectra(analyze_solution(h1, ws, cfg), tmp_path / "s.png")
    assert path.exists() and path.stat().st_size > 1000
