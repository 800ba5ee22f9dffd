"""MobileNetV2 and MobileNetV3-Small with torchvision's module names (``features.1.conv``).

Reference: Sandler et al., "MobileNetV2: Inverted Residuals and Linear Bottlenecks", CVPR
2018; Howard et al., "Searching for MobileNetV3", ICCV 2019.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from normlab.bench.zoo._blocks import (
    ConvNormActivation,
    NormLayer,
    SqueezeExcitation,
    init_weights,
    make_divisible,
    model_norm_layer,
    residual_add,
)


def _init_mobile(model: nn.Module) -> None:
    init_weights(model, _he_fan_out, linear_std=0.01)


def _he_fan_out(conv: nn.Conv2d) -> None:
    nn.init.kaiming_normal_(conv.weight, mode="fan_out")
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand ×t (BN, ReLU6; absent for t = 1) → 3x3 depthwise
    (BN, ReLU6) → 1x1 project → BN with no activation (the linear bottleneck); ``x +``
    when stride is 1 and the width is kept, with no activation after the add."""

    def __init__(
        self,
        inp: int,
        oup: int,
        stride: int,
        expand_ratio: int,
        *,
        norm_layer: NormLayer,
        inplace: bool = True,
    ) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride}")
        self.stride = stride
        hidden = round(inp * expand_ratio)
        self.use_res_connect = stride == 1 and inp == oup
        layers: list[nn.Module] = []
        cna = functools.partial(
            ConvNormActivation, norm_layer=norm_layer, activation=nn.ReLU6, inplace=inplace
        )
        if expand_ratio != 1:
            layers.append(cna(inp, hidden, kernel_size=1))
        layers += [
            cna(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, oup, 1, 1, 0, bias=False),
            norm_layer(oup),
        ]
        self.conv = nn.Sequential(*layers)
        self.out_channels = oup

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_res_connect:
            return x + self.conv(x)  # torchvision's add is out-of-place here
        return self.conv(x)


class MobileNetV2(nn.Module):
    """``features`` (3x3/2 stem, 17 inverted residuals, 1x1 to 1280, all ReLU6), global
    average pool, ``classifier`` = Dropout(0.2), Linear. (N, 3, H, W) → (N, num_classes)."""

    # expansion t, output channels c, repeats n, first stride s (Sandler et al., Table 2)
    SETTING = (
        (1, 16, 1, 1),
        (6, 24, 2, 2),
        (6, 32, 3, 2),
        (6, 64, 4, 2),
        (6, 96, 3, 1),
        (6, 160, 3, 2),
        (6, 320, 1, 1),
    )

    def __init__(
        self,
        *,
        num_classes: int = 1000,
        width_mult: float = 1.0,
        norm_layer: NormLayer | None = None,
        inplace: bool = True,
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        norm_layer = model_norm_layer(num_classes, norm_layer)
        cna = functools.partial(
            ConvNormActivation, norm_layer=norm_layer, activation=nn.ReLU6, inplace=inplace
        )
        width = make_divisible(32 * width_mult)
        self.last_channel = make_divisible(1280 * max(1.0, width_mult))
        features: list[nn.Module] = [cna(3, width, stride=2)]
        for t, c, n, s in self.SETTING:
            out = make_divisible(c * width_mult)
            for i in range(n):
                features.append(
                    InvertedResidual(
                        width,
                        out,
                        s if i == 0 else 1,
                        t,
                        norm_layer=norm_layer,
                        inplace=inplace,
                    )
                )
                width = out
        features.append(cna(width, self.last_channel, kernel_size=1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(
            nn.Dropout(dropout), nn.Linear(self.last_channel, num_classes)
        )
        _init_mobile(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.adaptive_avg_pool2d(self.features(x), (1, 1))
        return self.classifier(torch.flatten(x, 1))


def mobilenet_v2(
    *,
    num_classes: int = 1000,
    norm_layer: NormLayer | None = None,
    inplace: bool = True,
    width_mult: float = 1.0,
) -> MobileNetV2:
    """MobileNetV2 (Sandler et al. 2018), width multiplier 1.0 by default."""
    return MobileNetV2(
        num_classes=num_classes, width_mult=width_mult, norm_layer=norm_layer, inplace=inplace
    )


# --- MobileNetV3-Small -----------------------------------------------------------------


class InvertedResidualV3(nn.Module):
    """MobileNetV3 block, children of ``block``: 1x1 expand (if the width changes) →
    k×k depthwise → optional SE (squeeze to make_divisible(expanded/4), ReLU,
    hardsigmoid gate) → 1x1 project + BN with no activation; ``+= x`` when stride is 1
    and the width is kept. Activation: ReLU or hardswish per block."""

    def __init__(
        self,
        inp: int,
        kernel: int,
        expanded: int,
        out: int,
        use_se: bool,
        use_hs: bool,
        stride: int,
        *,
        norm_layer: NormLayer,
        inplace: bool = True,
    ) -> None:
        super().__init__()
        self.use_res_connect = stride == 1 and inp == out
        self.inplace = inplace
        act = nn.Hardswish if use_hs else nn.ReLU
        cna = functools.partial(ConvNormActivation, norm_layer=norm_layer, inplace=inplace)
        layers: list[nn.Module] = []
        if expanded != inp:
            layers.append(cna(inp, expanded, kernel_size=1, activation=act))
        layers.append(
            cna(
                expanded,
                expanded,
                kernel_size=kernel,
                stride=stride,
                groups=expanded,
                activation=act,
            )
        )
        if use_se:
            layers.append(
                SqueezeExcitation(
                    expanded, make_divisible(expanded // 4), scale_activation=nn.Hardsigmoid
                )
            )
        layers.append(cna(expanded, out, kernel_size=1, activation=None))
        self.block = nn.Sequential(*layers)
        self.out_channels = out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.block(x)
        if self.use_res_connect:
            result = residual_add(result, x, self.inplace)
        return result


class MobileNetV3(nn.Module):
    """``features`` (3x3/2 stem with hardswish, the blocks, 1x1 to 6× the last width with
    hardswish), global average pool, ``classifier`` = Linear, hardswish, Dropout(0.2),
    Linear. (N, 3, H, W) → (N, num_classes)."""

    # input, kernel, expanded, output, SE, hardswish, stride (Howard et al., Table 2)
    SMALL = (
        (16, 3, 16, 16, True, False, 2),
        (16, 3, 72, 24, False, False, 2),
        (24, 3, 88, 24, False, False, 1),
        (24, 5, 96, 40, True, True, 2),
        (40, 5, 240, 40, True, True, 1),
        (40, 5, 240, 40, True, True, 1),
        (40, 5, 120, 48, True, True, 1),
        (48, 5, 144, 48, True, True, 1),
        (48, 5, 288, 96, True, True, 2),
        (96, 5, 576, 96, True, True, 1),
        (96, 5, 576, 96, True, True, 1),
    )

    def __init__(
        self,
        setting: tuple[tuple[int, int, int, int, bool, bool, int], ...],
        last_channel: int,
        *,
        num_classes: int = 1000,
        norm_layer: NormLayer | None = None,
        inplace: bool = True,
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        norm_layer = model_norm_layer(
            num_classes, norm_layer, functools.partial(nn.BatchNorm2d, eps=1e-3, momentum=0.01)
        )
        cna = functools.partial(ConvNormActivation, norm_layer=norm_layer, inplace=inplace)
        features: list[nn.Module] = [cna(3, setting[0][0], stride=2, activation=nn.Hardswish)]
        for cfg in setting:
            features.append(InvertedResidualV3(*cfg, norm_layer=norm_layer, inplace=inplace))
        last_in = setting[-1][3]
        features.append(cna(last_in, 6 * last_in, kernel_size=1, activation=nn.Hardswish))
        self.features = nn.Sequential(*features)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Linear(6 * last_in, last_channel),
            nn.Hardswish(inplace=inplace),
            nn.Dropout(dropout, inplace=inplace),
            nn.Linear(last_channel, num_classes),
        )
        _init_mobile(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def mobilenet_v3_small(
    *, num_classes: int = 1000, norm_layer: NormLayer | None = None, inplace: bool = True
) -> MobileNetV3:
    """MobileNetV3-Small (Howard et al. 2019), width multiplier 1.0. ``norm_layer``
    defaults to BatchNorm2d with ``eps=1e-3, momentum=0.01`` (torchvision's)."""
    return MobileNetV3(
        MobileNetV3.SMALL, 1024, num_classes=num_classes, norm_layer=norm_layer, inplace=inplace
    )
