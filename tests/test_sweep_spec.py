"""Sweep specs without training: loading, validation messages, the configurations a spec expands to
(order, draws, keys, hashes), the divergence rule, torn-table repair, the Ray connection checks and the
summary figure. Every test here runs in milliseconds (the mutation run of sweep.py relies on that)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import socket
import statistics
import sys
import types
import warnings

import numpy as np
import pytest
import torch

from deepcollapse._validate import DeepCollapseError
from deepcollapse.dufm.batched import BatchResult, GDOptions
from deepcollapse.dufm.model import DUFM, DUFMConfig
from deepcollapse.experiments import sweep
from deepcollapse.experiments.sweep import (
    diverged,
    expand_spec,
    load_spec,
    plot_sweep,
    read_results,
    repair_table,
    spec_hash,
    sweep_figure,
    validate_spec,
)
from dufm_reference import np_dnc_loss, np_dufm_loss
from reference import np_dnc

FIXED = {"num_classes": 4, "n_per_class": 2, "num_layers": 3, "width": 5, "max_steps": 150, "lr": 0.3}
SPEC = {"grid": {"seed": [0, 1, 2], "lambda": [0.003, 0.005]}, "fixed": FIXED}
PARAMS = "num_classes, n_per_class, num_layers, width, lambda_h, lambda_w, init_std, seed, dtype, lambda, lr, max_steps, tol_grad, tol_rel, patience"  # noqa: E501


# ---------------------------------------------------------------- loading and validating a spec


def test_load_spec_from_a_dict_a_json_text_or_a_file(tmp_path):
    given = {"fixed": {"seed": 1}}
    loaded = load_spec(given)
    assert loaded == given and loaded is not given
    assert load_spec('  \n {"grid": {"seed": [1, 2]}}') == {"grid": {"seed": [1, 2]}}
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(SPEC))
    assert load_spec(path) == SPEC and load_spec(str(path)) == SPEC
    with pytest.raises(DeepCollapseError, match=r"^the sweep spec is not valid JSON: Expecting"):
        load_spec('{"grid": ')
    path.write_text("[1, 2]")
    with pytest.raises(DeepCollapseError, match=rf"^the sweep spec {path} must hold a JSON object$"):
        load_spec(path)
    with pytest.raises(DeepCollapseError, match="no such file"):
        load_spec(tmp_path / "missing.json")


def _rnd(params, draws=2):
    return {"random": {"draws": draws, "seed": 0, "params": params}}


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ([1, 2], "a sweep spec must be a JSON object, got list"),
        (
            {"grids": {}},
            "unknown key(s) ['grids'] in the sweep spec; allowed: grid, random, fixed, analysis, batch_size, name,"
            " allow_narrow",
        ),
        ({"grid": {"sed": [0]}}, f"unknown key(s) ['sed'] in grid; allowed: {PARAMS}"),
        ({"fixed": {"widht": 3}}, f"unknown key(s) ['widht'] in fixed; allowed: {PARAMS}"),
        ({"grid": [1]}, "grid must be an object of parameter: value(s), got [1]"),
        ({"fixed": 3}, "fixed must be an object of parameter: value(s), got 3"),
        ({"grid": {"seed": 3}}, "grid.seed must be a non-empty list of values, got 3"),
        ({"grid": {"seed": []}}, "grid.seed must be a non-empty list of values, got []"),
        ({"random": 3}, "random must be an object {draws, seed, params}, got 3"),
        ({"random": {"draws": 1, "sed": 1}}, "unknown key(s) ['sed'] in random; allowed: draws, seed, params"),
        ({"random": {"params": {"seed": {"choice": [1]}}}}, "random.draws must be an integer, got None"),
        (_rnd({"seed": {"choice": [1]}}, draws=0), "random.draws must be >= 1, got 0"),
        ({"random": {"draws": 1}}, "random.params must name at least one parameter and its distribution"),
        (_rnd({}), "random.params must name at least one parameter and its distribution"),
        (_rnd([["seed", 1]]), "random.params must name at least one parameter and its distribution"),
        (_rnd({"sed": {"choice": [1]}}), f"unknown key(s) ['sed'] in random.params; allowed: {PARAMS}"),
        (
            _rnd({"lambda": 0.1}),
            "random.params.lambda must be one of {uniform, log_uniform, int_uniform, choice: ...}, got 0.1",
        ),
        (
            _rnd({"lambda": {"uniform": [0, 1], "choice": [1]}}),
            "random.params.lambda must be one of {uniform, log_uniform, int_uniform, choice: ...},"
            " got {'uniform': [0, 1], 'choice': [1]}",
        ),
        (
            _rnd({"lambda": {"normal": [0, 1]}}),
            "unknown key(s) ['normal'] in random.params.lambda; allowed: uniform, log_uniform, int_uniform, choice",
        ),
        (_rnd({"seed": {"choice": []}}), "random.params.seed.choice must be a non-empty list, got []"),
        (_rnd({"seed": {"choice": 3}}), "random.params.seed.choice must be a non-empty list, got 3"),
        (_rnd({"lambda": {"uniform": [0.1]}}), "random.params.lambda.uniform must be [low, high], got [0.1]"),
        (_rnd({"lambda": {"uniform": [0, 1, 2]}}), "random.params.lambda.uniform must be [low, high], got [0, 1, 2]"),
        (_rnd({"lambda": {"uniform": [0, "1"]}}), "random.params.lambda.uniform must be [low, high], got [0, '1']"),
        (_rnd({"lambda": {"uniform": (0, 1)}}), r"random.params.lambda.uniform must be [low, high], got (0, 1)"),
        (_rnd({"seed": {"int_uniform": [3, 2]}}), "random.params.seed.int_uniform: low 3 is above high 2"),
        (_rnd({"lambda": {"log_uniform": [0, 1]}}), "random.params.lambda.log_uniform needs low > 0, got 0"),
        (_rnd({"lambda": {"log_uniform": [-1, 1]}}), "random.params.lambda.log_uniform needs low > 0, got -1"),
        ({"grid": {"seed": [0]}, "fixed": {"seed": 1}}, "parameter(s) ['seed'] are given in more than one of"),
        ({"grid": {"seed": [0]}, **_rnd({"seed": {"choice": [1]}})}, r"parameter(s) ['seed'] are given in more"),
        (
            {"fixed": {"width": 5, "seed": 0}, **_rnd({"seed": {"choice": [1]}, "width": {"choice": [5]}})},
            "parameter(s) ['seed', 'width'] are given in more than one of grid/fixed/random",
        ),
        ({"batch_size": 0}, "batch_size must be >= 1, got 0"),
        ({"batch_size": 1.5}, "batch_size must be an integer, got 1.5"),
        ({"analysis": "yes"}, "analysis must be true or false, got 'yes'"),
        ({"allow_narrow": 1}, "allow_narrow must be true or false, got 1"),
    ],
)
def test_a_bad_spec_is_refused_with_a_message_naming_the_key(spec, message):
    with pytest.raises(DeepCollapseError) as info:
        validate_spec(spec)
    assert str(info.value).startswith(message)


def test_validate_spec_accepts_the_edges_and_orders_the_top_keys():
    ok = {
        "fixed": {"width": 5},
        "grid": {"num_layers": [2, 3]},
        "random": {
            "draws": 1,
            "params": {
                "lambda": {"uniform": [0.0, 0.0]},  # low == high; uniform may start at 0
                "seed": {"int_uniform": [1.0, 3]},
                "init_std": {"log_uniform": [0.5, 0.5]},
            },
        },
        "analysis": False,
        "name": "x",
        "allow_narrow": True,
        "batch_size": 3,
    }
    out = validate_spec(ok)
    assert out == ok and list(out) == ["grid", "random", "fixed", "analysis", "batch_size", "name", "allow_narrow"]
    assert validate_spec({}) == {} and validate_spec({"fixed": {"seed": 1}}) == {"fixed": {"seed": 1}}


def test_spec_hash_is_the_sha256_of_the_canonical_json():
    """16 hex digits of SHA-256 of the validated spec, compact JSON with sorted keys (the sweep.json format)."""
    spec = {"fixed": FIXED, "grid": {"seed": [0, 1]}, "name": "é"}
    text = json.dumps(spec, sort_keys=True, separators=(",", ":"))
    assert spec_hash(spec) == hashlib.sha256(text.encode()).hexdigest()[:16]
    assert spec_hash(dict(reversed(list(spec.items())))) == spec_hash(spec)
    assert spec_hash({**spec, "name": "other"}) != spec_hash(spec)


# ---------------------------------------------------------------- expanding a spec


def _params(**over):
    """A configuration's parameters: the validated DUFMConfig and GDOptions defaults, overridden."""
    cfg, opt = DUFMConfig(), GDOptions()
    base = {k: getattr(cfg, k) for k in sweep.DUFM_KEYS} | {k: getattr(opt, k) for k in sweep.SOLVER_KEYS}
    return base | over


def test_grid_order_params_and_keys():
    """The product of the grid lists (the last key varies fastest), fixed values added, defaults filled."""
    items = expand_spec(SPEC)
    lam = [0.003, 0.005]
    assert [it["index"] for it in items] == list(range(6))
    assert [(it["params"]["seed"], it["params"]["lambda_h"]) for it in items] == [(s, x) for s in range(3) for x in lam]
    first = {**FIXED, "seed": 0, "lambda_h": 0.003, "lambda_w": 0.003}
    assert items[0]["params"] == _params(**first)
    assert items[0]["config"] == DUFMConfig(**{k: v for k, v in first.items() if k not in ("lr", "max_steps")})
    assert items[0]["options"] == GDOptions(lr=0.3, max_steps=150)
    for it in items:  # the key: 12 hex digits of SHA-256 of the parameters as JSON with sorted keys
        want = hashlib.sha256(json.dumps(it["params"], sort_keys=True).encode()).hexdigest()[:12]
        assert it["key"] == want
    assert len({it["key"] for it in items}) == 6


def test_parameters_are_those_of_the_validated_configuration():
    items = expand_spec({"fixed": {**FIXED, "num_classes": 4.0, "seed": 2.0, "width": [5, 5, 5]}})
    p = items[0]["params"]
    assert (p["num_classes"], p["seed"], p["width"]) == (4, 2, 5) and type(p["num_classes"]) is int
    assert p == expand_spec({"fixed": {**FIXED, "seed": 2}})[0]["params"]
    with pytest.raises(DeepCollapseError, match=r"^the spec produces duplicate configurations; give each a"):
        expand_spec({"grid": {"width": [5, [5, 5, 5]]}, "fixed": {k: v for k, v in FIXED.items() if k != "width"}})
    with pytest.raises(DeepCollapseError, match="duplicate configurations"):
        expand_spec({"grid": {"seed": [1, 1]}})


def test_lambda_sets_both_penalties_unless_one_is_given():
    (it,) = expand_spec({"fixed": {"lambda": 0.02, "lambda_h": 0.1}})
    assert (it["config"].lambda_h, it["config"].lambda_w) == (0.1, 0.02)
    (it,) = expand_spec({"fixed": {"lambda": 0.02, "lambda_w": [0.1, 0.2, 0.3]}})
    assert (it["config"].lambda_h, it["config"].lambda_w) == (0.02, [0.1, 0.2, 0.3])
    (it,) = expand_spec({})
    assert it["params"] == _params()
    with pytest.raises(DeepCollapseError, match=r"^lambda must be a number, got null$"):
        expand_spec({"fixed": {"lambda": None}})


def test_random_draws_per_grid_point_and_their_distributions():
    """Every grid point gets ``draws`` draws of every random parameter, from ``random.seed`` (default 0)."""
    params = {
        "lambda": {"uniform": [0.0, 0.01]},
        "init_std": {"log_uniform": [0.01, 1.0]},
        "n_per_class": {"int_uniform": [1.0, 3.0]},
        "dtype": {"choice": ["float32", "float64"]},
    }
    spec = {"grid": {"seed": [7, 8]}, "random": {"draws": 200, "seed": 5, "params": params}}
    items = expand_spec(spec)
    assert len(items) == 400 and [it["params"]["seed"] for it in items] == [7] * 200 + [8] * 200
    lam = [it["params"]["lambda_h"] for it in items]
    assert all(0.0 <= x <= 0.01 for x in lam) and abs(statistics.mean(lam) - 0.005) < 5e-4
    assert all(it["params"]["lambda_w"] == it["params"]["lambda_h"] for it in items)
    logs = [math.log10(it["params"]["init_std"]) for it in items]  # log-uniform: log10 uniform on [-2, 0]
    assert all(-2 <= x <= 0 for x in logs) and abs(statistics.mean(logs) + 1) < 0.1
    assert abs(statistics.mean(x < -1 for x in logs) - 0.5) < 0.1
    counts = [it["params"]["n_per_class"] for it in items]
    assert set(counts) == {1, 2, 3} and all(type(c) is int for c in counts)
    assert {it["params"]["dtype"] for it in items} == {"float32", "float64"}
    again = expand_spec(json.loads(json.dumps(spec)))
    assert [it["params"] for it in again] == [it["params"] for it in items]
    other = expand_spec({**spec, "random": {**spec["random"], "seed": 6}})
    assert [it["params"] for it in other] != [it["params"] for it in items]
    no_seed = {**spec, "random": {"draws": 200, "params": params}}
    seed0 = {**spec, "random": {"draws": 200, "seed": 0, "params": params}}
    assert [it["params"] for it in expand_spec(no_seed)] == [it["params"] for it in expand_spec(seed0)]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"grid": {"width": [5, 0]}}, 'configuration #1 ({"width": 0}): width must be >= 1, got 0'),
        ({"grid": {"seed": [0]}, "fixed": {"num_classes": 1}}, 'configuration #0 ({"seed": 0}): num_classes must'),
        ({"grid": {"lr": [0.1, -1.0]}}, 'configuration #1 ({"lr": -1.0}): lr must be > 0'),
        ({"fixed": {"dtype": ["float32"]}}, "configuration #0 ({}): unhashable type: 'list'"),
        ({"fixed": {"lr": [0.1, 0.2]}}, "configuration #0: lr must be one number"),
    ],
)
def test_an_impossible_configuration_is_named_by_its_index_and_values(spec, message):
    with pytest.raises(DeepCollapseError) as info:
        expand_spec(spec)
    assert str(info.value).startswith(message)


def test_a_width_below_the_classes_is_refused_unless_allowed():
    spec = {"grid": {"seed": [0, 1]}, "fixed": {**FIXED, "width": [5, 2, 3]}}
    with pytest.raises(DeepCollapseError) as info:
        expand_spec(spec)
    assert str(info.value) == (
        'configuration #0 ({"seed": 0}): width below K = 4 (d_2 = 2, d_3 = 3): the DNC optimum needs every'
        ' width >= K; set "allow_narrow": true in the spec to run it anyway'
    )
    assert len(expand_spec({**spec, "allow_narrow": True})) == 2
    with pytest.raises(DeepCollapseError, match="width below K"):
        expand_spec({**spec, "allow_narrow": False})
    assert len(expand_spec({"fixed": {**FIXED, "width": 4}})) == 1  # width == K is fine


# ---------------------------------------------------------------- the divergence rule


def _result(config: DUFMConfig, **over) -> BatchResult:
    model = DUFM(config)
    fields = dict(
        index=0,
        config=config,
        h1=model.h1.detach(),
        weights=[w.detach() for w in model.weights],
        loss=1.0,
        fit=0.5,
        reg=0.5,
        grad_norm=1e-3,
        steps=10,
        stop_reason="max_steps",
        seconds=0.5,
    )
    return BatchResult(**(fields | over))


def test_diverged_is_a_non_finite_end_or_a_loss_above_ten_times_the_initial_one():
    cfg = DUFMConfig(num_classes=3, n_per_class=2, num_layers=2, width=4, seed=3, lambda_h=0.01, lambda_w=0.02)
    model = DUFM(cfg)
    with torch.no_grad():
        h1, ws = model.h1.numpy(), [w.numpy() for w in model.weights]
    initial = np_dufm_loss(h1, ws, cfg.counts, cfg.lambda_h, cfg.lambda_w)
    with torch.no_grad():
        exact = float(model.loss()[0])  # the library's float of the same loss: the boundary itself
    assert exact == pytest.approx(initial, rel=1e-12)
    assert not diverged(_result(cfg, loss=10.0 * exact))  # "above" ten times: equal is not diverged
    assert not diverged(_result(cfg, loss=10 * initial * (1 - 1e-9)))
    assert diverged(_result(cfg, loss=10 * initial * (1 + 1e-9)))
    assert not diverged(_result(cfg, loss=10 * initial * (1 - 1e-9), grad_norm=1e30))
    assert diverged(_result(cfg, loss=0.1, stop_reason="diverged"))
    assert diverged(_result(cfg, loss=math.nan))
    assert diverged(_result(cfg, loss=math.inf))
    assert diverged(_result(cfg, loss=0.1, grad_norm=math.inf))
    assert diverged(_result(cfg, loss=0.1, grad_norm=math.nan))


def test_a_result_row_records_the_run_and_marks_divergence():
    (item,) = expand_spec({"fixed": {**FIXED, "lambda": 0.004}})
    res = _result(item["config"], loss=0.25, fit=0.125, reg=0.125, grad_norm=0.5, steps=7, seconds=1.23456)
    row = sweep.result_row(item, res, analysis=False)
    assert row == {"key": item["key"], "index": 0, **item["params"]} | {
        "loss": 0.25,
        "fit": 0.125,
        "reg": 0.125,
        "grad_norm": 0.5,
        "steps": 7,
        "stop_reason": "max_steps",
        "seconds": 1.235,
    }
    bad = sweep.result_row(item, dataclasses.replace(res, stop_reason="diverged"))
    assert (bad["stop_reason"], bad["verdict"]) == ("diverged", "diverged") and "dnc_loss" not in bad
    huge = sweep.result_row(item, dataclasses.replace(res, loss=1e30), analysis=False)
    assert (huge["stop_reason"], huge["verdict"]) == ("diverged", "diverged")
    full = sweep.result_row(item, res)
    assert set(full) == set(sweep.COLUMNS)
    assert full["dnc_loss"] == pytest.approx(np_dnc_loss(4, 3, 2, 0.004), rel=1e-6)
    cfg = item["config"]
    loss = np_dufm_loss(res.h1, res.weights, cfg.counts, cfg.lambda_h, cfg.lambda_w)  # of the parameters
    assert full["ratio_dnc"] == pytest.approx(loss / full["dnc_loss"], rel=1e-10)
    assert full["rank_pre_last"] == full["rank_pre"][-1] and full["rank_out"] in range(1, 5)
    assert [len(full[m]) for m in sweep.NC_METRICS] == [3, 3, 3]  # H_1, H_2, H_3
    assert (len(full["rank_pre"]), len(full["rank_post"])) == (2, 3) and full["verdict"] is not None


def test_a_row_of_an_srg_setting_has_the_srg_loss():
    """K = 3 = C(3, 2), L = 2, widths >= 3: the low-rank construction applies; its loss and ratio are recorded."""
    cfg = DUFMConfig(num_classes=3, n_per_class=1, num_layers=2, width=3)
    res = _result(cfg)
    row = sweep.result_row({"key": "k", "index": 0, "params": {}}, res)
    loss = np_dufm_loss(res.h1, res.weights, cfg.counts, cfg.lambda_h, cfg.lambda_w)
    assert row["srg_loss"] > 0 and row["ratio_srg"] == pytest.approx(loss / row["srg_loss"], rel=1e-10)


def test_per_layer_nc_of_float32_runs_are_computed_in_float64():
    """NC1/NC2 of H_1 and the post-ReLU H_l against the float64 numpy reference on the run's float32 values."""
    cfg = DUFMConfig(num_classes=3, n_per_class=[2, 1, 3], num_layers=3, width=[5, 4, 6], dtype="float32", seed=4)
    res = _result(cfg)
    assert res.h1.dtype == torch.float32
    labels = np.repeat(np.arange(3), [2, 1, 3])
    feats = [res.h1.double().numpy()]
    for w in res.weights[:-1]:
        feats.append(np.maximum(w.double().numpy() @ feats[-1], 0.0))
    want = [np_dnc(f.T, labels, 3) for f in feats]
    got = sweep.nc_by_layer(res)
    for name in sweep.NC_METRICS:
        np.testing.assert_allclose(got[name], [m[name] for m in want], rtol=1e-10)


# ---------------------------------------------------------------- reading a table


def test_read_results_orders_by_index_and_parses_list_cells(tmp_path):
    (tmp_path / "results.csv").write_text(
        'key,index,rank_pre,nc1,verdict\n0a2,2,"[1, 2]","[0.5, ""nan"", ""inf""]",dnc\n'
        "0b1,0,,,\n"
        '1e5,1,"[3]","[""-inf"", 1e-300]",other\n'
    )
    rows = read_results(tmp_path)
    assert [r["index"] for r in rows] == [0, 1, 2] and [r["key"] for r in rows] == ["0b1", "1e5", "0a2"]
    assert (rows[0]["rank_pre"], rows[0]["nc1"], rows[0]["verdict"]) == (None, None, None)
    assert rows[1]["rank_pre"] == [3] and rows[1]["nc1"] == [-math.inf, 1e-300]
    assert rows[2]["rank_pre"] == [1, 2] and all(type(v) is int for v in rows[2]["rank_pre"])
    assert rows[2]["nc1"][0] == 0.5 and math.isnan(rows[2]["nc1"][1])
    assert rows[2]["nc1"][2] == math.inf and all(type(v) is float for v in rows[2]["nc1"])
    assert repr(read_results(tmp_path / "results.csv")) == repr(rows)  # nan != nan: compare the text


# ---------------------------------------------------------------- repairing a torn table


@pytest.mark.parametrize(
    ("before", "after"),
    [
        (b"", b""),
        (b"a,b\n", b"a,b\n"),
        (b"a,b\n1,2\n", b"a,b\n1,2\n"),
        (b'a,b\n1,"[1, 2]"\n', b'a,b\n1,"[1, 2]"\n'),  # a quoted comma is one field
        (b"a,b\n1,2\n3,", b"a,b\n1,2\n"),  # no final newline: the write was cut short
        (b"a,b\n1,2\n3,4", b"a,b\n1,2\n"),
        (b"a,b\n1,2\n3\n", b"a,b\n1,2\n"),  # a whole line with too few fields
        (b"a,b\n1,2,3\n", b"a,b\n"),
        (b"a,", b""),  # a torn header
        (b"a,b\n1,2\n \n", b"a,b\n1,2\n"),  # only the last line goes, even a blank one
        (b"a,b\n1,X\nX\n", b"a,b\n1,X\n"),
    ],
)
def test_repair_table_drops_only_a_torn_last_line(tmp_path, before, after):
    path = tmp_path / "t.csv"
    path.write_bytes(before)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        dropped = repair_table(str(path))
    assert path.read_bytes() == after and dropped == (before != after)
    if before == after:
        assert seen == []
    else:
        (w,) = seen
        assert str(w.message) == f"{path}: dropped a torn last row ({len(before) - len(after)} bytes); it runs again"
        assert w.filename != sweep.__file__  # it points at the caller, not inside the library


# ---------------------------------------------------------------- the Ray connection


def test_probe_checks_an_explicit_address_only():
    for address in (None, "", "auto", "local"):
        assert sweep._probe(address) is None
    for bad in ("nonsense", "host:", ":6379", "ray://host:port", "host:63a"):
        with pytest.raises(DeepCollapseError) as info:
            sweep._probe(bad)
        assert str(info.value) == f"ray_address must be host:port or ray://host:port, got {bad!r}"
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        port = server.getsockname()[1]
        assert sweep._probe(f"127.0.0.1:{port}") is None
        assert sweep._probe(f"ray://127.0.0.1:{port}") is None
    with pytest.raises(DeepCollapseError, match=rf"^cannot reach the Ray cluster at 'ray://127\.0\.0\.1:{port}': "):
        sweep._probe(f"ray://127.0.0.1:{port}")  # closed now
    with pytest.raises(DeepCollapseError, match=r"^cannot reach the Ray cluster at '::1:9': "):
        sweep._probe("::1:9")  # an IPv6 host: the port follows the last colon
    with pytest.raises(DeepCollapseError) as info:
        sweep._probe("127.0.0.1:9")
    assert str(info.value) == "cannot reach the Ray cluster at '127.0.0.1:9': Connection refused"


class FakeRay(types.ModuleType):
    """Ray's driver API as the sweep uses it, run in this process (tasks run when submitted)."""

    def __init__(self, *, initialized=True, cpus=2, init_error=None):
        super().__init__("ray")
        self.initialized, self.cpus, self.init_error = initialized, cpus, init_error
        self.inits, self.tasks, self.num_cpus = [], [], []

    def is_initialized(self):
        return self.initialized

    def init(self, **kwargs):
        self.inits.append(kwargs)
        if self.init_error is not None:
            raise self.init_error
        self.initialized = True

    def cluster_resources(self):
        return {} if self.cpus is None else {"CPU": self.cpus}

    def remote(self, num_cpus):
        self.num_cpus.append(num_cpus)
        fake = self

        def decorate(fn):
            class Task:
                @staticmethod
                def remote(chunk, analysis, threads):
                    fake.tasks.append(([it["index"] for it in chunk], analysis, threads))
                    return fn(chunk, analysis, threads), torch.get_num_threads()

            return Task

        return decorate

    def wait(self, refs, num_returns):
        assert num_returns == 1
        return refs[:1], refs[1:]

    def get(self, ref):
        rows, threads = ref
        self.threads_seen = threads
        return rows


def test_connect_ray_reports_a_missing_ray_and_an_unreachable_cluster(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(DeepCollapseError) as info:
        sweep._connect_ray(None)
    assert str(info.value) == "backend='ray' needs Ray: pip install 'deepcollapse[ray]'"
    running = FakeRay()
    monkeypatch.setitem(sys.modules, "ray", running)
    assert sweep._connect_ray("nonsense") is running and running.inits == []  # attached: no probe, no init
    fresh = FakeRay(initialized=False)
    monkeypatch.setitem(sys.modules, "ray", fresh)
    assert sweep._connect_ray("local") is fresh
    assert fresh.inits == [
        {"address": "local", "include_dashboard": False, "log_to_driver": False, "configure_logging": False}
    ]
    for error, where, shown in [
        (ConnectionError("no head\nsecond line"), None, "'auto': no head"),
        (RuntimeError(" \n "), "auto", "'auto': RuntimeError"),
        (ValueError(""), "local", "'local': ValueError"),
    ]:
        monkeypatch.setitem(sys.modules, "ray", FakeRay(initialized=False, init_error=error))
        with pytest.raises(DeepCollapseError) as info:
            sweep._connect_ray(where)
        assert str(info.value) == f"cannot reach the Ray cluster at {shown}"
    monkeypatch.setitem(sys.modules, "ray", FakeRay(initialized=False))
    with pytest.raises(DeepCollapseError, match=r"^ray_address must be host:port"):
        sweep._connect_ray("nonsense")


# ---------------------------------------------------------------- the summary figure

ROWS = [
    {"index": 0, "verdict": "dnc", "ratio_dnc": 1.0},
    {"index": 1, "verdict": "other", "ratio_dnc": 0.5},
    {"index": 2, "verdict": "dnc", "ratio_dnc": 1.5},
    {"index": 3, "verdict": None, "ratio_dnc": None},
    {"index": 4, "verdict": "diverged", "ratio_dnc": math.inf},
    {"index": 5, "verdict": "other", "ratio_dnc": -1.0},
    {"index": 6, "verdict": "other", "ratio_dnc": math.nan},
    {"index": 7, "verdict": "dnc", "ratio_dnc": 0.0},
    {"index": 8, "verdict": "dnc", "ratio_dnc": 2},
]


def test_sweep_figure_counts_verdicts_and_plots_each_finite_ratio():

    fig = sweep_figure(ROWS)
    left, right = fig.axes
    assert left.get_position().x1 < right.get_position().x0  # side by side
    assert [t.get_text() for t in left.get_xticklabels()] == ["-", "diverged", "dnc", "other"]
    assert [p.get_height() for p in left.patches] == [1, 1, 4, 3]
    assert (left.get_title(), left.get_ylabel()) == ("9 configurations", "runs")
    series = {c.get_label(): c.get_offsets().tolist() for c in right.collections}
    assert series == {"dnc": [[0, 1.0], [2, 1.5]], "other": [[1, 0.5]]}
    assert [t.get_text() for t in right.get_legend().get_texts()] == ["dnc", "other"]
    (line,) = right.lines
    assert list(line.get_ydata()) == [1.0, 1.0] and right.get_yscale() == "log"
    assert (right.get_xlabel(), right.get_ylabel()) == ("configuration index", "loss / L_DNC")
    fig = sweep_figure([{"index": 0, "verdict": "diverged", "ratio_dnc": None}])
    assert len(fig.axes[1].collections) == 0 and fig.axes[1].get_legend() is None


def test_plot_sweep_writes_a_png_and_closes_its_figure(tmp_path):
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    path = tmp_path / "a" / "b" / "summary.png"
    for _ in range(2):  # into new directories, then over the old file
        assert plot_sweep(ROWS, str(path)) == path
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert (int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")) == (810, 324)
    assert plt.get_fignums() == before
