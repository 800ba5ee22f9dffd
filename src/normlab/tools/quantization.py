"""``torch.ao.quantization`` with normlab's layers: eager-mode fusion, and the FX route.

Eager mode. torch's ``fuse_modules`` / ``fuse_modules_qat`` look the module types up in
``torch.ao.quantization.fuser_method_mappings._DEFAULT_OP_LIST_TO_FUSER_METHOD`` (exact
types), and its fused modules (``ConvBn2d``, ``ConvBnReLU2d``, ``LinearBn1d``,
``BNReLU2d``…) assert exact ``torch.nn`` types. Importing normlab registers, for every
pattern torch has with its BatchNorm, the same pattern with normlab's layers:

==========================================  =========================================
pattern (module types, in order)            normlab layers
==========================================  =========================================
Conv{1,2,3}d → BN → (ReLU)                  BatchNorm{n}d, BatchRenorm{n}d,
ConvTranspose{1,2,3}d → BN                  GhostBatchNorm{n}d, FrozenBatchNorm{n}d,
Linear → BN                                 BatchNorm (any rank, channel_dim=1)
BN → ReLU (2d, 3d)                          the rank-specific layers above
==========================================  =========================================

Each fuser method turns the normlab layer into the equivalent ``torch.nn.BatchNorm{n}d``
(:func:`torch_batch_norm`: the same ``Parameter`` and buffer objects, eps, momentum,
affine/track flags, ``training`` flag and ``qconfig``) and calls torch's own fuser, so
the fused model is exactly the one torch builds from a torch-BN model in the same state
and quantizes to the same numbers. What torch's modules cannot reproduce is refused with
a ``ValueError`` saying what to change, never approximated:

- ``activation='relu'`` is a ReLU: Conv → BN(relu) fuses as Conv → BN → ReLU (and
  BN(relu) → ReLU as well: ReLU is idempotent); other activations are refused (torch's
  fused modules have ReLU only), as is a fused ReLU after ConvTranspose, or after Linear
  in QAT (torch has no fused Linear-BN-ReLU QAT module).
- PTQ (eval mode, ``fuse_modules``): normlab's eval map is BN's for every layer above,
  so everything folds; ``ema_debias=True`` folds the de-biased statistics eval mode uses.
  ``nonfinite`` acts only in training and does not matter here.
- QAT (training mode, ``fuse_modules_qat``): the fused module trains as torch's BN.
  Refused: ``ema_debias=True`` (torch's QAT BN keeps and converts with the raw EMA),
  ``nonfinite='raise'`` (torch's cannot raise), statistics frozen by
  :func:`normlab.freeze` (use ``torch.ao.nn.intrinsic.qat.freeze_bn_stats`` after
  ``prepare_qat``), and BatchRenorm / GhostBatchNorm (their training forward is not
  BN's). ``nonfinite='skip'`` (the default) becomes torch's behaviour — a NaN/Inf batch
  reaches the running statistics, as it reaches the fake-quant observers' ranges and the
  weights in any QAT model. FrozenBatchNorm is an affine map in every mode: it folds into
  the Conv/Linear (PTQ or QAT alike), which then trains as torch's QAT Conv/Linear.

FX mode. ``prepare_fx`` / ``prepare_qat_fx`` trace the model (normlab's layers are leaf
``call_module`` nodes, see :mod:`normlab.nn._fx`) and fuse by matching exact module
types against their backend config, so a normlab BatchNorm is not fused with the Conv
before it: the model still quantizes, but the BN runs in float between a dequantize and
a quantize, and its numbers are not the torch model's. normlab warns
(:class:`QuantizationFusionWarning`) when that happens; the route is
:func:`to_torch_for_quantization`, which returns the model with torch's layers, then
torch's FX quantization as usual.

Reference: Jacob et al., "Quantization and Training of Neural Networks for Efficient
Integer-Arithmetic-Only Inference", CVPR 2018 (BN folding in QAT, §3.2).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import normlab.nn as nlnn
from normlab.nn._fx import QuantizationFusionWarning
from normlab.tools._common import replace_modules
from normlab.tools.convert import convert
from normlab.tools.freeze import stats_frozen

try:  # torch.ao.quantization is deprecated upstream; normlab works without it
    from torch.ao.quantization import fuser_method_mappings as _fmm
except ImportError:  # pragma: no cover - every torch normlab supports has it
    _fmm = None

__all__ = [
    "QuantizationFusionWarning",
    "register_fuser_methods",
    "registered_fuser_patterns",
    "to_torch_for_quantization",
    "torch_batch_norm",
]

_WHERE = "quantization"
_TORCH_BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_CONV_T = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
_ACTIVATION_MODULES: dict[str, Callable[[nn.Module], nn.Module]] = {
    "relu": lambda layer: nn.ReLU(),
    "leaky_relu": lambda layer: nn.LeakyReLU(layer.negative_slope),
    "sigmoid": lambda layer: nn.Sigmoid(),
    "tanh": lambda layer: nn.Tanh(),
    "silu": lambda layer: nn.SiLU(),
}


def _ranked(rank: int) -> tuple[type, ...]:
    """normlab's rank-specific BN layers whose eval map is BN's."""
    names = ("BatchNorm", "BatchRenorm", "GhostBatchNorm", "FrozenBatchNorm")
    return tuple(getattr(nlnn, f"{name}{rank}d") for name in names)


def _is_variant(layer: nn.Module, prefix: str) -> bool:
    return type(layer).__module__.startswith("normlab.") and type(layer).__name__.startswith(prefix)


def _is_frozen(layer: nn.Module) -> bool:
    return _is_variant(layer, "FrozenBatchNorm")


def _describe(layer: nn.Module, name: str | None) -> str:
    return f"{type(layer).__name__} {name!r}" if name else type(layer).__name__


def _layer_rank(layer: nn.Module) -> int | None:
    for rank, cls in _TORCH_BN.items():
        if isinstance(layer, cls) or type(layer).__name__.endswith(f"{rank}d"):
            return rank
    return None


def _check_convertible(layer: nn.Module, input_dim: int, qat: bool, where: str) -> None:
    """Raise if torch's BN (trained as torch's QAT modules train it, if ``qat``) would not
    compute what ``layer`` computes on ``input_dim``-D input."""
    channel_dim = int(getattr(layer, "_channel_dim", 1))
    if channel_dim not in (1, 1 - input_dim):
        raise ValueError(
            f"{where}: normalises channel_dim={channel_dim} of its {input_dim}-D input, but "
            f"torch's BatchNorm normalises dim 1 (the Conv/Linear output channels); only a "
            f"layer with channels at dim 1 has a torch equivalent."
        )
    if _is_variant(layer, "GhostBatchNorm") and layer.running_mean is None:
        raise ValueError(
            f"{where}: without running statistics it normalises with ghost-batch statistics "
            f"in eval mode too, which torch's BN cannot; build it with "
            f"track_running_stats=True."
        )
    if not qat:
        return
    if _is_variant(layer, ("BatchRenorm", "GhostBatchNorm")):
        raise ValueError(
            f"{where}: its training forward (batch renormalization / ghost batches) is not "
            f"BN's, which torch's QAT fused modules would train instead. Quantize it after "
            f"training (fuse_modules in eval mode folds it exactly), or train it as plain BN: "
            f"normlab.convert(model, to='torch') before fuse_modules_qat."
        )
    if getattr(layer, "ema_debias", False):
        raise ValueError(
            f"{where}: ema_debias=True makes eval mode use de-biased running statistics, "
            f"but torch's QAT modules keep and convert with the raw EMA; set "
            f"layer.ema_debias = False before fuse_modules_qat (or fuse in eval mode, which "
            f"folds the de-biased statistics)."
        )
    if getattr(layer, "nonfinite", None) == "raise":
        raise ValueError(
            f"{where}: nonfinite='raise' asks for an error on a NaN/Inf batch, which torch's "
            f"QAT modules cannot give (they update the statistics as torch's BN does); set "
            f"layer.nonfinite = 'propagate' to accept that, then fuse."
        )
    if stats_frozen(layer):
        raise ValueError(
            f"{where}: its statistics are frozen by normlab.freeze, whose hooks torch's QAT "
            f"modules do not carry; normlab.unfreeze it before fuse_modules_qat and call "
            f"model.apply(torch.ao.nn.intrinsic.qat.freeze_bn_stats) after prepare_qat."
        )


def torch_batch_norm(
    layer: nn.Module,
    input_dim: int | None = None,
    *,
    qat: bool | None = None,
    name: str | None = None,
) -> nn.Module:
    """The ``torch.nn.BatchNorm{rank}d`` that computes what the normlab BN ``layer``
    computes, for torch's quantization tools; its fused ``activation`` is not included
    (``layer.activation`` says which to add).

    Args:
        layer: a normlab BatchNorm, BatchRenorm, GhostBatchNorm or FrozenBatchNorm layer
            (or a torch BN, returned as it is).
        input_dim: the number of dims of the layer's input, 2 to 5 (2 after a Linear,
            N + 2 after a ConvNd); required for the any-rank ``BatchNorm`` (its channel_dim
            must resolve to 1 there), default that of the layer's class
            (``BatchNorm2d``: 4).
        qat: the new layer will be trained by torch's QAT modules (default:
            ``layer.training``); refuses what torch's BN would train differently (see the
            module docstring).
        name: the layer's name, for error messages.

    Returns:
        torch BN holding the layer's own ``weight``/``bias`` Parameters and running-stat
        buffers (shared, not copied), with its eps, momentum, flags, ``training`` flag and
        ``qconfig``. In eval mode with ``ema_debias=True`` the running statistics are the
        de-biased ones eval mode uses (new tensors). A FrozenBatchNorm becomes an eval-mode
        BN with γ, β as Parameters that do not require grad (fold it; do not train it).
    """
    if not type(layer).__module__.startswith("normlab."):
        return layer
    qat = layer.training if qat is None else qat
    where = f"{_WHERE}: {_describe(layer, name)}"
    if input_dim is None:
        rank = _layer_rank(layer)
        input_dim = None if rank is None else rank + 2
    if input_dim not in (2, 3, 4, 5):
        raise ValueError(
            f"{where} accepts any input rank; say which torch BatchNorm it becomes with "
            f"input_dim=2 to 5 (the number of dims of its input), got {input_dim!r}."
        )
    rank = max(input_dim - 2, 1)
    _check_convertible(layer, input_dim, qat, where)
    frozen = _is_frozen(layer)
    tracking = frozen or bool(layer.track_running_stats)
    affine = frozen or bool(layer.affine)
    # On the meta device: every tensor is replaced by the layer's own just below.
    new = _TORCH_BN[rank](
        layer.num_features, layer.eps, getattr(layer, "momentum", 0.1), affine, tracking,
        device="meta",
    )  # fmt: skip
    if frozen:  # buffers in normlab; Parameters in torch's BN (fixed: requires_grad False)
        params = {
            k: nn.Parameter(getattr(layer, k), requires_grad=False) for k in ("weight", "bias")
        }
    else:
        params = {k: layer._parameters.get(k) for k in ("weight", "bias")}
    buffers = {k: layer._buffers.get(k) for k in ("running_mean", "running_var")}
    buffers["num_batches_tracked"] = layer._buffers.get("num_batches_tracked")
    if not layer.training and getattr(layer, "ema_debias", False):
        buffers["running_mean"], buffers["running_var"] = layer.population_stats()
    for key, value in params.items():
        new._parameters[key] = value
    for key, value in buffers.items():
        new._buffers[key] = value
    new.train(layer.training and not frozen)
    if hasattr(layer, "qconfig"):
        new.qconfig = layer.qconfig
    return new


# -- eager-mode fuser methods -------------------------------------------------------------


def _relu_like(reference: nn.Module) -> nn.ReLU:
    relu = nn.ReLU()
    relu.train(reference.training)
    return relu


def _fold_frozen(torch_fuser, modules: list[nn.Module]) -> nn.Module:
    """A FrozenBatchNorm is an affine map in every mode: fold it with torch's eval-mode
    fuser and give the result the original training flag (QAT then trains the folded
    Conv/Linear as torch's QAT Conv/Linear)."""
    training = [m.training for m in modules]
    try:
        for m in modules:
            m.training = False
        fused = torch_fuser(False, *modules)
    finally:
        for m, flag in zip(modules, training):
            m.training = flag
    return fused.train(training[0])


def _fuser(pattern: str, input_dim: int) -> Callable:
    """The fuser method for one normlab pattern: ``pattern`` is 'conv_bn', 'conv_bn_relu',
    'linear_bn', 'convt_bn' or 'bn_relu'; ``input_dim`` the number of dims of the BN's
    input (N + 2 after ConvNd, 2 after Linear)."""
    bn_at = 0 if pattern == "bn_relu" else 1

    def fuser_method(is_qat: bool, *modules: nn.Module) -> nn.Module:
        modules = list(modules)
        bn = modules[bn_at]
        where = (
            f"{_WHERE}: {type(bn).__name__} in {'fuse_modules_qat' if is_qat else 'fuse_modules'}"
        )
        frozen = _is_frozen(bn)
        if frozen and is_qat and pattern in ("bn_relu", "convt_bn"):
            raise ValueError(
                f"{where}: a FrozenBatchNorm is a fixed affine map, which torch's QAT "
                f"modules for this pattern would train as BN; fold it into the layer next "
                f"to it first (model.eval(); normlab.fold(model); model.train())."
            )
        activation = getattr(bn, "activation", None)
        if activation not in (None, "relu"):
            raise ValueError(
                f"{where}: fused activation={activation!r}; torch's fused modules have only "
                f"ReLU. Construct the layer without activation= and put the activation "
                f"module after it (it then stays outside the fused module)."
            )
        modules[bn_at] = torch_batch_norm(bn, input_dim, qat=is_qat and not frozen)
        conv_like = modules[0]
        if activation == "relu" and pattern in ("conv_bn", "linear_bn", "convt_bn"):
            if pattern == "convt_bn" or (pattern == "linear_bn" and is_qat and not frozen):
                raise ValueError(
                    f"{where}: activation='relu' after {type(conv_like).__name__}: torch has "
                    f"no fused {type(conv_like).__name__}-BN-ReLU module"
                    f"{' for QAT' if is_qat else ''}. Construct the BN without activation= "
                    f"and put nn.ReLU after it."
                )
            if pattern == "conv_bn":
                modules.append(_relu_like(conv_like))
                pattern_now = "conv_bn_relu"
            else:  # Linear-BN folded, then torch's fused LinearReLU (eval only)
                fused = _torch_fuser("linear_bn")
                linear = _fold_frozen(fused, modules) if frozen else fused(is_qat, *modules)
                return torch.ao.nn.intrinsic.LinearReLU(linear, _relu_like(conv_like))
        else:
            pattern_now = pattern
        torch_fuser = _torch_fuser(pattern_now)
        if frozen and pattern_now != "bn_relu":
            return _fold_frozen(torch_fuser, modules)
        return torch_fuser(is_qat, *modules)

    fuser_method.__name__ = f"normlab_fuse_{pattern}"
    fuser_method.__qualname__ = fuser_method.__name__
    return fuser_method


def _torch_fuser(pattern: str) -> Callable:
    if pattern == "bn_relu":

        def bn_relu(is_qat, bn, relu):
            fused_cls = {nn.BatchNorm2d: torch.ao.nn.intrinsic.BNReLU2d}.get(type(bn))
            fused_cls = fused_cls or torch.ao.nn.intrinsic.BNReLU3d
            return fused_cls(bn, relu)

        return bn_relu
    return {
        "conv_bn": _fmm.fuse_conv_bn,
        "conv_bn_relu": _fmm.fuse_conv_bn_relu,
        "linear_bn": _fmm.fuse_linear_bn,
        "convt_bn": _fmm.fuse_convtranspose_bn,
    }[pattern]


def _patterns() -> dict[tuple[type, ...], Callable]:
    any_rank = nlnn.BatchNorm
    patterns: dict[tuple[type, ...], Callable] = {}
    for rank in (1, 2, 3):
        conv, convt = _CONV[rank], _CONV_T[rank]
        for bn in (*_ranked(rank), any_rank):
            patterns[(conv, bn)] = _fuser("conv_bn", rank + 2)
            patterns[(conv, bn, nn.ReLU)] = _fuser("conv_bn_relu", rank + 2)
            patterns[(convt, bn)] = _fuser("convt_bn", rank + 2)
        if rank in (2, 3):  # torch fuses BN-ReLU for 2d and 3d only
            for bn in _ranked(rank):
                patterns[(bn, nn.ReLU)] = _fuser("bn_relu", rank + 2)
    for bn in (*_ranked(1), any_rank):
        patterns[(nn.Linear, bn)] = _fuser("linear_bn", 2)
    return patterns


_REGISTERED: list[tuple[type, ...]] = []


def register_fuser_methods() -> list[tuple[type, ...]]:
    """Add normlab's patterns to torch's default fuser-method mapping (done once at
    import of normlab; calling again is harmless). Patterns already in the mapping are
    left alone. Returns the patterns normlab registered."""
    if _fmm is None:  # pragma: no cover
        return []
    mapping = _fmm._DEFAULT_OP_LIST_TO_FUSER_METHOD
    for pattern, method in _patterns().items():
        if pattern not in mapping:
            mapping[pattern] = method
            _REGISTERED.append(pattern)
    return list(_REGISTERED)


def registered_fuser_patterns() -> list[tuple[type, ...]]:
    """The module-type patterns normlab added to torch's fuser-method mapping."""
    return list(_REGISTERED)


# -- FX mode: hand torch a torch model ------------------------------------------------------


def _record_ranks(model: nn.Module, example_inputs: tuple, layers: list[nn.Module]) -> dict:
    ranks: dict[int, int] = {}

    def hook(module, args):
        ranks.setdefault(id(module), args[0].dim())

    handles = [m.register_forward_pre_hook(hook) for m in layers]
    training = {id(m): m.training for m in model.modules()}
    try:
        model.eval()  # a shape probe: no statistics update
        with torch.no_grad():
            model(*example_inputs)
    finally:
        for h in handles:
            h.remove()
        for m in model.modules():
            m.training = training[id(m)]
    return ranks


def _with_activation(layer: nn.Module, torch_layer: nn.Module, activation) -> nn.Module:
    if activation is None:
        return torch_layer
    act = _ACTIVATION_MODULES[activation](layer)
    act.train(layer.training)
    return nn.Sequential(torch_layer, act).train(layer.training)


def to_torch_for_quantization(
    model: nn.Module, example_inputs=None, *, inplace: bool = False
) -> nn.Module:
    """``model`` with every normlab layer replaced by its ``torch.nn`` equivalent, for
    torch's FX-mode quantization (``prepare_fx``/``prepare_qat_fx``), whose fusion only
    matches torch's exact classes.

    Args:
        model: any module; layers in eval mode are prepared for post-training quantization,
            layers in training mode for QAT (the refusals of :func:`torch_batch_norm`).
        example_inputs: input (or tuple of inputs) to ``model``; needed only if it
            contains the any-rank ``normlab.nn.BatchNorm``, whose torch class depends on the
            input rank (recorded from one forward in eval mode under ``no_grad``).
        inplace: modify and return ``model`` instead of a deep copy.

    Returns:
        The model with torch layers holding the same parameter and buffer values,
        training flags and ``qconfig``: BN layers of every normlab kind become
        ``torch.nn.BatchNorm{n}d`` sharing the layer's tensors (see
        :func:`torch_batch_norm`); LayerNorm, GroupNorm, InstanceNorm{n}d, RMSNorm and
        SyncBatchNorm become torch's, with copies (:func:`normlab.convert`, ``to='torch'``).
        Torch's numerics then apply: outputs agree with the normlab model's to float
        rounding, not bit for bit. A fused
        ``activation=`` becomes ``nn.Sequential(layer, activation module)`` (state_dict
        keys gain ``.0``); torch then fuses Conv → BN (→ ReLU) inside it.

    Raises:
        ValueError: a layer torch's cannot reproduce (see :func:`torch_batch_norm`), a
            FrozenBatchNorm in training mode (fold it first with :func:`normlab.fold`), or
            an any-rank BatchNorm without ``example_inputs``.
    """
    if example_inputs is not None and not isinstance(example_inputs, tuple):
        example_inputs = (example_inputs,)
    root = model if inplace else copy.deepcopy(model)
    any_rank = [m for m in root.modules() if type(m) is nlnn.BatchNorm]
    ranks: dict[int, int] = {}
    if any_rank:
        if example_inputs is None:
            raise ValueError(
                f"{_WHERE}: to_torch_for_quantization: the model has normlab.nn.BatchNorm "
                f"(any rank), which becomes torch's BatchNorm1d/2d/3d by its input rank; pass "
                f"example_inputs (what prepare_fx gets) so that the rank can be recorded."
            )
        ranks = _record_ranks(root, example_inputs, any_rank)
    return replace_modules(
        root,
        lambda name, layer: (
            _to_torch_layer(layer, name or "<model>", ranks)
            if type(layer).__module__.startswith("normlab.nn")
            else None
        ),
    )


def _to_torch_layer(layer: nn.Module, name: str, ranks: dict[int, int]) -> nn.Module:
    activation = getattr(layer, "activation", None)
    is_bn = (isinstance(layer, _BatchNorm) and type(layer) is not nlnn.SyncBatchNorm) or (
        _is_frozen(layer)
    )
    if not is_bn:  # LayerNorm, GroupNorm, InstanceNorm, RMSNorm, SyncBatchNorm
        if getattr(layer, "ema_debias", False):
            raise ValueError(
                f"{_WHERE}: {_describe(layer, name)} uses ema_debias=True, which torch's "
                f"SyncBatchNorm lacks; set layer.ema_debias = False first."
            )
        if activation is not None:
            layer.activation = None  # the copy's layer: the activation becomes a module
        try:
            new = convert(layer, to="torch")
        finally:
            layer.activation = activation
        return _with_activation(layer, new, activation)
    if _is_frozen(layer) and layer.training:
        raise ValueError(
            f"{_WHERE}: {_describe(layer, name)} is in training mode: torch's BN would train "
            f"it, a frozen layer never changes. Fold it into the Conv/Linear first "
            f"(model.eval(); model, _ = normlab.fold(model); model.train()), then quantize."
        )
    input_dim = None
    if type(layer) is nlnn.BatchNorm:
        input_dim = ranks.get(id(layer))
        if input_dim is None:
            raise ValueError(
                f"{_WHERE}: {_describe(layer, name)} was not called by the model on "
                f"example_inputs, so its input rank (which torch BatchNorm it becomes) is "
                f"unknown; pass inputs that reach it."
            )
    return _with_activation(layer, torch_batch_norm(layer, input_dim, name=name), activation)


register_fuser_methods()
