"""ResNet-18 and ResNet-50 v1.5 with torchvision's module names (``conv1``, ``layer1.0.bn1``).

Reference: He et al., "Deep Residual Learning for Image Recognition", CVPR 2016; Goyal et
al., "Accurate, Large Minibatch SGD: Training ImageNet in 1 Hour", 2017 (zero-init residual).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from normlab.bench.zoo._blocks import (
    NormLayer,
    init_weights,
    model_norm_layer,
    residual_add,
)

ACTIVATIONS = ("relu", "leaky_relu")


def _conv3x3(in_planes: int, out_planes: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 3, stride, 1, groups=groups, bias=False)


def _conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 1, stride, bias=False)


def _resnet_activation(activation: str, inplace: bool, negative_slope: float) -> nn.Module:
    if activation == "relu":
        return nn.ReLU(inplace=inplace)
    if activation == "leaky_relu":
        return nn.LeakyReLU(negative_slope, inplace=inplace)
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


class _ResidualBlock(nn.Module):
    """What both ResNet blocks are: ``act(branch(x) + shortcut(x))``, the shortcut being
    ``downsample`` where the shape changes. A block builds its branch's modules (in
    torchvision's registration order, activation ``relu`` included) in ``_build`` and
    runs the branch, up to its last norm, in ``_branch``."""

    expansion = 1

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        *,
        norm_layer: NormLayer,
        activation: str = "relu",
        negative_slope: float = 0.01,
        inplace: bool = True,
    ) -> None:
        super().__init__()
        self._build(
            inplanes,
            planes,
            stride,
            norm_layer,
            lambda: _resnet_activation(activation, inplace, negative_slope),
        )
        self.downsample = downsample
        self.stride = stride
        self.inplace = inplace

    def _build(
        self,
        inplanes: int,
        planes: int,
        stride: int,
        norm_layer: NormLayer,
        act: Callable[[], nn.Module],
    ) -> None:
        raise NotImplementedError

    def _branch(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(residual_add(self._branch(x), identity, self.inplace))


class BasicBlock(_ResidualBlock):
    """``relu(bn2(conv2(relu(bn1(conv1(x))))) + downsample(x))``: two 3x3 convolutions,
    stride on the first."""

    expansion = 1

    def _build(self, inplanes, planes, stride, norm_layer, act) -> None:
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = norm_layer(planes)
        self.relu = act()
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = norm_layer(planes)

    def _branch(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self.bn2(self.conv2(out))


class Bottleneck(_ResidualBlock):
    """1x1 → 3x3 (stride here: ResNet v1.5, as torchvision) → 1x1 expanding ×4, residual
    add, then the activation."""

    expansion = 4

    def _build(self, inplanes, planes, stride, norm_layer, act) -> None:
        self.conv1 = _conv1x1(inplanes, planes)
        self.bn1 = norm_layer(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = norm_layer(planes)
        self.conv3 = _conv1x1(planes, planes * self.expansion)
        self.bn3 = norm_layer(planes * self.expansion)
        self.relu = act()

    def _branch(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.bn3(self.conv3(out))


class ResNet(nn.Module):
    """Stem (7x7/2 conv, BN, activation, 3x3/2 max pool), four stages ``layer1..4`` of
    ``block`` with 64·2^i planes (stride 2 from the second; a 1x1 conv + BN
    ``downsample`` where the shape changes), global average pool, ``fc``.
    (N, 3, H, W) → (N, num_classes)."""

    def __init__(
        self,
        block: type[BasicBlock | Bottleneck],
        layers: tuple[int, int, int, int],
        *,
        num_classes: int = 1000,
        norm_layer: NormLayer | None = None,
        activation: str = "relu",
        negative_slope: float = 0.01,
        inplace: bool = True,
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        norm_layer = model_norm_layer(num_classes, norm_layer)
        block_kw = dict(
            norm_layer=norm_layer,
            activation=activation,
            negative_slope=negative_slope,
            inplace=inplace,
        )
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = norm_layer(64)
        self.relu = _resnet_activation(activation, inplace, negative_slope)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        for i, blocks in enumerate(layers):
            planes, stride = 64 * 2**i, 1 if i == 0 else 2
            downsample = None
            if stride != 1 or self.inplanes != planes * block.expansion:
                downsample = nn.Sequential(
                    _conv1x1(self.inplanes, planes * block.expansion, stride),
                    norm_layer(planes * block.expansion),
                )
            stage = [block(self.inplanes, planes, stride, downsample, **block_kw)]
            self.inplanes = planes * block.expansion
            stage += [block(self.inplanes, planes, **block_kw) for _ in range(1, blocks)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*stage))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)

        gain_for = "leaky_relu" if activation == "leaky_relu" else "relu"
        init_weights(
            self,
            lambda m: nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity=gain_for),
        )
        if zero_init_residual:  # Goyal et al. 2017: each residual branch starts at zero
            for m in self.modules():
                last = m.bn3 if isinstance(m, Bottleneck) else getattr(m, "bn2", None)
                if isinstance(m, (BasicBlock, Bottleneck)) and last.weight is not None:
                    nn.init.zeros_(last.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _preset(name: str, block: type[_ResidualBlock], layers: tuple[int, int, int, int], doc: str):
    """A builder ``name(*, num_classes, norm_layer, activation, inplace,
    zero_init_residual) -> ResNet`` for one depth: the signature is written once."""

    def builder(
        *,
        num_classes: int = 1000,
        norm_layer: NormLayer | None = None,
        activation: str = "relu",
        inplace: bool = True,
        zero_init_residual: bool = False,
    ) -> ResNet:
        return ResNet(
            block,
            layers,
            num_classes=num_classes,
            norm_layer=norm_layer,
            activation=activation,
            inplace=inplace,
            zero_init_residual=zero_init_residual,
        )

    builder.__name__ = builder.__qualname__ = name
    builder.__doc__ = doc
    return builder


resnet18 = _preset(
    "resnet18",
    BasicBlock,
    (2, 2, 2, 2),
    """ResNet-18 (He et al. 2016). ``activation='leaky_relu'`` swaps every ReLU for
    ``LeakyReLU(0.01)`` (and the init gain to match).""",
)
resnet50 = _preset(
    "resnet50",
    Bottleneck,
    (3, 4, 6, 3),
    """ResNet-50 v1.5 (He et al. 2016; stride on the 3x3 as torchvision).""",
)
