"""RegNetY-400MF with torchvision's module names (``trunk_output.block1.block1-0.f.a``).

Reference: Radosavovic et al., "Designing Network Design Spaces", CVPR 2020.
"""

from __future__ import annotations

import functools
import math
from collections import OrderedDict

import torch
from torch import nn

from normlab.bench.zoo._blocks import (
    ConvNormActivation,
    NormLayer,
    SqueezeExcitation,
    init_weights,
    make_divisible,
    model_norm_layer,
)


def regnet_stages(
    depth: int, w_0: int, w_a: float, w_m: float, group_width: int
) -> list[tuple[int, int, int]]:
    """Per-stage (width, depth, group width) of a RegNet from its design parameters
    (Radosavovic et al. 2020, Sec. 3.3): block widths u_j = w_0 + w_a·j, quantised in log
    space to w_0·w_m^round(log(u_j/w_0)/log(w_m)) and to multiples of 8; consecutive equal
    widths form a stage; each width is then made a multiple of its group width."""
    if w_a < 0 or w_0 <= 0 or w_m <= 1 or w_0 % 8:
        raise ValueError(
            f"RegNet needs w_a >= 0, w_0 > 0 a multiple of 8 and w_m > 1; got "
            f"w_0={w_0}, w_a={w_a}, w_m={w_m}"
        )
    widths = []
    for j in range(depth):
        k = round(math.log((w_0 + w_a * j) / w_0) / math.log(w_m))
        widths.append(round(w_0 * w_m**k / 8) * 8)
    stages: list[list[int]] = []  # [width, depth]
    for w in widths:
        if stages and stages[-1][0] == w:
            stages[-1][1] += 1
        else:
            stages.append([w, 1])
    out = []
    for w, d in stages:
        g = min(group_width, w)
        out.append((make_divisible(w, g), d, g))
    return out


class ResBottleneckBlock(nn.Module):
    """RegNetY block: ``act(proj(x) + f(x))``, f = ``a`` 1x1 → ``b`` 3x3 grouped (stride
    here) → ``se`` (squeeze to se_ratio × the block's input width, ReLU, sigmoid) → ``c``
    1x1 + BN with no activation; ``proj`` (1x1 + BN) where the shape changes."""

    def __init__(
        self,
        width_in: int,
        width_out: int,
        stride: int,
        group_width: int,
        se_ratio: float,
        *,
        norm_layer: NormLayer,
        inplace: bool = True,
    ) -> None:
        super().__init__()
        cna = functools.partial(ConvNormActivation, norm_layer=norm_layer, inplace=inplace)
        self.proj = None
        if width_in != width_out or stride != 1:
            self.proj = cna(width_in, width_out, kernel_size=1, stride=stride, activation=None)
        f: OrderedDict[str, nn.Module] = OrderedDict()
        f["a"] = cna(width_in, width_out, kernel_size=1, activation=nn.ReLU)
        f["b"] = cna(
            width_out, width_out, stride=stride, groups=width_out // group_width, activation=nn.ReLU
        )
        f["se"] = SqueezeExcitation(width_out, round(se_ratio * width_in))
        f["c"] = cna(width_out, width_out, kernel_size=1, activation=None)
        self.f = nn.Sequential(f)
        self.activation = nn.ReLU(inplace=inplace)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.proj is None else self.proj(x)
        return self.activation(shortcut + self.f(x))


class RegNet(nn.Module):
    """``stem`` (3x3/2 conv to 32, BN, ReLU), ``trunk_output.block{i}`` stages of
    ``block{i}-{j}`` blocks (stride 2 on each stage's first), global average pool, ``fc``.
    (N, 3, H, W) → (N, num_classes)."""

    def __init__(
        self,
        stages: list[tuple[int, int, int]],
        *,
        se_ratio: float = 0.25,
        stem_width: int = 32,
        num_classes: int = 1000,
        norm_layer: NormLayer | None = None,
        inplace: bool = True,
    ) -> None:
        super().__init__()
        norm_layer = model_norm_layer(num_classes, norm_layer)
        self.stem = ConvNormActivation(
            3, stem_width, stride=2, norm_layer=norm_layer, activation=nn.ReLU, inplace=inplace
        )
        trunk: OrderedDict[str, nn.Module] = OrderedDict()
        width = stem_width
        for i, (w, d, g) in enumerate(stages, start=1):
            blocks: OrderedDict[str, nn.Module] = OrderedDict()
            for j in range(d):
                blocks[f"block{i}-{j}"] = ResBottleneckBlock(
                    width if j == 0 else w,
                    w,
                    2 if j == 0 else 1,
                    g,
                    se_ratio,
                    norm_layer=norm_layer,
                    inplace=inplace,
                )
            trunk[f"block{i}"] = nn.Sequential(blocks)
            width = w
        self.trunk_output = nn.Sequential(trunk)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(width, num_classes)
        init_weights(self, _he_normal_fan_out, norms=(nn.BatchNorm2d,), linear_std=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.trunk_output(self.stem(x)))
        return self.fc(x.flatten(start_dim=1))


def regnet_small(
    *, num_classes: int = 1000, norm_layer: NormLayer | None = None, inplace: bool = True
) -> RegNet:
    """RegNetY-400MF (Radosavovic et al. 2020): depth 16, w_0 = 48, w_a = 27.89,
    w_m = 2.09, group width 8, SE ratio 0.25 — stages (48, 1), (104, 3), (208, 6),
    (440, 6)."""
    return RegNet(
        regnet_stages(16, 48, 27.89, 2.09, 8),
        se_ratio=0.25,
        num_classes=num_classes,
        norm_layer=norm_layer,
        inplace=inplace,
    )


def _he_normal_fan_out(conv: nn.Conv2d) -> None:
    # pycls's init: N(0, 2 / fan_out) with fan_out = k_h · k_w · out_channels
    fan_out = conv.kernel_size[0] * conv.kernel_size[1] * conv.out_channels
    nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / fan_out))
