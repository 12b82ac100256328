"""`deepcollapse measure`: saved features in, metrics.json and a plot out; bad input gives one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from deepcollapse.cli import measure as measure_cmd
from deepcollapse.measure.readers import load_inputs

runner = CliRunner()


pytestmark = pytest.mark.usefixtures("one_thread")


def make_app() -> typer.Typer:
    app = typer.Typer(pretty_exceptions_enable=False)
    app.callback()(lambda: None)  # keep "measure" a sub-command whatever else is registered
    measure_cmd.register(app)
    return app


APP = make_app()


def invoke(*args: str):
    return runner.invoke(APP, ["measure", *map(str, args)])


def np_nc1_nc4(h: np.ndarray, y: np.ndarray, k: int) -> tuple[float, float]:
    h = h.reshape(len(h), -1).astype(np.float64)
    means = np.stack([h[y == c].mean(0) for c in range(k)])
    e = h - means[y]
    sw = e.T @ e / len(h)
    mbar = means - h.mean(0)
    nc1 = np.trace(sw @ np.linalg.pinv(mbar.T @ mbar / k, rtol=1e-10, hermitian=True)) / k
    nc4 = (((h[:, None] - means[None]) ** 2).sum(-1).argmin(1) == y).mean()
    return float(nc1), float(nc4)


@pytest.fixture
def arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    y = np.arange(300) % 4
    centres = rng.normal(size=(4, 6)) * 2
    return {
        "layer_a": centres[y] + rng.normal(size=(300, 6)),
        "layer_b": (centres[y, :6].reshape(300, 2, 3) + 0.5 * rng.normal(size=(300, 2, 3))).astype(np.float32),
        "labels": y,
    }


def layers_of(path: Path) -> dict[str, dict]:
    return {row["name"]: row for row in json.loads(path.read_text())["layers"]}


@pytest.mark.parametrize("compressed", [False, True])
def test_npz_matches_numpy(tmp_path: Path, arrays, compressed: bool) -> None:
    f = tmp_path / "feats.npz"
    (np.savez_compressed if compressed else np.savez)(f, **arrays)
    r = invoke(f, "--batch-size", 37)
    assert r.exit_code == 0, r.output
    out = tmp_path / "feats_dnc"
    assert (out / "metrics_vs_depth.png").stat().st_size > 0
    meta = json.loads((out / "metrics.json").read_text())
    assert meta["num_classes"] == 4 and meta["samples"] == 300
    rows = layers_of(out / "metrics.json")
    assert list(rows) == ["a", "b"] and rows["b"]["dim"] == 6 and rows["b"]["depth"] == 1
    for name in ("a", "b"):
        nc1, nc4 = np_nc1_nc4(arrays[f"layer_{name}"], arrays["labels"], 4)
        assert rows[name]["nc1"] == pytest.approx(nc1, rel=1e-8)
        assert rows[name]["nc4"] == pytest.approx(nc4)
    assert "DNC metrics of feats.npz" in r.output and "nc2_etf" in r.output


def test_npy_directory_in_natural_order_and_single_file(tmp_path: Path, arrays) -> None:
    d = tmp_path / "run"
    d.mkdir()
    np.save(d / "layer_10.npy", arrays["layer_a"])
    np.save(d / "layer_2.npy", arrays["layer_b"])
    np.save(d / "labels.npy", arrays["labels"])
    np.save(d / "other.npy", np.zeros(3))  # not a layer: ignored
    r = invoke(d, "--out", tmp_path / "o1", "--batch-size", 64)
    assert r.exit_code == 0, r.output
    rows = layers_of(tmp_path / "o1" / "metrics.json")
    assert list(rows) == ["2", "10"]
    r = invoke(d / "layer_10.npy", "--labels", d / "labels.npy", "--out", tmp_path / "o2")
    assert r.exit_code == 0, r.output
    single = layers_of(tmp_path / "o2" / "metrics.json")
    assert single["layer_10"]["nc1"] == pytest.approx(rows["10"]["nc1"], rel=1e-12)


def test_options(tmp_path: Path, arrays) -> None:
    f = tmp_path / "f.npz"
    np.savez(f, **arrays)
    assert invoke(f, "--out", tmp_path / "full", "--full").exit_code == 0
    assert invoke(f, "--out", tmp_path / "light", "--light").exit_code == 0
    r = invoke(f, "--out", tmp_path / "raw", "--no-normalize", "--passes", 1, "--num-classes", 4)
    assert r.exit_code == 0, r.output
    full, light, raw = (layers_of(tmp_path / d / "metrics.json") for d in ("full", "light", "raw"))
    assert light["a"]["nc1"] == pytest.approx(full["a"]["nc1"], rel=1e-10)
    assert raw["a"]["nc1"] == pytest.approx(4 * full["a"]["nc1"], rel=1e-9)
    assert "nc4" not in raw["a"] and "nc4" in full["a"]
    meta = json.loads((tmp_path / "raw" / "metrics.json").read_text())
    assert meta["options"] == {
        "passes": 1,
        "cov": "auto",
        "normalize": False,
        "weighting": "samples",
        "batch_size": 4096,
    }


def test_refuses_an_existing_run_unless_overwrite(tmp_path: Path, arrays) -> None:
    f = tmp_path / "f.npz"
    np.savez(f, **arrays)
    assert invoke(f).exit_code == 0
    r = invoke(f)
    assert r.exit_code == 1 and "already holds a run" in r.stderr and "--overwrite" in r.stderr
    assert invoke(f, "--overwrite").exit_code == 0


def one_line_error(tmp_path: Path, arrays: dict, *args: str, file: str = "f.npz") -> str:
    f = tmp_path / file
    np.savez(f, **arrays)
    r = invoke(f, "--out", tmp_path / "o", *args)
    assert r.exit_code == 1, r.output
    assert "Traceback" not in r.output
    return " ".join(r.stderr.split())


def test_bad_input_messages(tmp_path: Path, arrays) -> None:
    bad = dict(arrays)
    bad["layer_b"] = arrays["layer_b"].copy()
    bad["layer_b"][150, 1, 2] = np.nan
    assert "layer 'b', batch 2: features contains NaN or inf" in one_line_error(tmp_path, bad, "--batch-size", 64)
    msg = one_line_error(tmp_path, arrays, "--num-classes", 3)
    assert "labels must lie in 0..2 (num_classes=3), found 3" in msg
    assert "class(es) [4] have no samples" in one_line_error(tmp_path, arrays, "--num-classes", 5)
    assert "holds no 'labels' array" in one_line_error(tmp_path, {"layer_a": arrays["layer_a"]})
    assert "holds no feature arrays" in one_line_error(tmp_path, {"labels": arrays["labels"]})
    short = {**arrays, "labels": arrays["labels"][:200]}
    assert "layer 'a' has 300 rows but labels has 200 entries" in one_line_error(tmp_path, short)
    single = {**arrays, "labels": np.zeros(300, dtype=int)}
    assert "single class" in one_line_error(tmp_path, single)
    negative = {**arrays, "labels": arrays["labels"] - 1}
    assert "labels must lie in 0..1" in one_line_error(tmp_path, negative)
    (tmp_path / "x.txt").write_text("hi")
    r = invoke(tmp_path / "x.txt")
    assert r.exit_code == 1 and "expected an .npz file" in r.stderr
    r = invoke(tmp_path / "missing.npz")
    assert r.exit_code == 1 and "no such file or directory" in r.stderr
    np.save(tmp_path / "lone.npy", arrays["layer_a"])
    r = invoke(tmp_path / "lone.npy")
    assert r.exit_code == 1 and "pass its labels with --labels" in r.stderr


def test_npz_members_are_read_in_chunks(tmp_path: Path, arrays) -> None:
    f = tmp_path / "f.npz"
    np.savez_compressed(f, **arrays)
    layers, labels = load_inputs(f, None)
    chunks = list(layers[1].chunks(128))
    assert [c.shape for c in chunks] == [(128, 2, 3), (128, 2, 3), (44, 2, 3)]
    np.testing.assert_array_equal(np.concatenate(chunks), arrays["layer_b"])
    np.testing.assert_array_equal(labels, arrays["labels"])
