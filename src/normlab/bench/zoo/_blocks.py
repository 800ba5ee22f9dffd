"""Pieces every zoo architecture is built from: the norm-layer default, the residual add,
channel rounding, Conv-Norm-Activation, squeeze-and-excitation, and the weight init loop.

Reference: Hu et al., "Squeeze-and-Excitation Networks", CVPR 2018.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

NormLayer = Callable[[int], nn.Module]


def model_norm_layer(
    num_classes: int, norm_layer: NormLayer | None, default: NormLayer = nn.BatchNorm2d
) -> NormLayer:
    """The keywords every zoo model takes: check ``num_classes`` and return the norm layer
    to build with (``default`` when ``norm_layer`` is None)."""
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    return default if norm_layer is None else norm_layer


def residual_add(out: torch.Tensor, identity: torch.Tensor, inplace: bool) -> torch.Tensor:
    # torchvision adds in place (`out += identity`), which saves one activation-sized
    # allocation; out-of-place is for norm layers whose output may not be modified.
    if inplace:
        out += identity
        return out
    return out + identity


def init_weights(
    model: nn.Module,
    conv: Callable[[nn.Conv2d], None],
    *,
    norms: tuple[type[nn.Module], ...] = (nn.BatchNorm2d, nn.GroupNorm),
    linear_std: float | None = None,
) -> None:
    """Initialise as the reference implementations do: ``conv(m)`` for every Conv2d, weight
    1 and bias 0 for every ``norms`` layer, and (when ``linear_std`` is given) N(0,
    linear_std²) weights and zero bias for every Linear. One pass over ``model.modules()``
    in registration order, so each weight draws the same random numbers as torchvision's
    loop would."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            conv(m)
        elif isinstance(m, norms):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif linear_std is not None and isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, linear_std)
            nn.init.zeros_(m.bias)


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round ``value`` to the nearest multiple of ``divisor`` (at least ``min_value``,
    default ``divisor``), going up a step if rounding lost more than 10 % — the channel
    rounding of the MobileNet and RegNet reference implementations."""
    floor = divisor if min_value is None else min_value
    rounded = max(floor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


class ConvNormActivation(nn.Sequential):
    """Conv2d (no bias) → norm → optional activation, as children ``0``, ``1``, ``2``
    (torchvision's ``Conv2dNormActivation`` keys). Padding keeps the size at stride 1."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        groups: int = 1,
        *,
        norm_layer: NormLayer,
        activation: Callable[..., nn.Module] | None,
        inplace: bool = True,
    ) -> None:
        layers: list[nn.Module] = [
            nn.Conv2d(
                in_channels,
                out_channels,
                kernel_size,
                stride,
                (kernel_size - 1) // 2,
                groups=groups,
                bias=False,
            ),
            norm_layer(out_channels),
        ]
        if activation is not None:
            layers.append(activation(inplace=inplace))
        super().__init__(*layers)
        self.out_channels = out_channels


class SqueezeExcitation(nn.Module):
    """Channel attention (Hu et al. 2018): ``x * gate(fc2(act(fc1(mean_hw(x)))))``.
    ``fc1``/``fc2`` are 1x1 convolutions with bias; (N, C, H, W) → (N, C, H, W)."""

    def __init__(
        self,
        channels: int,
        squeeze_channels: int,
        activation: Callable[..., nn.Module] = nn.ReLU,
        scale_activation: Callable[..., nn.Module] = nn.Sigmoid,
    ) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze_channels, 1)
        self.fc2 = nn.Conv2d(squeeze_channels, channels, 1)
        self.activation = activation()
        self.scale_activation = scale_activation()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x)))))
        return scale * x
