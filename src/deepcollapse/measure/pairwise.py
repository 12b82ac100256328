r"""Tiled work on the K x K class-pair matrices, in O(K·D + tile) memory.

Every pairwise metric (CDNV, the NC2 Gram distances, the angle statistics) is a sum over entries of the
Gram matrix ``G = M̄ M̄^T`` of the centred means. :func:`row_blocks` yields ``G`` a block of rows at a
time, each block of at most ``tile_bytes`` (float64), so K = 50,000 classes never form the 20 GB matrix.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from deepcollapse._validate import DeepCollapseError

__all__ = ["DEFAULT_TILE_BYTES", "block_rows", "nearest_rows", "row_blocks"]

DEFAULT_TILE_BYTES = 64 * 2**20  # one tile of a K x K float64 matrix: 64 MiB


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
    h: Tensor, centre: Tensor, shifted: Tensor, sqnorm: Tensor, *, tile_bytes: int = DEFAULT_TILE_BYTES
) -> Tensor:
    """Nearest class mean of each row of ``h`` (B, D): ``argmin_c ||h_i - μ_c||²`` (B,) int64.

    Computed as ``argmin_c (||m_c||² - 2 g_i·m_c)`` with ``g_i = h_i - r`` and ``m_c = μ_c - r`` (``shifted``,
    (K, D) float64; ``sqnorm`` its squared row norms) about a central ``r`` (``centre``): ``||g_i||²`` is the
    same for every class and ``r`` cancels, so nothing large is subtracted. The ``B x K`` scores are tiled
    over classes in ``tile_bytes``; ties go to the lowest class index.
    """
    g = torch.sub(h if h.is_floating_point() else h.to(torch.float64), centre)  # float64 by type promotion
    step = block_rows(g.shape[0], tile_bytes)
    best = torch.full((g.shape[0],), float("inf"), dtype=torch.float64, device=g.device)
    arg = torch.zeros(g.shape[0], dtype=torch.int64, device=g.device)
    for s in range(0, shifted.shape[0], step):
        val, idx = (sqnorm[s : s + step][None, :] - 2.0 * (g @ shifted[s : s + step].T)).min(1)
        better = val < best
        best, arg = torch.where(better, val, best), torch.where(better, idx + s, arg)
    return arg
