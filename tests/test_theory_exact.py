"""The DNC closed forms (theory.closed_form) to the last digits, against high-precision decimal references written from
the definitions, at the boundaries of their rules (the zero threshold, zero λ's, L = 1), and their errors."""

from __future__ import annotations

import math
from decimal import Decimal, localcontext

import pytest

from deepcollapse import theory as T
from deepcollapse._validate import DeepCollapseError
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


@pytest.mark.parametrize("L", [1, 2, 3, 5, 9])
def test_optimal_scale_at_the_threshold(L):
    """At the threshold both s^* and 0 reach f = 1/2: zero is returned there (as ``zero_is_optimal`` says);
    one float below it, the non-zero optimum s^* = (L-1)/L."""
    kc_star = T.zero_threshold(num_classes=2, num_layers=L, n=1).kc
    assert kc_star == pytest.approx(critical_kc(L), rel=1e-15)
    assert T.optimal_scale(kc_star, L) == 0.0
    below = math.nextafter(kc_star, 0.0)
    s = T.optimal_scale(below, L)
    assert s == pytest.approx((L - 1) / L, rel=1e-12, abs=1e-12)
    if L > 1:
        assert T.dnc_objective(s, num_classes=1, num_layers=L, c=below) == pytest.approx(0.5, rel=1e-14)


def test_optimal_scale_without_regularization_is_one():
    for L in (1, 2, 7):
        assert T.optimal_scale(0.0, L) == 1.0
        assert T.optimal_scale(1e-300, L) == 1.0


@pytest.mark.parametrize(
    "kc, L, message",
    [
        (-1e-3, 2, r"^kc must be >= 0"),
        (math.nan, 2, r"^kc must be finite"),
        (math.inf, 3, r"^kc must be finite"),
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
