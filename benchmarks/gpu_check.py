"""One prepared script for a lent GPU: check the CUDA paths and measure throughput against the CPU.

Run by hand on a CUDA machine (from the repository root, without installing):

    PYTHONPATH=src python benchmarks/gpu_check.py --out results.json

Each section is independent (a failure is printed and the next section runs). Prints a table and writes
JSON with every figure.
"""

from __future__ import annotations

import argparse
import json
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch

RESULTS: dict[str, Any] = {}


def section(name: str) -> Callable[[Callable[[], dict[str, Any]]], Callable[[], None]]:
    def wrap(fn: Callable[[], dict[str, Any]]) -> Callable[[], None]:
        def run() -> None:
            t0 = time.perf_counter()
            try:
                out = fn()
                out["ok"] = True
            except Exception as e:  # report and go on
                out = {"ok": False, "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-2000:]}
            out["seconds"] = round(time.perf_counter() - t0, 2)
            RESULTS[name] = out
            print(f"[{name}] {json.dumps(out, default=str)[:1500]}", flush=True)

        return run

    return wrap


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


@section("device")
def device_info() -> dict[str, Any]:
    p = torch.cuda.get_device_properties(0)
    return {"name": p.name, "memory_gib": round(p.total_memory / 2**30, 1), "torch": torch.__version__}


@section("dufm_cuda_matches_cpu")
def dufm_match() -> dict[str, Any]:
    from deepcollapse import DUFM, DUFMConfig
    from deepcollapse import theory as T
    from deepcollapse.dufm.solve import SolverConfig, solve
    from deepcollapse.theory.analysis import analyze_solution

    kw = dict(num_classes=2, n_per_class=10, num_layers=3, width=16, lambda_h=2e-3, lambda_w=2e-3, seed=0)
    out: dict[str, Any] = {}
    for dtype in ("float64", "float32"):
        cpu = DUFM(DUFMConfig(dtype=dtype, **kw))
        gpu = DUFM(DUFMConfig(dtype=dtype, device="cuda", **kw))
        a = solve(cpu, SolverConfig(optimizer="gd", max_steps=2000, metrics=False))
        b = solve(gpu, SolverConfig(optimizer="gd", max_steps=2000, metrics=False))
        out[f"gd_{dtype}_rel_diff"] = abs(a.loss - b.loss) / a.loss
        gpu2 = DUFM(DUFMConfig(dtype=dtype, device="cuda", **kw))
        r = solve(gpu2, SolverConfig(optimizer="lbfgs", metrics=True))
        dnc = T.dnc_loss(num_classes=2, num_layers=3, n=10, lambda_h=2e-3, lambda_w=2e-3)
        out[f"lbfgs_{dtype}_gap"] = (r.loss - dnc) / dnc
        out[f"lbfgs_{dtype}_verdict"] = analyze_solution(gpu2.h1, list(gpu2.weights), DUFMConfig(**kw))["verdict"]
    return out


@section("dufm_gd_throughput")
def dufm_throughput() -> dict[str, Any]:
    from deepcollapse import DUFM, DUFMConfig
    from deepcollapse.dufm.solve import SolverConfig, solve

    out: dict[str, Any] = {}
    for name, kw in {
        "small K2 L3 d16": dict(num_classes=2, n_per_class=10, num_layers=3, width=16),
        "large K100 n50 L4 d512": dict(num_classes=100, n_per_class=50, num_layers=4, width=512),
    }.items():
        for device in ("cpu", "cuda"):
            for dtype in ("float64", "float32"):
                m = DUFM(DUFMConfig(lambda_h=1e-3, lambda_w=1e-3, device=device, dtype=dtype, **kw))
                steps = 300 if "large" in name else 1000
                solve(m, SolverConfig(optimizer="gd", lr=0.1, max_steps=10, metrics=False))
                sync()
                t0 = time.perf_counter()
                solve(m, SolverConfig(optimizer="gd", lr=0.1, max_steps=steps, metrics=False, tol_grad=0, tol_rel=0))
                sync()
                out[f"{name} {device} {dtype} steps/s"] = round(steps / (time.perf_counter() - t0), 1)
    return out


SECTIONS: list[Callable[[], None]] = [device_info, dufm_match, dufm_throughput]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="gpu_check.json")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return
    for run in SECTIONS:
        run()
    with open(args.out, "w") as f:
        json.dump(RESULTS, f, indent=2, default=str)


if __name__ == "__main__":
    main()
