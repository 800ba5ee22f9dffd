"""Where :mod:`normlab.diagnostics.flow` measures: which modules are layers and which are
activations, the hooks that find the pre-activation a layer feeds (the first activation
run after it, or a normlab layer's own fused ``activation=``), and the hook handles.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.modules.conv import _ConvNd

#: Module types the probe treats as layers (weight gradients, pre-activation owner).
LAYER_TYPES: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Bilinear,
    _ConvNd,
    _NormBase,  # BatchNorm*, InstanceNorm*, SyncBatchNorm and normlab's subclasses
    nn.GroupNorm,
    nn.LayerNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)
#: Layers that count as one step of depth (normalization layers share their producer's).
WEIGHT_LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Bilinear, _ConvNd)

# Most specific first: ReLU6 subclasses Hardtanh.
_ACTIVATION_MODULES: tuple[tuple[type[nn.Module], str], ...] = (
    (nn.Sigmoid, "sigmoid"),
    (nn.Tanh, "tanh"),
    (nn.ReLU6, "relu6"),
    (nn.ReLU, "relu"),
    (nn.LeakyReLU, "leaky_relu"),
    (nn.ELU, "elu"),
    (nn.SELU, "selu"),
    (nn.CELU, "celu"),
    (nn.GELU, "gelu"),
    (nn.SiLU, "silu"),
    (nn.Mish, "mish"),
    (nn.Softplus, "softplus"),
    (nn.Hardsigmoid, "hardsigmoid"),
    (nn.Hardtanh, "hardtanh"),
    (nn.Hardswish, "hardswish"),
)


def activation_kind(module: nn.Module) -> str | None:
    """The activation a module applies to its input (or, for a normlab layer with a fused
    ``activation=``, to its affine output), or None."""
    fused = getattr(module, "activation", None)
    if isinstance(module, LAYER_TYPES) and isinstance(fused, str) and fused != "identity":
        return fused
    for cls, name in _ACTIVATION_MODULES:
        if isinstance(module, cls):
            return name
    return None


_FEATURES_LAST = (
    nn.Linear,
    nn.Bilinear,
    nn.LayerNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)


def unit_dim(layer: nn.Module | None) -> int:
    # Linear/Bilinear/LayerNorm put features last; Conv and BatchNorm use dim 1.
    return -1 if isinstance(layer, _FEATURES_LAST) else 1


def fused_preactivation(module: nn.Module, inputs: tuple) -> torch.Tensor:
    """Re-run a fused norm+activation layer without its activation: z = γ·x̂ + β.

    The re-run sees the same input and mode; its buffer updates are undone so the probe
    leaves the running statistics exactly as the real forward left them.
    """
    saved = [(b, b.detach().clone()) for b in module.buffers(recurse=False)]
    activation = module.activation
    try:
        module.activation = None
        with torch.no_grad():
            return module.forward(*inputs)
    finally:
        module.activation = activation
        with torch.no_grad():
            for b, value in saved:
                b.copy_(value)


class Hooks:
    """Discovers layers and activation sites and owns every hook handle."""

    def __init__(self, model: nn.Module, layer_types: tuple[type[nn.Module], ...]):
        self.model = model
        self.handles: list[Any] = []
        self.layers = {
            m: name for name, m in model.named_modules() if isinstance(m, layer_types) and name
        }
        if isinstance(model, layer_types):
            self.layers[model] = ""
        self.acts = {
            m: (name, kind)
            for name, m in model.named_modules()
            if (kind := activation_kind(m)) is not None and m not in self.layers
        }
        self.order: list[nn.Module] = []  # layers in first-forward order
        self.last_layer: nn.Module | None = None
        self.consumer: dict[nn.Module, nn.Module] = {}  # layer -> activation module it feeds

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def on_layer(self, fn_after) -> None:
        """Register ``fn_after(module, inputs, output)`` on every layer; track order."""

        def hook(module, inputs, output):
            if module not in self.order:
                self.order.append(module)
            self.last_layer = module
            fn_after(module, inputs, output)

        for m in self.layers:
            self.handles.append(m.register_forward_hook(hook))

    def on_activation(self, fn_before) -> None:
        """Register ``fn_before(act_module, owner_layer_or_None, z)`` on activation modules."""

        def pre_hook(module, inputs):
            if inputs and isinstance(inputs[0], torch.Tensor):
                owner = self.last_layer
                if owner is not None:
                    # the first activation after a layer is the one it feeds
                    owner = owner if self.consumer.setdefault(owner, module) is module else None
                fn_before(module, owner, inputs[0])

        for m in self.acts:
            self.handles.append(m.register_forward_pre_hook(pre_hook))

    def reset_pass(self) -> None:
        self.last_layer = None
