"""`deepcollapse sweep` and `deepcollapse lowrank ...` through typer's CliRunner."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from deepcollapse.cli import app
from deepcollapse.files import read_csv, read_json

runner = CliRunner()
SPEC = {
    "grid": {"seed": [0, 1]},
    "fixed": {"num_classes": 4, "n_per_class": 2, "num_layers": 3, "width": 5, "max_steps": 100, "lambda": 0.004},
}


def test_sweep_and_resume(tmp_path):
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(SPEC))
    out = tmp_path / "out"
    res = runner.invoke(app, ["sweep", str(spec), "--out", str(out), "--threads", "1"])
    assert res.exit_code == 0, res.output
    assert "2 configurations, 2 run" in res.output
    assert len(read_csv(out / "results.csv")) == 2
    assert read_json(out / "sweep.json")["spec"]["grid"] == {"seed": [0, 1]}
    res = runner.invoke(app, ["sweep", str(spec), "--out", str(out), "--resume", "--set", "grid.seed=[0,1,2]"])
    assert res.exit_code == 1 and "different spec" in res.output
    res = runner.invoke(app, ["sweep", str(spec), "--out", str(out), "--resume"])
    assert res.exit_code == 0 and "0 run, 2 resumed" in res.output


def test_sweep_bad_input(tmp_path):
    out = str(tmp_path / "o")
    res = runner.invoke(app, ["sweep", json.dumps({**SPEC, "fixd": {}}), "--out", out])
    assert res.exit_code == 1 and "unknown key(s) ['fixd']" in res.output and "Traceback" not in res.output
    res = runner.invoke(app, ["sweep", json.dumps(SPEC), "--out", out, "--set", "fixed.lr=-1"])
    assert res.exit_code == 1 and "lr must be > 0" in res.output
    res = runner.invoke(app, ["sweep", str(tmp_path / "missing.json"), "--out", out])
    assert res.exit_code == 1 and "no such file" in res.output
    res = runner.invoke(app, ["sweep", json.dumps(SPEC), "--out", out, "--backend", "spark"])
    assert res.exit_code == 1 and "--backend" in res.output


def test_lowrank_table(tmp_path):
    res = runner.invoke(app, ["lowrank", "table", "--layers", "4", "--r", "4,5", "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    rows = read_csv(tmp_path / "srg_table.csv")
    assert [(r["L"], r["r"], r["K"]) for r in rows] == [(4, 4, 6), (4, 5, 10)]
    assert all(r["ratio"] < 1 for r in rows) and (tmp_path / "srg_table.png").exists()
    res = runner.invoke(app, ["lowrank", "table", "--layers", "1", "--out", str(tmp_path)])
    assert res.exit_code == 1 and "--layers must be >= 2" in res.output


def test_lowrank_gd_and_sweeps(tmp_path):
    res = runner.invoke(
        app,
        [
            "lowrank",
            "gd",
            "--seeds",
            "2",
            "--steps",
            "50",
            "--classes",
            "3",
            "--width",
            "6",
            "--out",
            str(tmp_path / "gd"),
        ],
    )
    assert res.exit_code == 0, res.output
    summary = read_json(tmp_path / "gd" / "summary.json")
    assert len(summary["runs"]) == 2 and "verdict" in summary["runs"][0]
    assert (tmp_path / "gd" / "gd_lowrank.png").exists() and (tmp_path / "gd" / "gd_lowrank_spectra.png").exists()
    again = [
        "lowrank",
        "gd",
        "--seeds",
        "1",
        "--steps",
        "5",
        "--classes",
        "3",
        "--width",
        "6",
        "--out",
        str(tmp_path / "gd"),
    ]
    res = runner.invoke(app, again)
    assert res.exit_code == 1 and "--overwrite" in res.output  # an earlier run is never replaced silently
    assert runner.invoke(app, [*again, "--overwrite"]).exit_code == 0
    res = runner.invoke(
        app,
        [
            "lowrank",
            "rank-vs-wd",
            "--lambdas",
            "0.002,0.004",
            "--seeds",
            "1",
            "--steps",
            "30",
            "--width",
            "12",
            "--out",
            str(tmp_path / "wd"),
        ],
    )
    assert res.exit_code == 0, res.output
    assert [r["lambda"] for r in read_csv(tmp_path / "wd" / "rank_vs_wd.csv")] == [0.002, 0.004]
    res = runner.invoke(
        app,
        ["lowrank", "dnc-vs-width", "--widths", "10,12", "--seeds", "1", "--steps", "30", "--out", str(tmp_path / "w")],
    )
    assert res.exit_code == 0, res.output
    assert [r["width"] for r in read_csv(tmp_path / "w" / "dnc_vs_width.csv")] == [10, 12]
