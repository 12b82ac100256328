"""NC metrics of streamed features: `deepcollapse measure`'s path against the anchor library's recipe and the
machine's flop bound, timed in the same run.

Run by hand (not by CI)::

    .venv/bin/python benchmarks/metrics_speed.py                    # the CPU scenarios below, one thread
    .venv/bin/python benchmarks/metrics_speed.py --threads 0        # torch's default threads
    .venv/bin/python benchmarks/metrics_speed.py --quick            # small sizes, a smoke test
    .venv/bin/python benchmarks/metrics_speed.py --gpu              # the ImageNet-sized scenario on CUDA

Scenarios (N samples, D features, K classes) and targets:

* ``main``  N = 100,000, D = 2,048, K = 100: >= 10x the anchor-style baseline end to end; within 2x of the
  flop bound.
* ``wideK`` N = 100,000, D = 512, K = 1,000: >= 3x the anchor-style baseline.
* ``vocab`` N = 100,000, D = 256, K = 50,000 (a language model's vocabulary): peak memory within 4 GiB (the
  process runs under an address-space limit, so a path that needs more fails instead of swapping).
* ``gpu``   N = 1,280,000, D = 2,048, K = 1,000 on CUDA (``--gpu``, runs only where CUDA exists): under 60 s.

Methods, each in a fresh subprocess on the same deterministic float32 source (class mean + noise cycled from a
bank of pre-generated blocks: a stand-in for reading stored features; its time is reported separately):

* **anchor** -- NC1 the way rhubarbwu/neural-collapse computes it: two streamed passes in float32; pass 1
  sums each class through a one-hot ``(K, B) @ (B, D)`` product; the means are ``totals / (n + eps)`` and the
  global mean their plain average; pass 2 adds ``(h - μ_y)^T (h - μ_y)`` into a pooled float32 ``D x D``
  ``Σ_W``; then ``NC1 = tr(pinv(Σ_B) Σ_W) / K`` with ``Σ_B`` the ``D x D`` between-class covariance. NC1 only.
* **measure** -- what ``deepcollapse measure`` runs on one saved layer
  (:func:`deepcollapse.measure.readers.measure_saved` with its default options, fed from the source instead
  of a file): every metric of the layer and the per-class table, in float64 statistics.
* **nc1** -- NC1 alone through the library's default path (``accumulate_stats(..., ncc=False)`` and
  :func:`~deepcollapse.measure.metrics.nc1`): the like-for-like comparison with the anchor, which computes
  only NC1 (``measure`` also pays the O(N·D·K) nearest-class-centre counts and every other metric).
* **bound** -- the flop bound: one ``(N x D) @ (D x min(D, K))`` product (the work an exact
  ``O(N·D·min(D, K))`` method cannot avoid), timed on the same sizes in row blocks of the batch size, in
  float32 (the features' precision) and in float64 (the precision the package keeps its products in).

Ratios printed: anchor / measure and anchor / nc1 (end to end, and with the source's time removed from
both) and measure / bound, nc1 / bound (source removed). The **ceiling** line is the best end-to-end ratio
any exact method with float64 products could reach in the same run: anchor / (source + the float64
product), with the least source time of the run; a target above it cannot be met without giving up the
float64 products (docs/conventions.md, "Why the products stay in float64"). Peak memory is each process's
peak resident set above what it held before the measurement started.
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

import numpy as np
import torch

SCENARIOS = {
    "main": {"n": 100_000, "d": 2_048, "k": 100, "batch": 1_000, "methods": ("anchor", "measure", "nc1", "bound")},
    "wideK": {"n": 100_000, "d": 512, "k": 1_000, "batch": 2_000, "methods": ("anchor", "measure", "nc1", "bound")},
    "vocab": {"n": 100_000, "d": 256, "k": 50_000, "batch": 4_000, "methods": ("measure",), "limit_gib": 4.0},
}
QUICK = {
    "main": {"n": 5_000, "d": 256, "k": 10, "batch": 500, "methods": ("anchor", "measure", "nc1", "bound")},
    "wideK": {"n": 5_000, "d": 64, "k": 200, "batch": 500, "methods": ("anchor", "measure", "nc1", "bound")},
    "vocab": {"n": 20_000, "d": 32, "k": 5_000, "batch": 2_000, "methods": ("measure",), "limit_gib": 4.0},
}
GPU = {"n": 1_280_000, "d": 2_048, "k": 1_000, "batch": 8_192, "methods": ("anchor", "measure", "nc1", "bound")}

SOURCE_SECONDS = [0.0]  # time spent inside the data source, per process
NOISE_BLOCKS = 8
NOISE: list[torch.Tensor] = []  # pre-generated noise blocks, made before the measurement starts


def prepare_source(d: int, batch: int, device: str, seed: int = 0) -> None:
    """Draw the noise bank: ``NOISE_BLOCKS`` blocks of (batch, D) standard normals (float32)."""
    g = torch.Generator().manual_seed(seed + 1)
    NOISE[:] = [torch.randn(batch, d, generator=g).to(device) for _ in range(NOISE_BLOCKS)]


def labels_of(n: int, k: int) -> np.ndarray:
    """Balanced labels in a fixed scramble of ``0..K-1``."""
    return (np.arange(n, dtype=np.int64) * 7919) % k


def source(cfg: dict[str, Any], seed: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Deterministic float32 batches ``μ_y + noise`` with class means ``1 + 4 N(0, 1)/sqrt(D)``."""
    n, d, k, batch, device = cfg["n"], cfg["d"], cfg["k"], cfg["batch"], cfg["device"]
    g = torch.Generator().manual_seed(seed)
    means = (4.0 / d**0.5 * torch.randn(k, d, generator=g) + 1.0).to(device)
    y_all = torch.from_numpy(labels_of(n, k)).to(device)
    for i, start in enumerate(range(0, n, batch)):
        t = time.perf_counter()
        b = min(batch, n - start)
        y = y_all[start : start + b]
        out = means[y] + NOISE[i % NOISE_BLOCKS][:b]
        _sync(device)
        SOURCE_SECONDS[0] += time.perf_counter() - t
        yield out, y


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def anchor(cfg: dict[str, Any]) -> dict[str, float]:
    """NC1 as rhubarbwu/neural-collapse computes it (see the module docstring), written here from its recipe."""
    d, k, dev, f32 = cfg["d"], cfg["k"], cfg["device"], torch.float32
    counts = torch.zeros(k, dtype=torch.int32, device=dev)
    totals = torch.zeros(k, d, dtype=f32, device=dev)
    classes = torch.arange(k, device=dev)
    for h, y in source(cfg):
        onehot = y[:, None] == classes  # (B, K)
        counts += onehot.sum(0, dtype=torch.int32)
        totals += onehot.T.to(f32) @ h
    eps = torch.finfo(f32).eps
    means = totals / (counts[:, None] + eps).to(f32)
    mean_g = means.mean(0)
    sigma_w = torch.zeros(d, d, dtype=f32, device=dev)
    for h, y in source(cfg):
        diff = h - means[y]
        sigma_w += diff.T @ diff
    sigma_w /= counts.sum() + eps
    centred = means - mean_g
    sigma_b = centred.T @ centred / k
    nc1 = float(torch.trace(torch.linalg.pinv(sigma_b) @ sigma_w)) / k
    return {"nc1": nc1}


def measure(cfg: dict[str, Any]) -> dict[str, float]:
    """`deepcollapse measure`'s code path on one layer fed by the source (default options)."""
    from deepcollapse.measure.readers import LayerArray, MeasureOptions, SavedFeatures, measure_saved

    if cfg["device"].startswith("cuda"):
        return measure_on_device(cfg)

    def chunks(rows: int) -> Iterator[np.ndarray]:
        assert rows == cfg["batch"]
        for h, _ in source(cfg):
            yield h.numpy()

    layer = LayerArray("features", (cfg["n"], cfg["d"]), chunks, np.dtype(np.float32))
    inputs = SavedFeatures(cfg.get("path", "<source>"), [layer], labels_of(cfg["n"], cfg["k"]))
    result = measure_saved(inputs, options=MeasureOptions(batch_size=cfg["batch"]))
    metrics = result.layers[0].metrics
    return {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)}


def nc1_only(cfg: dict[str, Any]) -> dict[str, float]:
    """NC1 alone, as the anchor computes it: the library's default accumulation without the NCC counts."""
    from deepcollapse.measure.accumulate import accumulate_stats
    from deepcollapse.measure.metrics import nc1

    stats = accumulate_stats(lambda: source(cfg), cfg["k"], ncc=False)
    out = {"nc1": nc1(stats)}
    _sync(cfg["device"])
    return out


def measure_on_device(cfg: dict[str, Any]) -> dict[str, float]:
    """On CUDA: the library's default accumulation and metrics on batches that never leave the device."""
    from deepcollapse.measure.accumulate import accumulate_stats
    from deepcollapse.measure.metrics import dnc_metrics

    stats = accumulate_stats(lambda: source(cfg), cfg["k"])
    out = {k: float(v) for k, v in dnc_metrics(stats).items() if isinstance(v, int | float)}
    _sync(cfg["device"])
    return out


def _matmul_gflops(cfg: dict[str, Any], dtype: torch.dtype) -> float:
    """GFLOP/s of (N x D) @ (D x min(D, K)) in ``dtype``, in row blocks of the batch size."""
    d, k, dev, batch = cfg["d"], cfg["k"], cfg["device"], cfg["batch"]
    right = torch.randn(d, min(d, k), device=dev, dtype=dtype)
    blocks = [x.to(dtype) for x in NOISE]
    acc = blocks[0] @ right  # warm-up, untimed
    _sync(dev)
    t = time.perf_counter()
    for i in range(0, cfg["n"], batch):
        acc = blocks[(i // batch) % NOISE_BLOCKS][: min(batch, cfg["n"] - i)] @ right
    _sync(dev)
    del acc
    return 2.0 * cfg["n"] * d * min(d, k) / (time.perf_counter() - t) / 1e9


def bound(cfg: dict[str, Any]) -> dict[str, float]:
    """The flop bound: (N x D) @ (D x min(D, K)) timed in float32 (the features' precision) and in float64
    (the precision of the package's products, see docs/conventions.md), source excluded."""
    return {"gflops": _matmul_gflops(cfg, torch.float32), "gflops64": _matmul_gflops(cfg, torch.float64)}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def worker(cfg: dict[str, Any]) -> None:
    """Run one method in this (fresh) process; print time, peak extra memory and the metrics as JSON."""
    if cfg.get("limit_gib"):
        lim = int(cfg["limit_gib"] * 2**30) + _rss_bytes() + 2**30  # the limit above what Python/torch hold
        resource.setrlimit(resource.RLIMIT_AS, (lim, lim))
    fn = {"anchor": anchor, "measure": measure, "nc1": nc1_only, "bound": bound}[cfg["method"]]
    if cfg.get("threads"):
        torch.set_num_threads(cfg["threads"])
    if cfg["method"] in ("measure", "nc1"):
        import deepcollapse.measure.readers  # noqa: F401  (import time is not measurement time)
    prepare_source(cfg["d"], cfg["batch"], cfg["device"])  # shared input, not counted in any method's memory
    _sync(cfg["device"])
    before = _rss_bytes()
    if cfg["device"].startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    try:
        metrics = fn(cfg)
    except MemoryError:
        print(json.dumps({"error": "out of memory under the address-space limit"}))
        return
    seconds = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before  # Linux: KiB
    if cfg["device"].startswith("cuda"):
        peak = torch.cuda.max_memory_allocated()
    out = {"seconds": seconds, "source_seconds": SOURCE_SECONDS[0], "peak_bytes": max(peak, 1)}
    print(json.dumps({**out, "metrics": metrics}))


def run(cfg: dict[str, Any]) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(cfg)], capture_output=True, text=True, check=False
    )
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"error": f"exit code {proc.returncode}: {tail}"}
    return json.loads(lines[-1])


def scenario(name: str, cfg: dict[str, Any]) -> None:
    n, d, k = cfg["n"], cfg["d"], cfg["k"]
    print(f"\n{name}: N={n:,}, D={d:,}, K={k:,}, batch={cfg['batch']:,}, device={cfg['device']}")
    res = {m: run({**cfg, "method": m}) for m in cfg["methods"]}
    for m in ("anchor", "measure", "nc1"):
        r = res.get(m)
        if r is None:
            continue
        if "error" in r:
            print(f"  {m:<8} FAILED: {r['error']}")
            continue
        compute = r["seconds"] - r["source_seconds"]
        print(
            f"  {m:<8} {r['seconds']:8.2f} s end to end ({r['source_seconds']:.2f} s in the source, {compute:.2f} s"
            f" computing), peak extra memory {r['peak_bytes'] / 2**20:,.0f} MiB"
        )
    flops = 2.0 * n * d * min(d, k)
    if "bound" in res and "error" not in res["bound"]:
        gf, gf64 = res["bound"]["metrics"]["gflops"], res["bound"]["metrics"]["gflops64"]
        print(
            f"  bound    {gf:8.1f} GFLOP/s float32 -> {flops / gf / 1e9:.2f} s for one N·D·min(D,K) product;"
            f" {gf64:.1f} GFLOP/s float64 -> {flops / gf64 / 1e9:.2f} s"
        )
    a = res.get("anchor")
    for name in ("measure", "nc1"):
        m = res.get(name)
        if a and m and "error" not in a and "error" not in m:
            e2e = a["seconds"] / m["seconds"]
            comp = (a["seconds"] - a["source_seconds"]) / (m["seconds"] - m["source_seconds"])
            nc1_m, nc1_a = m["metrics"]["nc1"], a["metrics"]["nc1"]
            print(
                f"  {name} vs anchor: x{e2e:.1f} end to end, x{comp:.1f} computing only;"
                f" NC1 {nc1_m:.10g} vs {nc1_a:.10g} (rel diff {abs(nc1_m - nc1_a) / abs(nc1_m):.1e})"
            )
        if m and "error" not in m and "bound" in res and "error" not in res["bound"]:
            compute = m["seconds"] - m["source_seconds"]
            t32, t64 = (flops / res["bound"]["metrics"][g] / 1e9 for g in ("gflops", "gflops64"))
            print(f"  {name} computing / bound: x{compute / t32:.2f} (float32 product), x{compute / t64:.2f} (float64)")
    ceiling(res, flops, d, k)
    m = res.get("measure")
    if m and "error" not in m and cfg.get("limit_gib"):
        ok = m["peak_bytes"] <= cfg["limit_gib"] * 2**30
        print(f"  peak memory {m['peak_bytes'] / 2**30:.2f} GiB ({'within' if ok else 'ABOVE'} {cfg['limit_gib']} GiB)")


def ceiling(res: dict[str, Any], flops: float, d: int, k: int) -> None:
    """The best ratio to the anchor that an exact method with float64 products can reach on this run:
    ``anchor / (source + float64 product)``, with the source's time the least any method of the run spent
    reading the data twice (every method here makes two passes) and the product the one N·D·min(D, K)
    float64 product no exact method avoids (docs/conventions.md: the NC1 products stay in float64). When
    D <= K that product is the D x D scatter, which is symmetric: the second line halves it."""
    a, b = res.get("anchor"), res.get("bound")
    if not a or not b or "error" in a or "error" in b:
        return
    src = min(r["source_seconds"] for r in res.values() if "source_seconds" in r and r["source_seconds"] > 0)
    t64, t32 = (flops / b["metrics"][g] / 1e9 for g in ("gflops64", "gflops"))
    print(
        f"  ceiling  best possible with float64 products: anchor / (source + float64 product) ="
        f" {a['seconds']:.2f} / ({src:.2f} + {t64:.2f}) = x{a['seconds'] / (src + t64):.1f}"
        f" (float32 products, which cannot guarantee 1e-6: x{a['seconds'] / (src + t32):.1f})"
    )
    if d <= k:  # the D x D scatter is symmetric: half the product's multiply-adds would do
        print(
            f"           with the symmetric D x D scatter at half the product's cost:"
            f" {a['seconds']:.2f} / ({src:.2f} + {t64 / 2:.2f}) = x{a['seconds'] / (src + t64 / 2):.1f}"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes (a smoke test)")
    p.add_argument("--only", default=None, help="comma-separated scenarios (main, wideK, vocab)")
    p.add_argument("--threads", type=int, default=1, help="torch threads in each run (0: torch's default)")
    p.add_argument("--gpu", action="store_true", help="run the ImageNet-sized scenario on CUDA (if available)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        worker(json.loads(a.worker))
        return
    threads = a.threads or torch.get_num_threads()
    print(f"torch {torch.__version__}, numpy {np.__version__}, {threads} thread(s) per process")
    if a.gpu:
        if not torch.cuda.is_available():
            print("--gpu: CUDA is not available here; skipped")
            return
        print(f"GPU: {torch.cuda.get_device_name()}")
        scenario("gpu", {**GPU, "device": "cuda", "threads": a.threads})
        return
    table = QUICK if a.quick else SCENARIOS
    names = a.only.split(",") if a.only else list(table)
    for name in names:
        scenario(name, {**table[name], "device": "cpu", "threads": a.threads})


if __name__ == "__main__":
    main()
