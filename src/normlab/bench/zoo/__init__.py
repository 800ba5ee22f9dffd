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

One module per family — :mod:`.resnet`, :mod:`.mobilenet`, :mod:`.regnet` — on the shared
pieces of :mod:`._blocks`; every name is importable from here (``zoo.resnet18``), and
:data:`MODELS` / :func:`build` are the registry.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from torch import nn

from normlab.bench.zoo._blocks import (
    ConvNormActivation,
    NormLayer,
    SqueezeExcitation,
    make_divisible,
)
from normlab.bench.zoo.mobilenet import (
    InvertedResidual,
    InvertedResidualV3,
    MobileNetV2,
    MobileNetV3,
    mobilenet_v2,
    mobilenet_v3_small,
)
from normlab.bench.zoo.regnet import RegNet, ResBottleneckBlock, regnet_small, regnet_stages
from normlab.bench.zoo.resnet import ACTIVATIONS, BasicBlock, Bottleneck, ResNet, resnet18, resnet50

__all__ = [
    "ACTIVATIONS",
    "MODELS",
    "BasicBlock",
    "Bottleneck",
    "ConvNormActivation",
    "InvertedResidual",
    "InvertedResidualV3",
    "MobileNetV2",
    "MobileNetV3",
    "NormLayer",
    "RegNet",
    "ResBottleneckBlock",
    "ResNet",
    "SqueezeExcitation",
    "build",
    "make_divisible",
    "mobilenet_v2",
    "mobilenet_v3_small",
    "regnet_small",
    "regnet_stages",
    "resnet18",
    "resnet50",
    "set_inplace",
]

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
