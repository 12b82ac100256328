"""Measure deep neural collapse of a model on data sharded over DDP ranks (gloo on CPU).

    torchrun --nproc_per_node 2 examples/ddp_measure.py --out ddp_metrics.json

Every rank runs the same probe on its own shard; each pass ends with a sum all-reduce of the class
statistics, so every rank gets the metrics of the whole data set, equal to one process measuring all of it.
Shards may be uneven (here 1,001 samples: one rank has a sample more and a batch more), and a rank may have
no batch at all.

The shards here are plain strided subsets. ``DistributedSampler`` (``drop_last=False``) pads the shards by
repeating samples so that every rank gets as many: those samples would be counted twice, and the metrics
would no longer be those of the data set. Shard without padding when you measure.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset

from deepcollapse import DNCProbe

K, D, N = 5, 12, 1001


def dataset() -> TensorDataset:
    """Gaussian classes around random means: the same on every rank (seeded)."""
    g = torch.Generator().manual_seed(0)
    y = torch.arange(N) % K
    x = 3.0 * torch.randn(K, D, generator=g)[y] + torch.randn(N, D, generator=g)
    return TensorDataset(x, y)


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, K))


def measure(rank: int, world: int, *, batch_size: int = 64) -> dict[str, dict[str, float]]:
    """This rank's part of the measurement; returns the full-data metrics (on every rank)."""
    data = dataset()
    shard = Subset(data, range(rank, len(data), world))  # no padding, unlike DistributedSampler
    loader = DataLoader(shard, batch_size=batch_size)
    net = model()
    if world > 1:
        net = nn.parallel.DistributedDataParallel(net)
    return DNCProbe(net, layers=("linear", "relu"), num_classes=K).measure(loader)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the metrics of rank 0 to this JSON file")
    args = parser.parse_args()
    dist.init_process_group("gloo")  # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        results = measure(rank, world)
        if rank == 0:
            for name, m in results.items():
                print(name, {k: round(m[k], 4) for k in ("nc1", "ncc_accuracy", "nc4") if k in m})
            if args.out:
                with open(args.out, "w") as f:
                    json.dump(results, f, indent=1)
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
