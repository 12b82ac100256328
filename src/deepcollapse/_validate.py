"""Input checks at the API edge.

Every public entry point validates its inputs here and raises :class:`DeepCollapseError` (a
``ValueError``) whose message names the offending argument, its value and the violated bound, so that
the CLI can print one line instead of a traceback.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

__all__ = [
    "DeepCollapseError",
    "DivergenceError",
    "check_finite",
    "check_labels",
    "check_nonneg",
    "check_positive_int",
    "check_real",
    "per_layer",
]


class DeepCollapseError(ValueError):
    """A user-facing error: bad input or an impossible request. Its message is one line."""


class DivergenceError(DeepCollapseError):
    """A run whose loss became NaN or infinite."""


def check_positive_int(name: str, value: Any, *, minimum: int = 1) -> int:
    """Return ``value`` as an int, or raise if it is not an integer >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int | float) or int(value) != value:
        raise DeepCollapseError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise DeepCollapseError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_real(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_inclusive: bool = True,
) -> float:
    """Return ``value`` as a finite float within ``[low, high]`` (or ``(low, high]``)."""
    if isinstance(value, bool):
        raise DeepCollapseError(f"{name} must be a number, got {value!r}")
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise DeepCollapseError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(v):
        raise DeepCollapseError(f"{name} must be finite, got {value!r}")
    if low is not None and (v < low or (v == low and not low_inclusive)):
        bound = ">=" if low_inclusive else ">"
        raise DeepCollapseError(f"{name} must be {bound} {low}, got {v}")
    if high is not None and v > high:
        raise DeepCollapseError(f"{name} must be <= {high}, got {v}")
    return v


def check_nonneg(name: str, value: Any) -> float:
    """A finite, non-negative real (regularization strengths)."""
    return check_real(name, value, low=0.0)


def per_layer(name: str, value: Any, count: int, check: Any) -> list:
    """Broadcast one value to ``count`` layers, or check that a list has exactly ``count`` entries.

    ``check(name, v)`` validates each entry.
    """
    if isinstance(value, str) or not isinstance(value, Sequence):
        return [check(name, value)] * count
    values = list(value)
    if len(values) == 1:
        return [check(name, values[0])] * count
    if len(values) != count:
        raise DeepCollapseError(f"{name} needs one value or one per layer ({count}), got {len(values)}: {values}")
    return [check(f"{name}[{i}]", v) for i, v in enumerate(values)]


def check_finite(name: str, tensor: torch.Tensor) -> None:
    """Raise if ``tensor`` holds NaN or inf, naming it and the first bad index."""
    if tensor.is_floating_point() or tensor.is_complex():
        bad = ~torch.isfinite(tensor)
        if bool(bad.any()):
            idx = tuple(int(i) for i in bad.nonzero()[0])
            raise DeepCollapseError(f"{name} contains NaN or inf ({int(bad.sum())} entries, first at index {idx})")


def check_labels(
    labels: torch.Tensor, num_classes: int, *, name: str = "labels", n_samples: int | None = None
) -> torch.Tensor:
    """Check integer labels in ``[0, num_classes)``, one per sample; return them as int64."""
    if not isinstance(labels, torch.Tensor):
        labels = torch.as_tensor(labels)
    if labels.dim() != 1:
        raise DeepCollapseError(f"{name} must be 1-D (one label per sample), got shape {tuple(labels.shape)}")
    if labels.is_floating_point():
        if not bool((labels == labels.round()).all()):
            raise DeepCollapseError(f"{name} must be integers, got non-integer values")
    if n_samples is not None and labels.numel() != n_samples:
        raise DeepCollapseError(f"{name} has {labels.numel()} entries but the features have {n_samples} samples")
    labels = labels.long()
    if labels.numel():
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= num_classes:
            bad = lo if lo < 0 else hi
            raise DeepCollapseError(f"{name} must lie in 0..{num_classes - 1} (num_classes={num_classes}), found {bad}")
    return labels
