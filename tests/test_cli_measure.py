"""`deepcollapse measure`: saved features in, metrics.json + per_class.csv + a plot out, values equal to a numpy
reference written here from the definitions; bad input gives one line and writes nothing."""

from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from deepcollapse.cli import measure as measure_cmd
from deepcollapse.files import read_csv
from deepcollapse.measure.readers import load_inputs

runner = CliRunner()

pytestmark = pytest.mark.usefixtures("one_thread")


def make_app() -> typer.Typer:
    app = typer.Typer(pretty_exceptions_enable=False)
    app.callback()(lambda: None)  # keep "measure" a sub-command whatever else is registered
    measure_cmd.register(app)
    return app


APP = make_app()


def invoke(*args: object):
    return runner.invoke(APP, ["measure", *map(str, args)])


# ------------------------------------------------------------------------------ the numpy reference


def reference(h: np.ndarray, y: np.ndarray, classes: list[int]) -> dict[str, object]:
    """The metrics of features ``h`` over ``classes`` (K = len(classes)), from the definitions, float64."""
    h = np.asarray(h, dtype=np.float64).reshape(len(h), -1)
    keep = np.isin(y, classes)
    h, y = h[keep], np.searchsorted(classes, y[keep])
    k, n = len(classes), len(h)
    means = np.stack([h[y == c].mean(0) for c in range(k)])
    e = h - means[y]
    sw = e.T @ e / n
    mbar = means - h.mean(0)
    sb = mbar.T @ mbar / k
    var = np.array([(e[y == c] ** 2).sum(1).mean() for c in range(k)])
    dist2 = ((means[:, None] - means[None]) ** 2).sum(-1)
    with np.errstate(divide="ignore"):
        cd = (var[:, None] + var[None]) / (2 * dist2)
    np.fill_diagonal(cd, np.nan)
    iu = np.triu_indices(k, 1)
    ncc = ((h[:, None, :] - means[None]) ** 2).sum(-1).argmin(1)
    etf = np.eye(k) - 1.0 / k
    g = mbar @ mbar.T
    return {
        "nc1": float(np.trace(sw @ np.linalg.pinv(sb, rtol=1e-10, hermitian=True)) / k),
        "nc2_etf": float(np.linalg.norm(g / np.linalg.norm(g) - etf / np.linalg.norm(etf))),
        "ncc": float((ncc == y).mean()),
        "cdnv": float(cd[iu].mean()),
        "h": h,
        "y": y,
        "mbar": mbar,
        "ncc_pred": ncc,
        "per_class": [
            {
                "class": classes[c],
                "samples": int((y == c).sum()),
                "within_variance": var[c],
                "mean_norm": float(np.linalg.norm(means[c])),
                "centred_mean_norm": float(np.linalg.norm(mbar[c])),
                "ncc_accuracy": float((ncc[y == c] == c).mean()),
                "cdnv_mean": float(np.nanmean(cd[c])),
                "cdnv_max": float(np.nanmax(cd[c])),
                "cdnv_max_class": classes[int(np.nanargmax(cd[c]))],
            }
            for c in range(k)
        ],
    }


def papyan_nc4(ref: dict, w: np.ndarray, b: np.ndarray | None) -> float:
    """Papyan et al.: the fraction of samples whose classifier prediction differs from the nearest class mean."""
    logits = ref["h"] @ w.T + (0.0 if b is None else b)
    return float((logits.argmax(1) != ref["ncc_pred"]).mean())


def zhu_nc3(w: np.ndarray, mbar: np.ndarray) -> float:
    """Zhu et al.: ``|| W M̄^T/||W M̄^T||_F - (I - 11^T/K)/sqrt(K-1) ||_F``."""
    k = len(w)
    g = w @ mbar.T
    return float(np.linalg.norm(g / np.linalg.norm(g) - (np.eye(k) - 1.0 / k) / np.sqrt(k - 1)))


def self_duality(w: np.ndarray, mbar: np.ndarray) -> float:
    """Papyan et al.: ``|| W/||W||_F - M̄/||M̄||_F ||_F`` with the centred class means."""
    return float(np.linalg.norm(w / np.linalg.norm(w) - mbar / np.linalg.norm(mbar)))


@pytest.fixture
def arrays() -> dict[str, np.ndarray]:
    """Two layers far from the origin (float64 and a float32 (N, 2, 3) map), 5 classes, unequal counts."""
    rng = np.random.default_rng(0)
    y = rng.permutation(np.arange(350) % 5)
    y[:40] = 0  # unequal classes
    centres = rng.normal(size=(5, 6)) * 2
    return {
        "layer_a": centres[y] + rng.normal(size=(350, 6)) + 50.0,
        "layer_b": (centres[y].reshape(350, 2, 3) + 0.5 * rng.normal(size=(350, 2, 3))).astype(np.float32),
        "labels": y,
        "weight": rng.normal(size=(5, 6)),
        "bias": rng.normal(size=5),
    }


def metrics_json(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


def layers_of(out: Path) -> dict[str, dict]:
    return {row["name"]: row for row in metrics_json(out)["layers"]}


# ----------------------------------------------------------------------------------------- results


@pytest.mark.parametrize("compressed", [False, True])
def test_npz_with_classifier_matches_numpy(tmp_path: Path, arrays, compressed: bool) -> None:
    f = tmp_path / "feats.npz"
    (np.savez_compressed if compressed else np.savez)(f, **arrays)
    r = invoke(f, "--batch-size", 37)
    assert r.exit_code == 0, r.output
    out = tmp_path / "feats_dnc"
    meta = metrics_json(out)
    assert {k: meta[k] for k in ("samples", "num_classes", "classes", "missing_classes")} == {
        "samples": 350,
        "num_classes": 5,
        "classes": [0, 1, 2, 3, 4],
        "missing_classes": [],
    }
    assert meta["classifier"] == {"source": str(f), "shape": [5, 6], "bias": True}
    assert meta["options"]["rtol"] is None and meta["options"]["batch_size"] == 37
    rows = layers_of(out)
    assert list(rows) == ["a", "b"]
    assert [(r["depth"], r["dim"], r["dtype"], r["samples"]) for r in rows.values()] == [
        (0, 6, "float64", 350),
        (1, 6, "float32", 350),
    ]
    csv_rows = read_csv(out / "per_class.csv", text_columns=("layer",))
    for name in ("a", "b"):
        ref = reference(arrays[f"layer_{name}"], arrays["labels"], [0, 1, 2, 3, 4])
        m = rows[name]["metrics"]
        assert "dim" not in m and "samples" not in m  # metadata is not among the metrics
        assert m["nc1"] == pytest.approx(ref["nc1"], rel=1e-8)
        assert m["nc2_etf"] == pytest.approx(ref["nc2_etf"], rel=1e-8)
        assert m["ncc_accuracy"] == pytest.approx(ref["ncc"], abs=1e-12)
        assert m["cdnv"] == pytest.approx(ref["cdnv"], rel=1e-8)
        mine = [row for row in csv_rows if row["layer"] == name]
        assert len(mine) == 5
        for got, want in zip(mine, ref["per_class"], strict=True):
            assert got["depth"] == rows[name]["depth"]
            for key, value in want.items():
                assert got[key] == pytest.approx(value, rel=1e-8), (name, key)
    # the classifier reads the last layer only: self-duality with centred means (it has a bias), Papyan's NC4
    assert "nc3_duality" not in rows["a"]["metrics"] and "nc4" not in rows["a"]["metrics"]
    ref_b = reference(arrays["layer_b"], arrays["labels"], [0, 1, 2, 3, 4])
    assert rows["b"]["metrics"]["nc3_duality"] == pytest.approx(self_duality(arrays["weight"], ref_b["mbar"]), rel=1e-8)
    assert rows["b"]["metrics"]["nc3_zhu"] == pytest.approx(zhu_nc3(arrays["weight"], ref_b["mbar"]), rel=1e-8)
    want = papyan_nc4(ref_b, arrays["weight"], arrays["bias"])
    assert 0.05 < want < 0.95 and rows["b"]["metrics"]["nc4"] == pytest.approx(want, abs=1e-12)
    logits = ref_b["h"] @ arrays["weight"].T + arrays["bias"]
    per_class_nc4 = [(logits.argmax(1) != ref_b["ncc_pred"])[ref_b["y"] == c].mean() for c in range(5)]
    got = [row["nc4"] for row in csv_rows if row["layer"] == "b"]
    assert got == pytest.approx(per_class_nc4, abs=1e-12)
    assert all(math.isnan(row["nc4"]) if isinstance(row["nc4"], float) else row["nc4"] is None for row in csv_rows[:5])
    assert (out / "metrics_vs_depth.png").exists()
    assert "DNC metrics of feats.npz" in r.output and "nc2_etf" in r.output


def test_classes_subset_and_weight_file(tmp_path: Path, arrays) -> None:
    f = tmp_path / "f.npz"
    np.savez(f, **{k: v for k, v in arrays.items() if k not in ("weight", "bias")})
    np.save(tmp_path / "w.npy", arrays["weight"])
    r = invoke(f, "--classes", "0,2-3", "--weight", tmp_path / "w.npy", "--out", tmp_path / "o", "--rtol", "1e-9")
    assert r.exit_code == 0, r.output
    meta = metrics_json(tmp_path / "o")
    assert meta["classes"] == [0, 2, 3] and meta["options"]["rtol"] == 1e-9
    assert [layer["rtol"] for layer in meta["layers"]] == [1e-9, 1e-9]  # the cutoff used, next to the metrics
    assert meta["classifier"] == {"source": str(tmp_path / "w.npy"), "shape": [5, 6], "bias": False}
    rows = layers_of(tmp_path / "o")
    for name in ("a", "b"):
        ref = reference(arrays[f"layer_{name}"], arrays["labels"], [0, 2, 3])
        assert rows[name]["samples"] == len(ref["y"])
        assert rows[name]["metrics"]["nc1"] == pytest.approx(ref["nc1"], rel=1e-8)
        assert rows[name]["metrics"]["cdnv"] == pytest.approx(ref["cdnv"], rel=1e-8)
    ref_b = reference(arrays["layer_b"], arrays["labels"], [0, 2, 3])
    w = arrays["weight"][[0, 2, 3]]  # the classifier's rows of the measured classes
    means = ref_b["mbar"] + ref_b["h"].mean(0)  # no bias: self-duality with the uncentred means
    assert "nc3_duality" not in rows["b"]["metrics"]  # no bias: the uncentred form, under its own name
    assert rows["b"]["metrics"]["nc3_duality_uncentred"] == pytest.approx(self_duality(w, means), rel=1e-8)
    assert rows["b"]["metrics"]["nc4"] == pytest.approx(papyan_nc4(ref_b, w, None), abs=1e-12)
    per_class = read_csv(tmp_path / "o" / "per_class.csv", text_columns=("layer",))
    assert [row["class"] for row in per_class] == [0, 2, 3, 0, 2, 3]
    assert {row["cdnv_max_class"] for row in per_class} <= {0, 2, 3}


def test_missing_class_is_measured_over_the_classes_present(tmp_path: Path, arrays) -> None:
    labels = arrays["labels"].copy()
    keep = labels != 3
    data = {"layer_a": arrays["layer_a"][keep], "labels": labels[keep]}
    np.savez(tmp_path / "f.npz", **data)
    r = invoke(tmp_path / "f.npz", "--num-classes", 6, "--out", tmp_path / "o")
    assert r.exit_code == 0, r.output
    assert "warning: classes [3, 5] of 0..5 have no samples" in " ".join(r.output.split())
    meta = metrics_json(tmp_path / "o")
    assert meta["classes"] == [0, 1, 2, 4] and meta["missing_classes"] == [3, 5] and meta["num_classes"] == 6
    ref = reference(data["layer_a"], data["labels"], [0, 1, 2, 4])
    assert layers_of(tmp_path / "o")["a"]["metrics"]["nc1"] == pytest.approx(ref["nc1"], rel=1e-8)


def test_npy_directory_in_natural_order_and_single_file(tmp_path: Path, arrays) -> None:
    d = tmp_path / "run"
    d.mkdir()
    np.save(d / "layer_10.npy", arrays["layer_a"])
    np.save(d / "layer_2.npy", arrays["layer_b"])
    np.save(d / "labels.npy", arrays["labels"][:, None])  # an (N, 1) column
    np.save(d / "other.npy", np.zeros(3))  # not a layer: ignored
    r = invoke(d, "--out", tmp_path / "o1", "--batch-size", 64)
    assert r.exit_code == 0, r.output
    rows = layers_of(tmp_path / "o1")
    assert list(rows) == ["2", "10"]
    onehot = np.eye(5, dtype=np.int8)[arrays["labels"]]
    np.save(tmp_path / "onehot.npy", onehot)
    r = invoke(d / "layer_10.npy", "--labels", tmp_path / "onehot.npy", "--out", tmp_path / "o2")
    assert r.exit_code == 0, r.output
    single = layers_of(tmp_path / "o2")
    ref = reference(arrays["layer_a"], arrays["labels"], [0, 1, 2, 3, 4])
    assert single["layer_10"]["metrics"]["nc1"] == pytest.approx(ref["nc1"], rel=1e-8)
    assert rows["10"]["metrics"]["nc1"] == pytest.approx(ref["nc1"], rel=1e-8)


def test_options(tmp_path: Path, arrays) -> None:
    f = tmp_path / "f.npz"
    np.savez(f, **arrays)
    ref = reference(arrays["layer_a"], arrays["labels"], [0, 1, 2, 3, 4])
    for flag in ("--full", "--light"):
        r = invoke(f, "--out", tmp_path / flag, flag)
        assert r.exit_code == 0, r.output
        assert layers_of(tmp_path / flag)["a"]["metrics"]["nc1"] == pytest.approx(ref["nc1"], rel=1e-8)
    r = invoke(f, "--out", tmp_path / "raw", "--no-normalize", "--passes", 1, "--weighting", "classes")
    assert r.exit_code == 0, r.output
    raw = layers_of(tmp_path / "raw")["a"]["metrics"]
    h = arrays["layer_a"]
    means = np.stack([h[arrays["labels"] == c].mean(0) for c in range(5)])
    e = h - means[arrays["labels"]]
    mbar = means - means.mean(0)  # 'classes': the plain average of the class means
    want = np.trace(e.T @ e / len(h) @ np.linalg.pinv(mbar.T @ mbar / 5, rtol=1e-10, hermitian=True))
    assert "nc1" not in raw and raw["nc1_unnormalized"] == pytest.approx(want, rel=1e-8)
    assert "ncc_accuracy" not in raw and "nc4" not in raw  # one pass, no classifier: not computed, so absent
    assert metrics_json(tmp_path / "raw")["options"] == {
        "batch_size": 4096,
        "device": "cpu",
        "passes": 1,
        "cov": None,
        "normalize": False,
        "weighting": "classes",
        "rtol": None,
    }


def test_inf_is_written_apart_from_not_computed(tmp_path: Path) -> None:
    """Two classes with the very same samples: equal means while features vary, so NC1 and CDNV are inf."""
    x = np.random.default_rng(1).normal(size=(20, 3))
    np.savez(tmp_path / "f.npz", features=np.concatenate([x, x]), labels=np.repeat([0, 1], 20))
    r = invoke(tmp_path / "f.npz", "--out", tmp_path / "o", "--passes", 1)
    assert r.exit_code == 0, r.output
    text = (tmp_path / "o" / "metrics.json").read_text()
    m = json.loads(text)["layers"][0]["metrics"]
    assert m["nc1"] == "inf" and m["cdnv"] == "inf" and float(m["nc1"]) == math.inf
    assert "ncc_accuracy" not in m and "Infinity" not in text and "NaN" not in text
    rows = read_csv(tmp_path / "o" / "per_class.csv", text_columns=("layer",))
    assert [row["cdnv_mean"] for row in rows] == [math.inf, math.inf]


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_files_follow_the_umask(tmp_path: Path, arrays, umask: int) -> None:
    np.savez(tmp_path / "f.npz", **arrays)
    old = os.umask(umask)
    try:
        r = invoke(tmp_path / "f.npz", "--out", tmp_path / "o")
    finally:
        os.umask(old)
    assert r.exit_code == 0, r.output
    for name in ("metrics.json", "per_class.csv", "metrics_vs_depth.png"):
        assert stat.S_IMODE(os.stat(tmp_path / "o" / name).st_mode) == 0o666 & ~umask, name


def test_refuses_an_existing_run_unless_overwrite(tmp_path: Path, arrays) -> None:
    f = tmp_path / "f.npz"
    np.savez(f, **arrays)
    assert invoke(f).exit_code == 0
    r = invoke(f)
    assert r.exit_code == 1 and "already holds a run" in r.stderr and "pass --overwrite" in r.stderr
    assert invoke(f, "--overwrite").exit_code == 0


# -------------------------------------------------------------------------------------- bad input


def one_line_error(tmp_path: Path, arrays: dict, *args: object) -> str:
    """Run on ``arrays`` saved as an .npz; check exit code 1, one line, no traceback and no files written."""
    f = tmp_path / "in" / "f.npz"
    f.parent.mkdir(exist_ok=True)
    np.savez(f, **arrays)
    r = invoke(f, "--out", tmp_path / "o", *args)
    assert r.exit_code == 1, r.output
    assert "Traceback" not in r.output and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "o").exists()  # nothing written half-way
    assert sorted(p.name for p in f.parent.iterdir()) == ["f.npz"]
    return " ".join(r.stderr.split())


def test_bad_input_one_line_and_no_files(tmp_path: Path, arrays) -> None:
    bad = dict(arrays)
    bad["layer_b"] = arrays["layer_b"].copy()
    bad["layer_b"][150, 1, 2] = np.nan  # in the last layer: the first one measures fine
    assert "layer 'b', batch 2: features contains NaN or inf" in one_line_error(tmp_path, bad, "--batch-size", 64)
    bad["layer_b"][150, 1, 2] = np.inf
    assert "features contains NaN or inf" in one_line_error(tmp_path, bad)
    assert "labels must lie in 0..3 (--num-classes 4), found 4" in one_line_error(tmp_path, arrays, "--num-classes", 4)
    negative = {**arrays, "labels": arrays["labels"] - 1}
    assert "labels must lie in 0..3" in one_line_error(tmp_path, negative)
    assert "found -1" in one_line_error(tmp_path, negative)
    wide = {**arrays, "weight": np.ones((5, 7))}
    msg = one_line_error(tmp_path, wide)
    assert "weight must be (num_classes, D) = (5, 6) to read layer 'b', got shape (5, 7)" in msg
    assert "got shape (4, 6)" in one_line_error(tmp_path, {**arrays, "weight": np.ones((4, 6))})
    assert "bias must be (num_classes,) = (5,), got shape (3,)" in one_line_error(
        tmp_path, {**arrays, "bias": np.ones(3)}
    )
    assert "weight from" in one_line_error(tmp_path, {**arrays, "weight": np.full((5, 6), np.nan)})
    for value in ("0", "1", "-0.1", "2"):
        assert f"--rtol must be a number in (0, 1), got {float(value)}" in one_line_error(
            tmp_path, arrays, "--rtol", value
        )
    assert "--classes [7] lie outside 0..4" in one_line_error(tmp_path, arrays, "--classes", "0,7")
    assert "single measured class" in one_line_error(tmp_path, arrays, "--classes", "2")
    for text in ("-1", "3-1", "a", "1,,2"):
        assert "--classes takes labels and ranges" in one_line_error(tmp_path, arrays, "--classes", text)
    np.save(tmp_path / "w.npy", np.ones((5, 2)))
    msg = one_line_error(tmp_path, arrays, "--weight", tmp_path / "w.npy")
    assert "--weight must be (num_classes, D) = (5, 6)" in msg
    assert "--weight" in one_line_error(tmp_path, arrays, "--weight", tmp_path / "nothing.npy")
    assert "holds no 'labels' array" in one_line_error(tmp_path, {"layer_a": arrays["layer_a"]})
    assert "holds no feature arrays" in one_line_error(tmp_path, {"labels": arrays["labels"]})
    short = {**arrays, "labels": arrays["labels"][:200]}
    assert "layer 'a' has 350 rows but labels has 200 entries" in one_line_error(tmp_path, short)
    single = {**arrays, "labels": np.zeros(350, dtype=int)}
    assert "single measured class" in one_line_error(tmp_path, single)
    assert "--weighting must be 'samples' or 'classes'" in one_line_error(tmp_path, arrays, "--weighting", "x")
    assert "--batch-size must be >= 1" in one_line_error(tmp_path, arrays, "--batch-size", 0)


def test_bad_paths(tmp_path: Path, arrays) -> None:
    (tmp_path / "x.txt").write_text("hi")
    r = invoke(tmp_path / "x.txt")
    assert r.exit_code == 1 and "expected an .npz file" in r.stderr
    r = invoke(tmp_path / "missing.npz")
    assert r.exit_code == 1 and "no such file or directory" in r.stderr
    np.save(tmp_path / "lone.npy", arrays["layer_a"])
    r = invoke(tmp_path / "lone.npy")
    assert r.exit_code == 1 and "its labels are needed (--labels LABELS.npy)" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lone.npy", "x.txt"]


def test_npz_members_are_read_in_chunks(tmp_path: Path, arrays) -> None:
    f = tmp_path / "f.npz"
    np.savez_compressed(f, **arrays)
    inputs = load_inputs(f)
    chunks = list(inputs.layers[1].chunks(128))
    assert [c.shape for c in chunks] == [(128, 2, 3), (128, 2, 3), (94, 2, 3)]
    np.testing.assert_array_equal(np.concatenate(chunks), arrays["layer_b"])
    np.testing.assert_array_equal(inputs.labels, arrays["labels"])
    np.testing.assert_array_equal(inputs.classifier.weight, arrays["weight"])


@pytest.mark.parametrize("path", [None, "--light", "--full"])
def test_float32_low_rank_lift_gives_the_float64_answer(tmp_path: Path, path: str | None) -> None:
    """Issue 8's case: a float32 rank-4 bottleneck (K = 10) lifted linearly to D = 256 has the NC1 of the
    bottleneck (Σ_B of rank 4 < K - 1), on every path of the command."""
    rng = np.random.default_rng(3)
    y = np.arange(2000) % 10
    z = (rng.normal(size=(10, 4))[y] * 3 + rng.normal(size=(2000, 4))).astype(np.float32)
    lift = rng.normal(size=(4, 256)).astype(np.float32)
    np.savez(tmp_path / "f.npz", layer_z=z, layer_up=z @ lift, labels=y)
    r = invoke(tmp_path / "f.npz", "--out", tmp_path / "o", *([path] if path else []))
    assert r.exit_code == 0, r.output
    rows = layers_of(tmp_path / "o")
    want = reference(z, y, list(range(10)))["nc1"]  # float64 on the bottleneck itself
    assert rows["z"]["metrics"]["nc1"] == pytest.approx(want, rel=1e-8)
    assert rows["up"]["metrics"]["nc1"] == pytest.approx(want, rel=1e-6)


def test_the_pairwise_sweep_runs_once_per_layer(tmp_path: Path, arrays, monkeypatch: pytest.MonkeyPatch) -> None:
    """The O(K²·D) pair sweep feeds both the layer's metrics and its per-class CDNV columns: one call a layer."""
    from deepcollapse.measure import metrics, readers

    calls = []
    real = metrics.pair_summary

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(metrics, "pair_summary", counting)
    monkeypatch.setattr(readers, "pair_summary", counting)
    f = tmp_path / "feats.npz"
    np.savez(f, **arrays)
    r = invoke(f)
    assert r.exit_code == 0, r.output
    assert len(calls) == 2  # two layers
