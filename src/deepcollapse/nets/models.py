r"""Backbones and the MLP "DUFM head" (docs/real-networks.md).

A network is ``backbone -> H1 -> head``. The backbone (MLP, small CNN or CIFAR ResNet20) maps an input to
``d_1`` features, the rows of ``H_1^T``; it ends with a linear layer, so ``H1`` is unconstrained in sign like
the DUFM's free features. The head is the DUFM itself, applied to rows:

.. math::

    h_{l+1} = σ(W_l h_l)\ (l = 1..L-1), \qquad \text{output} = W_L h_L,

with ``W_l`` of shape ``(d_{l+1}, d_l)``, ``d_2 = … = d_L = `` ``head_width``, ``d_{L+1} = K``, ReLU ``σ``
and no biases by default. :meth:`DUFMHead.weights` returns ``[W_1..W_L]`` in the layout of
:func:`deepcollapse.dufm.objective`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from deepcollapse._validate import DeepCollapseError, check_positive_int

__all__ = [
    "BACKBONES",
    "CNNBackbone",
    "DUFMHead",
    "DUFMNet",
    "MLPBackbone",
    "NetConfig",
    "ResNet20Backbone",
    "build_net",
]

BACKBONES = ("mlp", "cnn", "resnet20")


@dataclass
class NetConfig:
    """Architecture of backbone + DUFM head. Saved in ``config.json`` and every checkpoint."""

    backbone: str = "mlp"  # one of BACKBONES
    feature_dim: int = 64  # d_1: the backbone's output (H1) dimension
    head_layers: int = 3  # L: weight matrices in the head (L = 1: a linear classifier on H1)
    head_width: int = 64  # d_2..d_L
    head_bias: bool = False  # the DUFM has none; the theory comparison needs bias-free heads
    mlp_width: int = 256  # hidden width of the MLP backbone
    mlp_depth: int = 2  # hidden layers of the MLP backbone
    cnn_channels: int = 16  # channels of the CNN's first block (doubled in the second)

    def __post_init__(self) -> None:
        if self.backbone not in BACKBONES:
            raise DeepCollapseError(f"unknown backbone {self.backbone!r}; choose one of {', '.join(BACKBONES)}")
        for name in ("feature_dim", "head_layers", "head_width", "mlp_width", "cnn_channels"):
            setattr(self, name, check_positive_int(name, getattr(self, name)))
        self.mlp_depth = check_positive_int("mlp_depth", self.mlp_depth, minimum=0)
        self.head_bias = bool(self.head_bias)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class MLPBackbone(nn.Module):
    """``x -> [Linear -> ReLU] x depth -> Linear -> H1`` on the flattened input."""

    def __init__(self, in_dim: int, *, width: int, depth: int, out_dim: int) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        d = in_dim
        for _ in range(depth):
            layers += [nn.Linear(d, width), nn.ReLU()]
            d = width
        layers.append(nn.Linear(d, out_dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def _conv_bn(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out))


class CNNBackbone(nn.Module):
    """Three blocks ``Conv3x3 -> BN -> ReLU -> MaxPool2`` (``c``, ``2c``, ``4c`` channels), global average
    pooling, then ``Linear(4c, d_1) -> H1``.

    Pooling before the projection keeps its input small, so the penalty ``λ_H1 N ||h1||²`` stays well
    conditioned (a projection from the flattened map made SGD diverge at the same learning rate).
    """

    def __init__(self, in_shape: tuple[int, ...], *, channels: int, out_dim: int) -> None:
        super().__init__()
        if len(in_shape) != 3:
            raise DeepCollapseError(
                f"the cnn backbone needs images (C, H, W), got input shape {tuple(in_shape)}; use --backbone mlp"
            )
        c = channels
        self.features = nn.Sequential(
            _conv_bn(in_shape[0], c), nn.ReLU(), nn.MaxPool2d(2, ceil_mode=True),
            _conv_bn(c, 2 * c), nn.ReLU(), nn.MaxPool2d(2, ceil_mode=True),
            _conv_bn(2 * c, 4 * c), nn.ReLU(), nn.MaxPool2d(2, ceil_mode=True),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )  # fmt: skip
        self.proj = nn.Linear(4 * c, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(self.features(x))


class _BasicBlock(nn.Module):
    """ResNet basic block: ``relu(bn(conv(relu(bn(conv(x))))) + shortcut(x))``, 1x1-conv shortcut on change."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(_conv_bn(c_in, c_out, stride), nn.ReLU(), _conv_bn(c_out, c_out))
        self.short: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.short = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(self.body(x) + self.short(x))


class ResNet20Backbone(nn.Module):
    """CIFAR ResNet20 (He et al. 2016): conv 16, three stages of 3 basic blocks (16, 32, 64 channels,
    strides 1, 2, 2), global average pool, then ``Linear(64, d_1) -> H1``."""

    def __init__(self, in_shape: tuple[int, ...], *, out_dim: int, blocks: int = 3) -> None:
        super().__init__()
        if len(in_shape) != 3:
            raise DeepCollapseError(
                f"the resnet20 backbone needs images (C, H, W), got input shape {tuple(in_shape)}; use --backbone mlp"
            )
        layers: list[nn.Module] = [_conv_bn(in_shape[0], 16), nn.ReLU()]
        c = 16
        for c_out, stride in ((16, 1), (32, 2), (64, 2)):
            for b in range(blocks):
                layers.append(_BasicBlock(c, c_out, stride if b == 0 else 1))
                c = c_out
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.features = nn.Sequential(*layers)
        self.proj = nn.Linear(64, out_dim)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(self.features(x))


class DUFMHead(nn.Module):
    """The L-layer MLP head: ``h_{l+1} = relu(W_l h_l)``, ``out = W_L h_L`` (rows are samples).

    Weights start as ``N(0, 2/d_l)`` (He init: the signal keeps its scale through the ReLUs); biases
    (``bias=True`` only) at zero. A small init (PyTorch's default) starts near the all-zero solution, which is
    a local minimum of the DUFM for L >= 2, and with K = 10 training stayed there.
    """

    def __init__(self, in_dim: int, *, width: int, num_layers: int, num_classes: int, bias: bool = False) -> None:
        super().__init__()
        dims = [in_dim] + [width] * (num_layers - 1) + [num_classes]
        self.layers = nn.ModuleList(nn.Linear(a, b, bias=bias) for a, b in zip(dims[:-1], dims[1:], strict=True))
        for lin in self.layers:
            nn.init.normal_(lin.weight, std=math.sqrt(2.0 / lin.in_features))
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def weights(self) -> list[Tensor]:
        """``[W_1, …, W_L]`` with ``W_l`` of shape ``(d_{l+1}, d_l)``."""
        return [lin.weight for lin in self.layers]

    def forward(self, h1: Tensor) -> tuple[list[Tensor], Tensor]:
        """``([h_2, …, h_L], out)`` for input rows ``h1`` (post-ReLU features of the hidden head layers)."""
        hidden: list[Tensor] = []
        h = h1
        for lin in self.layers[:-1]:
            h = torch.relu(lin(h))
            hidden.append(h)
        return hidden, self.layers[-1](h)


class DUFMNet(nn.Module):
    """``backbone -> H1 -> DUFMHead``. ``forward`` returns ``(h1, [h_2..h_L], out)``."""

    def __init__(self, backbone: nn.Module, head: DUFMHead) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor], Tensor]:
        h1 = self.backbone(x)
        hidden, out = self.head(h1)
        return h1, hidden, out


def build_net(config: NetConfig, *, input_shape: tuple[int, ...], num_classes: int) -> DUFMNet:
    """The network described by ``config`` for inputs of ``input_shape`` (no batch axis) and K classes."""
    num_classes = check_positive_int("num_classes", num_classes, minimum=2)
    d1 = config.feature_dim
    if config.backbone == "mlp":
        backbone: nn.Module = MLPBackbone(
            math.prod(input_shape), width=config.mlp_width, depth=config.mlp_depth, out_dim=d1
        )
    elif config.backbone == "cnn":
        backbone = CNNBackbone(tuple(input_shape), channels=config.cnn_channels, out_dim=d1)
    elif config.backbone == "resnet20":
        backbone = ResNet20Backbone(tuple(input_shape), out_dim=d1)
    else:  # pragma: no cover - NetConfig validates
        raise DeepCollapseError(f"unknown backbone {config.backbone!r}")
    head = DUFMHead(
        d1, width=config.head_width, num_layers=config.head_layers, num_classes=num_classes, bias=config.head_bias
    )
    return DUFMNet(backbone, head)
