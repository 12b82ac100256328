"""Backbones and the DUFM head: shapes, the head equals the DUFM forward, bad input."""

from __future__ import annotations

import pytest
import torch

from deepcollapse._validate import DeepCollapseError
from deepcollapse.dufm.model import forward as dufm_forward
from deepcollapse.nets.models import DUFMHead, NetConfig, build_net


@pytest.mark.parametrize(
    ("backbone", "shape"),
    [("mlp", (40,)), ("mlp", (1, 8, 8)), ("cnn", (1, 28, 28)), ("cnn", (1, 8, 8)), ("resnet20", (3, 32, 32))],
)
def test_shapes(backbone: str, shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    cfg = NetConfig(backbone=backbone, feature_dim=12, head_layers=3, head_width=10, mlp_width=16, cnn_channels=4)
    net = build_net(cfg, input_shape=shape, num_classes=5)
    h1, hidden, out = net(torch.randn(3, *shape))
    assert h1.shape == (3, 12) and out.shape == (3, 5)
    assert [tuple(h.shape) for h in hidden] == [(3, 10), (3, 10)]
    assert [tuple(w.shape) for w in net.head.weights()] == [(10, 12), (10, 10), (5, 10)]
    assert all(lin.bias is None for lin in net.head.layers)  # bias-free by default


def test_head_is_the_dufm_forward() -> None:
    torch.manual_seed(0)
    head = DUFMHead(6, width=5, num_layers=4, num_classes=3).double()
    h1 = torch.randn(7, 6, dtype=torch.float64)
    hidden, out = head(h1)
    _, post, ref = dufm_forward(h1.T, head.weights())
    torch.testing.assert_close(out, ref.T)
    for h, p in zip(hidden, post, strict=True):
        torch.testing.assert_close(h, p.T)


def test_resnet20_size() -> None:
    net = build_net(NetConfig(backbone="resnet20", head_layers=1), input_shape=(3, 32, 32), num_classes=10)
    n = sum(p.numel() for p in net.backbone.parameters())
    assert 0.26e6 < n < 0.30e6  # ResNet20 has ~0.27M parameters


def test_bad_config() -> None:
    with pytest.raises(DeepCollapseError, match="unknown backbone 'vit'"):
        NetConfig(backbone="vit")
    with pytest.raises(DeepCollapseError, match="head_layers must be >= 1"):
        NetConfig(head_layers=0)
    with pytest.raises(DeepCollapseError, match="needs images"):
        build_net(NetConfig(backbone="cnn"), input_shape=(40,), num_classes=2)
