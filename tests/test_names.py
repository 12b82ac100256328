"""Every metric the DUFM and real-network runs write is named as in the registry ``metrics.METRICS``.

A tiny ``deepcollapse dufm`` and a tiny ``deepcollapse train`` run; every metric-like key of ``summary.json``'s
layer entries, every metric-like ``history.csv`` column, every metric column of the printed tables and every
plotted metric must be a registry name or ``<registry name>_<layer>`` -- an old name (``nc2``, ``etf``,
``nc3_l2``, ``nc2etf_l1``, ``norm_h1``...) fails.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path

import pytest
from typer.testing import CliRunner

from deepcollapse import plots
from deepcollapse.cli import app
from deepcollapse.cli import dufm as dufm_cmd
from deepcollapse.cli import train as train_cmd
from deepcollapse.files import read_csv
from deepcollapse.measure.metrics import METRICS

runner = CliRunner()
# What a metric-like name starts with: the NC family, CDNV, ranks, norms, frames and the old spellings.
METRIC_LIKE = re.compile(r"^(nc|cdnv|rank|etf|equi|orth|norm|mean_norm)")
# Comparisons of a registry quantity with the theory's value (the theory block of ``deepcollapse train``).
THEORY_SUFFIXES = ("theory", "rel_err")


def bad_names(keys: Iterable[str], layers: Iterable[str]) -> list[str]:
    """The metric-like ``keys`` that are neither a registry name nor ``<name>_<layer>`` / ``<name>_theory``."""
    suffixes = {*map(str, layers), *THEORY_SUFFIXES}
    ok = set(METRICS) | {f"{m}_{s}" for m in METRICS for s in suffixes}
    return sorted({k for k in keys if METRIC_LIKE.match(k) and k not in ok})


def test_bad_names_flags_old_names():
    layers = ["l1", "l2", "pre2", "h1", "out"]
    good = ["nc1", "nc2_orth_l2", "nc2_etf_l1", "nc3_span_l2", "ncc_accuracy_h1", "rank_pre2", "mean_norm_theory"]
    old = ["nc2", "etf", "nc3", "equinorm", "nc2_l2", "nc3_l2", "nc2etf_l1", "norm_h1", "orth_frame", "etf_out"]
    assert bad_names([*good, "loss", "layer", "epoch", "weight_norm"], layers) == []
    assert bad_names(old, layers) == sorted(old)
    assert bad_names(["nc2_orth_l9"], layers) == ["nc2_orth_l9"]  # a layer the run does not have


@pytest.fixture
def recorded(monkeypatch) -> dict[str, list[str]]:
    """Columns of every printed table and metrics of every metric-curve plot, as the commands pass them."""
    seen: dict[str, list[str]] = {"table": [], "plot": []}
    curves = plots.plot_metric_curves

    def table(title, rows, columns):
        seen["table"] += list(columns)

    def curve(rows, path, *, metrics=("nc1",), **kw):
        seen["plot"] += list(metrics)
        return curves(rows, path, metrics=metrics, **kw)

    for mod in (dufm_cmd, train_cmd):
        monkeypatch.setattr(mod, "print_table", table, raising=False)
    monkeypatch.setattr(plots, "plot_metric_curves", curve)
    return seen


def keys_of(entries: list[dict]) -> list[str]:
    return [k for e in entries for k in e]


def test_dufm_outputs_use_registry_names(tmp_path: Path, recorded):
    out = tmp_path / "dufm"
    args = ["dufm", "--classes", "3", "--n-per-class", "2", "--layers", "3", "--width", "6", "--steps", "50"]
    r = runner.invoke(app, [*args, "--out", str(out), "--no-progress"])
    assert r.exit_code == 0, r.output
    summary = json.loads((out / "summary.json").read_text())
    cols = list(read_csv(out / "history.csv")[0])
    layers = [f"l{i}" for i in range(1, 4)] + [f"pre{i}" for i in range(2, 4)]
    assert {"nc1_l1", "nc2_etf_l1", "nc2_orth_l2", "nc3_span_l3", "nc1_pre2", "rank_pre3"} <= set(cols)
    assert {"nc1", "nc2_orth", "nc3_span", "ncc_accuracy"} <= set(summary["layers"][-1])
    assert bad_names(cols, layers) == []
    assert bad_names(keys_of(summary["layers"] + summary["pre_activation"]), []) == []
    assert bad_names(keys_of(summary["analysis"]["layers"]), []) == []
    assert {"nc1", "nc2_orth"} <= set(recorded["table"]) and bad_names(recorded["table"], []) == []
    assert recorded["plot"] and bad_names(recorded["plot"], []) == []


def test_train_outputs_use_registry_names(tmp_path: Path, recorded):
    out = tmp_path / "train"
    args = ["train", "--dataset", "digits", "--classes", "0,1,2", "--per-class", "20", "--feature-dim", "6",
            "--head-width", "6", "--batch-size", "20", "--epochs", "1", "--fit-optimal-epochs", "0",
            "--no-progress", "--device", "cpu", "--out", str(out)]  # fmt: skip
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    summary = json.loads((out / "summary.json").read_text())
    cols = list(read_csv(out / "history.csv")[0])
    layers = ["h1", "l2", "l3", "out"]
    assert {"nc1_h1", "nc2_orth_l2", "nc2_etf_out", "nc3_span_l3", "ncc_accuracy_out", "cdnv_l2"} <= set(cols)
    assert bad_names(cols, layers) == []
    assert bad_names(keys_of(summary["layers"]), []) == []
    assert bad_names(keys_of(summary["theory"]["layers"]), []) == []
    assert "nc3_span" in summary["theory"]["layers"][0]
    assert {"nc1", "nc2_orth", "ncc_accuracy"} <= set(recorded["table"]) and bad_names(recorded["table"], []) == []
    assert recorded["plot"] and bad_names(recorded["plot"], []) == []
