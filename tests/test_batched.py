"""Batched GD equals plain GD on DUFM(config), configuration by configuration."""

from __future__ import annotations

import pytest
import torch

from deepcollapse._validate import DeepCollapseError
from deepcollapse.dufm.batched import GDOptions, batched_objective, stack_init, train_batched
from deepcollapse.dufm.model import DUFM, DUFMConfig, label_matrix, objective
from dufm_reference import plain_gd


def _configs():
    base = {"num_classes": 3, "n_per_class": 4, "num_layers": 3, "width": 6}
    return [
        DUFMConfig(**base, lambda_h=1e-3, lambda_w=2e-3, seed=0),
        DUFMConfig(**base, lambda_h=5e-3, lambda_w=1e-3, seed=1),
        DUFMConfig(**base, lambda_h=2e-3, lambda_w=[1e-3, 2e-3, 3e-3], seed=7, init_std=0.5),
        DUFMConfig(**base, lambda_h=3e-3, lambda_w=3e-3, seed=3),
    ]


def test_stack_init_matches_dufm():
    cfgs = _configs()
    h1, ws = stack_init(cfgs)
    for b, c in enumerate(cfgs):
        m = DUFM(c)
        assert torch.equal(h1[b], m.h1.detach())
        for w, mw in zip(ws, m.weights, strict=True):
            assert torch.equal(w[b], mw.detach())


def test_batched_objective_matches():
    cfgs = _configs()
    h1, ws = stack_init(cfgs)
    y = label_matrix(cfgs[0].counts)
    lh = torch.tensor([c.lambda_h for c in cfgs], dtype=torch.float64)
    lw = torch.tensor([c.lambdas_w for c in cfgs], dtype=torch.float64)
    total, fit, reg = batched_objective(h1, ws, y, lh, lw)
    for b, c in enumerate(cfgs):
        t, f, r = objective(h1[b], [w[b] for w in ws], y, c.lambda_h, c.lambdas_w)
        torch.testing.assert_close(torch.stack([total[b], fit[b], reg[b]]), torch.stack([t, f, r]), rtol=1e-14, atol=0)


def test_batched_gd_equals_plain_gd():
    cfgs, lrs, steps = _configs(), [0.3, 0.5, 0.2, 0.4], 200
    res = train_batched(cfgs, GDOptions(lr=lrs, max_steps=steps, tol_grad=0.0, tol_rel=0.0))
    for c, lr, r in zip(cfgs, lrs, res, strict=True):
        ref = plain_gd(c, lr, steps)
        assert r.steps == steps and r.stop_reason == "max_steps"
        assert (ref.h1.detach() - r.h1).abs().max() < 1e-10
        for w, rw in zip(ref.weights, r.weights, strict=True):
            assert (w.detach() - rw).abs().max() < 1e-10
        assert abs(float(ref.loss()[0].detach()) - r.loss) < 1e-12


def test_per_config_stopping_and_compaction():
    cfgs = _configs()
    lrs = [0.3, 1e30, 0.2, 0.4]  # the second diverges
    finished = []
    res = train_batched(
        cfgs, GDOptions(lr=lrs, max_steps=150, tol_grad=0.0, tol_rel=0.0), on_finish=lambda r: finished.append(r.index)
    )
    assert res[1].stop_reason == "diverged" and res[1].steps < 150
    assert finished[0] == 1 and sorted(finished) == [0, 1, 2, 3]
    # the others are unaffected by the divergence and the compaction
    ref = plain_gd(cfgs[2], 0.2, 150)
    assert (ref.h1.detach() - res[2].h1).abs().max() < 1e-10
    # stopping on the gradient norm: a loose tolerance stops everything at step 0
    res = train_batched(cfgs[:2], GDOptions(lr=0.1, max_steps=10, tol_grad=1e6))
    assert [r.stop_reason for r in res] == ["stationary", "stationary"] and [r.steps for r in res] == [0, 0]


def test_rel_stop_and_errors():
    cfg = DUFMConfig(num_classes=2, n_per_class=2, num_layers=2, width=3, lambda_h=0.5, lambda_w=0.5)
    (r,) = train_batched([cfg], GDOptions(lr=0.5, max_steps=5000, tol_grad=0.0, tol_rel=1e-10, patience=5))
    assert r.stop_reason == "stalled" and r.steps < 5000
    with pytest.raises(DeepCollapseError, match="share shapes"):
        train_batched([cfg, DUFMConfig(num_classes=2, n_per_class=2, num_layers=2, width=4)])
    with pytest.raises(DeepCollapseError, match="lr"):
        train_batched([cfg], GDOptions(lr=[0.1, 0.2]))


@pytest.mark.cuda
def test_batched_gd_on_cuda_matches_cpu():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    cfgs, lrs = _configs(), [0.3, 0.5, 0.2, 0.4]
    opts = GDOptions(lr=lrs, max_steps=100, tol_grad=0.0, tol_rel=0.0)
    cpu = train_batched(cfgs, opts)
    gpu = train_batched(cfgs, opts, device="cuda")
    for a, b in zip(cpu, gpu, strict=True):
        assert b.h1.device.type == "cpu"  # results come back on the CPU
        assert (a.h1 - b.h1).abs().max() < 1e-9 and abs(a.loss - b.loss) < 1e-12
