"""Convert the normalization layers of a model between torch and normlab, and between BN
variants (sync, batch renorm, ghost, frozen, group norm).

Every converted layer keeps what it had: constructor settings (eps, momentum, affine,
track_running_stats, bias flag, normlab's activation/nonfinite/ema_debias where the
target has them), parameters and buffers with their values (``num_batches_tracked``
included), ``requires_grad`` flags, the ``training`` flag, device and dtype, and a
:func:`normlab.freeze` state. A layer shared by several parents stays shared.
"""

from __future__ import annotations

import copy
import inspect

import torch
from torch import nn

import normlab.nn as nlnn
from normlab.tools._common import is_batch_norm, replace_modules
from normlab.tools.freeze import FreezeState, freeze, freeze_state

TARGETS = ("normlab", "torch", "sync", "renorm", "ghost", "frozen", "group")
_WHERE = "convert"

# torch class -> name of its drop-in in normlab.nn (converted when normlab has it).
_TORCH_TO_NORMLAB = {
    nn.BatchNorm1d: "BatchNorm1d",
    nn.BatchNorm2d: "BatchNorm2d",
    nn.BatchNorm3d: "BatchNorm3d",
    nn.SyncBatchNorm: "SyncBatchNorm",
    nn.LayerNorm: "LayerNorm",
    nn.GroupNorm: "GroupNorm",
    nn.InstanceNorm1d: "InstanceNorm1d",
    nn.InstanceNorm2d: "InstanceNorm2d",
    nn.InstanceNorm3d: "InstanceNorm3d",
}
if hasattr(nn, "RMSNorm"):
    _TORCH_TO_NORMLAB[nn.RMSNorm] = "RMSNorm"

_RANKED = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
# normlab BN variants without a torch counterpart export to plain torch BN of their rank
# (their eval-mode map is BN's): class-name prefix -> True.
_VARIANT_PREFIXES = ("BatchRenorm", "GhostBatchNorm", "FrozenBatchNorm")
_TARGET_FAMILY = {
    "renorm": "BatchRenorm{rank}d",
    "ghost": "GhostBatchNorm{rank}d",
    "frozen": "FrozenBatchNorm{rank}d",
}
_STATE_NAMES = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _normlab_class(name: str) -> type | None:
    return getattr(nlnn, name, None)


def _plain_bn_classes() -> tuple[type, ...]:
    """Batch norm layers the variant targets convert from: torch's and normlab's plain BN,
    synchronised or not (variants are deliberate choices and are left alone)."""
    names = ("BatchNorm", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm")
    ours = tuple(c for c in map(_normlab_class, names) if c is not None)
    return (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, *ours)


def _rank(module: nn.Module) -> int | None:
    """1/2/3 for BatchNorm{1,2,3}d-like classes, None for any-rank layers (SyncBatchNorm,
    normlab.nn.BatchNorm)."""
    for rank, cls in _RANKED.items():
        if isinstance(module, cls):
            return rank
    name = type(module).__name__
    for rank in (1, 2, 3):
        if name.endswith(f"{rank}d"):
            return rank
    return None


def _is_normlab(cls: type) -> bool:
    return cls.__module__.startswith("normlab.")


def _target_class(module: nn.Module, to: str, name: str, rank: int | None) -> type | None:
    """The class ``module`` becomes, or None to leave it as it is."""
    cls = type(module)
    if to == "normlab":
        target = _TORCH_TO_NORMLAB.get(cls)
        return None if target is None else _normlab_class(target) or _missing(target, to, name)
    if to == "torch":
        if not _is_normlab(cls):
            return None
        for torch_cls, our_name in _TORCH_TO_NORMLAB.items():
            if _normlab_class(our_name) is cls:
                return torch_cls
        if cls.__name__.startswith(_VARIANT_PREFIXES) and _rank(module) in _RANKED:
            return _RANKED[_rank(module)]
        if cls is _normlab_class("BatchNorm"):
            raise ValueError(
                f"{_WHERE}: layer {name!r} is normlab.nn.BatchNorm (any rank, channel_dim="
                f"{getattr(module, 'channel_dim', 1)}), which has no torch counterpart; replace "
                f"it by BatchNorm1d/2d/3d by hand, or keep it as normlab."
            )
        return None
    if cls not in _plain_bn_classes():  # exact classes: variants subclass torch's BN too
        return None
    if to == "sync":
        target = "SyncBatchNorm"
        return (
            None
            if cls is _normlab_class(target)
            else (_normlab_class(target) or _missing(target, to, name))
        )
    if to == "group":
        return _normlab_class("GroupNorm") or _missing("GroupNorm", to, name)
    rank = _rank(module) or rank
    if rank is None:
        raise ValueError(
            f"{_WHERE}: layer {name!r} ({cls.__module__}.{cls.__name__}) accepts any input rank, "
            f"but to={to!r} needs a rank-specific class ({_TARGET_FAMILY[to].format(rank='N')}); "
            f"say which with rank=1, 2 or 3 (e.g. rank=2 for (N, C, H, W) images)."
        )
    target = _TARGET_FAMILY[to].format(rank=rank)
    return _normlab_class(target) or _missing(target, to, name)


def _missing(target: str, to: str, name: str):
    raise NotImplementedError(
        f"{_WHERE}: to={to!r} needs normlab.nn.{target} (for layer {name!r}), which this "
        f"normlab build does not provide."
    )


def _device_dtype(module: nn.Module) -> dict:
    for t in (*module.parameters(recurse=False), *module.buffers(recurse=False)):
        if t.is_floating_point():
            return {"device": t.device, "dtype": t.dtype}
    return {}


def _init_params(cls: type) -> dict[str, inspect.Parameter]:
    """Named constructor arguments of ``cls``, following ``**kwargs`` to the ``__init__``
    it forwards to (GhostBatchNorm passes normlab's extras on to BatchNorm's)."""
    params: dict[str, inspect.Parameter] = {}
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        sig = inspect.signature(init).parameters
        for name, p in sig.items():
            if name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                params.setdefault(name, p)
        if not any(p.kind is p.VAR_KEYWORD for p in sig.values()):
            break
    return params


def _constructor_kwargs(module: nn.Module, cls: type, extra: dict) -> dict:
    """Arguments for ``cls(...)`` read from ``module``'s attributes of the same names (the
    drop-in classes share torch's argument names), then ``extra``."""
    params = _init_params(cls)
    kwargs = {}
    for name in params:
        if name == "bias":  # torch ≥ 2.13's keyword-only flag, not the tensor
            affine = getattr(module, "affine", getattr(module, "elementwise_affine", False))
            if affine and getattr(module, "bias", None) is None:
                kwargs["bias"] = False  # affine with γ only
            continue
        if name in ("device", "dtype"):
            continue
        if name in module.__dict__ or hasattr(type(module), name):
            value = getattr(module, name)
            if not isinstance(value, (torch.Tensor, nn.Module)):
                kwargs[name] = value
    if "num_channels" in params and "num_channels" not in kwargs:
        kwargs["num_channels"] = module.num_features
    kwargs.update(_device_dtype(module))
    for key, value in extra.items():
        if key not in params:
            raise TypeError(
                f"{_WHERE}: {cls.__name__} does not take the argument {key!r}; it takes "
                f"{list(params)}"
            )
        kwargs[key] = value
    return kwargs


def _convert_layer(module: nn.Module, cls: type, name: str, extra: dict) -> nn.Module:
    if cls.__module__.startswith("torch."):
        if getattr(module, "activation", None) is not None:
            raise ValueError(
                f"{_WHERE}: layer {name!r} has a fused activation={module.activation!r}, which "
                f"torch.nn.{cls.__name__} lacks; construct it without activation= and put the "
                f"activation module after it, then convert."
            )
        if getattr(module, "ema_debias", False):
            raise ValueError(
                f"{_WHERE}: layer {name!r} uses ema_debias=True, which changes its eval "
                f"output and has no torch equivalent; set layer.ema_debias = False first."
            )
    params = _init_params(cls)
    needs_stats = cls.__name__.startswith(("FrozenBatchNorm", "BatchRenorm"))
    if needs_stats and getattr(module, "running_mean", None) is None:
        raise ValueError(
            f"{_WHERE}: layer {name!r} has no running statistics (track_running_stats=False), "
            f"but {cls.__name__} needs them; recalibrate it with track_running_stats=True first."
        )
    if getattr(module, "channel_dim", 1) != 1 and "channel_dim" not in params:
        raise ValueError(
            f"{_WHERE}: layer {name!r} normalises channel_dim={module.channel_dim}, which "
            f"{cls.__name__} cannot (channels at dim 1 only)."
        )
    new = cls(**_constructor_kwargs(module, cls, extra))
    with torch.no_grad():
        for key in _STATE_NAMES:
            src, dst = getattr(module, key, None), getattr(new, key, None)
            if isinstance(src, torch.Tensor) and isinstance(dst, torch.Tensor):
                if src.shape != dst.shape:
                    raise ValueError(
                        f"{_WHERE}: layer {name!r}: {key} has shape {tuple(src.shape)} but "
                        f"{cls.__name__} needs {tuple(dst.shape)}"
                    )
                dst.copy_(src)
                if isinstance(src, nn.Parameter) and isinstance(dst, nn.Parameter):
                    dst.requires_grad_(src.requires_grad)
    if hasattr(module, "qconfig"):  # as torch's convert_sync_batchnorm does
        new.qconfig = module.qconfig
    new.train(module.training)
    state = freeze_state(module)
    if state is not None:
        _carry_freeze(state, new)
    return new


def _carry_freeze(state: FreezeState, new: nn.Module) -> None:
    if not is_batch_norm(new):
        return  # e.g. GroupNorm: no statistics to freeze; requires_grad was carried
    if state.stats:
        freeze(new, stats=True, affine=False)
    if state.affine:
        freeze(new, stats=False, affine=True)
        new.__dict__["_normlab_freeze"].requires_grad = dict(state.requires_grad)


def convert(
    model: nn.Module,
    to: str,
    *,
    num_groups: int | None = None,
    process_group=None,
    rank: int | None = None,
    inplace: bool = False,
    **layer_kwargs,
) -> nn.Module:
    """Convert the normalization layers of ``model``; returns the converted model.

    Args:
        model: any module (or a single layer).
        to: what to convert to:

            - 'normlab': every ``torch.nn`` BatchNorm1d/2d/3d, SyncBatchNorm, LayerNorm,
              GroupNorm, InstanceNorm1d/2d/3d and RMSNorm (exact classes, not user
              subclasses) → its normlab drop-in. ``torch.nn.SyncBatchNorm`` →
              ``normlab.nn.SyncBatchNorm``, which runs on CPU and without a process group,
              so a model saved with torch's SyncBN runs anywhere.
            - 'torch': the reverse; normlab's BatchRenorm/GhostBatchNorm/FrozenBatchNorm
              become torch BatchNorm of the same rank (their eval-mode map; the renorm step
              count is dropped; a frozen layer's γ, β become trainable Parameters).
            - 'sync', 'renorm', 'ghost', 'frozen', 'group': every plain batch norm (torch's
              or normlab's, synchronised or not) → ``normlab.nn.SyncBatchNorm``,
              ``BatchRenorm{1,2,3}d``, ``GhostBatchNorm{1,2,3}d``, ``FrozenBatchNorm{1,2,3}d``
              or ``GroupNorm(num_groups, C)`` (running statistics dropped: GN has none).

        num_groups: for to='group'; must divide every converted layer's channel count.
        process_group: for to='sync' (default: a torch SyncBatchNorm source's own group,
            else the default group).
        rank: 1, 2 or 3: the input rank of any-rank sources (SyncBatchNorm,
            ``normlab.nn.BatchNorm``) for targets that exist per rank ('renorm', 'ghost',
            'frozen'); e.g. ``convert(m, to='frozen', rank=2)`` for a SyncBN image model.
        inplace: modify and return ``model`` itself instead of a deep copy.
        **layer_kwargs: passed to every new layer's constructor, e.g.
            ``virtual_batch_size=32`` for 'ghost', ``r_max=3.0`` for 'renorm',
            ``nonfinite='raise'`` for 'normlab'.

    Raises:
        ValueError: unknown ``to``; a conversion that would change results silently (a
            fused activation or ``ema_debias`` going to torch, ``num_groups`` not dividing
            C, a frozen target without running statistics).

    Hooks other than :func:`normlab.freeze`'s are not carried to the new layers.
    """
    if to not in TARGETS:
        raise ValueError(f"{_WHERE}: to must be one of {TARGETS}, got {to!r}")
    extra = dict(layer_kwargs)
    if to == "group":
        if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups <= 0:
            raise ValueError(
                f"{_WHERE}: to='group' needs num_groups=G, a positive int dividing each layer's "
                f"channel count (e.g. 32, or 1 for LayerNorm-like, C for InstanceNorm-like), "
                f"got {num_groups!r}"
            )
        extra["num_groups"] = num_groups
    elif to == "ghost" and "virtual_batch_size" not in extra:
        raise ValueError(
            f"{_WHERE}: to='ghost' needs virtual_batch_size=B, the samples per ghost batch "
            f"(Hoffer et al. 2017 use 128), e.g. convert(model, to='ghost', virtual_batch_size=32)"
        )
    elif num_groups is not None:
        raise ValueError(f"{_WHERE}: num_groups is only used with to='group', not to={to!r}")
    if rank not in (None, 1, 2, 3):
        raise ValueError(f"{_WHERE}: rank must be 1, 2, 3 or None, got {rank!r}")
    if to == "sync" and process_group is not None:
        extra["process_group"] = process_group

    def replacement(name: str, module: nn.Module) -> nn.Module | None:
        cls = _target_class(module, to, name or "<model>", rank)
        if cls is None:
            return None
        if to == "group" and module.num_features % num_groups:
            raise ValueError(
                f"{_WHERE}: layer {name!r} has {module.num_features} channels, which "
                f"num_groups={num_groups} does not divide; choose a divisor of every layer's "
                f"channel count."
            )
        return _convert_layer(module, cls, name or "<model>", extra)

    return replace_modules(model if inplace else copy.deepcopy(model), replacement)
