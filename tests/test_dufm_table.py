"""One table over dtype x device for the public DUFM and solver API: the module, the objective, the solvers,
the batched trainer, the explicit optimum and the solution record keep the dtype and device they are given
and agree with the float64 CPU result to the dtype's precision."""

from __future__ import annotations

import pytest
import torch

from deepcollapse import theory as T
from deepcollapse.dufm.batched import GDOptions, train_batched
from deepcollapse.dufm.model import DUFM, DUFMConfig, objective
from deepcollapse.dufm.solve import SolverConfig, solve
from deepcollapse.theory.analysis import analyze_solution

DEVICES = [
    "cpu",
    pytest.param(
        "cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
    ),
]
DTYPES = {"float32": 1e-5, "float64": 1e-12}  # relative agreement with float64 on the CPU
KW = dict(num_classes=2, n_per_class=4, num_layers=3, width=5, lambda_h=5e-3, lambda_w=5e-3, seed=1)


def _cfg(dtype: str, device: str) -> DUFMConfig:
    return DUFMConfig(**KW, dtype=dtype, device=device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_public_api_over_dtype_and_device(dtype, device):
    rtol = DTYPES[dtype]
    want = getattr(torch, dtype)
    ref = DUFM(_cfg("float64", "cpu"))
    model = DUFM(_cfg(dtype, device))
    # the module and the objective
    assert model.h1.dtype == want and model.h1.device.type == device
    total = model.loss()[0].detach()
    assert total.dtype == want and total.device.type == device
    assert float(total) == pytest.approx(float(ref.loss()[0].detach()), rel=rtol)
    y = model.y
    stacked = objective(
        model.h1[None].expand(3, -1, -1), [w[None].expand(3, -1, -1) for w in model.weights], y, 0.005, [0.005] * 3
    )
    assert stacked[0].shape == (3,) and torch.allclose(stacked[0], total.expand(3))
    # plain GD: the same trajectory as float64 on the CPU, to the dtype's precision
    opts = SolverConfig(optimizer="gd", lr=0.5, max_steps=50, tol_grad=0, tol_rel=0, metrics=False)
    res = solve(model, opts)
    res_ref = solve(ref, opts)
    assert res.steps == res_ref.steps == 50 and res.stop_reason == "max_steps"
    assert res.loss == pytest.approx(res_ref.loss, rel=100 * rtol)
    assert model.h1.dtype == want and model.h1.device.type == device
    # the batched trainer returns CPU tensors in the run's dtype, and agrees with solve's GD
    (b,) = train_batched(
        [_cfg(dtype, "cpu")], GDOptions(lr=0.5, max_steps=50, tol_grad=0, tol_rel=0), dtype=want, device=device
    )
    assert b.h1.dtype == want and b.h1.device.type == "cpu"
    assert b.loss == pytest.approx(res_ref.loss, rel=100 * rtol)
    # the explicit optimum and the record: L_DNC to the dtype's precision, verdict "dnc"
    cfg = _cfg(dtype, device)
    h, ws = T.optimal_parameters(cfg, h1="etf")
    assert h.dtype == want and h.device.type == device
    a = analyze_solution(h, ws, cfg, srg=False)
    assert a["verdict"] == "dnc" and abs(a["gap"]) < 10 * rtol
    # L-BFGS reaches the theory from the random start
    solved = solve(DUFM(cfg), SolverConfig(metrics=False, max_steps=300))
    dnc = T.dnc_loss(num_classes=2, num_layers=3, n=4, lambda_h=5e-3, lambda_w=5e-3)
    assert solved.loss == pytest.approx(dnc, rel=max(1e-9, 10 * rtol))
