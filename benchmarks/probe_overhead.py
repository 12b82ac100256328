"""What measuring costs: a ``DNCProbe`` pass against a plain eval pass over the same loader, timed in one run.

Run by hand (not by CI)::

    .venv/bin/python benchmarks/probe_overhead.py              # one thread
    .venv/bin/python benchmarks/probe_overhead.py --threads 0  # torch's default threads
    .venv/bin/python benchmarks/probe_overhead.py --quick      # small sizes, a smoke test

Model: a CIFAR-style residual network (stem, three stages of a basic block each with 32, 64 and 128
channels, global average pooling, a linear classifier; BatchNorm, a ReLU module reused within each block),
in float32 on the CPU, on N synthetic 3x32x32 images of K = 10 classes held in memory in batches of 256.

* **plain** -- one eval pass: ``model(x)`` for every batch under ``torch.no_grad()``.
* **probe** -- ``DNCProbe(model, layers=..., num_classes=10).measure(loader)``: two passes (class means,
  then centred moments, NCC and NC4 against the classifier), then the metrics.

Target: a probe pass costs at most 1.5x a plain eval pass, i.e. ``probe / (2 x plain) <= 1.5``. Printed for
two layer choices: ``head`` (the pooled features and the classifier, what a training-loop monitor usually
needs) and ``blocks`` (additionally the output of every residual block, flattened conv maps of
D = 32,768, 16,384 and 8,192 on the light path). The runs are interleaved and each time is the best of
``--repeat``; the CPU time (``time.process_time``) of a one-thread run is the steadier figure on a shared
machine.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from torch import nn

from deepcollapse import DNCProbe

K = 10


class Block(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.short = (
            nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
            if stride != 1 or c_in != c_out
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + self.short(x))


def resnet() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, 1, 1, bias=False),
        nn.BatchNorm2d(32),
        nn.ReLU(inplace=True),
        Block(32, 32, 1),
        Block(32, 64, 2),
        Block(64, 128, 2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(128, K),
    ).eval()


def data(n: int, batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    y = torch.arange(n) % K
    x = torch.randn(K, 3, 32, 32, generator=g)[y] + torch.randn(n, 3, 32, 32, generator=g)
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, n, batch)]


def timed(fn: Callable[[], object]) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call."""
    w, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w, time.process_time() - c


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1024, help="samples (default 1024)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads; 0 keeps torch's default")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="N = 256, one repeat")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    n, repeat = (256, 1) if args.quick else (args.n, args.repeat)
    model, loader = resnet(), data(n, 256)

    def plain() -> None:
        with torch.no_grad():
            for x, _ in loader:
                model(x)

    probes = {
        "head": DNCProbe(model, layers=["7", "8"], num_classes=K),
        "blocks": DNCProbe(model, layers=["3", "4", "5", "7", "8"], num_classes=K),
    }
    runs: dict[str, list[tuple[float, float]]] = {"plain": [], **{name: [] for name in probes}}
    plain()  # warm-up
    for _ in range(repeat):  # interleaved, so that a load change on the machine hits every method alike
        runs["plain"].append(timed(plain))
        for name, probe in probes.items():
            runs[name].append(timed(lambda p=probe: p.measure(loader)))
    best = {name: (min(w for w, _ in r), min(c for _, c in r)) for name, r in runs.items()}
    wall, cpu = best["plain"]
    print(f"N = {n}, batch 256, threads {torch.get_num_threads()}, best of {repeat}:")
    print(f"  plain eval pass: {wall:.3f} s wall, {cpu:.3f} s CPU")
    for name, probe in probes.items():
        w, c = best[name]
        rw, rc = w / (probe.passes * wall), c / (probe.passes * cpu)
        print(
            f"  {name:>6}: probe {w:.3f} s wall, {c:.3f} s CPU for {probe.passes} passes; per pass {rw:.2f}x (wall),"
            f" {rc:.2f}x (CPU) a plain eval pass ({'meets' if max(rw, rc) <= 1.5 else 'misses'} the 1.5x target)"
        )


if __name__ == "__main__":
    main()
