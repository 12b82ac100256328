"""A numpy reference for the DUFM loss and for L_DNC, written from the definitions (float64), and plain
full-batch gradient descent with autograd, the reference for the batched and sweep trainers."""

from __future__ import annotations

import numpy as np
import torch

from deepcollapse.dufm.model import DUFM, DUFMConfig


def np_dufm_loss(h1, weights, counts, lambda_h, lambdas_w) -> float:
    """``1/(2N) ||W_L σ(… σ(W_1 H_1)) - Y||² + λ_H/2 ||H_1||² + Σ λ_l/2 ||W_l||²``, all samples at once."""
    h1 = np.asarray(h1, dtype=np.float64)
    ws = [np.asarray(w, dtype=np.float64) for w in weights]
    labels = np.repeat(np.arange(len(counts)), counts)
    y = np.eye(len(counts))[:, labels]
    h = h1
    for w in ws[:-1]:
        h = np.maximum(w @ h, 0.0)
    fit = ((ws[-1] @ h - y) ** 2).sum() / (2 * y.shape[1])
    lams = [lambdas_w] * len(ws) if np.isscalar(lambdas_w) else list(lambdas_w)
    reg = lambda_h / 2 * (h1**2).sum() + sum(lam / 2 * (w**2).sum() for lam, w in zip(lams, ws, strict=True))
    return float(fit + reg)


def np_dnc_loss(k: int, num_layers: int, n: int, lam: float) -> float:
    """``min_s ½(1-s)² + (K/2)(L+1) C s^{2/(L+1)}``, ``C = (n λ^{L+1})^{1/(L+1)}``: a dense grid on [0, 1]
    refined around its best point (independent of the library's bisection)."""
    c = (n * lam ** (num_layers + 1)) ** (1 / (num_layers + 1))

    def f(s):
        return 0.5 * (1 - s) ** 2 + 0.5 * k * (num_layers + 1) * c * s ** (2 / (num_layers + 1))

    s = np.linspace(0.0, 1.0, 200_001)
    best = s[np.argmin(f(s))]
    fine = np.linspace(max(0.0, best - 1e-5), min(1.0, best + 1e-5), 200_001)
    return float(min(f(fine).min(), f(0.0)))


def plain_gd(config: DUFMConfig, lr: float, steps: int) -> DUFM:
    """The reference: θ ← θ - lr ∇L, full batch, on one DUFM."""
    model = DUFM(config)
    params = [model.h1, *model.weights]
    for _ in range(steps):
        total, _, _ = model.loss()
        grads = torch.autograd.grad(total, params)
        with torch.no_grad():
            for p, g in zip(params, grads, strict=True):
                p.sub_(lr * g)
    return model
