"""`deepcollapse train`: files written, summary printed, resume, and one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import typer
from typer.testing import CliRunner

from deepcollapse.cli import train as train_cmd
from deepcollapse.files import read_csv

runner = CliRunner()


def make_app() -> typer.Typer:
    app = typer.Typer(pretty_exceptions_enable=False)
    app.callback()(lambda: None)  # keep "train" a sub-command whatever else is registered
    train_cmd.register(app)
    return app


APP = make_app()
TINY = ["--dataset", "digits", "--classes", "0,1", "--per-class", "40", "--feature-dim", "8", "--head-width", "8",
        "--batch-size", "16", "--no-progress", "--device", "cpu"]  # fmt: skip


def invoke(*args: str):
    return runner.invoke(APP, ["train", *map(str, args)])


def one_line_error(result, text: str) -> None:
    assert result.exit_code == 1, result.output
    out = result.output.strip()
    assert out.startswith("error:") and text in out and len(out.splitlines()) == 1, out


def test_train_writes_results(tmp_path: Path) -> None:
    out = tmp_path / "run"
    r = invoke(*TINY, "--epochs", "3", "--fit-optimal-epochs", "1", "--out", out)
    assert r.exit_code == 0, r.output
    assert "L_DNC" in r.output and "train accuracy" in r.output
    summary = json.loads((out / "summary.json").read_text())
    assert {"train_accuracy", "test_accuracy", "layers", "theory", "fit_optimal"} <= set(summary)
    assert [e["layer"] for e in summary["layers"]] == ["h1", "l2", "l3", "out"]
    assert {"nc1", "nc2_orth", "nc2_etf", "nc3_span", "ncc_accuracy"} <= set(summary["layers"][0])
    assert summary["theory"]["n"] == 40 and summary["theory"]["num_classes"] == 2
    assert f"verdict of the head's solution: {summary['theory']['verdict']}." in r.output.replace("\n", " ")
    cols = set(read_csv(out / "history.csv")[0])
    assert {"epoch", "nc1_h1", "nc1_l2", "nc1_l3", "nc2_orth_l3", "nc3_span_l2", "train_acc", "test_acc"} <= cols
    config = json.loads((out / "config.json").read_text())
    assert config["data"]["classes"] == [0, 1] and config["net"]["head_layers"] == 3
    assert (out / "metrics.png").exists() and (out / "loss.png").exists()
    one_line_error(invoke(*TINY, "--epochs", "3", "--out", out), "already holds a run")
    assert invoke(*TINY, "--epochs", "2", "--fit-optimal-epochs", "0", "--out", out, "--overwrite").exit_code == 0


def test_stop_and_resume(tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = [*TINY, "--epochs", "3", "--fit-optimal-epochs", "0", "--out", out]
    r = invoke(*args, "--stop-after", "1")
    assert r.exit_code == 0 and "continue with --resume" in r.output
    r = invoke(*args, "--resume")
    assert r.exit_code == 0, r.output
    assert "resuming" in r.output and len(read_csv(out / "history.csv")) == 3
    one_line_error(invoke(*args, "--resume", "--lr", "0.3"), "different configuration")


@pytest.mark.parametrize(
    ("extra", "text"),
    [
        (["--dataset", "svhn"], "unknown data set 'svhn'"),
        (["--backbone", "vit"], "unknown backbone 'vit'"),
        (["--classes", "0,42"], "classes [42] do not occur"),
        (["--classes", "0,x"], "--classes must be a number"),
        (["--preset", "huge"], "unknown preset"),
        (["--dataset", "cifar10"], "--data-dir"),
        (["--dataset", "fashion-mnist", "--data-dir", "/nonexistent"], "dataset-fashion-mnist"),
        (["--lr", "-1"], "lr must be > 0"),
    ],
)
def test_bad_input(tmp_path: Path, extra: list[str], text: str) -> None:
    one_line_error(invoke(*TINY, "--epochs", "1", "--out", tmp_path / "x", *extra), text)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_unavailable(tmp_path: Path) -> None:
    one_line_error(invoke(*TINY[:-2], "--device", "cuda", "--out", tmp_path / "x"), "CUDA is not available")
