"""NC1-NC4 over N features: streamed float64 statistics vs the published in-memory recipe.

Run by hand (not by CI)::

    .venv/bin/python benchmarks/metrics_speed.py            # N=50,000, D=2,048, K=100; light path at D=32,768
    .venv/bin/python benchmarks/metrics_speed.py --quick    # small sizes, ~30 s

The features come from a deterministic source that yields float32 batches (class mean + noise cycled from a
bank of pre-generated blocks: a stand-in for reading stored features), so both methods see the same data:

* **baseline** -- the way the published NC code does it: keep all features in memory (concatenated
  float32), loop over classes for a float32 within-class covariance ``Σ_W`` (D x D), ``pinv`` of the D x D
  ``Σ_B``, ``NC1 = tr(Σ_W Σ_B⁺)/K``; NC2 from the centred means; NC3 (self-duality, not squared) against a
  fixed classifier ``W``; NC4 from ``cdist`` of all features to the means.
* **streamed** -- :func:`deepcollapse.measure.accumulate.accumulate_stats` (two passes over the source, float64,
  light O(K·D) state by default) and the metric functions of :mod:`deepcollapse.metrics`.

Both run single-threaded by default (``--threads``): on a small shared machine, two OpenMP threads make every
timing hostage to the other processes. Each method runs in its own subprocess; peak memory is that
process's peak resident set size above what it held before the measurement started (Python, torch and the
noise bank). Throughput is printed end to end
(source included; the streamed method reads every batch twice: two passes) and for the metrics alone.
The baseline is not run at D=32,768: it would need N·D·4 B of features plus several D x D float32
matrices and an SVD of a 32,768² matrix.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import torch

SOURCE_SECONDS = [0.0]  # time spent inside the data source, per process
NOISE_BLOCKS = 8
NOISE: list[torch.Tensor] = []  # pre-generated noise blocks, made before the measurement starts


def prepare_source(d: int, batch: int, seed: int = 0) -> None:
    """Draw the noise bank: ``NOISE_BLOCKS`` blocks of (batch, D) standard normals (float32)."""
    g = torch.Generator().manual_seed(seed + 1)
    NOISE[:] = [torch.randn(batch, d, generator=g) for _ in range(NOISE_BLOCKS)]


def source(n: int, d: int, k: int, batch: int, seed: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Deterministic float32 batches ``μ_y + noise``: balanced labels (a fixed scramble of 0..K-1), class means
    ``1 + 4 N(0, 1)/sqrt(D)``, noise cycled from the bank (one add per element: about the cost of reading
    stored features)."""
    if not NOISE or NOISE[0].shape != (batch, d):
        prepare_source(d, batch, seed)
    g = torch.Generator().manual_seed(seed)
    means = 4.0 / d**0.5 * torch.randn(k, d, generator=g) + 1.0
    for i, start in enumerate(range(0, n, batch)):
        t = time.perf_counter()
        b = min(batch, n - start)
        y = (torch.arange(start, start + b) * 7919) % k
        out = means[y] + NOISE[i % NOISE_BLOCKS][:b]
        SOURCE_SECONDS[0] += time.perf_counter() - t
        yield out, y


def classifier(k: int, d: int) -> torch.Tensor:
    return torch.randn(k, d, generator=torch.Generator().manual_seed(12345))


def baseline(cfg: dict[str, Any]) -> dict[str, float]:
    """All features in memory, per-class covariance loop, pinv of Σ_B (the published recipe), in float32
    (``cfg["dtype"]="float64"`` runs the same recipe in float64, as an accuracy reference)."""
    n, d, k = cfg["n"], cfg["d"], cfg["k"]
    dtype = getattr(torch, cfg.get("dtype", "float32"))
    feats, labels = zip(*source(n, d, k, cfg["batch"]), strict=True)
    h, y = torch.cat(feats).to(dtype), torch.cat(labels)
    del feats, labels
    means = []
    sw = torch.zeros(d, d, dtype=dtype)
    for c in range(k):
        hc = h[y == c]
        mu = hc.mean(0)
        z = hc - mu
        sw += z.T @ z
        means.append(mu)
    sw /= n
    m = torch.stack(means)
    mbar = m - h.mean(0)
    sb = mbar.T @ mbar / k
    nc1 = float(torch.trace(sw @ torch.linalg.pinv(sb))) / k
    g = mbar @ mbar.T
    etf = torch.eye(k, dtype=dtype) - 1.0 / k
    nc2 = float(torch.linalg.matrix_norm(g / torch.linalg.matrix_norm(g) - etf / torch.linalg.matrix_norm(etf)))
    w = classifier(k, d).to(dtype)
    nc3 = float(torch.linalg.matrix_norm(w / torch.linalg.matrix_norm(w) - mbar / torch.linalg.matrix_norm(mbar)))
    nc4 = float((torch.cdist(h, m).argmin(1) == y).double().mean())
    return {"nc1": nc1, "nc2": nc2, "nc3": nc3, "nc4": nc4}


def streamed(cfg: dict[str, Any]) -> dict[str, float]:
    """Two streamed passes into float64 sufficient statistics, metrics from deepcollapse.metrics."""
    from deepcollapse.measure.accumulate import accumulate_stats
    from deepcollapse.measure.metrics import nc1, nc2_etf, nc3, nc4

    n, d, k = cfg["n"], cfg["d"], cfg["k"]
    stats = accumulate_stats(lambda: source(n, d, k, cfg["batch"]), k, cov=cfg["cov"])
    w = classifier(k, d)
    return {
        "nc1": nc1(stats),
        "nc2": nc2_etf(stats),
        "nc3": nc3(w, stats, method="duality", center=True),
        "nc4": nc4(stats),
    }


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def worker(cfg: dict[str, Any]) -> None:
    """Run one method in this (fresh) process; print time, peak extra memory and the metrics as JSON."""
    fn = {"baseline": baseline, "streamed": streamed}[cfg["method"]]
    torch.manual_seed(0)
    if cfg.get("threads"):
        torch.set_num_threads(cfg["threads"])
    prepare_source(cfg["d"], cfg["batch"])  # shared input, not counted in either method's memory
    before = _rss_bytes()
    t = time.perf_counter()
    metrics = fn(cfg)
    seconds = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    out = {"seconds": seconds, "source_seconds": SOURCE_SECONDS[0], "peak_bytes": max(peak - before, 1)}
    print(json.dumps({**out, "metrics": metrics}))


def run(cfg: dict[str, Any]) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(cfg)], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise SystemExit(f"{cfg['method']} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def report(label: str, cfg: dict[str, Any], res: dict[str, Any]) -> None:
    mib = res["peak_bytes"] / 2**20
    compute = res["seconds"] - res["source_seconds"]
    print(
        f"  {label:<27} {res['seconds']:7.2f} s {cfg['n'] / res['seconds']:10,.0f} samples/s"
        f" | {compute:7.2f} s {cfg['n'] / compute:10,.0f} samples/s | {mib:9.1f} MiB"
    )


HEADER = f"  {'':<27} {'end to end (with source)':>32} | {'metrics only (source excluded)':>30} | {'peak extra':>12}"


def max_rel(a: dict[str, float], b: dict[str, float]) -> float:
    return max(abs(a[k] - b[k]) / max(abs(b[k]), 1e-300) for k in a)


def ratios(name: str, base: dict[str, Any], res: dict[str, Any]) -> None:
    speed = base["seconds"] / res["seconds"]
    speed_c = (base["seconds"] - base["source_seconds"]) / (res["seconds"] - res["source_seconds"])
    mem = res["peak_bytes"] / base["peak_bytes"]
    print(
        f"  {name} / baseline: throughput x{speed:.1f} end to end, x{speed_c:.1f} metrics only;"
        f" memory x{mem:.3f} (1/{1 / mem:.0f})"
    )


def show(label: str, metrics: dict[str, float]) -> None:
    print(f"  {label:<27} " + ", ".join(f"{m}={v:.10g}" for m, v in metrics.items()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="N=5,000, D=256, K=10; light path at D=4,096")
    p.add_argument("--n", type=int, default=None)
    p.add_argument("--d", type=int, default=None)
    p.add_argument("--k", type=int, default=None)
    p.add_argument("--d-light", type=int, default=None, help="D of the light-path-only run (0 skips it)")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--threads", type=int, default=1, help="torch threads in each run (0: torch's default)")
    p.add_argument("--with-full", action="store_true", help="also time the streamed full (D x D) path")
    p.add_argument("--no-check", action="store_true", help="skip the float64 run of the baseline recipe")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        worker(json.loads(a.worker))
        return
    n, d, k, d_light, batch = (5_000, 256, 10, 4_096, 500) if a.quick else (50_000, 2_048, 100, 32_768, 1_000)
    n, d, k = a.n or n, a.d or d, a.k or k
    d_light = d_light if a.d_light is None else a.d_light
    cfg = {"n": n, "d": d, "k": k, "batch": a.batch or batch, "threads": a.threads}
    threads = a.threads or torch.get_num_threads()
    print(f"torch {torch.__version__}, {threads} thread(s); N={n:,}, K={k}, batch={cfg['batch']}")

    print(f"\nD = {d:,}\n{HEADER}")
    base = run({**cfg, "method": "baseline"})
    report("baseline (in memory, f32)", cfg, base)
    results = {"streamed light": run({**cfg, "method": "streamed", "cov": "light"})}
    report("streamed light (f64)", cfg, results["streamed light"])
    if a.with_full:
        results["streamed full"] = run({**cfg, "method": "streamed", "cov": "full"})
        report("streamed full D x D (f64)", cfg, results["streamed full"])
    for name, res in results.items():
        ratios(name, base, res)
    show("baseline f32:", base["metrics"])
    for name, res in results.items():
        show(f"{name}:", res["metrics"])
        print(f"  {'':<27} max rel diff vs baseline f32: {max_rel(res['metrics'], base['metrics']):.1e}")
    if not a.no_check:
        ref = run({**cfg, "method": "baseline", "dtype": "float64"})
        show("baseline recipe in f64:", ref["metrics"])
        for name, res in results.items():
            print(f"  {name} vs baseline recipe in f64: max rel diff {max_rel(res['metrics'], ref['metrics']):.1e}")

    if d_light:
        cfg_l = {**cfg, "d": d_light, "batch": a.batch or max(64, cfg["batch"] * d // d_light)}  # same bytes/batch
        print(f"\nD = {d_light:,}, light path only, batch={cfg_l['batch']}\n{HEADER}")
        res = run({**cfg_l, "method": "streamed", "cov": "light"})
        report("streamed light (f64)", cfg_l, res)
        need = (n * d_light * 4 + 3 * d_light * d_light * 4) / 2**30
        print(f"  baseline not run: it would hold >= {need:.1f} GiB (features + 3 D x D float32) and SVD a D x D")
        show("streamed light:", res["metrics"])


if __name__ == "__main__":
    main()
