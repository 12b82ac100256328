r"""Tiled work on the K x K class-pair matrices, in O(K·D + tile) memory.

Every pairwise metric (CDNV, the NC2 Gram distances, the angle statistics) is a sum over entries of the
Gram matrix ``G = M̄ M̄^T`` of the centred means. :func:`row_blocks` yields ``G`` a block of rows at a
time, each block of at most ``tile_bytes`` (float64), so K = 50,000 classes never form the 20 GB matrix.

The nearest-class-centre rule (:func:`nearest_rows`) is the other ``K``-wide product: its ``B x K`` scores
are tiled over classes the same way, and for float32/float16/bfloat16 features they take float32 products
with a per-row rounding bound, float64 deciding the rows the bound leaves open (docs/conventions.md).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from deepcollapse._validate import DeepCollapseError

__all__ = [
    "DEFAULT_TILE_BYTES",
    "ScaledMeans",
    "block_rows",
    "nearest_rows",
    "nearest_rows_certified",
    "nearest_rows_f64",
    "row_blocks",
    "scaled_means",
    "score_error_bound",
]

DEFAULT_TILE_BYTES = 64 * 2**20  # one tile of a K x K float64 matrix: 64 MiB
F32, F64 = torch.float32, torch.float64
LOW_PRECISION = (torch.float32, torch.float16, torch.bfloat16)  # features whose NCC scores take float32 products
U32 = 2.0**-24  # unit roundoff of float32
ETA32 = 2.0**-149  # spacing of float32's subnormals (the absolute error of an underflow)
SAFETY = 2.0  # factor on the certified score bound (see score_error_bound)


def block_rows(num_cols: int, tile_bytes: int, *, name: str = "tile_bytes") -> int:
    """Rows of a ``(rows, num_cols)`` float64 block that fit in ``tile_bytes`` (at least one row must)."""
    if isinstance(tile_bytes, bool) or not isinstance(tile_bytes, int) or tile_bytes < 8 * num_cols:
        raise DeepCollapseError(
            f"{name}={tile_bytes!r} cannot hold one tile: a row of {num_cols} float64 values needs {8 * num_cols} bytes"
        )
    return max(1, tile_bytes // (8 * num_cols))


def row_blocks(left: Tensor, right: Tensor, tile_bytes: int) -> Iterator[tuple[slice, Tensor]]:
    """Yield ``(rows, left[rows] @ right^T)`` over row blocks of ``left`` (K1, D) against ``right`` (K2, D)."""
    step = block_rows(right.shape[0], tile_bytes)
    for start in range(0, left.shape[0], step):
        rows = slice(start, min(start + step, left.shape[0]))
        yield rows, left[rows] @ right.T


def nearest_rows(
    h: Tensor,
    centre: Tensor,
    shifted: Tensor,
    sqnorm: Tensor,
    *,
    tile_bytes: int = DEFAULT_TILE_BYTES,
    scaled: ScaledMeans | None = None,
) -> Tensor:
    """Nearest class mean of each row of ``h`` (B, D): ``argmin_c ||h_i - μ_c||²`` (B,) int64.

    Computed as ``argmin_c (||m_c||² - 2 g_i·m_c)`` with ``g_i = h_i - r`` and ``m_c = μ_c - r`` (``shifted``,
    (K, D) float64; ``sqnorm`` its squared row norms) about a central ``r`` (``centre``): ``||g_i||²`` is the
    same for every class and ``r`` cancels, so nothing large is subtracted. The ``B x K`` scores are tiled
    over classes in ``tile_bytes``; ties go to the lowest class index.

    Features of 32 bits or fewer take :func:`nearest_rows_certified` (float32 products, float64 only for the
    rows they cannot decide; ``scaled``, the means' float32 copy from :func:`scaled_means`, can be computed
    once for many batches); the answer is the float64 rule's either way.
    """
    if h.dtype in LOW_PRECISION and _certifiable(h.shape[1], shifted.shape[0], h.device):
        scaled = scaled or scaled_means(shifted, sqnorm)
        if scaled is not None:
            return nearest_rows_certified(h, centre, shifted, sqnorm, scaled, tile_bytes=tile_bytes)
    return nearest_rows_f64(h, centre, shifted, sqnorm, tile_bytes=tile_bytes)


def nearest_rows_f64(
    h: Tensor, centre: Tensor, shifted: Tensor, sqnorm: Tensor, *, tile_bytes: int = DEFAULT_TILE_BYTES
) -> Tensor:
    """:func:`nearest_rows` with float64 products: the float64 rule."""
    g = torch.sub(h if h.is_floating_point() else h.to(F64), centre)  # float64 by type promotion
    step = block_rows(g.shape[0], tile_bytes)
    best = torch.full((g.shape[0],), float("inf"), dtype=F64, device=g.device)
    arg = torch.zeros(g.shape[0], dtype=torch.int64, device=g.device)
    for s in range(0, shifted.shape[0], step):
        val, idx = (sqnorm[s : s + step][None, :] - 2.0 * (g @ shifted[s : s + step].T)).min(1)
        better = val < best
        best, arg = torch.where(better, val, best), torch.where(better, idx + s, arg)
    return arg


def _certifiable(dim: int, num_classes: int, device: torch.device) -> bool:
    """Float32 products are IEEE float32 here (no TF32 or bf16 shortcut) and the bound holds (``D·u <= 1/4``)."""
    if num_classes < 2 or dim * U32 > 0.25 or device.type not in ("cpu", "cuda"):
        return False
    try:
        if torch.get_float32_matmul_precision() != "highest":
            return False
    except RuntimeError:  # the legacy and the per-backend precision settings were mixed
        return False
    if device.type == "cuda":
        backend = torch.backends.cuda.matmul
        if backend.allow_tf32:
            return False
    else:
        backend = getattr(torch.backends.mkldnn, "matmul", None)
    return getattr(backend, "fp32_precision", "none") in ("none", "ieee")


@dataclass(frozen=True)
class ScaledMeans:
    """The centred means ``m_c`` times a power of two ``scale = t`` with ``t·max_c ||m_c|| ∈ [1/2, 1)``, in
    float32: ``means`` (K, D) ``fl(t m_c)``, ``sqnorm`` (K,) ``fl(t² ||m_c||²)``, and ``mnorm`` ``t·max_c ||m_c||``."""

    scale: float
    means: Tensor
    sqnorm: Tensor
    mnorm: float


def scaled_means(shifted: Tensor, sqnorm: Tensor) -> ScaledMeans | None:
    """:class:`ScaledMeans` of ``shifted`` (K, D) with squared row norms ``sqnorm``; ``None`` when every
    ``m_c`` is 0 (or not finite): then only the float64 rule can order the classes."""
    mnorm = math.sqrt(float(sqnorm.max()))
    if not 0.0 < mnorm < math.inf:
        return None
    t = math.ldexp(1.0, -math.frexp(mnorm)[1])  # exact scaling: mnorm·t in [1/2, 1)
    return ScaledMeans(t, (shifted * t).to(F32), (sqnorm * (t * t)).to(F32), mnorm * t)


def score_error_bound(gnorm: Tensor, mnorm: float, dim: int) -> Tensor:
    r"""Bound on the rounding error of each row's float32 scores ``fl(fl(||m_c||²) - 2 fl(g_i·m_c))``.

    With ``u = 2^-24``, ``γ_D = D u / (1 - D u)``, ``η = 2^-149`` (the subnormal spacing), ``M = max_c ||m_c||
    <= 1`` and both ``g_i`` and ``m_c`` rounded to float32 from float64 (docs/conventions.md, "Nearest-class-centre
    scores in float32, certified"):

    .. math:: |δ_{ic}| \le 2 \big[ 2(γ_D + 3u) ||g_i|| M + 2u M^2 + 8(D + 1)(1 + ||g_i||) η \big]

    (the outer 2 is a safety factor for the second-order terms, the float64 rounding of ``g_i``, ``M`` and this
    bound, and the float64 rule's own error). Needs ``D u <= 1/4``.
    """
    gamma = dim * U32 / (1.0 - dim * U32)
    first = 2.0 * (gamma + 3.0 * U32) * mnorm * gnorm + 2.0 * U32 * mnorm**2
    return SAFETY * (first + 8.0 * (dim + 1) * ETA32 * (1.0 + gnorm))


def nearest_rows_certified(
    h: Tensor,
    centre: Tensor,
    shifted: Tensor,
    sqnorm: Tensor,
    scaled: ScaledMeans,
    *,
    tile_bytes: int = DEFAULT_TILE_BYTES,
) -> Tensor:
    """:func:`nearest_rows` with float32 products, certified row by row.

    ``g_i = h_i - r`` is formed in float64, scaled by the same power of two as the means (``scaled``, from
    :func:`scaled_means`: every score scales by ``t² > 0``, the argmin not at all) and rounded to float32. A
    row whose best and second-best float32 scores are finite and differ by more than twice
    :func:`score_error_bound` has the same argmin in exact arithmetic and under the float64 rule; the other
    rows (near-ties, overflow) are recomputed by :func:`nearest_rows_f64`.
    """
    t = scaled.scale
    g = torch.sub(h, centre).mul_(t)  # float64 (B, D), exactly t (h_i - r) up to the one subtraction
    gnorm = torch.linalg.vector_norm(g, dim=1)
    best, second, arg = _two_smallest(g.to(F32), scaled.means, scaled.sqnorm, tile_bytes)
    best, second = best.to(F64), second.to(F64)
    sure = (second - best > 2.0 * score_error_bound(gnorm, scaled.mnorm, h.shape[1])) & best.isfinite()
    rows = (~(sure & second.isfinite())).nonzero().flatten()  # the negation also catches NaN
    if rows.numel():
        arg[rows] = nearest_rows_f64(h.index_select(0, rows), centre, shifted, sqnorm, tile_bytes=tile_bytes)
    return arg


def _two_smallest(g: Tensor, m: Tensor, sq: Tensor, tile_bytes: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per row of the float32 scores ``sq_c - 2 g_i·m_c``: the smallest, the second smallest and the argmin
    (on ties any of the tied indices: such rows are not certified), tiled over classes. The product is a
    plain ``g m^T`` (no fused ``addmm``: some BLAS kernels accumulate onto ``C``, which would round ``sq``
    ``D`` times)."""
    b, inf = g.shape[0], float("inf")
    best = torch.full((b,), inf, dtype=F32, device=g.device)
    second, arg = best.clone(), torch.zeros(b, dtype=torch.int64, device=g.device)
    step = block_rows(b, tile_bytes)
    for s in range(0, m.shape[0], step):
        score = (g @ m[s : s + step].T).mul_(-2.0).add_(sq[s : s + step])
        if score.shape[1] >= 2:  # on a tie v1 == v2, so the row is recomputed whichever index topk gives
            val, pos = score.topk(2, dim=1, largest=False, sorted=True)
            v1, v2, idx = val[:, 0], val[:, 1], pos[:, 0]
        else:
            v1, v2, idx = score[:, 0], torch.full_like(best, inf), torch.zeros_like(arg)
        better = v1 < best
        second = torch.where(better, torch.minimum(best, v2), torch.minimum(second, v1))
        best, arg = torch.where(better, v1, best), torch.where(better, idx + s, arg)
    return best, second, arg
