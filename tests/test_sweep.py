"""Sweep specs, validation, resumable tables, and the Ray backend."""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np
import pytest
import torch

from deepcollapse._validate import DeepCollapseError
from deepcollapse.experiments.sweep import expand_spec, read_results, run_sweep, spec_hash, validate_spec
from dufm_reference import plain_gd
from reference import np_dnc

SPEC = {
    "grid": {"seed": [0, 1, 2], "lambda": [0.003, 0.005]},
    "fixed": {"num_classes": 4, "n_per_class": 2, "num_layers": 3, "width": 5, "max_steps": 150, "lr": 0.3},
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


RESUME = {**SPEC, "analysis": False}  # the analysis columns are tested elsewhere


def test_killed_and_resumed_equals_uninterrupted(tmp_path):
    """A sweep killed after three rows and resumed writes the rows of an uninterrupted one."""
    full = tmp_path / "full"
    summary = run_sweep(RESUME, full, threads=1, plot=False)
    assert summary["ran"] == 6
    ref = read_results(full)
    assert [r["index"] for r in ref] == list(range(6)) and all(r["steps"] == 150 for r in ref)

    part, seen = tmp_path / "part", []

    def kill_after_three(row):
        seen.append(row)
        if len(seen) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_sweep(RESUME, part, threads=1, on_row=kill_after_three)
    assert len(read_results(part)) == 3
    with pytest.raises(DeepCollapseError, match="already holds a run"):
        run_sweep(RESUME, part)
    summary = run_sweep(RESUME, part, resume=True, threads=1)
    assert (summary["skipped"], summary["ran"], summary["plot"]) == (3, 3, str(part / "summary.png"))
    assert _strip(read_results(part)) == _strip(ref)
    assert run_sweep(RESUME, part, resume=True, plot=False)["ran"] == 0
    assert (part / "summary.png").stat().st_size > 0


def test_resume_with_another_spec(tmp_path):
    run_sweep({**SPEC, "grid": {"seed": [0]}}, tmp_path, threads=1, plot=False)
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


def test_each_configuration_of_a_batch_runs_with_its_own_lr_and_reports_nc_per_layer(tmp_path, one_thread):
    """One batch (same shapes) with two learning rates: every row equals plain GD at its own lr, and its
    per-layer NC1/NC2 equal the numpy reference on that GD's features."""
    spec = {
        "grid": {"lr": [0.1, 0.45]},
        "fixed": {**{k: v for k, v in SPEC["fixed"].items() if k != "lr"}, "max_steps": 40, "lambda": 0.004}
        | {"tol_grad": 0.0, "tol_rel": 0.0},
    }
    run_sweep(spec, tmp_path, threads=1)
    rows = read_results(tmp_path)
    assert [r["lr"] for r in rows] == [0.1, 0.45] and {r["steps"] for r in rows} == {40}
    for row, item in zip(rows, expand_spec(spec), strict=True):
        model = plain_gd(item["config"], row["lr"], row["steps"])
        with torch.no_grad():
            h1, ws, loss = model.h1.detach(), [w.detach() for w in model.weights], float(model.loss()[0])
        assert row["loss"] == pytest.approx(loss, rel=1e-10)
        labels = np.repeat(np.arange(4), 2)
        feats = [h1.numpy()]
        for w in ws[:-1]:
            feats.append(np.maximum(w.numpy() @ feats[-1], 0.0))
        want = [np_dnc(f.T, labels, 4) for f in feats]
        np.testing.assert_allclose(row["nc1"], [m["nc1"] for m in want], rtol=1e-7)
        np.testing.assert_allclose(row["nc2_orth"], [m["nc2_orth"] for m in want], rtol=1e-7)
        np.testing.assert_allclose(row["nc2_etf"], [m["nc2_etf"] for m in want], rtol=1e-7)
    assert (tmp_path / "summary.png").stat().st_size > 0


def test_diverged_runs_are_recorded_as_diverged(tmp_path):
    """lr 50 blows the loss up to ~1e18 without reaching inf: recorded as diverged, not max_steps/other."""
    fixed = {k: v for k, v in SPEC["fixed"].items() if k != "lr"}
    spec = {"grid": {"lr": [0.3, 50.0]}, "fixed": {**fixed, "max_steps": 100, "lambda": 1e-4}}
    run_sweep(spec, tmp_path, threads=1)
    ok, bad = read_results(tmp_path)
    assert (bad["stop_reason"], bad["verdict"]) == ("diverged", "diverged")
    assert ok["stop_reason"] != "diverged" and ok["verdict"] != "diverged"


def test_width_below_classes_is_refused_unless_allowed(tmp_path):
    spec = {"fixed": {**SPEC["fixed"], "width": [5, 2, 5], "lambda": 0.004}}
    with pytest.raises(DeepCollapseError, match=r"width below K = 4 \(d_2 = 2\).*allow_narrow"):
        run_sweep(spec, tmp_path / "a")
    assert not (tmp_path / "a" / "results.csv").exists()
    assert run_sweep({**spec, "allow_narrow": True}, tmp_path / "b", threads=1)["ran"] == 1


def test_torn_last_row_is_dropped_and_rerun(tmp_path):
    spec = {**RESUME, "grid": {"seed": [0, 1, 2]}}
    run_sweep(spec, tmp_path / "full", threads=1, plot=False)
    part = tmp_path / "part"
    run_sweep(spec, part, threads=1, plot=False)
    text = (part / "results.csv").read_text()
    last = text.rstrip("\n").rfind("\n") + 1
    (part / "results.csv").write_text(text[:last] + text[last : last + 30])  # a write cut short
    with pytest.warns(UserWarning, match="torn last row"):
        summary = run_sweep(spec, part, resume=True, threads=1, plot=False)
    assert (summary["skipped"], summary["ran"]) == (2, 1)
    assert _strip(read_results(part)) == _strip(read_results(tmp_path / "full"))


# ---------------------------------------------------------------- the files a sweep writes (tiny runs, no plot)

TINY = {
    "grid": {"seed": [0, 1]},
    "fixed": {"num_classes": 2, "n_per_class": 2, "num_layers": 2, "width": 3, "max_steps": 20, "lambda": 0.004},
    "analysis": False,
}
HEADER = (
    "key,index,num_classes,n_per_class,num_layers,width,lambda_h,lambda_w,init_std,seed,dtype,lr,max_steps,tol_grad,"
    "tol_rel,patience,loss,fit,reg,grad_norm,steps,stop_reason,dnc_loss,ratio_dnc,srg_loss,ratio_srg,rank_pre,"
    "rank_post,rank_pre_last,rank_out,nc1,nc2_etf,nc2_orth,verdict,seconds"
)


def test_the_table_and_sweep_json_hold_exactly_the_runs(tmp_path):
    starts, saved, clock = [], [], time.perf_counter()
    summary = run_sweep(
        TINY, tmp_path, threads=1, plot=False, on_start=lambda *a: starts.append(a), on_row=saved.append
    )
    assert 0 < summary["seconds"] < time.perf_counter() - clock  # the wall time of the runs
    digest = spec_hash(TINY)
    assert {k: v for k, v in summary.items() if k != "seconds"} == {
        "out": str(tmp_path / "results.csv"),
        "plot": None,
        "spec_hash": digest,
        "total": 2,
        "skipped": 0,
        "ran": 2,
        "backend": "local",
    }
    assert starts == [(2, 0)] and not (tmp_path / "summary.png").exists()
    lines = (tmp_path / "results.csv").read_text().splitlines()
    assert lines[0] == HEADER and len(lines) == 3
    assert [line.split(",")[0] for line in lines[1:]] == [r["key"] for r in saved]  # on_row: each row as saved
    items = expand_spec(TINY)
    for line, item in zip(sorted(lines[1:], key=lambda s: s.split(",")[1]), items, strict=True):
        params = f"{item['key']},{item['index']},2,2,2,3,0.004,0.004,1.0,{item['index']},float64,0.5,20,1e-05,1e-13,20,"
        assert line.startswith(params)
        cells = line.split(",")
        assert cells[20:22] == ["20", "max_steps"] and cells[22:34] == [""] * 12  # no analysis asked
        assert float(cells[16]) == pytest.approx(float(cells[17]) + float(cells[18]), rel=1e-12)
    meta = json.loads((tmp_path / "sweep.json").read_text())
    assert meta == {"spec": validate_spec(TINY), "spec_hash": digest, "columns": HEADER.split(",")}


def test_resume_refuses_a_table_it_cannot_attribute(tmp_path):
    run_sweep(TINY, tmp_path, threads=1, plot=False)
    table = tmp_path / "results.csv"
    other = {**TINY, "grid": {"seed": [0, 1, 2]}}
    with pytest.raises(DeepCollapseError) as info:
        run_sweep(other, tmp_path, resume=True)
    assert str(info.value) == (
        f"{table} was written by a different spec (hash {spec_hash(TINY)} != {spec_hash(other)});"
        " use another out or overwrite=True"
    )
    (tmp_path / "sweep.json").unlink()
    with pytest.raises(DeepCollapseError) as info:
        run_sweep(TINY, tmp_path, resume=True)
    assert str(info.value) == f"{table} has no sweep.json beside it; cannot tell which spec wrote it"


def test_overwrite_replaces_and_resume_starts_a_new_table(tmp_path):
    run_sweep(TINY, tmp_path / "a", threads=1, plot=False)
    one = {**TINY, "grid": {"seed": [5]}}
    summary = run_sweep(one, tmp_path / "a", overwrite=True, threads=1, plot=False)
    assert summary["ran"] == 1 and [r["seed"] for r in read_results(tmp_path / "a")] == [5]
    assert json.loads((tmp_path / "a" / "sweep.json").read_text())["spec_hash"] == spec_hash(one)
    summary = run_sweep(one, tmp_path / "b" / "c", resume=True, threads=1, plot=False)  # nothing to resume
    assert (summary["ran"], summary["skipped"]) == (1, 0) and len(read_results(tmp_path / "b" / "c")) == 1
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "summary.json").write_text("{}")  # another kind of run, no table: nothing to resume
    with pytest.raises(DeepCollapseError, match=r"already holds a run \(summary.json\)"):
        run_sweep(one, tmp_path / "e", resume=True)
    with pytest.raises(DeepCollapseError, match=r"^backend must be 'local' or 'ray', got 'spark'$"):
        run_sweep(one, tmp_path / "d", backend="spark")
    assert not (tmp_path / "d").exists()


@pytest.fixture
def thread_knob(monkeypatch):
    """torch's intra-op thread count as a plain number, so the sweep's settings are seen without starting a
    thread pool (one started here hangs forked test runners, such as mutmut's, and crowds a 2-core CI)."""
    state = {"n": torch.get_num_threads()}
    monkeypatch.setattr(torch, "get_num_threads", lambda: state["n"])
    monkeypatch.setattr(torch, "set_num_threads", lambda n: state.update(n=n))
    return state


def test_threads_are_set_for_the_run_and_restored(tmp_path, monkeypatch, thread_knob):
    before = torch.get_num_threads()
    seen = []
    run_sweep(TINY, tmp_path / "a", threads=3, plot=False, on_row=lambda r: seen.append(torch.get_num_threads()))
    monkeypatch.setattr(os, "cpu_count", lambda: 5)
    run_sweep(TINY, tmp_path / "b", plot=False, on_row=lambda r: seen.append(torch.get_num_threads()))
    monkeypatch.setattr(os, "cpu_count", lambda: None)  # unknown: one thread
    run_sweep(TINY, tmp_path / "c", plot=False, on_row=lambda r: seen.append(torch.get_num_threads()))
    assert seen == [3, 3, 5, 5, 1, 1] and torch.get_num_threads() == before


def test_batches_hold_one_shape_and_at_most_batch_size_configurations(tmp_path, monkeypatch):
    from deepcollapse.experiments import sweep

    sizes = []

    def spy(configs, options, **kw):
        sizes.append([(c.width, c.seed) for c in configs])
        assert options.lr == [0.5] * len(configs)
        return real(configs, options, **kw)

    real = sweep.train_batched
    monkeypatch.setattr(sweep, "train_batched", spy)
    fixed = {k: v for k, v in TINY["fixed"].items() if k != "width"}
    spec = {**TINY, "grid": {"width": [3, 4], "seed": [0, 1, 2]}, "fixed": fixed, "batch_size": 2}
    run_sweep(spec, tmp_path / "a", threads=1, plot=False)
    assert sizes == [[(3, 0), (3, 1)], [(3, 2)], [(4, 0), (4, 1)], [(4, 2)]]
    sizes.clear()
    run_sweep({**spec, "batch_size": 3}, tmp_path / "b", threads=1, plot=False)
    assert sizes == [[(3, 0), (3, 1), (3, 2)], [(4, 0), (4, 1), (4, 2)]]
    sizes.clear()
    run_sweep({k: v for k, v in spec.items() if k != "batch_size"}, tmp_path / "c", threads=1, plot=False)
    assert sizes == [[(3, 0), (3, 1), (3, 2)], [(4, 0), (4, 1), (4, 2)]]
    sizes.clear()
    fixed = {k: v for k, v in TINY["fixed"].items() if k != "max_steps"}
    steps = {
        **TINY,
        "grid": {"max_steps": [10, 20], "seed": [0]},
        "fixed": fixed,
    }  # other stopping rules: other batches
    run_sweep(steps, tmp_path / "d", threads=1, plot=False)
    assert len(sizes) == 2 and [r["steps"] for r in read_results(tmp_path / "d")] == [10, 20]
    sizes.clear()
    many = {**TINY, "grid": {"seed": list(range(257))}, "fixed": {**TINY["fixed"], "max_steps": 1}}
    run_sweep(many, tmp_path / "e", threads=1, plot=False)
    assert [len(b) for b in sizes] == [256, 1]  # the default batch_size


@pytest.mark.parametrize(
    ("cpus", "batch", "tasks"),
    [
        (2, 256, [[0, 1], [2, 3], [4]]),
        (None, 256, [[0, 1, 2], [3, 4]]),  # no CPU count: one CPU
        (0, 256, [[0, 1, 2], [3, 4]]),
        (4, 256, [[0], [1], [2], [3], [4]]),
        (1, 2, [[0, 1], [2, 3], [4]]),
    ],
)
def test_the_ray_backend_sends_batches_as_tasks_and_writes_their_rows(tmp_path, monkeypatch, cpus, batch, tasks):
    """Two tasks per cluster CPU (one CPU each, at most batch_size configurations), rows as the local backend's."""
    from test_sweep_spec import FakeRay

    spec = {**TINY, "grid": {"seed": [0, 1, 2, 3, 4]}, "batch_size": batch}
    fake = FakeRay(cpus=cpus)
    monkeypatch.setitem(sys.modules, "ray", fake)
    summary = run_sweep(spec, tmp_path / "ray", backend="ray", plot=False)
    assert [t[0] for t in fake.tasks] == tasks and set(fake.num_cpus) == {1}
    assert {t[1:] for t in fake.tasks} == {(False, 1)} and summary["backend"] == "ray"
    run_sweep(spec, tmp_path / "local", threads=1, plot=False)
    assert _strip(read_results(tmp_path / "ray")) == _strip(read_results(tmp_path / "local"))


def test_ray_tasks_analyse_and_use_the_threads_asked_for(tmp_path, monkeypatch, thread_knob):
    from test_sweep_spec import FakeRay

    fake = FakeRay(cpus=1)
    monkeypatch.setitem(sys.modules, "ray", fake)
    run_sweep({**TINY, "analysis": True}, tmp_path, backend="ray", threads=2, plot=False)
    assert fake.tasks == [([0], True, 2), ([1], True, 2)] and fake.threads_seen == 2
    assert [r["verdict"] is not None for r in read_results(tmp_path)] == [True, True]
    monkeypatch.setitem(sys.modules, "ray", FakeRay(initialized=False))  # ray_address reaches the connection
    with pytest.raises(DeepCollapseError, match=r"^ray_address must be host:port"):
        run_sweep(TINY, tmp_path / "b", backend="ray", ray_address="nonsense")
