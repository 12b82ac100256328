"""Sweeps over DUFM configurations: a spec, a grid or random draws, one resumable results table.

A spec is JSON (a dict or a file)::

    {
      "grid":   {"num_classes": [10], "num_layers": [4], "width": [30], "lambda": [0.002, 0.004],
                 "seed": [0, 1, 2, 3]},
      "random": {"draws": 8, "seed": 0, "params": {"lambda": {"log_uniform": [1e-3, 1e-2]}}},
      "fixed":  {"n_per_class": 5, "lr": 0.5, "max_steps": 20000},
      "analysis": true, "batch_size": 256
    }

The configurations are the product of the ``grid`` lists, times ``random.draws`` draws when ``random`` is
given (distributions ``uniform``, ``log_uniform``, ``int_uniform`` over ``[low, high]`` and ``choice``
over a list, drawn from ``random.seed``, default 0), with ``fixed`` values added. ``lambda`` sets both
``lambda_h`` and ``lambda_w`` (unless they are given). Every configuration is validated before anything runs;
errors name the key and the configuration. A configuration's parameters are those of its validated
:class:`DUFMConfig` and :class:`GDOptions` (defaults filled in, integers as ints, equal per-layer values as one),
and its ``key`` is the first 12 hex digits of the SHA-256 of those parameters as JSON with sorted keys.

Results go to ``DIR/results.csv``, one row per configuration, appended (and fsynced) as each one
finishes, so a killed sweep loses only the runs in flight; ``DIR/sweep.json`` keeps the spec and its
hash (the first 16 hex digits of the SHA-256 of the validated spec as compact JSON with sorted keys).
``resume=True`` skips the rows (keys) already in the table and refuses a table written for another spec.
The local backend trains configurations with the same shapes together (:mod:`deepcollapse.dufm.batched`) on
all cores; ``backend="ray"`` sends batches to a Ray cluster (``pip install 'deepcollapse[ray]'``).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import itertools
import json
import math
import os
import random
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from deepcollapse._validate import DeepCollapseError, check_positive_int
from deepcollapse.dufm.batched import BatchResult, GDOptions, shape_key, train_batched
from deepcollapse.dufm.model import DUFM, DUFMConfig, labels_from_counts, layer_metrics
from deepcollapse.files import append_csv_rows, prepare_out_dir, read_csv, read_json, write_json

__all__ = [
    "DUFM_KEYS",
    "PARAM_KEYS",
    "SOLVER_KEYS",
    "expand_spec",
    "load_spec",
    "plot_sweep",
    "read_results",
    "repair_table",
    "result_row",
    "run_sweep",
    "spec_hash",
    "sweep_figure",
    "validate_spec",
]

DUFM_KEYS = ("num_classes", "n_per_class", "num_layers", "width", "lambda_h", "lambda_w", "init_std", "seed", "dtype")
SOLVER_KEYS = ("lr", "max_steps", "tol_grad", "tol_rel", "patience")
PARAM_KEYS = (*DUFM_KEYS, "lambda", *SOLVER_KEYS)
TOP_KEYS = ("grid", "random", "fixed", "analysis", "batch_size", "name", "allow_narrow")
DISTRIBUTIONS = ("uniform", "log_uniform", "int_uniform", "choice")
NC_METRICS = ("nc1", "nc2_etf", "nc2_orth")  # per layer: H_1, then the post-ReLU H_2..H_L
DIVERGENCE_FACTOR = 10.0  # a run ending above this multiple of its initial loss diverged (GD never gains that)
RESULT_KEYS = (
    "loss",
    "fit",
    "reg",
    "grad_norm",
    "steps",
    "stop_reason",
    "dnc_loss",
    "ratio_dnc",
    "srg_loss",
    "ratio_srg",
    "rank_pre",
    "rank_post",
    "rank_pre_last",
    "rank_out",
    *NC_METRICS,
    "verdict",
    "seconds",
)
COLUMNS = ("key", "index", *[k for k in PARAM_KEYS if k != "lambda"], *RESULT_KEYS)
RESULTS, META, SUMMARY_PLOT = "results.csv", "sweep.json", "summary.png"


def load_spec(spec: str | Path | Mapping[str, Any]) -> dict[str, Any]:
    """A spec from a dict, a JSON file path or a JSON string."""
    if isinstance(spec, Mapping):
        return dict(spec)
    text = str(spec)
    if text.lstrip().startswith("{"):
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise DeepCollapseError(f"the sweep spec is not valid JSON: {e}") from None
    data = read_json(text)
    if not isinstance(data, dict):
        raise DeepCollapseError(f"the sweep spec {text} must hold a JSON object")
    return data


def _unknown(where: str, keys: Sequence[str], allowed: Sequence[str]) -> None:
    bad = [k for k in keys if k not in allowed]
    if bad:
        raise DeepCollapseError(f"unknown key(s) {bad} in {where}; allowed: {', '.join(allowed)}")


def _check_distribution(name: str, dist: Any) -> None:
    if not isinstance(dist, Mapping) or len(dist) != 1:
        raise DeepCollapseError(
            f"random.params.{name} must be one of {{{', '.join(DISTRIBUTIONS)}: ...}}, got {dist!r}"
        )
    kind, arg = next(iter(dist.items()))
    _unknown(f"random.params.{name}", [kind], DISTRIBUTIONS)
    if kind == "choice":
        if not isinstance(arg, list) or not arg:
            raise DeepCollapseError(f"random.params.{name}.choice must be a non-empty list, got {arg!r}")
        return
    if not (isinstance(arg, list) and len(arg) == 2 and all(isinstance(v, int | float) for v in arg)):
        raise DeepCollapseError(f"random.params.{name}.{kind} must be [low, high], got {arg!r}")
    low, high = arg
    if not low <= high:
        raise DeepCollapseError(f"random.params.{name}.{kind}: low {low} is above high {high}")
    if kind == "log_uniform" and low <= 0:
        raise DeepCollapseError(f"random.params.{name}.log_uniform needs low > 0, got {low}")


def validate_spec(spec: Mapping[str, Any]) -> dict[str, Any]:
    """Check the structure of a spec (keys, lists, distributions); returns it normalized."""
    if not isinstance(spec, Mapping):
        raise DeepCollapseError(f"a sweep spec must be a JSON object, got {type(spec).__name__}")
    _unknown("the sweep spec", list(spec), TOP_KEYS)
    grid = spec.get("grid", {})
    fixed = spec.get("fixed", {})
    rnd = spec.get("random")
    for where, part in (("grid", grid), ("fixed", fixed)):
        if not isinstance(part, Mapping):
            raise DeepCollapseError(f"{where} must be an object of parameter: value(s), got {part!r}")
        _unknown(where, list(part), PARAM_KEYS)
    for k, v in grid.items():
        if not isinstance(v, list) or not v:
            raise DeepCollapseError(f"grid.{k} must be a non-empty list of values, got {v!r}")
    if rnd is not None:
        if not isinstance(rnd, Mapping):
            raise DeepCollapseError(f"random must be an object {{draws, seed, params}}, got {rnd!r}")
        _unknown("random", list(rnd), ("draws", "seed", "params"))
        check_positive_int("random.draws", rnd.get("draws"))
        params = rnd.get("params")
        if not isinstance(params, Mapping) or not params:
            raise DeepCollapseError("random.params must name at least one parameter and its distribution")
        _unknown("random.params", list(params), PARAM_KEYS)
        for k, d in params.items():
            _check_distribution(k, d)
    overlap = set(grid) & set(fixed) | (set(grid) | set(fixed)) & set((rnd or {}).get("params", {}))
    if overlap:
        raise DeepCollapseError(f"parameter(s) {sorted(overlap)} are given in more than one of grid/fixed/random")
    if "batch_size" in spec:
        check_positive_int("batch_size", spec["batch_size"])
    for flag in ("analysis", "allow_narrow"):
        if flag in spec and not isinstance(spec[flag], bool):
            raise DeepCollapseError(f"{flag} must be true or false, got {spec[flag]!r}")
    return {k: spec[k] for k in TOP_KEYS if k in spec}


def spec_hash(spec: Mapping[str, Any]) -> str:
    """SHA-256 (first 16 hex digits) of the spec's canonical JSON."""
    text = json.dumps(validate_spec(spec), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _draw(dist: Mapping[str, Any], rng: random.Random) -> Any:
    kind, arg = next(iter(dist.items()))
    if kind == "choice":
        return arg[rng.randrange(len(arg))]
    low, high = arg
    if kind == "uniform":
        return rng.uniform(low, high)
    if kind == "int_uniform":
        return rng.randint(int(low), int(high))
    return math.exp(rng.uniform(math.log(low), math.log(high)))


def _resolve(params: Mapping[str, Any]) -> dict[str, Any]:
    p = dict(params)
    if "lambda" in p and p["lambda"] is None:
        raise DeepCollapseError("lambda must be a number, got null")
    lam = p.pop("lambda", None)
    if lam is not None:
        p.setdefault("lambda_h", lam)
        p.setdefault("lambda_w", lam)
    return p


def _key(params: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]


def expand_spec(spec: Mapping[str, Any]) -> list[dict[str, Any]]:
    """All configurations of a spec, validated: ``[{"key", "index", "params", "config", "options"}]``.

    Raises :class:`DeepCollapseError` naming the configuration and the key for an impossible value.
    """
    spec = validate_spec(spec)
    grid, fixed, rnd = spec.get("grid", {}), spec.get("fixed", {}), spec.get("random")
    points = [dict(pairs) for pairs in itertools.product(*([(n, v) for v in vs] for n, vs in grid.items()))]
    if rnd is not None:
        rng = random.Random(int(rnd.get("seed", 0)))
        drawn = []
        for point in points:
            for _ in range(int(rnd["draws"])):
                drawn.append({**point, **{k: _draw(d, rng) for k, d in rnd["params"].items()}})
        points = drawn
    out = []
    for i, point in enumerate(points):
        params = _resolve({**fixed, **point})
        try:
            config = DUFMConfig(**{k: params[k] for k in DUFM_KEYS if k in params})
            options = GDOptions(**{k: params[k] for k in SOLVER_KEYS if k in params})
        except (DeepCollapseError, TypeError) as e:
            raise DeepCollapseError(f"configuration #{i} ({json.dumps(point)}): {e}") from None
        if isinstance(options.lr, list):
            raise DeepCollapseError(f"configuration #{i}: lr must be one number")
        narrow = [f"d_{j + 1} = {d}" for j, d in enumerate(config.widths) if d < config.num_classes]
        if narrow and not spec.get("allow_narrow"):
            raise DeepCollapseError(
                f"configuration #{i} ({json.dumps(point)}): width below K = {config.num_classes} "
                f'({", ".join(narrow)}): the DNC optimum needs every width >= K; set "allow_narrow": true in '
                "the spec to run it anyway"
            )
        full = {k: getattr(config, k) for k in DUFM_KEYS} | {k: getattr(options, k) for k in SOLVER_KEYS}
        out.append({"key": _key(full), "index": i, "params": full, "config": config, "options": options})
    keys = [c["key"] for c in out]
    if len(set(keys)) != len(keys):
        raise DeepCollapseError("the spec produces duplicate configurations; give each a distinct seed or value")
    return out


def diverged(res: BatchResult) -> bool:
    """A run diverged when its loss or gradient is not finite, or its loss ends above ``DIVERGENCE_FACTOR``
    times the loss at its initialization (stable GD never raises the loss)."""
    if res.stop_reason == "diverged" or not (math.isfinite(res.loss) and math.isfinite(res.grad_norm)):
        return True
    with torch.no_grad():
        initial = float(DUFM(DUFMConfig(**{**res.config.to_dict(), "dtype": "float64"})).loss()[0])
    return res.loss > DIVERGENCE_FACTOR * initial


def nc_by_layer(res: BatchResult) -> dict[str, list[float]]:
    """``NC_METRICS`` of ``H_1`` and of every post-ReLU ``H_l`` (l = 2..L), one list per metric."""
    cfg = res.config
    labels = labels_from_counts(cfg.counts)
    h1, ws = res.h1.to(torch.float64), [w.to(torch.float64) for w in res.weights]
    rows = [r for r in layer_metrics(h1, ws, labels, cfg.num_classes) if r["stage"] in ("free", "post")]
    return {name: [r[name] for r in rows] for name in NC_METRICS}


def result_row(item: Mapping[str, Any], res: BatchResult, *, analysis: bool = True) -> dict[str, Any]:
    """One table row: the configuration's parameters, the end of its run and (optionally) its analysis."""
    row: dict[str, Any] = {"key": item["key"], "index": item["index"], **item["params"]}
    bad = diverged(res)
    row.update(
        loss=res.loss,
        fit=res.fit,
        reg=res.reg,
        grad_norm=res.grad_norm,
        steps=res.steps,
        stop_reason="diverged" if bad else res.stop_reason,
        seconds=round(res.seconds, 3),
    )
    if bad:
        row["verdict"] = "diverged"
    elif analysis:
        from deepcollapse.theory.analysis import analyze_solution

        a = analyze_solution(res.h1, res.weights, res.config)
        row.update(
            dnc_loss=a["dnc_loss"],
            ratio_dnc=a["ratio_dnc"],
            srg_loss=a["srg_loss"],
            ratio_srg=a["ratio_srg"],
            rank_pre=a["ranks_pre"],
            rank_post=a["ranks_post"],
            rank_pre_last=a["rank_pre_last"],
            rank_out=a["rank_out"],
            verdict=a["verdict"],
            **nc_by_layer(res),
        )
    return row


def _chunks(items: Sequence[dict[str, Any]], size: int) -> list[list[dict[str, Any]]]:
    """Group by shape and stopping rules (everything but the learning rate), then cut into batches of ``size``."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for it in items:
        o = it["options"]
        groups.setdefault((shape_key(it["config"]), o.max_steps, o.tol_grad, o.tol_rel, o.patience), []).append(it)
    return [g[i : i + size] for g in groups.values() for i in range(0, len(g), size)]


def _options(chunk: Sequence[Mapping[str, Any]]) -> GDOptions:
    """One GDOptions for a batch: per-config lr, the stopping rules its members share (see ``_chunks``)."""
    return dataclasses.replace(chunk[0]["options"], lr=[it["options"].lr for it in chunk])


def _run_chunk(chunk: Sequence[Mapping[str, Any]], analysis: bool, on_row: Callable[[dict], None] | None) -> list[dict]:
    rows: list[dict] = []

    def done(res: BatchResult) -> None:
        row = result_row(chunk[res.index], res, analysis=analysis)
        rows.append(row)
        if on_row is not None:
            on_row(row)

    train_batched([it["config"] for it in chunk], _options(chunk), on_finish=done)
    return rows


def _ray_chunk(chunk: list[dict[str, Any]], analysis: bool, threads: int) -> list[dict]:
    torch.set_num_threads(threads)
    return _run_chunk(chunk, analysis, None)


def _probe(address: str | None, *, timeout: float = 3.0) -> None:
    """Fail fast (one TCP connect) when an explicit ``host:port`` cannot be reached; Ray itself retries for long."""
    if not address or address in ("auto", "local"):
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")  # IPv6: the last colon
    if not host or not port.isdigit():
        raise DeepCollapseError(f"ray_address must be host:port or ray://host:port, got {address!r}")
    import socket

    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as e:
        raise DeepCollapseError(f"cannot reach the Ray cluster at {address!r}: {e.strerror or e}") from None


def _connect_ray(address: str | None) -> Any:
    try:
        import ray
    except ImportError:
        raise DeepCollapseError("backend='ray' needs Ray: pip install 'deepcollapse[ray]'") from None
    if ray.is_initialized():
        return ray
    _probe(address)
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
    except Exception as e:  # Ray raises ConnectionError, RuntimeError or its own types
        where = address or "auto"
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DeepCollapseError(f"cannot reach the Ray cluster at {where!r}: {msg}") from None
    return ray


def repair_table(path: str | Path) -> bool:
    """Drop a torn last line of a CSV table (a crash in the middle of a write), with a warning.

    A line is torn when the file does not end with a newline, or when its last line has another number of
    fields than the header. Returns whether something was dropped; the dropped row's configuration is then
    missing from the table, so a resumed run computes it again.
    """
    path = Path(path)
    data = path.read_bytes()
    if not data:
        return False
    keep = data[: data.rfind(b"\n") + 1]  # up to the last newline
    lines = keep.decode().splitlines()
    if lines and len(next(csv.reader([lines[-1]]))) != len(next(csv.reader([lines[0]]))):
        keep = keep[: keep.rstrip(b"\n").rfind(b"\n") + 1]
    if keep == data:
        return False
    warnings.warn(f"{path}: dropped a torn last row ({len(data) - len(keep)} bytes); it runs again", stacklevel=2)
    with open(path, "r+b") as f:
        f.truncate(len(keep))
        f.flush()
        os.fsync(f.fileno())
    return True


def _table_check(out: Path, digest: str) -> set[str]:
    """The keys already in ``out/results.csv``, after checking that ``digest``'s spec wrote it."""
    meta_path, table = out / META, out / RESULTS
    if not meta_path.exists():
        raise DeepCollapseError(f"{table} has no {META} beside it; cannot tell which spec wrote it")
    meta = read_json(meta_path)
    if meta.get("spec_hash") != digest:
        raise DeepCollapseError(
            f"{table} was written by a different spec (hash {meta.get('spec_hash')} != {digest});"
            " use another out or overwrite=True"
        )
    repair_table(table)
    return {str(r["key"]) for r in read_csv(table)}


def run_sweep(
    spec: str | Path | Mapping[str, Any],
    out: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    backend: str = "local",
    ray_address: str | None = None,
    threads: int | None = None,
    on_row: Callable[[dict[str, Any]], None] | None = None,
    on_start: Callable[[int, int], None] | None = None,
    plot: bool = True,
) -> dict[str, Any]:
    """Run every configuration of ``spec`` not already in ``out/results.csv``; returns a summary.

    ``on_start(total, done)`` is called once the work is known; ``on_row(row)`` after each row is saved.
    ``threads`` (default: all cores) sets torch's intra-op threads for the local backend. ``plot`` writes
    ``out/summary.png`` (:func:`plot_sweep`) of the whole table at the end.
    """
    if backend not in ("local", "ray"):
        raise DeepCollapseError(f"backend must be 'local' or 'ray', got {backend!r}")
    spec = load_spec(spec)
    items = expand_spec(spec)
    digest = spec_hash(spec)
    analysis = bool(spec.get("analysis", True))
    batch = int(spec.get("batch_size", 256))
    out = Path(out)
    if resume and (out / RESULTS).exists():
        finished = _table_check(out, digest)
    else:
        prepare_out_dir(out, overwrite=overwrite)  # no table to resume: a directory holding a run is refused
        finished = set()
    write_json(out / META, {"spec": validate_spec(spec), "spec_hash": digest, "columns": list(COLUMNS)})
    todo = [it for it in items if it["key"] not in finished]
    if on_start is not None:
        on_start(len(items), len(items) - len(todo))
    start = time.perf_counter()

    def save(row: dict[str, Any]) -> None:
        append_csv_rows(out / RESULTS, [row], COLUMNS)
        if on_row is not None:
            on_row(row)

    if backend == "local":
        old = torch.get_num_threads()
        torch.set_num_threads(threads or os.cpu_count() or 1)
        try:
            for chunk in _chunks(todo, batch):
                _run_chunk(chunk, analysis, save)
        finally:
            torch.set_num_threads(old)
    elif todo:
        ray = _connect_ray(ray_address)
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        size = max(1, min(batch, math.ceil(len(todo) / (2 * cpus))))
        task = ray.remote(num_cpus=1)(_ray_chunk)
        refs = [task.remote(c, analysis, threads or 1) for c in _chunks(todo, size)]
        while refs:
            ready, refs = ray.wait(refs, num_returns=1)
            for row in ray.get(ready[0]):
                save(row)
    if plot:
        plot_sweep(read_results(out), out / SUMMARY_PLOT)
    return {
        "out": str(out / RESULTS),
        "plot": str(out / SUMMARY_PLOT) if plot else None,
        "spec_hash": digest,
        "total": len(items),
        "skipped": len(items) - len(todo),
        "ran": len(todo),
        "seconds": time.perf_counter() - start,
        "backend": backend,
    }


LIST_COLUMNS = ("rank_pre", "rank_post", *NC_METRICS)


def _as_list(cell: Any) -> Any:
    """A JSON list cell back as a list (non-finite numbers are written as "nan"/"inf" strings)."""
    if not isinstance(cell, str) or not cell.startswith("["):
        return cell
    return [float(v) if isinstance(v, str) else v for v in json.loads(cell)]


def read_results(out: str | Path) -> list[dict[str, Any]]:
    """The rows of ``out/results.csv`` in spec order (by ``index``), one per configuration; list columns
    (ranks, per-layer NC metrics) as lists."""
    path = Path(out)
    rows = read_csv(path / RESULTS if path.is_dir() else path)
    for r in rows:
        for c in LIST_COLUMNS:
            if c in r:
                r[c] = _as_list(r[c])
    return sorted(rows, key=lambda r: r["index"])


def _verdict(row: Mapping[str, Any]) -> str:
    return str(row.get("verdict") or "-")


def sweep_figure(rows: Sequence[Mapping[str, Any]]) -> Any:
    """The sweep at a glance (a matplotlib Figure): runs per verdict (left) and ``loss / L_DNC`` of every run
    against its configuration index, one series per verdict, with the line ``loss = L_DNC`` (right)."""
    from matplotlib.figure import Figure  # not pyplot: no global figure to close

    verdicts = sorted({_verdict(r) for r in rows})
    fig = Figure(figsize=(9, 3.6))
    left, right = fig.subplots(1, 2)
    left.bar(verdicts, [sum(_verdict(r) == v for r in rows) for v in verdicts])
    left.set_ylabel("runs")
    left.set_title(f"{len(rows)} configurations", fontsize=9)
    for v in verdicts:
        pts = [(r["index"], r["ratio_dnc"]) for r in rows if _verdict(r) == v]
        pts = [(i, y) for i, y in pts if isinstance(y, float) and math.isfinite(y) and y > 0]
        if pts:
            right.scatter([i for i, _ in pts], [y for _, y in pts], s=12, label=v)
    right.axhline(1.0, color="k", lw=1, ls=":")
    right.set_yscale("log")
    right.set_xlabel("configuration index")
    right.set_ylabel("loss / L_DNC")
    if right.collections:
        right.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_sweep(rows: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """:func:`sweep_figure` saved as a PNG of 810 x 324 pixels at ``path`` (parent directories created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_figure(rows).savefig(path, dpi=90)
    return path
