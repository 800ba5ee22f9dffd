"""Running the kernels on torch tensors: the wrappers the engine calls.

:func:`batch_forward` / :func:`batch_backward` (training), their residual pair
:func:`batch_forward_residual` / :func:`batch_backward_residual`, and the eval forward
:func:`affine_forward` (with :func:`affine_channels`, a layer's shortcut to it) turn
tensors into the by-address arguments of the compiled entries (data pointers, a dtype
witness, the activation's parameter array) and call them through
:func:`normlab.kernels._launch._entry`. Every wrapper runs once per layer call: at
(64, 100) the kernels take ~5 µs, so each torch op, view or numpy conversion here is a
measurable share of the call.
"""

from __future__ import annotations

import functools
import math
import sys

import numpy as np
import torch

from normlab.kernels._launch import _entry, _kernels
from normlab.kernels._memory import empty_like
from normlab.kernels._plan import Plan, _eligible_storage, _layout, _use, traced

_package = sys.modules["normlab.kernels"]

# The kernels' dtypes: per input dtype, the dtype of the (2, C) moments they return and of
# the per-channel parameters they read. Half-precision inputs (read and written as 16-bit
# patterns, computed in float32/float64: kernels._elementwise, "half-precision storage") take
# float32 parameters and return float32 moments, as the torch-op path's working dtype.
_NUMPY_DTYPES = {
    torch.float32: np.dtype(np.float32),
    torch.float64: np.dtype(np.float64),
    torch.bfloat16: np.dtype(np.float32),
    torch.float16: np.dtype(np.float32),
}
_PARAM_DTYPES = {
    torch.float32: torch.float32,
    torch.float64: torch.float64,
    torch.bfloat16: torch.float32,
    torch.float16: torch.float32,
}


def affine_channels(
    x: torch.Tensor,
    c: int,
    mean: torch.Tensor,
    var: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    activation: str | None,
    negative_slope: float,
    eager: bool = False,
) -> torch.Tensor | None:
    """Eval batch norm of ``x`` with (C,) statistics and parameters for channel dim ``c``
    (a layer's buffers, already validated), by the kernels; None when they do not
    apply (the caller then takes its general path). Saves the per-channel views and
    shape matching of :func:`plan_affine` (~8 µs a call) on a layer's hot path.
    ``eager``: the caller has established that ``x`` is not :func:`traced`."""
    if not (_eligible_storage(x) and (eager or not traced(x))):
        return None
    numel = x.numel()
    if numel == 0 or not _use(numel):
        return None
    params = (mean, var, weight, bias)
    if torch.is_grad_enabled() and (
        x.requires_grad or any(p is not None and p.requires_grad for p in params)
    ):
        return None
    for p in params:
        if p is not None and not (p.is_cpu and p.is_floating_point()):
            return None
    plan = _layout(x, c)
    # Through the package, as every other caller: the one seam tests spy on.
    return _package.affine_forward(
        plan, x, mean, var, weight, bias, eps, activation, negative_slope
    )


@functools.lru_cache(maxsize=64)
def _constant(c: int, dtype: torch.dtype, value: float) -> torch.Tensor:
    return torch.full((c,), value, dtype=dtype)  # shared: the kernels only read parameters


def _param(p: torch.Tensor | None, c: int, dtype: torch.dtype, fill: float) -> torch.Tensor:
    """A per-channel parameter as C contiguous values of the kernels' parameter dtype
    (``p`` itself if it is one already: parameters of the input's dtype, or float32 ones
    for a half-precision input, as autocast leaves them, cost no copy)."""
    if p is None:
        return _constant(c, dtype, fill)
    if p.dtype != dtype:
        p = p.detach().to(dtype)
    return p if p.is_contiguous() else p.contiguous()


_ACTIVATIONS: dict[tuple, np.ndarray] = {}


def _activation(activation: str | None, negative_slope: float) -> np.ndarray:
    """The kernels' ``act`` array (cached: the kernels only read it)."""
    key = (activation, negative_slope)
    act = _ACTIVATIONS.get(key)
    if act is None:
        from normlab.functional.activations import get_activation  # validates, as torch path

        spec = get_activation(activation)
        if spec.name == "elu":  # α in the name ('elu(0.5)')
            act = _kernels().activation_params("elu", spec.params[0])
        elif spec.name == "hardtanh":  # bounds in the name ('hardtanh(0.0, 2.0)')
            act = _kernels().activation_params("hardtanh", 0.0, *spec.params)
        else:
            act = _kernels().activation_params(spec.name, negative_slope)
        act.flags.writeable = False
        if len(_ACTIVATIONS) < 64:
            _ACTIVATIONS[key] = act
    return act


# A value of the storage dtype: tells the by-address entries what the memory holds.
# Half storage: its bits as 16-bit integers, whose type picks the format (uint16 bfloat16,
# int16 float16; see kernels._elementwise).
_WITNESS = {
    torch.float32: np.float32(0),
    torch.float64: np.float64(0),
    torch.bfloat16: np.uint16(0),
    torch.float16: np.int16(0),
}


def _running_args(running, c: int) -> tuple | None:
    """The by-address arguments of :func:`_numba.running_update_at` for an
    ``engine.RunningUpdate`` (after ``moments``: r0, mean_at, var_at, count_at,
    momentum, skip_nonfinite), or None if its buffers are not ones the kernel can update
    in place (plain contiguous CPU float32/float64 tensors of C values, not requiring
    grad, of one dtype; an int64 scalar counter): the engine then uses torch ops."""
    rm, rv, nbt = running.mean, running.var, running.num_batches_tracked
    dtype = rm.dtype
    if not (
        type(rm) is torch.Tensor
        and type(rv) is torch.Tensor
        and (dtype is torch.float32 or dtype is torch.float64)
        and rv.dtype is dtype
        and rm.is_cpu
        and rv.is_cpu
        and rm.numel() == c
        and rv.numel() == c
        and rm.is_contiguous()
        and rv.is_contiguous()
        and not (rm.requires_grad or rv.requires_grad)
    ):
        return None
    if nbt is None:
        count_at = 0
    elif type(nbt) is torch.Tensor and nbt.dtype is torch.int64 and nbt.is_cpu and nbt.dim() == 0:
        count_at = nbt.data_ptr()
    else:
        return None
    momentum = -1.0 if running.momentum is None else float(running.momentum)
    return (
        _WITNESS[dtype],
        rm.data_ptr(),
        rv.data_ptr(),
        count_at,
        momentum,
        bool(running.skip_nonfinite),
    )


def batch_forward(
    plan: Plan,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    activation: str | None,
    negative_slope: float,
    running=None,
) -> tuple[torch.Tensor, np.ndarray, np.ndarray, bool]:
    """Training forward: ``(y, moments, stats, folded)``; ``moments`` the (2, C) mean and
    biased variance in x's dtype (see :func:`stats_tensors`), ``stats`` the float64
    (4, C) array [shift, delta, var, invstd] for :func:`batch_backward`. ``running`` (an
    ``engine.RunningUpdate`` or None) is folded in by the same kernel call when its
    buffers allow (``folded``; its ``skipped`` is set); otherwise the caller does it."""
    act = _activation(activation, negative_slope)
    numel = x.numel()
    dtype = x.dtype
    pdtype = _PARAM_DTYPES[dtype]  # the parameters'
    rows, c, s = plan.dims
    stats = np.empty((4, c))
    moments = np.empty((2, c), dtype=_NUMPY_DTYPES[dtype])
    w, b = _param(weight, c, pdtype, 1.0), _param(bias, c, pdtype, 0.0)
    fold = None if running is None else _running_args(running, c)
    correction = numel / (numel - c) if numel > c else math.nan  # n/(n − 1), n = numel/c
    entry, nblocks = _entry("forward_at", numel, rows)
    xc = plan.contiguous(x)  # kept alive for the call
    y = empty_like(x, torch.contiguous_format if plan.copy else torch.preserve_format)
    w0 = _WITNESS[dtype]
    r0, mean_at, var_at, count_at, momentum, skip = (
        (w0, 0, 0, 0, 0.0, False) if fold is None else fold
    )
    status = entry(
        w0, plan.layout == "cf", xc.data_ptr(), y.data_ptr(), rows, c, s, w.data_ptr(),
        b.data_ptr(), float(eps), act, stats, moments, r0, mean_at, var_at, count_at,
        correction, momentum, skip, nblocks,
    )  # fmt: skip
    if fold is not None:
        running.skipped = status == 2
    return y, moments, stats, fold is not None


def stats_tensors(plan: Plan, moments: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``moments`` of :func:`batch_forward` as keepdim (``plan.keep``) mean and
    biased variance tensors (sharing its memory)."""
    keep = plan.keep
    return torch.from_numpy(moments[0].reshape(keep)), torch.from_numpy(moments[1].reshape(keep))


def batch_backward(
    plan: Plan,
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    stats: np.ndarray,
    activation: str | None,
    negative_slope: float,
    needs: tuple[bool, bool, bool],
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Closed-form training backward: ``(dx, dweight, dbias)`` (None where not needed);
    ``stats`` from :func:`batch_forward`."""
    act = _activation(activation, negative_slope)
    dtype = x.dtype
    pdtype = _PARAM_DTYPES[dtype]  # the parameters'
    rows, c, s = plan.dims
    if dy.dtype != dtype:
        dy = dy.to(dtype)
    need_dx = bool(needs[0])
    w, b = _param(weight, c, pdtype, 1.0), _param(bias, c, pdtype, 0.0)
    entry, nblocks = _entry("backward_at", x.numel(), rows)
    dx = None
    if need_dx:
        dx = empty_like(x, torch.contiguous_format if plan.copy else torch.preserve_format)
    # dγ, dβ are written straight into torch-owned tensors rather than numpy arrays
    # wrapped by torch.from_numpy: autograd frees those with the GIL released, and a
    # numpy-owned buffer then needs the GIL back (~1 µs a step at (64, 100)).
    dw = _grad_tensor(weight, needs[1], pdtype)
    db = _grad_tensor(bias, needs[2], pdtype)
    xc, dyc = plan.contiguous(x), plan.contiguous(dy)  # kept alive for the call
    entry(
        _WITNESS[dtype], plan.layout == "cf", dyc.data_ptr(), xc.data_ptr(),
        dx.data_ptr() if need_dx else 0, rows, c, s, w.data_ptr(), b.data_ptr(),
        stats, act, need_dx, 0 if db is None else db.data_ptr(),
        0 if dw is None else dw.data_ptr(), nblocks,
    )  # fmt: skip
    return dx, _as_param(dw, weight), _as_param(db, bias)


def batch_forward_residual(
    plan: Plan,
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    activation: str | None,
    negative_slope: float,
    running=None,
) -> tuple[torch.Tensor, np.ndarray, np.ndarray, bool]:
    """:func:`batch_forward` with a residual: ``y = act(γ·x̂ + β + r)`` in the kernel's
    write pass (``residual`` shaped like x, any strides: copied to the plan's layout if
    they differ)."""
    act = _activation(activation, negative_slope)
    numel = x.numel()
    dtype = x.dtype
    pdtype = _PARAM_DTYPES[dtype]  # the parameters'
    rows, c, s = plan.dims
    stats = np.empty((4, c))
    moments = np.empty((2, c), dtype=_NUMPY_DTYPES[dtype])
    w, b = _param(weight, c, pdtype, 1.0), _param(bias, c, pdtype, 0.0)
    fold = None if running is None else _running_args(running, c)
    correction = numel / (numel - c) if numel > c else math.nan
    entry, nblocks = _entry("forward_res_at", numel, rows)
    xc, rc = plan.contiguous(x), plan.contiguous(residual)  # kept alive for the call
    y = empty_like(x, torch.contiguous_format if plan.copy else torch.preserve_format)
    w0 = _WITNESS[dtype]
    r0, mean_at, var_at, count_at, momentum, skip = (
        (w0, 0, 0, 0, 0.0, False) if fold is None else fold
    )
    status = entry(
        w0, plan.layout == "cf", xc.data_ptr(), rc.data_ptr(), y.data_ptr(), rows, c, s,
        w.data_ptr(), b.data_ptr(), float(eps), act, stats, moments, r0, mean_at, var_at,
        count_at, correction, momentum, skip, nblocks,
    )  # fmt: skip
    if fold is not None:
        running.skipped = status == 2
    return y, moments, stats, fold is not None


def batch_backward_residual(
    plan: Plan,
    dy: torch.Tensor,
    x: torch.Tensor,
    src: torch.Tensor,
    from_y: bool,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    stats: np.ndarray,
    activation: str | None,
    negative_slope: float,
    needs: tuple[bool, bool, bool, bool],
) -> tuple[torch.Tensor | None, ...]:
    """Backward of :func:`batch_forward_residual`: ``(dx, dr, dweight, dbias)`` (None
    where ``needs`` says not needed), dr = dz = dy·act'(z) and dx from the same kernel
    call. ``src``: the forward's output y (``from_y``: y determines act'(z)) or the
    residual r."""
    act = _activation(activation, negative_slope)
    dtype = x.dtype
    pdtype = _PARAM_DTYPES[dtype]  # the parameters'
    rows, c, s = plan.dims
    if dy.dtype != dtype:
        dy = dy.to(dtype)
    need_dx, need_dr = bool(needs[0]), bool(needs[1])
    w, b = _param(weight, c, pdtype, 1.0), _param(bias, c, pdtype, 0.0)
    entry, nblocks = _entry("backward_res_at", x.numel(), rows)
    fmt = torch.contiguous_format if plan.copy else torch.preserve_format
    dx = empty_like(x, fmt) if need_dx else None
    dr = empty_like(x, fmt) if need_dr else None
    dw = _grad_tensor(weight, needs[2], pdtype)
    db = _grad_tensor(bias, needs[3], pdtype)
    xc, dyc, sc = plan.contiguous(x), plan.contiguous(dy), plan.contiguous(src)
    entry(
        _WITNESS[dtype], plan.layout == "cf", dyc.data_ptr(), xc.data_ptr(), sc.data_ptr(),
        bool(from_y), 0 if dx is None else dx.data_ptr(), 0 if dr is None else dr.data_ptr(),
        rows, c, s, w.data_ptr(), b.data_ptr(), stats, act, need_dx, need_dr,
        0 if db is None else db.data_ptr(), 0 if dw is None else dw.data_ptr(), nblocks,
    )  # fmt: skip
    return dx, dr, _as_param(dw, weight), _as_param(db, bias)


def _grad_tensor(p: torch.Tensor | None, needed: bool, dtype: torch.dtype):
    """A new contiguous tensor for ``p``'s gradient, in the kernels' parameter ``dtype``
    (converted to ``p``'s own by :func:`_as_param`)."""
    if p is None or not needed:
        return None
    if p.dtype == dtype and p.is_contiguous():  # empty_like: no shape/dtype parsing
        return torch.empty_like(p)
    return torch.empty(p.shape, dtype=dtype)


def _as_param(g: torch.Tensor | None, p: torch.Tensor | None) -> torch.Tensor | None:
    return g if g is None or g.dtype == p.dtype else g.to(p.dtype)


def affine_forward(
    plan: Plan,
    x: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    activation: str | None,
    negative_slope: float,
) -> torch.Tensor:
    """Eval forward ``act((x − mean)·γ/sqrt(var + ε) + β)`` with per-channel constants."""
    act = _activation(activation, negative_slope)
    dtype = x.dtype
    pdtype = _PARAM_DTYPES[dtype]  # the parameters'
    rows, c, s = plan.dims
    m, v = _param(mean, c, pdtype, 0.0), _param(var, c, pdtype, 1.0)
    w, b = _param(weight, c, pdtype, 1.0), _param(bias, c, pdtype, 0.0)
    entry, nblocks = _entry("affine_at", x.numel(), rows)
    xc = plan.contiguous(x)  # kept alive for the call
    y = empty_like(x, torch.contiguous_format if plan.copy else torch.preserve_format)
    entry(
        _WITNESS[dtype], plan.layout == "cf", xc.data_ptr(), y.data_ptr(), rows, c, s,
        m.data_ptr(), v.data_ptr(), w.data_ptr(), b.data_ptr(), float(eps), act, nblocks,
    )  # fmt: skip
    return y
