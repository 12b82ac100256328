"""The DNC-optimality atlas: cells, bad input, the K = 2 theorem, resume, the CLI."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from deepcollapse._validate import DeepCollapseError
from deepcollapse.cli import app
from deepcollapse.experiments.atlas import AtlasOptions, atlas_cells, read_atlas, run_atlas
from dufm_reference import np_dnc_loss, np_dufm_loss

FAST = AtlasOptions(n_per_class=3, random=1, low_rank=1, adam_steps=400)
runner = CliRunner()


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (([1, 2], [3], [0.004]), "classes must be >= 2"),
        (([2], [0], [0.004]), "layers must be >= 1"),
        (([2], [3], [0.0]), "lambdas must be > 0"),
        (([2], [3], [-1e-3]), "lambdas must be > 0"),
        (([2, 6], [3], [0.004], AtlasOptions(width=4)), "width 4 is below the number of classes K = 6"),
        (([], [3], [0.004]), "classes is empty"),
    ],
)
def test_bad_grid_fails_before_running(tmp_path, args, match):
    with pytest.raises(DeepCollapseError, match=match):
        run_atlas(*args[:3], tmp_path / "a", options=args[3] if len(args) > 3 else FAST)
    assert not (tmp_path / "a").exists()


def test_cells_and_keys():
    cells = atlas_cells([6, 2], [3], [0.004, 0.001], FAST)
    assert [(c["num_classes"], c["lambda"], c["width"]) for c in cells] == [
        (2, 0.001, 6),
        (2, 0.004, 6),
        (6, 0.001, 18),
        (6, 0.004, 18),
    ]
    other = atlas_cells([6, 2], [3], [0.004, 0.001], AtlasOptions(n_per_class=3, random=3))
    assert {c["key"] for c in cells}.isdisjoint(c["key"] for c in other)  # the budget is part of a cell's key


def test_two_classes_end_at_dnc_and_resume(tmp_path, one_thread):
    """K = 2: L_DNC is the global optimum, so every cell ends at it (never below) with verdict dnc."""
    out = tmp_path / "atlas"
    seen = []
    summary = run_atlas([2], [3], [0.002, 0.006], out, options=FAST, threads=1, workers=1, on_row=seen.append)
    assert summary["ran"] == 2 and summary["violations"] == 0 and len(seen) == 2
    rows = read_atlas(out)
    for r in rows:
        d = np_dnc_loss(2, r["num_layers"], 3, r["lambda"])
        assert r["dnc_loss"] == pytest.approx(d, rel=1e-9)
        assert d * (1 - 1e-9) <= r["best_loss"] <= d * (1 + 1e-6)
        assert r["verdict"] == "dnc" and r["srg_loss"] is None and r["theorem_violation"] is False
        point = torch.load(out / "points" / f"{r['key']}.pt", weights_only=True)
        h1, ws = point["h1"].numpy(), [w.numpy() for w in point["weights"]]
        assert np_dufm_loss(h1, ws, [3, 3], r["lambda"], r["lambda"]) == pytest.approx(r["best_loss"], rel=1e-12)
    assert (out / "atlas.png").stat().st_size > 0
    # a torn last line (a crash mid-write) is dropped with a warning and its cell runs again
    text = (out / "atlas.csv").read_text()
    (out / "atlas.csv").write_text(text[: text.rstrip("\n").rfind("\n") + 1] + text.splitlines()[-1][:20])
    with pytest.warns(UserWarning, match="torn last row"):
        again = run_atlas([2], [3], [0.002, 0.006], out, options=FAST, threads=1, workers=1, resume=True)
    assert (again["ran"], again["skipped"]) == (1, 1)
    assert len(read_atlas(out)) == 2
    with pytest.raises(DeepCollapseError, match="other search options"):
        run_atlas([2], [3], [0.002], out, options=AtlasOptions(n_per_class=3, random=2), resume=True)


def test_cli(tmp_path):
    res = runner.invoke(app, ["atlas", "--classes", "2,1", "--out", str(tmp_path / "x")])
    assert res.exit_code == 1 and "classes must be >= 2" in res.output and "Traceback" not in res.output
    res = runner.invoke(app, ["atlas", "--classes", "3", "--width", "2", "--out", str(tmp_path / "x")])
    assert res.exit_code == 1 and "--width 2 is below" in res.output
    res = runner.invoke(app, ["atlas", "--lambda", "0", "--out", str(tmp_path / "x")])
    assert res.exit_code == 1 and "lambdas must be > 0" in res.output
    args = ["atlas", "--classes", "3", "--layers", "2", "--lambda", "0.004", "--n-per-class", "2", "--random", "1"]
    args += ["--low-rank", "1", "--adam-steps", "300", "--workers", "1", "--threads", "1", "--out", str(tmp_path / "c")]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    (row,) = read_atlas(tmp_path / "c")
    assert row["num_classes"] == 3 and row["best_source"] and row["verdict"]
    assert row["best_loss"] <= row["dnc_loss"] * (1 + 1e-6)  # the DNC start is among the starts


def test_ray_backend_matches_local(tmp_path):
    """The Ray backend (one task per (K, L) group) writes the same rows as the local one."""
    ray = pytest.importorskip("ray")
    grid = ([2], [2], [0.004])
    run_atlas(*grid, tmp_path / "local", options=FAST, threads=1, workers=1)
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        summary = run_atlas(*grid, tmp_path / "ray", options=FAST, backend="ray")
    finally:
        if started:
            ray.shutdown()
    assert summary["ran"] == 1
    (a,), (b,) = read_atlas(tmp_path / "local"), read_atlas(tmp_path / "ray")
    assert {k: v for k, v in a.items() if k != "seconds"} == {k: v for k, v in b.items() if k != "seconds"}


def test_a_two_class_cell_below_dnc_is_reported_as_a_bug(tmp_path, monkeypatch):
    """The theorem forbids K = 2 below L_DNC: such a row is written, flagged, and the run ends in an error."""
    import deepcollapse.theory.analysis as analysis

    real = analysis.analyze_solution

    def lower(*args, **kwargs):
        rec = real(*args, **kwargs)
        return {**rec, "loss": rec["dnc_loss"] * 0.999}

    monkeypatch.setattr(analysis, "analyze_solution", lower)
    with pytest.raises(DeepCollapseError, match="which the theorem forbids"):
        run_atlas([2], [2], [0.004], tmp_path, options=FAST, threads=1, workers=1)
    (row,) = read_atlas(tmp_path)
    assert row["theorem_violation"] is True
