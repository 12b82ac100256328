"""The DUFM objective and module against the paper's formula written out by hand."""

from __future__ import annotations

import warnings

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
from reference import np_dnc


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


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(num_classes=1), "num_classes must be >= 2, got 1"),
        (dict(num_classes=2.5), "num_classes must be an integer, got 2.5"),
        (dict(num_layers=0), "num_layers must be >= 1, got 0"),
        (dict(n_per_class=0), "n_per_class must be >= 1, got 0"),
        (dict(n_per_class="3"), "n_per_class must be an integer, got '3'"),
        (dict(n_per_class=[3, 0]), "n_per_class[1] must be >= 1, got 0"),
        (dict(n_per_class=[3, 3, 3]), "n_per_class has 3 counts but num_classes is 2"),
        (dict(width=0), "width must be >= 1, got 0"),
        (dict(width=[4, 4]), "width needs one value or one per layer (3), got 2: [4, 4]"),
        (dict(width=[4, 0, 4]), "width[1] must be >= 1, got 0"),
        (dict(lambda_h=-1e-3), "lambda_h must be >= 0.0, got -0.001"),
        (dict(lambda_w=[1e-3, -1e-3, 1e-3]), "lambda_w[1] must be >= 0.0, got -0.001"),
        (dict(lambda_w=float("inf")), "lambda_w must be finite, got inf"),
        (dict(init_std=0.0), "init_std must be > 0.0, got 0.0"),
        (dict(init_std=float("nan")), "init_std must be finite, got nan"),
        (dict(dtype="float16"), "dtype must be one of ['float32', 'float64'], got 'float16'"),
        (dict(seed=-1), "seed must be >= 0, got -1"),
        (dict(seed=1.5), "seed must be an integer, got 1.5"),
    ],
)
def test_config_errors_are_one_exact_line(kw, message):
    with pytest.raises(DeepCollapseError) as info:
        DUFMConfig(**kw)
    assert str(info.value) == message


def test_config_normalizes_per_class_and_per_layer_values():
    """Equal per-class/per-layer lists collapse to one number, unequal ones stay lists; numbers become
    ints/floats; the derived properties and the dict round trip."""
    c = DUFMConfig(num_classes=3.0, n_per_class=(4, 4, 4), num_layers=2.0, width=[6, 6], lambda_w=[1, 1], lambda_h=1)
    assert (c.num_classes, c.num_layers, c.n_per_class, c.width, c.lambda_w, c.lambda_h) == (3, 2, 4, 6, 1.0, 1.0)
    assert [type(v) for v in (c.num_classes, c.num_layers, c.n_per_class, c.width)] == [int] * 4
    assert type(c.lambda_w) is float and type(c.lambda_h) is float
    assert c.counts == [4, 4, 4] and c.balanced and c.n == 4 and c.num_samples == 12
    assert c.widths == [6, 6] and c.lambdas_w == [1.0, 1.0] and c.torch_dtype == torch.float64
    u = DUFMConfig(num_classes=3, n_per_class=(2, 5, 1), num_layers=3, width=[4, 5, 6], lambda_w=[0.1, 0.2, 0.3])
    assert u.n_per_class == [2, 5, 1] and u.counts == [2, 5, 1] and not u.balanced and u.num_samples == 8
    assert u.width == [4, 5, 6] and u.widths == [4, 5, 6] and u.lambda_w == [0.1, 0.2, 0.3] == u.lambdas_w
    with pytest.raises(DeepCollapseError) as info:
        _ = u.n
    assert str(info.value) == "n is defined for balanced classes only; use counts"
    b = DUFMConfig(width=[7], lambda_w=[0.25], init_std=1, seed=0, dtype="float32", num_classes=2)
    assert (b.width, b.widths, b.lambda_w, b.init_std, b.seed, b.num_classes) == (7, [7] * 3, 0.25, 1.0, 0, 2)
    assert type(b.init_std) is float and b.torch_dtype == torch.float32
    assert DUFMConfig(init_std=1e-12).init_std == 1e-12
    d = u.to_dict()
    assert d["n_per_class"] == [2, 5, 1] and d["lambda_w"] == [0.1, 0.2, 0.3] and d["extra"] == {}
    assert DUFMConfig(**d) == u


def test_label_matrix_with_a_missing_class_and_its_dtype():
    """A class with no samples keeps its (all-zero) row of Y; Y is float64 unless asked otherwise."""
    y = label_matrix([2, 0, 1])
    assert y.dtype == torch.float64
    assert y.tolist() == [[1.0, 1.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 1.0]]
    assert label_matrix([1, 2], dtype=torch.float32).dtype == torch.float32
    assert labels_from_counts([0, 2, 1]).tolist() == [1, 1, 2]


def test_module_lives_on_the_configured_device():
    """Parameters, buffers and the loss on the configured device (the meta device stands in for an
    accelerator: it runs no numbers, so any tensor left on the CPU would make the loss raise)."""
    m = DUFM(DUFMConfig(num_classes=3, n_per_class=[2, 3, 1], num_layers=2, width=4, device="meta", dtype="float32"))
    tensors = [m.h1, *m.weights, m.y, m.labels]
    assert {t.device.type for t in tensors} == {"meta"}
    assert m.h1.dtype == m.y.dtype == torch.float32 and m.labels.dtype == torch.int64
    assert [tuple(t.shape) for t in tensors] == [(4, 6), (4, 4), (3, 4), (3, 6), (6,)]
    total, fit, reg = m.loss()
    assert total.device.type == fit.device.type == reg.device.type == "meta"
    assert labels_from_counts([2, 1], device="meta").device.type == "meta"
    assert label_matrix([2, 1], device="meta").device.type == "meta"


def test_init_draws_the_documented_scales():
    """H1 ~ N(0, init_std²) and W_l ~ N(0, init_std²/d_l): sample standard deviations of large draws."""
    cfg = DUFMConfig(num_classes=2, n_per_class=400, num_layers=3, width=[50, 200, 100], init_std=3.0, seed=1)
    m = DUFM(cfg)
    assert float(m.h1.detach().std()) == pytest.approx(3.0, rel=0.02)
    assert abs(float(m.h1.detach().mean())) < 0.1
    for w, d_in, rel in zip(m.weights, [50, 200, 100], [0.03, 0.03, 0.15], strict=True):
        assert float(w.detach().std()) == pytest.approx(3.0 / d_in**0.5, rel=rel)


def test_seed_fixes_the_start_in_every_dtype_and_a_generator_overrides_it():
    cfg = DUFMConfig(num_classes=3, n_per_class=[2, 3, 4], num_layers=2, width=[5, 6], seed=3)
    with torch.random.fork_rng():  # the global RNG state differs between the two draws
        torch.manual_seed(0)
        a = DUFM(cfg)
        torch.manual_seed(1)
        b = DUFM(cfg)
    c = DUFM(DUFMConfig(**{**cfg.to_dict(), "dtype": "float32"}))
    d = DUFM(DUFMConfig(**{**cfg.to_dict(), "seed": 99}), generator=torch.Generator().manual_seed(3))
    for pa, pb, pc, pd in zip(a.parameters(), b.parameters(), c.parameters(), d.parameters(), strict=True):
        assert pa.dtype == torch.float64 and pc.dtype == torch.float32
        assert torch.equal(pa, pb) and torch.equal(pa, pd) and torch.equal(pa.float(), pc)
    assert a.config is cfg
    assert torch.equal(a.y, label_matrix([2, 3, 4])) and a.labels.tolist() == [0, 0, 1, 1, 1, 2, 2, 2, 2]
    assert c.y.dtype == torch.float32 and torch.equal(c.y, label_matrix([2, 3, 4], dtype=torch.float32))
    assert all(p.requires_grad for p in a.parameters()) and len(list(a.parameters())) == 3
    assert set(dict(a.named_buffers())) == {"y", "labels"}


def test_module_loss_and_forward_against_the_numpy_reference():
    """Unequal classes, per-layer λ's, float32 parameters from given float64 values (copied, not aliased)."""
    counts, dims = [3, 1, 2], [4, 5, 6, 3]
    lam_h, lam_w = 0.03, [0.01, 0.2, 0.05]
    cfg = DUFMConfig(num_classes=3, n_per_class=counts, num_layers=3, width=dims[:-1], lambda_h=lam_h, lambda_w=lam_w)
    g = torch.Generator().manual_seed(11)
    h1, ws = _random_dufm(g, dims, sum(counts), 1.5)
    m = DUFM.from_parameters(cfg, h1, ws)
    ref = np_objective(h1.numpy(), [w.numpy() for w in ws], counts, lam_h, lam_w)
    for got, want in zip((t.detach() for t in m.loss()), ref, strict=True):
        assert float(got) == pytest.approx(want, rel=1e-12)
    pre, post, out = m()
    np.testing.assert_allclose(pre[0].detach().numpy(), ws[0].numpy() @ h1.numpy(), rtol=1e-12)
    h = np.maximum(ws[1].numpy() @ np.maximum(ws[0].numpy() @ h1.numpy(), 0), 0)
    np.testing.assert_allclose(post[1].detach().numpy(), h, rtol=1e-12)
    np.testing.assert_allclose(out.detach().numpy(), ws[2].numpy() @ h, rtol=1e-12)
    h1_before = h1.clone()
    h1.add_(1.0)
    assert torch.equal(m.h1.detach(), h1_before) and isinstance(m.h1, torch.nn.Parameter)
    m32 = DUFM.from_parameters(DUFMConfig(**{**cfg.to_dict(), "dtype": "float32"}), h1_before, ws)
    assert m32.h1.dtype == torch.float32 and torch.equal(m32.weights[2].detach(), ws[2].float())
    assert float(m32.loss()[0].detach()) == pytest.approx(ref[0], rel=1e-5)


def test_from_parameters_names_the_shapes():
    cfg = DUFMConfig(num_classes=2, n_per_class=[1, 2], num_layers=2, width=[3, 4])
    with pytest.raises(DeepCollapseError) as info:
        DUFM.from_parameters(cfg, torch.zeros(3, 3), [torch.zeros(4, 3), torch.zeros(2, 3)])
    assert (
        str(info.value)
        == "parameter shapes [(3, 3), (4, 3), (2, 3)] do not match the config's [(3, 3), (4, 3), (2, 4)]"
    )
    with pytest.raises(DeepCollapseError, match=r"^parameter shapes \[\(3, 3\), \(4, 3\)\] do not match"):
        DUFM.from_parameters(cfg, torch.zeros(3, 3), [torch.zeros(4, 3)])


def test_one_layer_forward_and_per_sample_targets():
    """L = 1: no hidden layers, output W_1 H_1. A (B, K, N) target: each batch entry against its own Y."""
    g = torch.Generator().manual_seed(4)
    h1 = torch.randn(2, 3, 5, generator=g, dtype=torch.float64)
    w = torch.randn(2, 2, 3, generator=g, dtype=torch.float64)
    pre, post, out = forward(h1, [w])
    assert pre == [] and post == [] and torch.allclose(out, w @ h1, rtol=1e-14, atol=0)
    ys = torch.stack([label_matrix([2, 3]), label_matrix([4, 1])])
    total, fit, reg = objective(h1, [w], ys, 0.1, [0.2])
    for b, counts in enumerate(([2, 3], [4, 1])):
        ref = np_objective(h1[b].numpy(), [w[b].numpy()], counts, 0.1, [0.2])
        assert [float(total[b]), float(fit[b]), float(reg[b])] == pytest.approx(list(ref), rel=1e-12)
    with pytest.raises(DeepCollapseError) as info:
        objective(h1, [w], ys, 0.1, torch.zeros(2, 3))
    assert str(info.value) == "lambdas_w has 3 values for 1 weight matrices"


def test_layer_metrics_against_the_numpy_reference():
    """Every (layer, stage) row: NC1 and, with the layer's weight, NC3 (span) of the right features,
    against the numpy reference on features formed here."""
    counts = [4, 5, 6]
    cfg = DUFMConfig(num_classes=3, n_per_class=counts, num_layers=3, width=[6, 7, 8], seed=2)
    m = DUFM(cfg)
    ws = [w.detach().numpy() for w in m.weights]
    y = np.repeat(np.arange(3), counts)
    h1 = m.h1.detach().numpy()
    z2 = ws[0] @ h1
    z3 = ws[1] @ np.maximum(z2, 0)
    want = [
        (1, "free", h1, ws[0]),
        (2, "pre", z2, None),
        (2, "post", np.maximum(z2, 0), ws[1]),
        (3, "pre", z3, None),
        (3, "post", np.maximum(z3, 0), ws[2]),
    ]
    rows = layer_metrics(m.h1, list(m.weights), m.labels, 3)
    assert len(rows) == len(want)
    for row, (layer, stage, h, w) in zip(rows, want, strict=True):
        ref = np_dnc(h.T, y, 3, weight=w, inp=None if w is None else h.T)
        assert (row["layer"], row["stage"]) == (layer, stage)
        assert row["nc1"] == pytest.approx(ref["nc1"], rel=1e-9)
        if w is None:
            assert "nc3_span" not in row
        else:
            assert row["nc3_span"] == pytest.approx(ref["nc3"], rel=1e-9)
    one = layer_metrics(m.h1, [m.weights[2][:, :6]], m.labels, 3)
    assert [(r["layer"], r["stage"]) for r in one] == [(1, "free")]


def test_docstring_examples_run():
    import doctest

    import deepcollapse.dufm.model as model

    result = doctest.testmod(model, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted >= 5 and result.failed == 0


def test_one_layer_config_and_full_precision_start():
    """L = 1 (the plain UFM) takes one width; a float64 model starts from a float64 draw (not float32
    values widened), so its start uses the full mantissa."""
    c = DUFMConfig(num_layers=1, width=[8], lambda_w=[0.5])
    assert (c.width, c.widths, c.lambda_w, c.lambdas_w) == (8, [8], 0.5, [0.5])
    m = DUFM(c)
    assert [tuple(w.shape) for w in m.weights] == [(2, 8)]
    for p in m.parameters():
        assert not torch.equal(p.detach(), p.detach().float().double())


def test_layer_metrics_say_when_a_class_is_missing():
    """Labels without the last class: every (layer, stage) row measures the classes present and warns
    that class 2 has no samples."""
    m = DUFM(DUFMConfig(num_classes=3, n_per_class=[3, 3, 2], num_layers=2, width=5, seed=1))
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 0, 1])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rows = layer_metrics(m.h1, list(m.weights), labels, 3)
    missing = [w for w in caught if "class(es) [2] have no samples" in str(w.message)]
    assert len(rows) == 3 and len(missing) == len(rows)
