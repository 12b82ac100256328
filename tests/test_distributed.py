"""Two gloo processes on CPU (127.0.0.1): the probe and the accumulators under DDP equal one process on all data."""

from __future__ import annotations

import importlib.util
import itertools
import json
import subprocess
import sys
from datetime import timedelta
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
    dist.init_process_group("gloo", store=store, rank=rank, world_size=WORLD, timeout=timedelta(seconds=120))
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
        uneven = {}
        for case in CASES:  # the same process group measures uneven shards and an empty rank
            shard = uneven_shards(x, y, rank, case)
            for p in (1, 2):
                uneven[case, p] = DNCProbe(ddp, layers=("linear", "relu"), num_classes=K, passes=p).measure(shard)
        torch.save(uneven, Path(out) / f"uneven{rank}.pt")
        dist.barrier()  # both ranks done with every collective before either tears gloo down
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One two-process gloo run (its files) shared by the tests below: spawning costs most of their time."""
    out = tmp_path_factory.mktemp("ddp")
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    mp.spawn(worker, args=(str(out), store.port), nprocs=WORLD, join=True)
    del store
    return out


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo")
def test_two_gloo_processes_equal_one(ddp_run: Path) -> None:
    tmp_path = ddp_run
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


# ----------------------------------------------------------------------- uneven shards, an empty rank


def uneven_shards(x: torch.Tensor, y: torch.Tensor, rank: int, case: str) -> list:
    if case == "uneven":  # rank 0: 13 batches of up to 16, rank 1: one batch of 40
        xs, ys = (x[:200], y[:200]) if rank == 0 else (x[200:], y[200:])
        size = 16 if rank == 0 else 40
    else:  # "empty": rank 1 has no batch at all
        xs, ys = (x, y) if rank == 0 else (x[:0], y[:0])
        size = 64
    return [(xs[i : i + size], ys[i : i + size]) for i in range(0, len(xs), size)]


CASES = ("uneven", "empty")


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo")
def test_uneven_shards_and_an_empty_rank_equal_one_process(ddp_run: Path) -> None:
    tmp_path = ddp_run
    x, y = data()
    for passes in (1, 2):
        full = DNCProbe(model(), layers=("linear", "relu"), num_classes=K, passes=passes).measure([(x, y)])
        assert "nc4" in full["2"] if passes == 2 else "nc4" not in full["2"]
        for rank, case in itertools.product(range(WORLD), CASES):
            got = torch.load(tmp_path / f"uneven{rank}.pt")[case, passes]
            assert list(got) == list(full)
            for name, metrics in full.items():
                assert got[name].keys() == metrics.keys()
                for key, value in metrics.items():
                    assert got[name][key] == pytest.approx(value, rel=1e-9, abs=1e-12), (rank, case, passes, name, key)


# ----------------------------------------------------------------------------- the torchrun example


EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "ddp_measure.py"


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo")
def test_torchrun_example_equals_one_process(tmp_path: Path) -> None:
    out = tmp_path / "ddp.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(EXAMPLE)]
    done = subprocess.run([*cmd, "--out", str(out)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    spec = importlib.util.spec_from_file_location("ddp_measure", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    torch.set_num_threads(1)
    one = example.measure(0, 1)  # one process, all the data
    got = json.loads(out.read_text())
    assert list(got) == list(one) == ["0", "1", "2", "3", "4"]
    for name, metrics in one.items():
        for key, value in metrics.items():
            assert got[name][key] == pytest.approx(value, rel=1e-7, abs=1e-12), (name, key)
