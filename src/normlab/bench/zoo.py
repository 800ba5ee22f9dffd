"""torchvision-style image classifiers, written here so that torchvision is not needed.

The builders reproduce torchvision's architectures and module names, so ``state_dict``
keys read like torchvision's (``conv1.weight``, ``layer1.0.bn1.running_mean``,
``features.1.conv.0.0.weight``, ``trunk_output.block1.block1-0.f.a.1.weight``) and a
checkpoint of one loads into the other. With torch's BatchNorm every model traces with
:func:`torch.fx.symbolic_trace` (no data-dependent control flow).

=====================  ======================================================  ==========
builder                architecture                                            params*
=====================  ======================================================  ==========
``resnet18``           ResNet-18: BasicBlocks [2, 2, 2, 2]                     11,689,512
``resnet50``           ResNet-50 v1.5: Bottlenecks [3, 4, 6, 3], stride on 3x3 25,557,032
``mobilenet_v2``       MobileNetV2: inverted residuals, ReLU6, linear bottleneck 3,504,872
``mobilenet_v3_small`` MobileNetV3-Small: hardswish, SE with hardsigmoid
``regnet_small``       RegNetY-400MF: grouped 3x3, SE with sigmoid              4,344,144
=====================  ======================================================  ==========

\\* for ``num_classes=1000``, equal to torchvision's ``num_params`` in its weights'
metadata (pytorch.org/vision/stable/models). References: He et al. 2016, "Deep Residual
Learning for Image Recognition"; Sandler et al. 2018, "MobileNetV2: Inverted Residuals
and Linear Bottlenecks"; Howard et al. 2019, "Searching for MobileNetV3"; Radosavovic et
al. 2020, "Designing Network Design Spaces".

Every builder takes keyword-only ``num_classes``, ``norm_layer`` (a callable
``C -> module``; default ``torch.nn.BatchNorm2d``, for MobileNetV3 with torchvision's
``eps=1e-3, momentum=0.01``) and ``inplace``. ``inplace=True`` (torchvision's choice)
makes the activations and the residual additions that torchvision writes in place
(``out += identity``) in-place; ``inplace=False`` makes them out-of-place, for layers
whose outputs must not be modified in place (a custom autograd Function returning a
view). :func:`set_inplace` flips it on a built model. Weights are initialised as
torchvision does (He normal, fan-out, for convolutions; BN weight 1, bias 0).
"""

from __future__ import annotations

import functools
import math
from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import nn

NormLayer = Callable[[int], nn.Module]

ACTIVATIONS = ("relu", "leaky_relu")


def _norm(norm_layer: NormLayer | None, default: NormLayer = nn.BatchNorm2d) -> NormLayer:
    return default if norm_layer is None else norm_layer


def _check_classes(num_classes: int) -> None:
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")


def _add(out: torch.Tensor, identity: torch.Tensor, inplace: bool) -> torch.Tensor:
    # torchvision adds in place (`out += identity`), which saves one activation-sized
    # allocation; out-of-place is for norm layers whose output may not be modified.
    if inplace:
        out += identity
        return out
    return out + identity


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


# --- ResNet ----------------------------------------------------------------------------


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


class BasicBlock(nn.Module):
    """``relu(bn2(conv2(relu(bn1(conv1(x))))) + downsample(x))``: two 3x3 convolutions,
    stride on the first."""

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
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = norm_layer(planes)
        self.relu = _resnet_activation(activation, inplace, negative_slope)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = norm_layer(planes)
        self.downsample = downsample
        self.stride = stride
        self.inplace = inplace

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(_add(out, identity, self.inplace))


class Bottleneck(nn.Module):
    """1x1 → 3x3 (stride here: ResNet v1.5, as torchvision) → 1x1 expanding ×4, residual
    add, then the activation."""

    expansion = 4

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
        self.conv1 = _conv1x1(inplanes, planes)
        self.bn1 = norm_layer(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = norm_layer(planes)
        self.conv3 = _conv1x1(planes, planes * self.expansion)
        self.bn3 = norm_layer(planes * self.expansion)
        self.relu = _resnet_activation(activation, inplace, negative_slope)
        self.downsample = downsample
        self.stride = stride
        self.inplace = inplace

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(_add(out, identity, self.inplace))


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
        _check_classes(num_classes)
        norm_layer = _norm(norm_layer)
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
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity=gain_for)
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:  # Goyal et al. 2017: each residual branch starts at zero
            for m in self.modules():
                last = m.bn3 if isinstance(m, Bottleneck) else getattr(m, "bn2", None)
                if isinstance(m, (BasicBlock, Bottleneck)) and last.weight is not None:
                    nn.init.zeros_(last.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18(
    *,
    num_classes: int = 1000,
    norm_layer: NormLayer | None = None,
    activation: str = "relu",
    inplace: bool = True,
    zero_init_residual: bool = False,
) -> ResNet:
    """ResNet-18 (He et al. 2016). ``activation='leaky_relu'`` swaps every ReLU for
    ``LeakyReLU(0.01)`` (and the init gain to match)."""
    return ResNet(
        BasicBlock,
        (2, 2, 2, 2),
        num_classes=num_classes,
        norm_layer=norm_layer,
        activation=activation,
        inplace=inplace,
        zero_init_residual=zero_init_residual,
    )


def resnet50(
    *,
    num_classes: int = 1000,
    norm_layer: NormLayer | None = None,
    activation: str = "relu",
    inplace: bool = True,
    zero_init_residual: bool = False,
) -> ResNet:
    """ResNet-50 v1.5 (He et al. 2016; stride on the 3x3 as torchvision)."""
    return ResNet(
        Bottleneck,
        (3, 4, 6, 3),
        num_classes=num_classes,
        norm_layer=norm_layer,
        activation=activation,
        inplace=inplace,
        zero_init_residual=zero_init_residual,
    )


# --- MobileNetV2 -----------------------------------------------------------------------


def _init_mobile(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)


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
        _check_classes(num_classes)
        norm_layer = _norm(norm_layer)
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
            result = _add(result, x, self.inplace)
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
        _check_classes(num_classes)
        norm_layer = _norm(norm_layer, functools.partial(nn.BatchNorm2d, eps=1e-3, momentum=0.01))
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


# --- RegNetY ---------------------------------------------------------------------------


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
        _check_classes(num_classes)
        norm_layer = _norm(norm_layer)
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
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

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


# --- registry --------------------------------------------------------------------------

MODELS: dict[str, Callable[..., nn.Module]] = {
    "resnet18": resnet18,
    "resnet50": resnet50,
    "mobilenet_v2": mobilenet_v2,
    "mobilenet_v3_small": mobilenet_v3_small,
    "regnet_small": regnet_small,
    "resnet18_leaky": functools.partial(resnet18, activation="leaky_relu"),
}


def build(name: str, **kwargs) -> nn.Module:
    """The zoo model ``name`` (a key of :data:`MODELS`) built with ``kwargs``."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {sorted(MODELS)}")
    return MODELS[name](**kwargs)


def set_inplace(model: nn.Module, inplace: bool) -> nn.Module:
    """Set ``inplace`` on every module that has the flag (activations, dropout and the zoo's
    residual blocks) and return ``model`` (mutated, not copied)."""
    for m in model.modules():
        if isinstance(getattr(m, "inplace", None), bool):
            m.inplace = inplace
    return model
