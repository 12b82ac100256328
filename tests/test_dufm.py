"""The DUFM objective and module against the paper's formula written out by hand."""

from __future__ import annotations

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
