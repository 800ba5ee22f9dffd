"""normlab's layers as leaf modules of ``torch.fx`` symbolic tracing.

``torch.fx.Tracer.is_leaf_module`` keeps modules defined under ``torch.nn`` as single
``call_module`` nodes and traces into every other module's ``forward``. normlab's layers
live in ``normlab.nn``, so a tracer would trace into them and hand their input checks
and kernels a ``torch.fx.Proxy``, which they cannot take (they read shapes, dtypes and
tensor values). Each layer's ``forward`` therefore starts with::

    if isinstance(input, Proxy):
        return call_as_leaf(self, input)

which records the layer as one ``call_module`` node, exactly what the tracer does for
``torch.nn.BatchNorm2d``. This works with any tracer built on ``torch.fx.Tracer``
(``symbolic_trace``, subclasses with their own ``is_leaf_module`` — a tracer that already
treats the layer as a leaf never calls its ``forward`` with a Proxy — and torch.ao's
``QuantizationTracer`` used by ``prepare_fx``/``prepare_qat_fx``), and the traced
``GraphModule`` calls the same layer object, so its outputs, gradients and statistics
updates are the layer's own in training and in eval.

Real tensors never reach the helper: the check is one ``isinstance`` on the input
(after the validated-signature fast path in BatchNorm's ``forward``).

torch.ao's FX quantization fuses Conv/Linear → BN by exact module type, so it would leave
a normlab BN after a Conv unfused (and in float); when its tracer records one, a
:class:`QuantizationFusionWarning` names the layer and the route
(:func:`normlab.tools.to_torch_for_quantization`).
"""

from __future__ import annotations

import warnings

import torch
from torch.fx import Proxy

__all__ = ["Proxy", "QuantizationFusionWarning", "call_as_leaf"]


class QuantizationFusionWarning(UserWarning):
    """torch.ao FX quantization traced a normlab BN that torch would have fused with the
    Conv/Linear before it, had it been torch's; it stays unfused."""


_FUSING_PRODUCERS = (
    torch.nn.Conv1d,
    torch.nn.Conv2d,
    torch.nn.Conv3d,
    torch.nn.ConvTranspose1d,
    torch.nn.ConvTranspose2d,
    torch.nn.ConvTranspose3d,
    torch.nn.Linear,
)


def call_as_leaf(module: torch.nn.Module, input: Proxy, **kwargs) -> Proxy:
    """Record ``module(input, **kwargs)`` as one ``call_module`` node of ``input``'s tracer
    and return its Proxy (what ``torch.fx.Tracer.call_module`` does for a leaf module);
    keyword arguments that are None are left out.

    Raises:
        TypeError: the layer is the root of the trace (a ``call_module`` node needs a
            parent module that owns the layer), or the tracer cannot name modules.
    """
    tracer = input.tracer
    name = type(module).__name__
    path_of_module = getattr(tracer, "path_of_module", None)
    if path_of_module is None:
        raise TypeError(
            f"{name}: traced by {type(tracer).__name__}, which has no module hierarchy to "
            f"record it in (torch.fx.Tracer.path_of_module); trace the model that contains "
            f"the layer with torch.fx.symbolic_trace or a torch.fx.Tracer subclass."
        )
    path = path_of_module(module)
    if not path:
        raise TypeError(
            f"{name}: torch.fx records normlab's layers as leaf modules (one call_module "
            f"node), which needs a parent module; trace a model that contains the layer, "
            f"e.g. torch.fx.symbolic_trace(torch.nn.Sequential(layer)), not the layer alone."
        )
    _warn_if_unfused(module, input, tracer, path)
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    return tracer.create_proxy("call_module", path, (input,), kwargs)


def _warn_if_unfused(module: torch.nn.Module, input: Proxy, tracer, path: str) -> None:
    try:
        from torch.ao.quantization.fx.tracer import QuantizationTracer
    except ImportError:  # pragma: no cover - torch without torch.ao.quantization
        return
    if not isinstance(tracer, QuantizationTracer):
        return
    # Imported here: those modules import this one.
    from normlab.nn.batchnorm import _NormlabBatchNorm
    from normlab.nn.frozen_batch_norm import _FrozenBatchNorm
    from normlab.nn.syncbatchnorm import SyncBatchNorm

    fusable = isinstance(module, (_NormlabBatchNorm, _FrozenBatchNorm))
    node = input.node
    if not fusable or isinstance(module, SyncBatchNorm) or node.op != "call_module":
        return  # torch fuses no SyncBatchNorm either
    producer = tracer.root.get_submodule(node.target)
    if type(producer) in _FUSING_PRODUCERS:  # exact types, as torch's pattern matcher
        warnings.warn(
            f"torch.ao FX quantization (prepare_fx/prepare_qat_fx) fuses Conv/Linear with "
            f"BatchNorm only for torch.nn's exact classes: normlab {type(module).__name__} "
            f"{path!r} after {type(producer).__name__} {node.target!r} stays unfused and runs "
            f"in float between a dequantize and a quantize, so the quantized model differs "
            f"from the torch model's. Convert first: model = "
            f"normlab.tools.to_torch_for_quantization(model, example_inputs).",
            QuantizationFusionWarning,
            stacklevel=2,
        )
