"""Throughput of the batched DUFM trainer against the same configurations trained one after another.

256 small DUFMs (K = 10, L = 4, width 30, n = 5), each with its own λ, learning rate and seed, run for a
fixed number of plain GD steps (no early stop, so both sides do the same work). The baseline is plain
full-batch GD on ``DUFM(config)``, one configuration at a time, timed in the same process. Both use the
same torch threads. Usage::

    python benchmarks/sweep_speed.py            # 256 configs x 300 steps
    python benchmarks/sweep_speed.py --quick    # 64 configs x 100 steps (baseline on 16, extrapolated)
"""

from __future__ import annotations

import argparse
import time

import torch

from deepcollapse.dufm.batched import GDOptions, train_batched
from deepcollapse.dufm.model import DUFM, DUFMConfig


def make_configs(count: int) -> tuple[list[DUFMConfig], list[float]]:
    """``count`` configurations with λ ∈ [1e-3, 8e-3], lr ∈ [0.2, 0.5], seed = index."""
    gen = torch.Generator().manual_seed(0)
    lams = (torch.rand(count, generator=gen) * 7e-3 + 1e-3).tolist()
    lrs = (torch.rand(count, generator=gen) * 0.3 + 0.2).tolist()
    cfgs = [
        DUFMConfig(num_classes=10, n_per_class=5, num_layers=4, width=30, lambda_h=lam, lambda_w=lam, seed=i)
        for i, lam in enumerate(lams)
    ]
    return cfgs, lrs


def sequential(configs: list[DUFMConfig], lrs: list[float], steps: int) -> list[float]:
    """Plain GD, θ ← θ - η ∇L, one configuration after another; final losses."""
    out = []
    for cfg, lr in zip(configs, lrs, strict=True):
        model = DUFM(cfg)
        params = [model.h1, *model.weights]
        for _ in range(steps):
            total, _, _ = model.loss()
            grads = torch.autograd.grad(total, params)
            with torch.no_grad():
                for p, g in zip(params, grads, strict=True):
                    p.sub_(lr * g)
        with torch.no_grad():
            out.append(float(model.loss()[0]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="64 configs x 100 steps; baseline on 16 configs")
    ap.add_argument("--configs", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch threads for both sides (default: torch's)")
    ap.add_argument("--baseline-threads", type=int, default=None, help="torch threads for the baseline only")
    ap.add_argument("--device", default="cpu", help="device of the batched run (the baseline stays on the CPU)")
    ap.add_argument("--baseline-configs", type=int, default=None, help="time the baseline on this many, scale up")
    args = ap.parse_args()
    count = args.configs or (64 if args.quick else 256)
    steps = args.steps or (100 if args.quick else 300)
    base_n = min(count, args.baseline_configs or (16 if args.quick else count))
    if args.threads:
        torch.set_num_threads(args.threads)
    configs, lrs = make_configs(count)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, float64, {count} DUFMs x {steps} GD steps")

    t0 = time.perf_counter()
    res = train_batched(configs, GDOptions(lr=lrs, max_steps=steps, tol_grad=0.0, tol_rel=0.0), device=args.device)
    t_batched = time.perf_counter() - t0

    threads = torch.get_num_threads()
    if args.baseline_threads:
        torch.set_num_threads(args.baseline_threads)
    t0 = time.perf_counter()
    seq = sequential(configs[:base_n], lrs[:base_n], steps)
    t_seq = (time.perf_counter() - t0) * count / base_n
    base_threads = torch.get_num_threads()
    torch.set_num_threads(threads)

    err = max(abs(a - r.loss) / abs(a) for a, r in zip(seq, res, strict=False))
    thr_b, thr_s = count * steps / t_batched, count * steps / t_seq
    print(f"batched ({args.device}, {threads} threads): {t_batched:8.2f} s  {thr_b:10.0f} config-steps/s")
    extra = f" (timed on {base_n}, scaled)" if base_n < count else ""
    print(f"sequential (cpu, {base_threads} threads): {t_seq:8.2f} s  {thr_s:10.0f} config-steps/s{extra}")
    print(f"max relative difference of final losses: {err:.2e}")
    print(f"speed-up   : {thr_b / thr_s:.1f}x")


if __name__ == "__main__":
    main()
