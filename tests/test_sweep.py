"""Sweep specs, validation, resumable tables, and the Ray backend."""

from __future__ import annotations

import json

import pytest

from deepcollapse._validate import DeepCollapseError
from deepcollapse.experiments.sweep import expand_spec, read_results, run_sweep, spec_hash, validate_spec

SPEC = {
    "grid": {"seed": [0, 1, 2], "lambda": [0.003, 0.005]},
    "fixed": {"num_classes": 3, "n_per_class": 2, "num_layers": 3, "width": 5, "max_steps": 150, "lr": 0.3},
}
VOLATILE = ("seconds",)


def _strip(rows):
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in rows]


def test_expand_grid_and_random():
    items = expand_spec(SPEC)
    assert len(items) == 6 and [it["index"] for it in items] == list(range(6))
    assert {(it["config"].lambda_h, it["config"].lambda_w) for it in items} == {(0.003, 0.003), (0.005, 0.005)}
    assert len({it["key"] for it in items}) == 6
    spec = {**SPEC, "random": {"draws": 2, "seed": 3, "params": {"init_std": {"log_uniform": [0.5, 2.0]}}}}
    a, b = expand_spec(spec), expand_spec(spec)
    assert len(a) == 12 and [x["params"] for x in a] == [x["params"] for x in b]
    assert all(0.5 <= x["config"].init_std <= 2.0 for x in a)
    assert spec_hash(spec) != spec_hash(SPEC) and spec_hash(SPEC) == spec_hash(json.loads(json.dumps(SPEC)))


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ({"grid": {"sed": [0]}}, r"unknown key\(s\) \['sed'\] in grid"),
        ({"grids": {}}, r"unknown key\(s\) \['grids'\] in the sweep spec"),
        ({"fixed": {"widht": 3}}, r"\['widht'\] in fixed"),
        ({"grid": {"seed": 3}}, "grid.seed must be a non-empty list"),
        ({"random": {"draws": 2, "params": {"lambda": {"normal": [0, 1]}}}}, r"\['normal'\] in random.params.lambda"),
        ({"random": {"draws": 2, "params": {"lambda": {"log_uniform": [0, 1]}}}}, "needs low > 0"),
        ({"random": {"draws": 0, "params": {"seed": {"choice": [1]}}}}, "random.draws must be >= 1"),
        ({"grid": {"seed": [0]}, "fixed": {"seed": 1}}, r"\['seed'\] are given in more than one"),
    ],
)
def test_bad_structure(spec, match):
    with pytest.raises(DeepCollapseError, match=match):
        expand_spec(spec)


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ({"num_classes": 1}, r"configuration #0 .*num_classes must be >= 2"),
        ({"width": 0}, "width must be >= 1"),
        ({"lambda_h": -1.0}, "lambda_h must be >= 0"),
        ({"lr": 0.0}, "lr must be > 0"),
        ({"num_layers": 2, "width": [3, 3, 3]}, "width needs one value or one per layer"),
        ({"max_steps": 1.5}, "max_steps must be an integer"),
    ],
)
def test_impossible_values_fail_before_running(tmp_path, override, match):
    spec = {**SPEC, "fixed": {**SPEC["fixed"], **override}}
    with pytest.raises(DeepCollapseError, match=match):
        run_sweep(spec, tmp_path / "s")
    assert not (tmp_path / "s" / "results.csv").exists()


def test_killed_and_resumed_equals_uninterrupted(tmp_path):
    full = tmp_path / "full"
    summary = run_sweep(SPEC, full, threads=1)
    assert summary["ran"] == 6
    ref = read_results(full)
    assert [r["index"] for r in ref] == list(range(6)) and all(r["steps"] == 150 for r in ref)

    part, seen = tmp_path / "part", []

    def kill_after_three(row):
        seen.append(row)
        if len(seen) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_sweep(SPEC, part, threads=1, on_row=kill_after_three)
    assert len(read_results(part)) == 3
    with pytest.raises(DeepCollapseError, match="already holds a run"):
        run_sweep(SPEC, part)
    summary = run_sweep(SPEC, part, resume=True, threads=1)
    assert (summary["skipped"], summary["ran"]) == (3, 3)
    assert _strip(read_results(part)) == _strip(ref)
    assert run_sweep(SPEC, part, resume=True)["ran"] == 0


def test_resume_with_another_spec(tmp_path):
    run_sweep({**SPEC, "grid": {"seed": [0]}}, tmp_path, threads=1)
    with pytest.raises(DeepCollapseError, match="different spec"):
        run_sweep(SPEC, tmp_path, resume=True)


def test_validate_spec_rejects_non_objects():
    with pytest.raises(DeepCollapseError, match="JSON object"):
        validate_spec([1, 2])


def test_ray_unreachable(tmp_path):
    pytest.importorskip("ray")
    import ray

    if ray.is_initialized():
        pytest.skip("a Ray instance is already running in this process")
    with pytest.raises(DeepCollapseError, match=r"cannot reach the Ray cluster at '127\.0\.0\.1:9'"):
        run_sweep(SPEC, tmp_path / "r", backend="ray", ray_address="127.0.0.1:9")
    with pytest.raises(DeepCollapseError, match="host:port"):
        run_sweep(SPEC, tmp_path / "r2", backend="ray", ray_address="nonsense")


def test_ray_backend_matches_local(tmp_path):
    ray = pytest.importorskip("ray")
    spec = {**SPEC, "grid": {"seed": [0, 1], "lambda": [0.003, 0.005]}}
    run_sweep(spec, tmp_path / "local", threads=1)
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        summary = run_sweep(spec, tmp_path / "ray", backend="ray")
    finally:
        if started:
            ray.shutdown()
    assert summary["ran"] == 4 and summary["backend"] == "ray"
    assert _strip(read_results(tmp_path / "ray")) == _strip(read_results(tmp_path / "local"))
