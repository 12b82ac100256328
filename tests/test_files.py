"""Result files: atomic writes with the user's umask, inf/nan/not-computed kept apart, CSV round trips,
run directories."""

from __future__ import annotations

import json
import math
import os
import stat

import numpy as np
import pytest
import torch

from deepcollapse._validate import DeepCollapseError
from deepcollapse.files import (
    append_csv_rows,
    check_out_dir,
    prepare_out_dir,
    read_csv,
    read_json,
    save_torch,
    write_csv,
    write_json,
)


def test_csv_round_trip_keeps_keys_as_text_and_nonfinite_values(tmp_path):
    rows = [
        {"key": "2498324e5906", "x": 1.5, "n": 3, "y": float("inf")},
        {"key": "026245519458", "x": float("nan"), "n": 4, "y": None},
        {"key": "a", "x": 0.1 + 0.2, "n": 5, "y": -math.inf},
    ]
    write_csv(tmp_path / "a.csv", rows)
    lines = (tmp_path / "a.csv").read_text().splitlines()
    assert lines == [
        "key,x,n,y",
        "2498324e5906,1.5,3,inf",
        "026245519458,nan,4,",
        "a,0.30000000000000004,5,-inf",
    ]
    back = read_csv(tmp_path / "a.csv")
    assert [r["key"] for r in back] == ["2498324e5906", "026245519458", "a"]
    assert back[0]["x"] == 1.5 and back[0]["n"] == 3 and back[0]["y"] == math.inf
    assert math.isnan(back[1]["x"]) and back[1]["y"] is None  # undefined vs not computed
    assert back[2]["x"] == 0.1 + 0.2 and back[2]["y"] == -math.inf


def test_json_tells_inf_nan_and_not_computed_apart(tmp_path):
    obj = {
        "inf": float("inf"),
        "minus_inf": np.float32(-np.inf),
        "nan": torch.tensor(float("nan"), dtype=torch.float64),
        "missing": None,
        "list": [1.0, math.inf, None],
        "finite": np.float64(0.25),
    }
    write_json(tmp_path / "m.json", obj)
    raw = json.loads((tmp_path / "m.json").read_text())  # strict JSON: no bare NaN/Infinity tokens
    assert raw == {
        "inf": "inf",
        "minus_inf": "-inf",
        "nan": "nan",
        "missing": None,
        "list": [1.0, "inf", None],
        "finite": 0.25,
    }
    assert read_json(tmp_path / "m.json") == raw
    assert float(raw["inf"]) == math.inf and math.isnan(float(raw["nan"]))


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_files_get_the_umask_mode(tmp_path, umask):
    old = os.umask(umask)
    try:
        write_json(tmp_path / "a.json", {"a": 1})
        write_csv(tmp_path / "b.csv", [{"a": 1}])
        save_torch(tmp_path / "c.pt", {"a": 1})
        append_csv_rows(tmp_path / "d.csv", [{"a": 1}], ["a"])
        (tmp_path / "e.json").write_text("{}")  # what open() gives: the reference
    finally:
        os.umask(old)
    want = 0o666 & ~umask
    assert _mode(tmp_path / "e.json") == want
    for name in ("a.json", "b.csv", "c.pt", "d.csv"):
        assert _mode(tmp_path / name) == want, name
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left


def test_a_failed_write_leaves_the_old_file(tmp_path):
    write_json(tmp_path / "a.json", {"a": 1})
    with pytest.raises(TypeError):
        write_json(tmp_path / "a.json", {"a": object()})
    assert read_json(tmp_path / "a.json") == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_append_survives_a_partial_last_line(tmp_path):
    path = tmp_path / "r.csv"
    append_csv_rows(path, [{"key": "a", "v": 1}], ["key", "v"])
    append_csv_rows(path, [{"key": "b", "v": 2}], ["key", "v"])
    with open(path, "a") as f:
        f.write("c,3")  # a write cut short by a kill
    assert [r["key"] for r in read_csv(path)] == ["a", "b"]


def test_out_dir_holding_a_run_is_refused(tmp_path):
    assert check_out_dir(tmp_path / "new") == [] and not (tmp_path / "new").exists()  # checks, creates nothing
    write_json(tmp_path / "summary.json", {"a": float("inf")})
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(DeepCollapseError, match=r"already holds a run \(summary.json\); pass overwrite=True"):
        check_out_dir(tmp_path)
    with pytest.raises(DeepCollapseError, match="overwrite=True"):
        prepare_out_dir(tmp_path)
    assert check_out_dir(tmp_path, resume=True) == ["summary.json"]
    prepare_out_dir(tmp_path, overwrite=True)
    assert not (tmp_path / "summary.json").exists() and (tmp_path / "notes.txt").read_text() == "mine"
    with pytest.raises(DeepCollapseError, match="is not a directory"):
        check_out_dir(tmp_path / "notes.txt")
