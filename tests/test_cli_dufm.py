"""``deepcollapse dufm`` end to end through typer's CliRunner."""

from __future__ import annotations

import csv
import json

import pytest
from typer.testing import CliRunner

from deepcollapse import theory as T
from deepcollapse.cli import app

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, ["dufm", *args, "--no-progress"])


def test_done_criterion_run(tmp_path):
    """The issue's 'done means' command: gap < 1e-4, NC1 < 1e-4 at every layer, L_DNC from docs/theory.md."""
    out = tmp_path / "run"
    r = invoke(
        "--classes", "2", "--n-per-class", "10", "--layers", "3", "--width", "16",
        "--lambda-h", "2e-3", "--lambda-w", "2e-3", "--out", str(out),
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    summary = json.loads((out / "summary.json").read_text())
    c = (10 * 2e-3 * 2e-3**3) ** (1 / 4)
    s = summary["theory"]["s"]
    formula = 0.5 * (1 - s) ** 2 + (2 / 2) * 4 * c * s ** (2 / 4)
    assert summary["theory"]["dnc_loss"] == pytest.approx(formula, rel=1e-14)
    assert (1 - s) * s ** (2 / 4) == pytest.approx(2 * c, rel=1e-10)
    assert abs(summary["gap"]) < 1e-4
    assert [e["layer"] for e in summary["layers"]] == [1, 2, 3]
    assert all(e["nc1"] < 1e-4 for e in summary["layers"])
    assert all({"layer", "nc1", "nc2_etf", "nc3_span"} <= set(e) for e in summary["layers"])
    assert all(("nc2_orth" in e) == (e["stage"] == "post") for e in summary["layers"])
    assert summary["analysis"]["verdict"] == "dnc" and summary["analysis"]["gap"] == summary["gap"]
    assert summary["stop_reason"] == "gap" and summary["certificate"]["gap"] <= 1e-9  # K = 2: a certified gap
    for name in ("config.json", "history.csv", "loss.png", "metrics.png", "checkpoint.pt"):
        assert (out / name).stat().st_size > 0
    rows = list(csv.DictReader((out / "history.csv").open()))
    assert {"step", "loss", "fit", "reg", "gap", "nc1_l3"} <= set(rows[0])
    assert "L_DNC" in r.output and "nc1" in r.output


def test_gd_and_unequal_classes(tmp_path):
    out = tmp_path / "gd"
    r = invoke(
        "--n-per-class",
        "3,5",
        "--layers",
        "2",
        "--width",
        "4",
        "--optimizer",
        "gd",
        "--steps",
        "200",
        "--out",
        str(out),
    )
    assert r.exit_code == 0, r.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["theory"] is None and summary["gap"] is None  # no closed form for unequal classes
    assert summary["steps"] == 200


def test_resume_continues_a_run(tmp_path):
    out = tmp_path / "r"
    assert (
        invoke("--optimizer", "gd", "--steps", "50", "--layers", "2", "--width", "4", "--out", str(out)).exit_code == 0
    )
    r = invoke("--optimizer", "gd", "--steps", "120", "--layers", "2", "--width", "4", "--out", str(out), "--resume")
    assert r.exit_code == 0, r.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 120
    r = invoke("--optimizer", "gd", "--steps", "120", "--layers", "3", "--width", "4", "--out", str(out), "--resume")
    assert r.exit_code == 1 and "different configuration" in r.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["--classes", "1"], "num_classes must be >= 2"),
        (["--n-per-class", "0"], "--n-per-class must be >= 1"),
        (["--lambda-h", "-0.1"], "--lambda-h must be >= 0"),
        (["--lambda-w", "1e-3,-1e-3,1e-3"], "lambda_w[1] must be >= 0"),
        (["--width", "16,16"], "width needs one value or one per layer"),
        (["--classes", "3", "--width", "2"], "width below K = 3"),
        (["--optimizer", "magic"], "optimizer must be one of"),
        (["--dtype", "float16"], "dtype must be one of"),
        (["--width", "abc"], "--width must be a number"),
        (["--optimizer", "gd", "--lr", "1e6", "--steps", "50"], "the loss became"),
    ],
)
def test_bad_input_gives_one_line_error(tmp_path, args, message):
    r = invoke(*args, "--out", str(tmp_path / "x"))
    assert r.exit_code == 1
    assert message in r.output
    assert "Traceback" not in r.output


def test_diverged_run_keeps_its_files(tmp_path):
    out = tmp_path / "div"
    r = invoke("--optimizer", "gd", "--lr", "1e6", "--steps", "50", "--out", str(out))
    assert r.exit_code == 1
    assert json.loads((out / "summary.json").read_text())["status"] == "diverged"
    assert (out / "history.csv").exists()


def test_out_dir_with_another_run_is_refused(tmp_path):
    out = tmp_path / "o"
    assert invoke("--steps", "3", "--out", str(out), "--no-plots").exit_code == 0
    r = invoke("--steps", "3", "--out", str(out))
    assert r.exit_code == 1 and "--overwrite" in r.output
    assert invoke("--steps", "3", "--out", str(out), "--overwrite", "--no-plots").exit_code == 0


def test_zero_solution_past_the_threshold(tmp_path):
    lam = 1.5 * T.zero_threshold(num_classes=2, num_layers=3, n=5).lambda_equal
    out = tmp_path / "z"
    r = invoke("--n-per-class", "5", "--lambda-h", str(lam), "--lambda-w", str(lam), "--out", str(out), "--no-plots")
    assert r.exit_code == 0, r.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["theory"]["s"] == 0.0 and summary["theory"]["zero_threshold"]["zero_is_global_optimum"]
    assert summary["analysis"]["verdict"] == "zero"
    assert summary["final_loss"] == pytest.approx(0.5, abs=1e-8)


def test_theory_command_prints_closed_forms():
    r = runner.invoke(app, ["theory", "-K", "2", "-n", "5", "-L", "3", "--lambda-h", "0.005", "--lambda-w", "0.005"])
    assert r.exit_code == 0, r.output
    assert "L_DNC = 0.0297943235" in r.output
    r = runner.invoke(
        app, ["theory", "-K", "2", "-n", "5", "-L", "3", "--lambda-h", "0.5", "--lambda-w", "0.5", "--json"]
    )
    data = json.loads(r.output)
    assert data["s"] == 0.0 and data["zero_threshold"]["zero_is_global_optimum"]
    assert (
        "zero is the global optimum"
        in runner.invoke(app, ["theory", "-n", "5", "--lambda-h", "0.5", "--lambda-w", "0.5"]).output
    )
    r = runner.invoke(app, ["theory", "-K", "10", "-L", "4", "-n", "5", "--lambda-h", "0.03", "--lambda-w", "0.03"])
    assert "zero beats every DNC configuration (not proven globally optimal" in r.output
    assert "global optimum" not in r.output.replace("not proven globally optimal", "")
    r = runner.invoke(app, ["theory", "-K", "1"])
    assert r.exit_code == 1 and "num_classes" in r.output


def test_one_verdict_even_for_a_run_that_goes_nowhere(tmp_path):
    """lr 1e6: the line search never accepts a step; the run stalls far from the optimum. One verdict is
    printed, and it is not "dnc"."""
    r = invoke("--lr", "1e6", "--steps", "200", "--out", str(tmp_path / "x"), "--no-plots")
    assert r.exit_code == 0, r.output
    assert r.output.count("verdict:") == 1 and "verdict: other" in r.output
    assert "does NOT match" not in r.output
    summary = json.loads((tmp_path / "x" / "summary.json").read_text())
    assert "check" not in summary and summary["analysis"]["verdict"] == "other"
