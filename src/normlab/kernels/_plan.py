"""When the kernels apply: the ``NORMLAB_KERNELS`` switch and the plans.

:func:`mode` reads the switch; :func:`plan_batch` (training) and :func:`plan_affine`
(eval) decide whether a call can run on the kernels and how to view its tensor
(:class:`Plan`); :func:`traced` tells a tracer's or transform's tensor from a plain one.
The rules are in the package docstring (:mod:`normlab.kernels`).
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch

from normlab import _private

KERNELS_ENV = "NORMLAB_KERNELS"
MODES = ("auto", "torch", "numba")

# Below this many elements, `auto` keeps the torch-op path. `normlab bench --paths` on the
# development machine (2 cores, shared) found the kernel path at least as fast as the
# torch-op path at every size, down to (64, 100), in training and eval: each torch op
# costs as much Python and dispatch as a whole kernel call. Hence 0.
MIN_NUMEL = 0


_mode_cache: tuple[object, str] = (None, "auto")
# The raw value, read on every layer call (see normlab._private.env_raw: ~0.6 µs saved).
_env_raw = _private.env_raw(KERNELS_ENV)


def mode() -> str:
    """The path selection from ``NORMLAB_KERNELS`` (read on every call, so tests and
    users can switch it at run time)."""
    global _mode_cache
    raw = _env_raw()
    if raw == _mode_cache[0]:
        return _mode_cache[1]
    if isinstance(raw, bytes):
        raw = os.fsdecode(raw)
    if raw == _mode_cache[0]:
        return _mode_cache[1]
    value = (raw or "auto").strip().lower() or "auto"
    if value not in MODES:
        raise ValueError(
            f"{KERNELS_ENV}={value!r} is not one of {MODES}: 'auto' (default) picks the fused "
            f"kernels or torch's ops by size, 'torch' always uses torch's ops, 'numba' uses the "
            f"kernels wherever they apply."
        )
    _mode_cache = (_env_raw(), value)
    return value


class Plan(NamedTuple):
    """How to view a tensor for the kernels.

    ``layout`` 'cf': ``(N, C, S)`` of the contiguous tensor; 'cl': ``(M, C)`` of the
    tensor with the channel dim moved last. ``copy``: the input is in neither layout and
    is made contiguous first. ``keep``: the shape of a keepdim per-channel statistic.
    ``dims``: ``(rows, C, S)`` of the kernel's view (S = 1 for 'cl').
    """

    layout: str
    channel_dim: int
    copy: bool
    keep: tuple[int, ...]
    dims: tuple[int, int, int]

    @property
    def shape(self) -> tuple[int, ...]:
        """The kernel's view: ``(N, C, S)`` ('cf') or ``(M, C)`` ('cl')."""
        return self.dims if self.layout == "cf" else self.dims[:2]

    def contiguous(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` (shaped like the planned input) with C-contiguous memory in this layout:
        itself if its strides fit (the usual case), else a copy."""
        if self.layout == "cl" and self.channel_dim != t.dim() - 1:
            t = t.movedim(self.channel_dim, -1)
        return t if t.is_contiguous() else t.contiguous()


_is_compiling = getattr(torch.compiler, "is_compiling", lambda: False)
# Private torch queries with no public equivalent (normlab._private).
_functorch_active = _private.functorch_active
_dispatch_modes = _private.dispatch_modes
_jit_tracing = torch.jit.is_tracing


def traced(x: torch.Tensor) -> bool:
    """Whether ``x`` is seen by a tracer or transform rather than being a plain tensor with
    real memory: torch.compile/torch.export (fake tensors, dynamo), torch.jit.trace,
    torch.func transforms, a dispatch mode (FakeTensorMode, make_fx, FlopCounterMode…), a
    tensor subclass, or the meta device. Then nothing may read its memory or branch on
    its values, and the engine takes its traceable path
    (:mod:`normlab.functional.traced`)."""
    return (
        _is_compiling()  # first: dynamo folds it to a constant, and traces no C call after it
        or type(x) is not torch.Tensor
        or x.is_meta
        or _functorch_active()
        or _dispatch_modes() > 0
        or _jit_tracing()
    )


def _eligible_storage(x: torch.Tensor) -> bool:
    """A plain (no subclass) CPU float32/float64/bfloat16/float16 strided tensor of rank
    ≥ 2: memory the kernels can read."""
    dtype = x.dtype
    return (
        type(x) is torch.Tensor
        and (
            dtype is torch.float32
            or dtype is torch.bfloat16
            or dtype is torch.float64
            or dtype is torch.float16
        )
        and x.is_cpu
        and x.layout is torch.strided
        and x.dim() >= 2
    )


def _eligible_tensor(x: torch.Tensor) -> bool:
    return _eligible_storage(x) and not traced(x)


def _per_channel(p: torch.Tensor | None, shape: torch.Size, c: int) -> bool:
    """``p`` is None or a CPU floating tensor holding one value per channel of an input
    of ``shape`` (channels at dim ``c``), shaped to broadcast against it: the keepdim
    shape ``(1, …, C, 1, …)`` right-aligned, possibly without leading ones ((C,) for an
    (N, C) input)."""
    if p is None:
        return True
    if not (isinstance(p, torch.Tensor) and p.is_cpu and p.is_floating_point()):
        return False
    pshape = p.shape
    skip = len(shape) - len(pshape)
    if skip < 0 or skip > c:
        return False
    for d, s in enumerate(pshape, skip):
        if s != (shape[c] if d == c else 1):
            return False
    return True


# Plans by (shape, channel dim, strides kind): a training loop asks for the same few
# plans on every call, and making one (a NamedTuple, its shapes) costs more than the
# lookup. Bounded: cleared when full.
_PLANS: dict[tuple, Plan] = {}
_PLANS_MAX = 256


def _layout(x: torch.Tensor, c: int) -> Plan:
    shape = x.shape
    if x.is_contiguous():
        kind = 0
    elif x.movedim(c, -1).is_contiguous():
        kind = 1
    else:
        kind = 2
    key = (shape, c, kind)
    plan = _PLANS.get(key)
    if plan is None:
        if len(_PLANS) >= _PLANS_MAX:
            _PLANS.clear()
        plan = _PLANS[key] = _make_plan(shape, c, kind)
    return plan


def _make_plan(shape: torch.Size, c: int, kind: int) -> Plan:
    channels = shape[c]
    keep = [1] * len(shape)
    keep[c] = channels
    n = 1
    for s in shape[:c]:
        n *= s
    numel = n * channels
    for s in shape[c + 1 :]:
        numel *= s
    s_inner = numel // (n * channels)
    if kind == 0 and s_inner == 1:  # (N, C) or (N, C, 1, ...): the channels-last loop fits
        kind = 1
    if kind == 1:
        rows = numel // channels
        return Plan("cl", c, False, tuple(keep), (rows, channels, 1))
    return Plan("cf", c, kind == 2, tuple(keep), (n, channels, s_inner))


def _use(numel: int) -> bool:
    m = mode()
    return m == "numba" or (m == "auto" and numel >= MIN_NUMEL)


def plan_batch(
    x: torch.Tensor,
    dims: tuple[int, ...],
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    center: bool,
    flat: bool = False,
) -> Plan | None:
    """A plan for training-mode batch norm of ``x`` over ``dims`` (ascending, canonical),
    or None for the torch-op path. ``weight``/``bias``: per channel, broadcastable, or
    (``flat``) (C,) tensors."""
    # No traced() here: the engine routes traced inputs to normlab.functional.traced before
    # its Functions plan, and the custom ops plan on real tensors (a check per call on the
    # hot path is ~0.4 µs, 4 % of a small eval call).
    if not center or not _eligible_storage(x):
        return None
    numel = x.numel()
    shape = x.shape
    ndim = len(shape)
    if numel == 0 or len(dims) != ndim - 1:
        return None
    c = ndim * (ndim - 1) // 2 - sum(dims)  # the one dim not reduced
    check = _flat_per_channel if flat else _per_channel
    if not (check(weight, shape, c) and check(bias, shape, c) and _use(numel)):
        return None
    return _layout(x, c)


def _flat_per_channel(p: torch.Tensor | None, shape: torch.Size, c: int) -> bool:
    """``p`` is None or a (C,) CPU floating tensor for channel dim ``c``."""
    return p is None or (
        p.dim() == 1 and p.shape[0] == shape[c] and p.is_cpu and p.is_floating_point()
    )


def plan_affine(
    x: torch.Tensor,
    mean: torch.Tensor | None,
    var: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
) -> Plan | None:
    """A plan for eval-mode (given statistics) batch norm, or None for the torch-op path.
    Only for inference: nothing may require a gradient. The statistics and parameters
    hold one value per channel, shaped to broadcast against ``x``."""
    if mean is None or not _eligible_tensor(x):
        return None
    numel = x.numel()
    if numel == 0:
        return None
    if torch.is_grad_enabled() and (
        x.requires_grad
        or mean.requires_grad
        or var.requires_grad
        or (weight is not None and weight.requires_grad)
        or (bias is not None and bias.requires_grad)
    ):
        return None
    # The channel dim: the one where mean (right-aligned against x) is not 1.
    shape, mshape = x.shape, mean.shape
    offset = len(shape) - len(mshape)
    c = -1
    for d, s in enumerate(mshape, offset):
        if s != 1:
            if c >= 0:
                return None  # not per channel
            c = d
    if offset < 0 or c < 0:
        return None  # not per channel (or a single channel: torch's ops do fine)
    if mshape[c - offset] != shape[c] or not (mean.is_cpu and mean.is_floating_point()):
        return None
    for t in (var, weight, bias):
        # the usual case first: shaped as mean (which is per channel), on the CPU
        if (
            t is not None
            and not (t.shape == mshape and t.is_cpu and t.is_floating_point())
            and not _per_channel(t, shape, c)
        ):
            return None
    if not _use(numel):
        return None
    return _layout(x, c)
