r"""The L-layer deep unconstrained features model (L-DUFM), docs/theory.md.

K classes with ``n_c`` samples each (``N = Σ n_c``), one-hot labels ``Y`` (K x N, samples grouped by class).
Free features ``H_1`` (d_1 x N) and weights ``W_l`` (d_{l+1} x d_l), ``l = 1..L``, ``d_{L+1} = K``;
no biases; ``σ = ReLU``:

.. math::

    \tilde H_{l+1} = W_l H_l,\quad H_{l+1} = σ(\tilde H_{l+1})\ (l = 1..L-1),\qquad
    \text{output} = W_L H_L,

    \mathcal L = \frac1{2N}\|W_L H_L - Y\|_F^2 + \sum_{l=1}^L \frac{λ_{W_l}}2 \|W_l\|_F^2
        + \frac{λ_{H_1}}2 \|H_1\|_F^2 .

The math lives in pure functions (:func:`forward`, :func:`objective`); :class:`DUFM` only owns the
parameters. Matrices follow the paper: features are columns (``d x N``). The metrics module takes rows
(``N x d``), so :func:`layer_metrics` transposes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from itertools import pairwise
from typing import Any

import torch
from torch import Tensor, nn

from deepcollapse._validate import (
    DeepCollapseError,
    check_nonneg,
    check_positive_int,
    check_real,
    per_layer,
)
from deepcollapse.measure import metrics as M

__all__ = [
    "DUFM",
    "DUFMConfig",
    "fit_term",
    "forward",
    "label_matrix",
    "labels_from_counts",
    "layer_lambdas",
    "layer_metrics",
    "objective",
    "penalty",
]

DTYPES = {"float64": torch.float64, "float32": torch.float32}


def _one_or_list(values: list) -> Any:
    """One value when all are equal (the config's compact form), else the list."""
    return values[0] if len(set(values)) == 1 else values


@dataclass
class DUFMConfig:
    """Shape and regularization of an L-DUFM. Lists are per layer; one number is broadcast."""

    num_classes: int = 2  # K
    n_per_class: int | list[int] = 10  # n, or one count per class (unequal classes)
    num_layers: int = 3  # L: weight matrices (L = 1 is the plain UFM)
    width: int | list[int] = 16  # d_1..d_L (d_{L+1} = K)
    lambda_h: float = 2e-3  # λ_H1, penalty on the free features
    lambda_w: float | list[float] = 2e-3  # λ_W1..λ_WL, weight decay per layer
    init_std: float = 1.0  # H1 ~ N(0, init_std²), W_l ~ N(0, init_std²/d_l)
    dtype: str = "float64"  # float64 (default) or float32
    device: str = "cpu"
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)  # free-form notes saved with the config

    def __post_init__(self) -> None:
        self.num_classes = check_positive_int("num_classes", self.num_classes, minimum=2)
        self.num_layers = check_positive_int("num_layers", self.num_layers)
        if isinstance(self.n_per_class, Sequence) and not isinstance(self.n_per_class, str):
            counts = [check_positive_int(f"n_per_class[{i}]", c) for i, c in enumerate(self.n_per_class)]
            if len(counts) != self.num_classes:
                raise DeepCollapseError(f"n_per_class has {len(counts)} counts but num_classes is {self.num_classes}")
            self.n_per_class = _one_or_list(counts)
        else:
            self.n_per_class = check_positive_int("n_per_class", self.n_per_class)
        widths = per_layer("width", self.width, self.num_layers, check_positive_int)
        self.width = _one_or_list(widths)
        self.lambda_h = check_nonneg("lambda_h", self.lambda_h)
        lw = per_layer("lambda_w", self.lambda_w, self.num_layers, check_nonneg)
        self.lambda_w = _one_or_list(lw)
        self.init_std = check_real(
            "init_std",
            self.init_std,
            low=0.0,
            low_inclusive=False,  # pragma: no mutate  (None is as falsy as False; check_real reads truthiness)
        )
        if self.dtype not in DTYPES:
            raise DeepCollapseError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        self.seed = check_positive_int("seed", self.seed, minimum=0)

    @property
    def counts(self) -> list[int]:
        if isinstance(self.n_per_class, list):
            return list(self.n_per_class)
        return [self.n_per_class] * self.num_classes

    @property
    def balanced(self) -> bool:
        return len(set(self.counts)) == 1

    @property
    def n(self) -> int:
        """Samples per class (balanced classes only)."""
        if not self.balanced:
            raise DeepCollapseError("n is defined for balanced classes only; use counts")
        return self.counts[0]

    @property
    def num_samples(self) -> int:
        return sum(self.counts)

    @property
    def widths(self) -> list[int]:
        """d_1..d_L."""
        return per_layer("width", self.width, self.num_layers, check_positive_int)

    @property
    def lambdas_w(self) -> list[float]:
        return per_layer("lambda_w", self.lambda_w, self.num_layers, check_nonneg)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def labels_from_counts(counts: Sequence[int], *, device: torch.device | str = "cpu") -> Tensor:
    """Integer labels ``y`` (N,), samples grouped by class: ``[0]*n_0 + [1]*n_1 + ...``.

    The output size is given, so building it on an accelerator needs no device-to-host sync.
    """
    counts = list(counts)
    return torch.repeat_interleave(torch.as_tensor(counts, device=device), output_size=sum(counts))


def label_matrix(
    counts: Sequence[int], *, dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu"
) -> Tensor:
    """One-hot ``Y`` (K x N); for balanced classes ``Y = I_K ⊗ 1_n^T``."""
    y = labels_from_counts(counts, device=device)
    return nn.functional.one_hot(y, len(counts)).T.to(dtype)


def forward(h1: Tensor, weights: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor], Tensor]:
    """Run the DUFM: ``H̃_{l+1} = W_l H_l``, ``H_{l+1} = σ(H̃_{l+1})`` (l = 1..L-1), output ``W_L H_L``.

    Broadcasts over leading batch dimensions: ``h1`` is ``(..., d_1, N)`` and ``weights[l]`` is
    ``(..., d_{l+2}, d_{l+1})``. Returns ``(pre, post, output)``: ``pre[l]`` is ``H̃_{l+2}`` and ``post[l]``
    its ReLU (``l = 0..L-2``, i.e. layers 2..L), and ``output = W_L H_L`` ``(..., K, N)``; ``pre``/``post``
    are empty for L = 1.
    """
    pre: list[Tensor] = []
    post: list[Tensor] = []
    h = h1
    for w in weights[:-1]:
        z = torch.matmul(w, h)
        h = torch.relu(z)
        pre.append(z)
        post.append(h)
    return pre, post, torch.matmul(weights[-1], h)


def fit_term(output: Tensor, y: Tensor) -> Tensor:
    """``||output - Y||_F² / (2N)`` over the last two dimensions, ``N = y.shape[-1]``: shape ``(...)``."""
    return (output - y).pow(2).sum((-2, -1)) / (2 * y.shape[-1])


def penalty(x: Tensor, lam: float | Tensor) -> Tensor:
    """``λ/2 ||X||_F²`` over the last two dimensions; ``lam`` is a number or a ``(...)`` tensor."""
    return 0.5 * lam * x.pow(2).sum((-2, -1))


def layer_lambdas(lambdas_w: Sequence[float | Tensor] | Tensor, num_layers: int) -> list[float | Tensor]:
    """``λ_W1..λ_WL`` as a list: from a sequence of ``L`` numbers/``(...)`` tensors, or a ``(..., L)`` tensor."""
    values = list(lambdas_w.unbind(-1)) if isinstance(lambdas_w, Tensor) else list(lambdas_w)
    if len(values) != num_layers:
        raise DeepCollapseError(f"lambdas_w has {len(values)} values for {num_layers} weight matrices")
    return values


def objective(
    h1: Tensor,
    weights: Sequence[Tensor],
    y: Tensor,
    lambda_h: float | Tensor,
    lambdas_w: Sequence[float | Tensor] | Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    r"""The DUFM loss and its parts ``(total, fit, reg)``, one value per leading batch index.

    .. math::

        \text{fit} = \frac1{2N}\|W_L H_L - Y\|_F^2,\qquad
        \text{reg} = \sum_{l=1}^L \frac{λ_{W_l}}2\|W_l\|_F^2 + \frac{λ_{H_1}}2\|H_1\|_F^2 .

    Shapes: ``h1`` ``(..., d_1, N)``, ``weights[l]`` ``(..., d_{l+2}, d_{l+1})``, ``y`` ``(K, N)`` (or
    ``(..., K, N)``); ``lambda_h`` a number or a ``(...)`` tensor; ``lambdas_w`` ``L`` numbers or ``(...)``
    tensors, or one ``(..., L)`` tensor. Unbatched inputs give 0-dim results. This is the one
    implementation of the objective: the solvers, the batched trainer, the theory and the real-network
    head call it.

    Example
    -------
    >>> h1, ws = torch.ones(2, 3, 6), [torch.ones(2, 2, 3)]  # a batch of two L = 1 DUFMs
    >>> total, fit, reg = objective(h1, ws, label_matrix([3, 3], dtype=torch.float32), torch.tensor([0.0, 1.0]), [0.0])
    >>> reg.tolist()  # λ_H/2 ||H_1||² = 0 and 18/2
    [0.0, 9.0]
    >>> fit.tolist()  # every output is 3: (3 samples x (4 + 9)) x 2 classes / (2 N)
    [6.5, 6.5]
    """
    _, _, out = forward(h1, weights)
    fit = fit_term(out, y)
    reg = sum(map(penalty, weights, layer_lambdas(lambdas_w, len(weights))), penalty(h1, lambda_h))
    return fit + reg, fit, reg


class DUFM(nn.Module):
    """Parameters of an L-DUFM: ``h1`` (d_1 x N) and ``weights[l]`` (d_{l+2} x d_{l+1}).

    Example
    -------
    >>> model = DUFM(DUFMConfig(num_classes=2, n_per_class=3, num_layers=2, width=4))
    >>> total, fit, reg = model.loss()
    >>> tuple(model.h1.shape), [tuple(w.shape) for w in model.weights]
    ((4, 6), [(4, 4), (2, 4)])
    """

    def __init__(self, config: DUFMConfig, *, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.config = config
        dtype, device = config.torch_dtype, torch.device(config.device)
        if generator is None:
            generator = torch.Generator().manual_seed(config.seed)
        dims = [*config.widths, config.num_classes]
        std = config.init_std
        # Draw on the CPU so that a seed gives the same start on every device.
        h1 = torch.randn(dims[0], config.num_samples, generator=generator, dtype=torch.float64) * std
        self.h1 = nn.Parameter(h1.to(device=device, dtype=dtype))
        ws = []
        for d_in, d_out in pairwise(dims):
            w = torch.randn(d_out, d_in, generator=generator, dtype=torch.float64) * (std / d_in**0.5)
            ws.append(nn.Parameter(w.to(device=device, dtype=dtype)))
        self.weights = nn.ParameterList(ws)
        self.register_buffer("y", label_matrix(config.counts, dtype=dtype, device=device))
        self.register_buffer("labels", labels_from_counts(config.counts, device=device))

    @classmethod
    def from_parameters(cls, config: DUFMConfig, h1: Tensor, weights: Sequence[Tensor]) -> DUFM:
        """A DUFM holding the given parameters (copied), e.g. the theory's optimum."""
        model = cls(config)
        dims = [*config.widths, config.num_classes]
        expected = [(dims[0], config.num_samples)] + [(o, i) for i, o in pairwise(dims)]
        got = [tuple(h1.shape)] + [tuple(w.shape) for w in weights]
        if got != expected:
            raise DeepCollapseError(f"parameter shapes {got} do not match the config's {expected}")
        with torch.no_grad():
            model.h1.copy_(h1)
            for i, w in enumerate(weights):  # as many as model.weights: the shapes matched
                model.weights[i].copy_(w)
        return model

    def loss(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(total, fit, reg)`` at the current parameters."""
        return objective(self.h1, list(self.weights), self.y, self.config.lambda_h, self.config.lambdas_w)

    def forward(self) -> tuple[list[Tensor], list[Tensor], Tensor]:  # type: ignore[override]
        return forward(self.h1, list(self.weights))


def layer_metrics(h1: Tensor, weights: Sequence[Tensor], labels: Tensor, num_classes: int) -> list[dict[str, Any]]:
    """DNC metrics at every layer of a DUFM, in float64.

    One entry per (layer, stage): layer 1 stage ``"free"`` (H1, with ``W_1``); for l = 2..L stage ``"pre"``
    (``H̃_l``) and ``"post"`` (``H_l``, with ``W_l``). Each entry holds ``layer``, ``stage`` and the keys of
    :func:`deepcollapse.metrics.dnc_metrics`; ``nc3_span`` is W_l's alignment with the means of its input H_l.
    """
    with torch.no_grad():
        pre, post, _ = forward(h1, weights)
        rows: list[dict[str, Any]] = []
        rows.append({"layer": 1, "stage": "free", **M.dnc_metrics(h1.T, labels, num_classes, weight=weights[0])})
        for i, z in enumerate(pre):
            layer = i + 2
            rows.append({"layer": layer, "stage": "pre", **M.dnc_metrics(z.T, labels, num_classes)})
            rows.append(
                {
                    "layer": layer,
                    "stage": "post",
                    **M.dnc_metrics(post[i].T, labels, num_classes, weight=weights[layer - 1]),
                }
            )
    return rows
