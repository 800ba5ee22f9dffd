"""The small ResNet-style model every tool test uses, and a few helpers around it."""

from __future__ import annotations

import torch
from torch import nn

import normlab as nl

BN_KINDS = {"torch": nn.BatchNorm2d, "normlab": nl.nn.BatchNorm2d}


class Block(nn.Module):
    """conv-BN-ReLU-conv-BN plus the identity, then ReLU (He et al. 2016, basic block)."""

    def __init__(self, c: int, bn: type) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = bn(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = bn(c)

    def forward(self, x):  # (N, C, H, W) -> (N, C, H, W)
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(x + self.bn2(self.conv2(y)))


class SmallResNet(nn.Module):
    """stem conv-BN-ReLU, ``blocks`` residual blocks, global average pool, Linear."""

    def __init__(self, bn: type = nn.BatchNorm2d, c: int = 6, blocks: int = 2, classes: int = 5):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1), bn(c), nn.ReLU())
        self.blocks = nn.Sequential(*[Block(c, bn) for _ in range(blocks)])
        self.head = nn.Linear(c, classes)

    def forward(self, x):  # (N, 3, H, W) -> (N, classes)
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


def images(n: int = 8, size: int = 6, seed: int = 0, shift: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g) * 1.5 + 0.5 + shift


def bn_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def small_resnet(kind: str = "torch", seed: int = 0, **kw) -> SmallResNet:
    """A SmallResNet with non-trivial γ, β and running statistics (a few training steps
    of forward passes), returned in eval mode."""
    torch.manual_seed(seed)
    model = SmallResNet(BN_KINDS[kind], **kw)
    with torch.no_grad():
        for m in bn_layers(model):
            m.weight.uniform_(0.5, 1.5)
            m.bias.uniform_(-0.5, 0.5)
        model.train()
        for i in range(3):
            model(images(16, seed=100 + i))
    return model.eval()


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer, cloned (for bit-identity checks)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
