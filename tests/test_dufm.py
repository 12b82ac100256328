"""The DUFM objective and module against the paper's formula written out by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deepcollapse._validate import DeepCollapseError
from deepcollapse.dufm.model import (
    DUFM,
    DUFMConfig,
    forward,
    label_matrix,
    labels_from_counts,
    layer_metrics,
    objective,
)


def test_label_matrix_is_kronecker_for_balanced_classes():
    y = label_matrix([3, 3, 3])
    expected = torch.kron(torch.eye(3, dtype=torch.float64), torch.ones(1, 3, dtype=torch.float64))
    assert torch.equal(y, expected)
    assert labels_from_counts([2, 1, 3]).tolist() == [0, 0, 1, 2, 2, 2]


def test_objective_matches_hand_written_formula():
    g = torch.Generator().manual_seed(0)
    h1 = torch.randn(4, 6, generator=g, dtype=torch.float64)
    ws = [torch.randn(5, 4, generator=g, dtype=torch.float64), torch.randn(2, 5, generator=g, dtype=torch.float64)]
    y = label_matrix([3, 3])
    lam_h, lam_w = 0.01, [0.02, 0.03]
    out = ws[1] @ torch.relu(ws[0] @ h1)
    fit = ((out - y) ** 2).sum() / (2 * 6)
    reg = lam_h / 2 * (h1**2).sum() + lam_w[0] / 2 * (ws[0] ** 2).sum() + lam_w[1] / 2 * (ws[1] ** 2).sum()
    total, f, r = objective(h1, ws, y, lam_h, lam_w)
    assert float(f) == pytest.approx(float(fit), rel=1e-14)
    assert float(r) == pytest.approx(float(reg), rel=1e-14)
    assert float(total) == pytest.approx(float(fit + reg), rel=1e-14)
    pre, post, output = forward(h1, ws)
    assert len(pre) == len(post) == 1 and torch.equal(post[0], torch.relu(pre[0]))
    assert torch.allclose(output, out)


def test_module_shapes_seed_and_dtype():
    cfg = DUFMConfig(num_classes=3, n_per_class=[2, 3, 4], num_layers=3, width=[5, 6, 7], seed=4, dtype="float32")
    a, b = DUFM(cfg), DUFM(cfg)
    assert tuple(a.h1.shape) == (5, 9)
    assert [tuple(w.shape) for w in a.weights] == [(6, 5), (7, 6), (3, 7)]
    assert a.h1.dtype == torch.float32
    assert torch.equal(a.h1, b.h1)
    assert not torch.equal(
        a.h1,
        DUFM(
            DUFMConfig(num_classes=3, n_per_class=[2, 3, 4], num_layers=3, width=[5, 6, 7], seed=5, dtype="float32")
        ).h1,
    )


def test_layer_metrics_cover_every_layer_and_stage():
    cfg = DUFMConfig(num_classes=2, n_per_class=4, num_layers=3, width=5)
    m = DUFM(cfg)
    rows = layer_metrics(m.h1, list(m.weights), m.labels, 2)
    assert [(r["layer"], r["stage"]) for r in rows] == [(1, "free"), (2, "pre"), (2, "post"), (3, "pre"), (3, "post")]
    assert all("nc3_span" in r for r in rows if r["stage"] != "pre")


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(num_classes=1), "num_classes"),
        (dict(n_per_class=0), "n_per_class"),
        (dict(num_layers=0), "num_layers"),
        (dict(width=0), "width"),
        (dict(width=[4, 4]), "width"),
        (dict(lambda_h=-1e-3), "lambda_h"),
        (dict(lambda_w=[1e-3, -1e-3, 1e-3]), r"lambda_w\[1\]"),
        (dict(lambda_w=float("nan")), "lambda_w"),
        (dict(n_per_class=[3, 3, 3]), "n_per_class"),
        (dict(dtype="float16"), "dtype"),
        (dict(init_std=0.0), "init_std"),
    ],
)
def test_config_errors_name_the_argument(kw, match):
    with pytest.raises(DeepCollapseError, match=match):
        DUFMConfig(**kw)


def test_from_parameters_checks_shapes():
    cfg = DUFMConfig(num_classes=2, n_per_class=2, num_layers=2, width=3)
    with pytest.raises(DeepCollapseError, match="shapes"):
        DUFM.from_parameters(cfg, torch.zeros(3, 4), [torch.zeros(3, 3), torch.zeros(3, 3)])


def np_objective(h1, ws, counts, lam_h, lam_w):
    """The paper's loss in numpy float64, sample by sample: 1/(2N) Σ_i ||f(h_i) - e_{y_i}||² + penalties."""
    h1 = np.asarray(h1, dtype=np.float64)
    ws = [np.asarray(w, dtype=np.float64) for w in ws]
    labels = np.repeat(np.arange(len(counts)), counts)
    fit = 0.0
    for i, c in enumerate(labels):
        h = h1[:, i]
        for w in ws[:-1]:
            h = np.maximum(w @ h, 0.0)
        target = np.zeros(len(counts))
        target[c] = 1.0
        fit += float(((ws[-1] @ h - target) ** 2).sum())
    fit /= 2 * len(labels)
    reg = lam_h / 2 * float((h1**2).sum()) + sum(
        lam / 2 * float((w**2).sum()) for lam, w in zip(lam_w, ws, strict=True)
    )
    return fit + reg, fit, reg


def _random_dufm(g, dims, n, scale, dtype=torch.float64):
    h1 = torch.randn(dims[0], n, generator=g, dtype=torch.float64) * scale
    ws = [torch.randn(o, i, generator=g, dtype=torch.float64) * scale for i, o in zip(dims[:-1], dims[1:], strict=True)]
    return h1.to(dtype), [w.to(dtype) for w in ws]


@pytest.mark.parametrize("scale", [1e-3, 1.0, 30.0])
@pytest.mark.parametrize("counts", [[3, 3, 3], [1, 4, 2]])
def test_objective_matches_numpy_reference(scale, counts):
    g = torch.Generator().manual_seed(int(scale * 7) + len(counts))
    dims, lam_h, lam_w = [5, 7, 4, 3], 0.013, [0.002, 0.05, 0.3]
    h1, ws = _random_dufm(g, dims, sum(counts), scale)
    total, fit, reg = objective(h1, ws, label_matrix(counts), lam_h, lam_w)
    ref = np_objective(h1.numpy(), [w.numpy() for w in ws], counts, lam_h, lam_w)
    for got, want in zip((total, fit, reg), ref, strict=True):
        assert float(got) == pytest.approx(want, rel=1e-12)
    # float32 parameters: the same values to float32 precision
    total32, _, _ = objective(
        h1.float(), [w.float() for w in ws], label_matrix(counts, dtype=torch.float32), lam_h, lam_w
    )
    assert total32.dtype == torch.float32 and float(total32) == pytest.approx(ref[0], rel=1e-5)


def test_objective_broadcasts_over_batches_as_a_loop():
    """A (2, 3) batch of DUFMs with per-configuration λ's: every entry equals its own unbatched objective."""
    g = torch.Generator().manual_seed(5)
    counts, dims = [2, 3], [4, 5, 2]
    h1 = torch.randn(2, 3, dims[0], 5, generator=g, dtype=torch.float64)
    ws = [torch.randn(2, 3, o, i, generator=g, dtype=torch.float64) for i, o in zip(dims[:-1], dims[1:], strict=True)]
    lam_h = torch.rand(2, 3, generator=g, dtype=torch.float64)
    lam_w = torch.rand(2, 3, 2, generator=g, dtype=torch.float64)  # (..., L)
    y = label_matrix(counts)
    batched = objective(h1, ws, y, lam_h, lam_w)
    as_list = objective(h1, ws, y, lam_h, [lam_w[..., 0], lam_w[..., 1]])  # L tensors of shape (...)
    for a, b in zip(batched, as_list, strict=True):
        assert a.shape == (2, 3) and torch.equal(a, b)
    for i in range(2):
        for j in range(3):
            lw = [float(v) for v in lam_w[i, j]]
            ref = np_objective(h1[i, j].numpy(), [w[i, j].numpy() for w in ws], counts, float(lam_h[i, j]), lw)
            for got, want in zip(batched, ref, strict=True):
                assert float(got[i, j]) == pytest.approx(want, rel=1e-12)
    # a scalar λ broadcasts too
    _, _, reg = objective(h1, ws, y, 0.5, [0.0, 0.0])
    assert torch.allclose(reg, 0.25 * h1.pow(2).sum((-2, -1)), rtol=1e-14, atol=0)


def test_objective_names_a_wrong_number_of_lambdas():
    h1, ws = torch.zeros(3, 4), [torch.zeros(3, 3), torch.zeros(2, 3)]
    with pytest.raises(DeepCollapseError, match="lambdas_w has 3 values for 2 weight matrices"):
        objective(h1, ws, label_matrix([2, 2], dtype=torch.float32), 0.1, [0.1, 0.1, 0.1])


def test_forward_broadcasts_and_keeps_relu():
    g = torch.Generator().manual_seed(1)
    h1 = torch.randn(4, 3, 6, generator=g, dtype=torch.float64)
    ws = [
        torch.randn(4, 5, 3, generator=g, dtype=torch.float64),
        torch.randn(4, 2, 5, generator=g, dtype=torch.float64),
    ]
    pre, post, out = forward(h1, ws)
    for b in range(4):
        z = ws[0][b].numpy() @ h1[b].numpy()
        np.testing.assert_allclose(pre[0][b].numpy(), z, rtol=1e-13)
        np.testing.assert_allclose(out[b].numpy(), ws[1][b].numpy() @ np.maximum(z, 0), rtol=1e-12)
    assert torch.equal(post[0], pre[0].clamp_min(0))
