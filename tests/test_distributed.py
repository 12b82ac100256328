"""Two gloo processes on CPU (127.0.0.1): the probe and the accumulators under DDP equal one process on all data."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from deepcollapse import DNCProbe
from deepcollapse.measure.accumulate import ClassAccumulator

K, N, D, WORLD = 4, 240, 20, 2


def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    y = torch.arange(N) % K
    x = 2.0 * torch.randn(K, D, generator=g, dtype=torch.float64)[y] + torch.randn(
        N, D, generator=g, dtype=torch.float64
    )
    return x, y


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D, 16), nn.ReLU(), nn.Linear(16, K)).double()


def shard_loader(x: torch.Tensor, y: torch.Tensor, rank: int, world: int) -> list:
    xs, ys = x[rank::world], y[rank::world]  # what a DistributedSampler does
    return [(xs[i : i + 16], ys[i : i + 16]) for i in range(0, len(xs), 16)]


def worker(rank: int, out: str, port: int) -> None:
    # The parent owns the rendezvous store (on a port the OS picked), so no port race with other processes
    # and no store file that one rank could remove while the other still tears down.
    store = dist.TCPStore("127.0.0.1", port, is_master=False)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        x, y = data()
        ddp = nn.parallel.DistributedDataParallel(model())
        loader = shard_loader(x, y, rank, WORLD)
        res = DNCProbe(ddp, layers=("linear", "relu"), num_classes=K).measure(loader)
        one = ClassAccumulator(K, passes=1, cov="full")
        for h, lab in loader:
            one.update(h, lab)
        one.end_pass()
        stats = one.compute()
        torch.save({"probe": res, "sigma_w": stats.sigma_w, "means": stats.means}, Path(out) / f"rank{rank}.pt")
        dist.barrier()  # both ranks done with every collective before either tears gloo down
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo")
def test_two_gloo_processes_equal_one(tmp_path: Path) -> None:
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    mp.spawn(worker, args=(str(tmp_path), store.port), nprocs=WORLD, join=True)
    del store
    x, y = data()
    full = DNCProbe(model(), layers=("linear", "relu"), num_classes=K).measure([(x[:100], y[:100]), (x[100:], y[100:])])
    acc = ClassAccumulator(K, passes=1, cov="full")
    acc.update(x, y)
    acc.end_pass()
    ref = acc.compute()
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert list(got["probe"]) == ["0", "1", "2"]  # names without DDP's "module." prefix
        for name, metrics in full.items():
            assert got["probe"][name].keys() == metrics.keys()
            for key, value in metrics.items():
                assert got["probe"][name][key] == pytest.approx(value, rel=1e-9, abs=1e-12), (rank, name, key)
        torch.testing.assert_close(got["sigma_w"], ref.sigma_w, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(got["means"], ref.means, rtol=1e-12, atol=1e-12)
