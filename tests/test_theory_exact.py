"""The DNC closed forms (theory.closed_form) to the last digits, against high-precision decimal references written from
the definitions, at the boundaries of their rules (the zero threshold, zero λ's, L = 1), and their errors."""

from __future__ import annotations

import math
from decimal import Decimal, localcontext

import numpy as np
import pytest
import torch

from deepcollapse import theory as T
from deepcollapse._validate import DeepCollapseError
from deepcollapse.dufm.model import DUFM, DUFMConfig
from reference import dec_dnc_objective, dec_optimal_scale

EPS = 2.0**-52


def critical_kc(L: int) -> float:
    """``(K C)^*`` by hand: ``f(s) = f(0)`` and ``f'(s) = 0`` together give ``s^* = (L-1)/L`` and
    ``K C = (1 - s^*) s^{*(L-1)/(L+1)}`` (1 for L = 1, where the optimum ``1 - K C`` reaches 0)."""
    return 1.0 if L == 1 else (1 - (L - 1) / L) * ((L - 1) / L) ** ((L - 1) / (L + 1))


def close_to_last_bits(got: float, want: float, ulps: int = 4) -> bool:
    return abs(got - want) <= ulps * math.ulp(want)


# kc as fractions of the threshold: far below, near, just past, between the threshold and the end of the
# interior minimum (the zero solution already wins there), and far past
FRACTIONS = [0.0, 1e-12, 1e-4, 0.1, 0.5, 0.9, 1 - 1e-6, 1 + 1e-6, 1.1, 3.0]


@pytest.mark.parametrize("L", [1, 2, 3, 4, 6, 10])
def test_optimal_scale_is_the_global_minimizer_of_f(L):
    """The scale against a golden-section minimization of f itself (60 digits), compared with f(0) = 1/2."""
    for frac in FRACTIONS:
        kc = frac * critical_kc(L)
        s = T.optimal_scale(kc, L)
        ref_s, ref_f = dec_optimal_scale(kc, L)
        assert close_to_last_bits(s, ref_s), (L, frac, s, ref_s)
        assert T.dnc_objective(s, num_classes=1, num_layers=L, c=kc) == pytest.approx(ref_f, rel=1e-14, abs=1e-30)
        assert (s == 0.0) == (frac >= 1)


@pytest.mark.parametrize("L", [1, 2, 3, 5, 9, 10])
def test_optimal_scale_at_the_threshold(L):
    """At the threshold both s^* and 0 reach f = 1/2: zero is returned there (as ``zero_is_optimal`` says);
    one float below it, the non-zero optimum s^* = (L-1)/L."""
    kc_star = T.zero_threshold(num_classes=2, num_layers=L, n=1).kc
    assert kc_star == pytest.approx(critical_kc(L), rel=1e-15)
    assert T.optimal_scale(kc_star, L) == 0.0
    below = math.nextafter(kc_star, 0.0)
    s = T.optimal_scale(below, L)
    assert s == pytest.approx((L - 1) / L, rel=1e-12, abs=1e-12)
    assert s >= (L - 1) / L  # below the threshold the root lies above s^*, so its rounding cannot fall below
    if L > 1:
        assert T.dnc_objective(s, num_classes=1, num_layers=L, c=below) == pytest.approx(0.5, rel=1e-14)


def test_scale_of_a_kc_past_the_float_range_is_zero():
    """K C can overflow where C does not (K = 10, C ~ 3e307): the zero solution, loss 1/2."""
    assert T.optimal_scale(math.inf, 3) == 0.0 and T.optimal_scale(math.inf, 1) == 0.0
    kw = dict(num_classes=10, num_layers=1, n=10, lambda_h=1e307, lambda_w=1e307)
    assert T.dnc_scale(**kw) == 0.0 and T.dnc_loss(**kw) == 0.5
    sol = T.dnc_solution(**kw)
    assert (sol.s, sol.t, sol.weight_norms) == (0.0, 0.0, [0.0]) and sol.zero_threshold.zero_is_optimal


def test_optimal_scale_without_regularization_is_one():
    for L in (1, 2, 7):
        assert T.optimal_scale(0.0, L) == 1.0
        assert T.optimal_scale(1e-300, L) == 1.0


@pytest.mark.parametrize(
    "kc, L, message",
    [
        (-1e-3, 2, r"^kc must be >= 0"),
        (math.nan, 2, r"^kc must be finite"),
        (-math.inf, 3, r"^kc must be finite"),
        (0.1, 0, r"^num_layers must be >= 1"),
        (0.1, 2.5, r"^num_layers must be an integer"),
    ],
)
def test_optimal_scale_input_errors(kc, L, message):
    with pytest.raises(DeepCollapseError, match=message):
        T.optimal_scale(kc, L)


def test_dnc_objective_against_decimals():
    for s, K, L, c in [(0.0, 2, 1, 0.1), (1.0, 3, 2, 0.02), (0.37, 10, 4, 1e-3), (0.9, 2, 7, 0.05), (1e-9, 5, 3, 2.0)]:
        with localcontext() as ctx:
            ctx.prec = 40
            want = float(dec_dnc_objective(s, K * Decimal(c), L))
        assert T.dnc_objective(s, num_classes=K, num_layers=L, c=c) == pytest.approx(want, rel=1e-15)


def dec_constant(n: int, lambda_h: float, lambda_w: list[float]) -> float:
    """``C = (n λ_H1 Π_l λ_Wl)^{1/(L+1)}`` in 60-digit decimals (no underflow of the product)."""
    with localcontext() as ctx:
        ctx.prec = 60
        prod = Decimal(n) * Decimal(lambda_h)
        for v in lambda_w:
            prod *= Decimal(v)
        return float(prod ** (Decimal(1) / (len(lambda_w) + 1)))


CONSTANT_CASES = [
    # L, n, lambda_h, lambda_w
    (1, 10, 0.002, [0.002]),
    (3, 5, 0.004, [1e-3, 2e-3, 5e-3]),
    (4, 1, 0.3, [0.02, 7.0, 1e-5, 0.5]),
    (6, 7, 1e-200, [1e-200] * 6),  # the product (1e-1400) underflows a float: computed in logs
    (2, 10**9, 1e150, [1e150, 1e150]),  # the product overflows a float
    (1, 10, 1e300, [1e300]),  # C near the largest float
]


@pytest.mark.parametrize("L, n, lh, lw", CONSTANT_CASES)
def test_dnc_constant_against_decimals(L, n, lh, lw):
    """To the precision of an exponential of a sum of logs: ``ε·|log C|`` relative (a few ulps of log C)."""
    want = dec_constant(n, lh, lw)
    rel = 4 * EPS * (1 + abs(math.log(want)))
    assert T.dnc_constant(L, n, lh, lw) == pytest.approx(want, rel=rel)
    if len(set(lw)) == 1:  # one λ_W for every layer
        assert T.dnc_constant(L, n, lh, lw[0]) == T.dnc_constant(L, n, lh, lw)


def test_dnc_constant_of_a_zero_lambda_is_zero():
    assert T.dnc_constant(3, 5, 0.0, 0.01) == 0.0
    assert T.dnc_constant(3, 5, 0.01, [0.01, 0.0, 0.01]) == 0.0
    assert T.dnc_constant(1, 5, 0.01, 0.0) == 0.0


@pytest.mark.parametrize(
    "args, message",
    [
        ((0, 5, 0.1, 0.1), r"^num_layers must be >= 1, got 0$"),
        ((2, 0, 0.1, 0.1), r"^n must be >= 1, got 0$"),
        ((2, 5, -0.1, 0.1), r"^lambda_h must be >= 0.0, got -0.1$"),
        ((2, 5, 0.1, -0.1), r"^lambda_w must be >= 0.0, got -0.1$"),
        ((2, 5, 0.1, [0.1, -0.1]), r"^lambda_w\[1\] must be >= 0.0, got -0.1$"),
        ((2, 5, 0.1, [0.1, 0.1, 0.1]), r"^lambda_w needs one value or one per layer \(2\), got 3"),
    ],
)
def test_dnc_constant_input_errors(args, message):
    with pytest.raises(DeepCollapseError, match=message):
        T.dnc_constant(*args)


@pytest.mark.parametrize("K, L, n", [(2, 1, 10), (3, 1, 4), (2, 2, 5), (4, 3, 1), (10, 4, 5), (3, 7, 20)])
def test_zero_threshold_fields(K, L, n):
    lh, lw = 3e-3, [1e-3 * (i + 1) for i in range(L)]
    zt = T.zero_threshold(num_classes=K, num_layers=L, n=n, lambda_h=lh, lambda_w=lw)
    assert zt.kc == pytest.approx(critical_kc(L), rel=1e-15)
    assert zt.c == pytest.approx(critical_kc(L) / K, rel=1e-15)
    assert zt.s == (L - 1) / L
    # the critical common λ: n λ^{L+1} = C^{*(L+1)}
    assert T.dnc_constant(L, n, zt.lambda_equal, zt.lambda_equal) == pytest.approx(zt.c, rel=1e-14)
    assert dec_constant(n, zt.lambda_equal, [zt.lambda_equal] * L) == pytest.approx(zt.c, rel=1e-14)
    # C is homogeneous of degree one: every λ times `scale` lands on the threshold
    at = dec_constant(n, lh * zt.scale, [v * zt.scale for v in lw])
    assert at == pytest.approx(zt.c, rel=1e-14)
    assert zt.zero_is_optimal is (zt.scale <= 1)
    assert zt.to_dict() == {
        "kc": zt.kc,
        "c": zt.c,
        "s": zt.s,
        "lambda_equal": zt.lambda_equal,
        "scale": zt.scale,
        "zero_is_optimal": zt.zero_is_optimal,
        "zero_is_global_optimum": zt.zero_is_global_optimum,
    }


@pytest.mark.parametrize("K, L", [(2, 1), (2, 3), (3, 1), (3, 2), (10, 4)])
@pytest.mark.parametrize("factor", [0.5, 0.999, 1.001, 4.0])
def test_zero_threshold_verdicts_on_both_sides(K, L, factor):
    """Before the threshold a DNC configuration beats zero (False); past it zero is the best DNC
    configuration, proven global for K = 2 or L = 1 (True) and not known otherwise (None)."""
    n = 5
    lam = T.zero_threshold(num_classes=K, num_layers=L, n=n).lambda_equal * factor
    zt = T.zero_threshold(num_classes=K, num_layers=L, n=n, lambda_h=lam, lambda_w=lam)
    assert zt.scale == pytest.approx(1 / factor, rel=1e-13)
    past = factor > 1
    assert zt.zero_is_optimal is past
    assert zt.zero_is_global_optimum is (None if past and K > 2 and L > 1 else past)
    assert (T.dnc_scale(num_classes=K, num_layers=L, n=n, lambda_h=lam, lambda_w=lam) == 0.0) is past


def test_zero_threshold_without_regularization():
    zt = T.zero_threshold(num_classes=3, num_layers=2, n=5, lambda_w=0.1)  # lambda_h = 0: C = 0
    assert zt.scale == math.inf and zt.zero_is_optimal is False and zt.zero_is_global_optimum is False
    assert T.zero_threshold(num_classes=3, num_layers=2, n=5).scale == math.inf


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(num_classes=1, num_layers=2, n=5), r"^num_classes must be >= 2, got 1$"),
        (dict(num_classes=2, num_layers=0, n=5), r"^num_layers must be >= 1, got 0$"),
        (dict(num_classes=2, num_layers=2, n=0), r"^n must be >= 1, got 0$"),
        (dict(num_classes=2, num_layers=2, n=5, lambda_h=-1.0), r"^lambda_h must be >= 0.0, got -1.0$"),
    ],
)
def test_zero_threshold_input_errors(kw, message):
    with pytest.raises(DeepCollapseError, match=message):
        T.zero_threshold(**kw)


SOLUTION_CASES = [
    # K, L, n, lambda_h, lambda_w
    (2, 1, 10, 0.002, [0.002]),
    (5, 1, 3, 0.01, [0.03]),
    (2, 3, 5, 0.005, [0.001, 0.01, 0.004]),
    (3, 2, 7, 1e-4, [2e-3, 5e-5]),
    (10, 4, 5, 0.004, [0.004] * 4),
    (4, 6, 2, 1e-3, [1e-3, 1e-2, 1e-4, 1e-3, 5e-3, 2e-3]),
]


def balanced_terms(sol, lambda_h, lambda_w):
    """The L+1 penalty factors ``n λ_H1 t², λ_W1 (q_2/t)², …, λ_WL (s/q_L)²`` of a solution."""
    norms = [sol.t, *sol.q, sol.s]
    return [sol.n * lambda_h * sol.t**2] + [lam * (norms[i + 1] / norms[i]) ** 2 for i, lam in enumerate(lambda_w)]


@pytest.mark.parametrize("K, L, n, lh, lw", SOLUTION_CASES)
def test_dnc_solution_against_decimals(K, L, n, lh, lw):
    kw = dict(num_classes=K, num_layers=L, n=n, lambda_h=lh, lambda_w=lw)
    c = dec_constant(n, lh, lw)
    s, loss = dec_optimal_scale(K * c, L)
    assert 0 < s < 1
    assert T.dnc_scale(**kw) == pytest.approx(s, rel=1e-14)
    assert T.dnc_loss(**kw) == pytest.approx(loss, rel=1e-14)
    sol = T.dnc_solution(**kw)
    assert (sol.num_classes, sol.num_layers, sol.n) == (K, L, n)
    assert sol.s == pytest.approx(s, rel=1e-14) and sol.dnc_loss == pytest.approx(loss, rel=1e-14)
    assert sol.c == pytest.approx(c, rel=1e-14)
    # AM-GM: the L+1 factors are equal, so each is the (L+1)-th root of their product C^{L+1} s²
    with localcontext() as ctx:
        ctx.prec = 60
        prod = Decimal(n) * Decimal(lh) * math.prod(Decimal(v) for v in lw) * Decimal(s) ** 2
        common = float(prod ** (Decimal(1) / (L + 1)))
    assert balanced_terms(sol, lh, lw) == pytest.approx([common] * (L + 1), rel=1e-13)
    assert len(sol.q) == L - 1 and len(sol.weight_norms) == L
    assert sol.zero_threshold == T.zero_threshold(**kw)
    assert T.balanced_scales(**kw) == (sol.s, sol.t, sol.q)
    d = sol.to_dict()
    assert d["zero_threshold"] == sol.zero_threshold.to_dict() and d["weight_norms"] == sol.weight_norms
    assert d["dnc_loss"] == sol.dnc_loss and d["q"] == sol.q and d["t"] == sol.t


def test_dnc_solution_past_the_threshold_is_zero():
    kw = dict(num_classes=3, num_layers=3, n=5, lambda_h=0.2, lambda_w=0.2)
    sol = T.dnc_solution(**kw)
    assert (sol.s, sol.t, sol.q, sol.weight_norms, sol.dnc_loss) == (0.0, 0.0, [0.0, 0.0], [0.0] * 3, 0.5)
    assert T.balanced_scales(**kw) == (0.0, 0.0, [0.0, 0.0])
    assert sol.c == pytest.approx(dec_constant(5, 0.2, [0.2] * 3), rel=1e-14)


def test_dnc_solution_without_regularization():
    """No penalty: the fit is exact (s = 1, loss 0) and the scales are not determined (nan)."""
    sol = T.dnc_solution(num_classes=2, num_layers=3, n=5, lambda_h=0.0, lambda_w=0.01)
    assert (sol.s, sol.c, sol.dnc_loss) == (1.0, 0.0, 0.0)
    assert math.isnan(sol.t) and len(sol.q) == 2 and len(sol.weight_norms) == 3
    assert all(math.isnan(v) for v in [*sol.q, *sol.weight_norms])
    with pytest.raises(DeepCollapseError, match=r"^the optimal scales are not unique when some λ is 0; give every"):
        T.balanced_scales(num_classes=2, num_layers=3, n=5, lambda_h=0.0, lambda_w=0.01)


@pytest.mark.parametrize("fn", [T.dnc_solution, T.balanced_scales, T.dnc_scale, T.dnc_loss])
def test_closed_form_input_errors(fn):
    kw = dict(num_classes=2, num_layers=2, n=5, lambda_h=0.01, lambda_w=0.01)
    with pytest.raises(DeepCollapseError, match=r"^num_classes must be >= 2, got 1$"):
        fn(**{**kw, "num_classes": 1})
    with pytest.raises(DeepCollapseError, match=r"^lambda_w needs one value or one per layer \(2\), got 3"):
        fn(**{**kw, "lambda_w": [0.1, 0.1, 0.1]})
    with pytest.raises(DeepCollapseError, match=r"^lambda_h must be >= 0.0, got -0.01$"):
        fn(**{**kw, "lambda_h": -0.01})
    with pytest.raises(DeepCollapseError, match=r"^n must be >= 1, got 0$"):
        fn(**{**kw, "n": 0})
    with pytest.raises(DeepCollapseError, match=r"^num_layers must be >= 1, got 0$"):
        fn(**{**kw, "num_layers": 0})
    with pytest.raises(DeepCollapseError, match=r"^num_layers must be an integer, got 2.5$"):
        fn(**{**kw, "num_layers": 2.5})


def test_scales_at_c_exactly_one_past_the_threshold():
    """n = 1 and every λ = 1 give C = 1 exactly, far past the threshold: every scale is 0 (not undetermined)."""
    sol = T.dnc_solution(num_classes=2, num_layers=2, n=1, lambda_h=1.0, lambda_w=1.0)
    assert (sol.c, sol.s, sol.t, sol.q, sol.weight_norms, sol.dnc_loss) == (1.0, 0.0, 0.0, [0.0], [0.0, 0.0], 0.5)


def test_zero_threshold_exactly_at_it():
    """L = 1, K = 2, n = 1, λ = 1/2: C = 1/2 = C^* exactly; the optimum s = 1 - K C is 0 there."""
    zt = T.zero_threshold(num_classes=2, num_layers=1, n=1, lambda_h=0.5, lambda_w=0.5)
    assert zt.c == T.dnc_constant(1, 1, 0.5, 0.5) == 0.5 and zt.scale == 1.0
    assert zt.zero_is_optimal is True and zt.zero_is_global_optimum is True
    assert T.dnc_scale(num_classes=2, num_layers=1, n=1, lambda_h=0.5, lambda_w=0.5) == 0.0


def test_zero_threshold_default_lambdas_are_zero():
    assert T.zero_threshold(num_classes=3, num_layers=2, n=5, lambda_h=0.1).scale == math.inf
    assert T.zero_threshold(num_classes=3, num_layers=2, n=5, lambda_w=0.1).scale == math.inf


# ------------------------------------------------------------------ explicit parameters


def np_forward(h, ws):
    feats = [h]
    for w in ws[:-1]:
        feats.append(np.maximum(w @ feats[-1], 0))
    return feats, ws[-1] @ feats[-1]


@pytest.mark.parametrize("h1", ["orthogonal", "antipodal", "etf"])
def test_optimal_parameters_shapes_norms_and_dtype(h1):
    widths = [1 if h1 == "antipodal" else 4, 5, 3]  # antipodal means need one H1 dimension only
    kw = dict(num_classes=2, n_per_class=3, num_layers=3, width=widths, lambda_h=3e-3, lambda_w=[1e-3, 4e-3, 2e-3])
    cfg = DUFMConfig(**kw, dtype="float32")
    h, ws = T.optimal_parameters(cfg, h1=h1, generator=torch.Generator().manual_seed(1))
    assert h.dtype == torch.float32 and all(w.dtype == torch.float32 for w in ws)
    assert tuple(h.shape) == (widths[0], 6)
    assert [tuple(w.shape) for w in ws] == [(5, widths[0]), (3, 5), (2, 3)]
    sol = T.dnc_solution(num_classes=2, num_layers=3, n=3, lambda_h=3e-3, lambda_w=[1e-3, 4e-3, 2e-3])
    hn, wn = h.double().numpy(), [w.double().numpy() for w in ws]
    feats, out = np_forward(hn, wn)
    assert [np.linalg.norm(w) for w in wn] == pytest.approx(sol.weight_norms, rel=1e-6)  # float32 parameters
    for f, norm in zip(feats, [sol.t, *sol.q], strict=True):
        assert np.linalg.norm(f, axis=0) == pytest.approx(np.full(6, norm), rel=1e-6)
    assert out == pytest.approx(sol.s * np.kron(np.eye(2), np.ones((1, 3))), abs=1e-6)


def test_optimal_parameters_follow_the_generator():
    cfg = DUFMConfig(num_classes=3, n_per_class=2, num_layers=2, width=5, lambda_h=1e-3, lambda_w=1e-3)
    for h1 in ("orthogonal", "etf"):
        plain, _ = T.optimal_parameters(cfg, h1=h1)
        a, wa = T.optimal_parameters(cfg, h1=h1, generator=torch.Generator().manual_seed(7))
        b, wb = T.optimal_parameters(cfg, h1=h1, generator=torch.Generator().manual_seed(7))
        c, _ = T.optimal_parameters(cfg, h1=h1, generator=torch.Generator().manual_seed(8))
        assert torch.equal(a, b) and all(torch.equal(x, y) for x, y in zip(wa, wb, strict=True))
        assert not torch.allclose(a, c, atol=1e-3) and not torch.allclose(a, plain, atol=1e-3)
        assert int((plain.abs() > 0).any(1).sum()) == 3  # without a generator: the first K coordinates
    k2 = DUFMConfig(num_classes=2, n_per_class=2, num_layers=2, width=4, lambda_h=1e-3, lambda_w=1e-3)
    a, _ = T.optimal_parameters(k2, h1="antipodal", generator=torch.Generator().manual_seed(7))
    b, _ = T.optimal_parameters(k2, h1="antipodal", generator=torch.Generator().manual_seed(7))
    plain, _ = T.optimal_parameters(k2, h1="antipodal")
    assert torch.equal(a, b) and not torch.allclose(a, plain, atol=1e-3)


def test_optimal_parameters_on_the_configs_device():
    """Placed on ``config.device`` (the meta device: shapes only, no accelerator needed)."""
    cfg = DUFMConfig(num_classes=2, n_per_class=2, num_layers=2, width=3, device="meta")
    h, ws = T.optimal_parameters(cfg)
    assert h.device.type == "meta" and all(w.device.type == "meta" for w in ws)


def test_zero_solution_parameters_are_zero():
    cfg = DUFMConfig(num_classes=3, n_per_class=2, num_layers=3, width=[4, 5, 3], lambda_h=0.2, lambda_w=0.2)
    h, ws = T.optimal_parameters(cfg, h1="etf", generator=torch.Generator().manual_seed(0))
    assert tuple(h.shape) == (4, 6) and [tuple(w.shape) for w in ws] == [(5, 4), (3, 5), (3, 3)]
    assert not h.any() and not any(w.any() for w in ws)


@pytest.mark.parametrize(
    "kw, h1, message",
    [
        (
            dict(num_classes=3, num_layers=3, width=[4, 2, 5]),
            "orthogonal",
            r"^.*layer\(s\) \[2\] have width\(s\) \[2\]$",
        ),
        (dict(num_classes=3, num_layers=2, width=[2, 1]), "etf", r"^.*layer\(s\) \[1, 2\] have width\(s\) \[2, 1\]$"),
        (dict(num_classes=2, num_layers=2, width=[1, 4]), "orthogonal", r"^.*layer\(s\) \[1\] have width\(s\) \[1\]$"),
        (dict(num_classes=2, num_layers=2, width=[1, 1]), "antipodal", r"^.*layer\(s\) \[2\] have width\(s\) \[1\]$"),
        (
            dict(num_classes=3, num_layers=2, width=4),
            "simplex",
            r"^h1 must be 'orthogonal', 'antipodal' or 'etf', got 'simplex'$",
        ),
        (
            dict(num_classes=3, num_layers=2, width=4),
            "antipodal",
            r"^h1='antipodal' is optimal for K = 2 and L >= 2 only$",
        ),
        (
            dict(num_classes=2, num_layers=1, width=4),
            "antipodal",
            r"^h1='antipodal' is optimal for K = 2 and L >= 2 only$",
        ),
        (dict(num_classes=2, num_layers=1, width=4), "etf", r"^h1='etf' needs a ReLU after H1 \(L >= 2\)$"),
        (
            dict(num_classes=2, n_per_class=[3, 4]),
            "orthogonal",
            r"^the closed-form optimum is for balanced classes \(one n_per_class\)$",
        ),
        (
            dict(num_classes=2, lambda_w=0.0),
            "orthogonal",
            r"^the optimal scales are not unique when some λ is 0; give every λ a positive value$",
        ),
    ],
)
def test_optimal_parameters_errors(kw, h1, message):
    with pytest.raises(DeepCollapseError, match=message):
        T.optimal_parameters(DUFMConfig(**kw), h1=h1)


def test_width_message_names_k():
    with pytest.raises(DeepCollapseError, match=r"^the DNC optimum needs every width >= K = 3; layer\(s\)"):
        T.optimal_parameters(DUFMConfig(num_classes=3, width=2))


# ------------------------------------------------------------------ check


def np_report(h, ws, counts, lambda_h, lambda_w):
    """The measured side of ``check`` in float64 numpy: loss terms, s, per-layer class-mean norms."""
    h, ws = h.astype(np.float64), [w.astype(np.float64) for w in ws]
    y = np.repeat(np.arange(len(counts)), counts)
    feats, out = np_forward(h, ws)
    onehot = np.eye(len(counts))[:, y]
    fit = 0.5 * ((out - onehot) ** 2).sum() / len(y)
    reg = 0.5 * (lambda_h * (h**2).sum() + sum(lam * (w**2).sum() for lam, w in zip(lambda_w, ws, strict=True)))
    s = np.mean([out[c, y == c].mean() for c in range(len(counts))])
    norms = [np.linalg.norm([f[:, y == c].mean(1) for c in range(len(counts))], axis=1) for f in feats]
    return fit, reg, s, norms


@pytest.mark.parametrize(
    "kw",
    [
        dict(lambda_h=4e-3, lambda_w=[4e-3, 1e-3, 2e-3]),  # before the threshold
        dict(lambda_h=0.2, lambda_w=0.2),  # past it: every prediction 0
        dict(lambda_h=0.0, lambda_w=0.01),  # C = 0: s = 1, the other scales undetermined (nan)
    ],
)
def test_check_every_entry_at_a_float32_point(kw):
    cfg = DUFMConfig(num_classes=3, n_per_class=4, num_layers=3, width=[6, 5, 4], dtype="float32", **kw)
    model = DUFM(cfg)  # a random float32 point: check works in float64
    h, ws = model.h1.detach().numpy(), [w.detach().numpy() for w in model.weights]
    report = T.check(model.h1, list(model.weights), cfg)
    fit, reg, s, norms = np_report(h, ws, cfg.counts, cfg.lambda_h, cfg.lambdas_w)
    sol = T.dnc_solution(num_classes=3, num_layers=3, n=4, lambda_h=cfg.lambda_h, lambda_w=cfg.lambdas_w)
    assert set(report) == {"loss", "fit", "reg", "dnc_loss", "gap", "s", "s_theory", "s_rel_err", "h1_cos"} | {
        "layers",
        "zero_threshold",
    }
    assert report["fit"] == pytest.approx(fit, rel=1e-13) and report["reg"] == pytest.approx(reg, rel=1e-13)
    assert report["loss"] == pytest.approx(fit + reg, rel=1e-13)
    assert report["dnc_loss"] == sol.dnc_loss and report["s_theory"] == sol.s
    assert report["zero_threshold"] == sol.zero_threshold.to_dict()
    assert report["s"] == pytest.approx(s, rel=1e-13)
    want = abs(s) if sol.s == 0 else abs(s - sol.s) / sol.s  # against a predicted 0: the measured value
    assert report["s_rel_err"] == pytest.approx(want, rel=1e-12)
    for l, (e, w, nrm) in enumerate(zip(report["layers"], ws, norms, strict=True), start=1):
        assert set(e) == {"layer", "mean_norm", "mean_norm_theory", "mean_norm_rel_err", "weight_norm"} | {
            "weight_norm_theory",
            "weight_norm_rel_err",
            "nc1",
            "nc2_orth",
        }
        q, wq = [sol.t, *sol.q][l - 1], sol.weight_norms[l - 1]
        wnorm = np.linalg.norm(w.astype(np.float64))
        assert e["layer"] == l and e["mean_norm"] == pytest.approx(nrm.mean(), rel=1e-13)
        assert e["weight_norm"] == pytest.approx(wnorm, rel=1e-13)
        assert e["mean_norm_theory"] == pytest.approx(q, nan_ok=True, rel=0, abs=0)
        assert e["weight_norm_theory"] == pytest.approx(wq, nan_ok=True, rel=0, abs=0)
        unknown = q == 0 or math.isnan(q)
        want_m = nrm.max() if unknown else np.abs(nrm - q).max() / q
        want_w = wnorm if wq == 0 or math.isnan(wq) else abs(wnorm - wq) / wq
        assert e["mean_norm_rel_err"] == pytest.approx(want_m, rel=1e-12)
        assert e["weight_norm_rel_err"] == pytest.approx(want_w, rel=1e-12)
        assert (e["nc2_orth"] is None) == (l == 1)


def test_check_of_the_zero_solution():
    cfg = DUFMConfig(num_classes=3, n_per_class=2, num_layers=3, width=4, lambda_h=0.2, lambda_w=0.2)
    h, ws = T.optimal_parameters(cfg)
    report = T.check(h, ws, cfg)
    assert report["loss"] == report["dnc_loss"] == 0.5 and report["gap"] == 0.0
    assert report["s"] == 0.0 and report["s_rel_err"] == 0.0 and report["h1_cos"] == [0.0, 0.0, 0.0]
    for e in report["layers"]:
        assert e["mean_norm"] == 0.0 and e["mean_norm_rel_err"] == 0.0 and e["weight_norm_rel_err"] == 0.0
        assert e["nc2_orth"] is None  # no frame to measure


def test_check_of_unbalanced_classes_has_no_theory():
    cfg = DUFMConfig(num_classes=2, n_per_class=[3, 5], num_layers=2, width=4, lambda_h=1e-3, lambda_w=1e-3)
    model = DUFM(cfg)
    report = T.check(model.h1, list(model.weights), cfg)
    for key in ("dnc_loss", "gap", "s_theory", "s_rel_err", "zero_threshold"):
        assert report[key] is None
    for e in report["layers"]:
        assert e["mean_norm_theory"] is None and e["mean_norm_rel_err"] is None
        assert e["weight_norm_theory"] is None and e["weight_norm_rel_err"] is None
    fit, reg, s, _ = np_report(
        model.h1.detach().numpy(), [w.detach().numpy() for w in model.weights], [3, 5], 1e-3, [1e-3] * 2
    )
    assert report["fit"] == pytest.approx(fit, rel=1e-13) and report["s"] == pytest.approx(s, rel=1e-13)
    assert report["reg"] == pytest.approx(reg, rel=1e-13)


def test_h1_cosines_of_small_means():
    """Cosines are scale-free: class means of norm ~1e-3 give the same cosines as at norm 1."""
    cfg = DUFMConfig(num_classes=3, n_per_class=2, num_layers=2, width=4, lambda_h=1e-3, lambda_w=1e-3)
    model = DUFM(cfg)
    h = model.h1.detach()
    big = T.check(h, list(model.weights), cfg)["h1_cos"]
    small = T.check(h * 1e-3, list(model.weights), cfg)["h1_cos"]
    assert small == pytest.approx(big, rel=1e-12) and max(abs(v) for v in big) > 0.05


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_parameters_and_check():
    """Parameters on the GPU; ``check`` of GPU tensors equals ``check`` of their CPU copies."""
    kw = dict(num_classes=3, n_per_class=4, num_layers=3, width=5, lambda_h=2e-3, lambda_w=2e-3)
    h, ws = T.optimal_parameters(DUFMConfig(device="cuda", **kw), h1="etf")
    assert h.is_cuda and all(w.is_cuda for w in ws)
    cfg = DUFMConfig(**kw)
    assert T.check(h, ws, cfg) == T.check(h.cpu(), [w.cpu() for w in ws], cfg)


def test_optimal_scale_returns_an_exact_root_exactly():
    """Where ``(1-s) s^{(L-1)/(L+1)} = kc`` has a float root whose powers are exact, that root comes back:
    L = 3, s = 49/64: (15/64)(7/8) = 105/512; L = 7, s = (31/32)^4: (1 - s)(31/32)^3. Both above s^*."""
    assert T.optimal_scale(105 / 512, 3) == 49 / 64
    s7 = (31 / 32) ** 4
    assert T.optimal_scale((1 - s7) * (31 / 32) ** 3, 7) == s7


def test_dnc_constant_past_the_float_range():
    """C above the largest float: one line naming the λ's, for every closed form that needs C."""
    big = dict(num_layers=1, n=10, lambda_h=1e308, lambda_w=1e308)
    message = r"^lambda_h and lambda_w are too large: C overflows a float \(log C = 710\.3\d*\)$"
    with pytest.raises(DeepCollapseError, match=message):
        T.dnc_constant(**big)
    for fn in (T.dnc_loss, T.dnc_solution, T.zero_threshold):
        with pytest.raises(DeepCollapseError, match=message):
            fn(num_classes=2, **big)
