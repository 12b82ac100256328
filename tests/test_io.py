"""Result files: atomic writes, CSV round trips, run directories."""

from __future__ import annotations

import pytest

from deepcollapse._validate import DeepCollapseError
from deepcollapse.files import append_csv_rows, prepare_out_dir, read_csv, write_csv, write_json


def test_csv_round_trip_keeps_keys_as_text(tmp_path):
    rows = [{"key": "2498324e5906", "x": 1.5, "n": 3}, {"key": "026245519458", "x": float("nan"), "n": 4}]
    write_csv(tmp_path / "a.csv", rows)
    back = read_csv(tmp_path / "a.csv")
    assert [r["key"] for r in back] == ["2498324e5906", "026245519458"]
    assert back[0]["x"] == 1.5 and back[0]["n"] == 3 and back[1]["x"] is None


def test_append_survives_a_partial_last_line(tmp_path):
    path = tmp_path / "r.csv"
    append_csv_rows(path, [{"key": "a", "v": 1}], ["key", "v"])
    append_csv_rows(path, [{"key": "b", "v": 2}], ["key", "v"])
    with open(path, "a") as f:
        f.write("c,3")  # a write cut short by a kill
    assert [r["key"] for r in read_csv(path)] == ["a", "b"]


def test_out_dir_holding_a_run_is_refused(tmp_path):
    write_json(tmp_path / "summary.json", {"a": float("inf")})
    with pytest.raises(DeepCollapseError, match="--overwrite"):
        prepare_out_dir(tmp_path)
    prepare_out_dir(tmp_path, overwrite=True)
    assert not (tmp_path / "summary.json").exists()
