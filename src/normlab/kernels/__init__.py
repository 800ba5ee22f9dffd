"""Fast fused CPU kernels for batch normalization, and the rule for when to use them.

Only :mod:`normlab.functional.engine` calls this package: it asks for a *plan*
(:func:`plan_batch`, :func:`plan_affine`) and, if it gets one, runs the kernels instead of
its torch-op path, which stays the reference. A plan exists only for the BatchNorm case:

* statistics per channel over every other dim (training), or per-channel constants
  (eval), with weight/bias per channel;
* a plain CPU float32/float64 ``torch.Tensor`` (no subclass, not meta, not traced by
  ``torch.compile``) with at least :data:`MIN_NUMEL` elements;
* channels-first contiguous (viewed as ``(N, C, S)``) or channels-last contiguous
  (``(M, C)``); other strides are copied to contiguous first, which is still far faster
  than the torch-op path;
* training statistics from the batch itself (no ``StatsSource``), and no double backward
  (the engine's differentiable path handles ``create_graph=True``);
* eval only when nothing asks for gradients (inference).

``NORMLAB_KERNELS`` selects the path: ``auto`` (default) as above, ``torch`` never uses
the kernels, ``numba`` uses them whenever they apply, whatever the size (tests, bench).

Numerics and the formulas are in :mod:`normlab.kernels._numba`; the kernels run on
``torch.get_num_threads()`` threads.
"""

from __future__ import annotations

import functools
import os
import threading
from typing import NamedTuple

import numpy as np
import torch

from normlab.kernels._memory import empty_like

KERNELS_ENV = "NORMLAB_KERNELS"
MODES = ("auto", "torch", "numba")

# Below this many elements, `auto` keeps the torch-op path. `normlab bench --paths` on the
# development machine (2 cores, shared) found the kernel path at least as fast as the
# torch-op path at every size, down to (64, 100), in training and eval: each torch op
# costs as much Python and dispatch as a whole kernel call. Hence 0.
MIN_NUMEL = 0
# Below this many elements the kernels run on the calling thread only. A threaded launch
# costs ~10 µs on an idle machine and milliseconds on a busy one (the whole team must be
# scheduled); 2^18 elements are ~0.3 ms of work per pass, enough to amortise it.
PARALLEL_MIN_NUMEL = 1 << 18

_KERNEL_DTYPES = (torch.float32, torch.float64)
_NUMPY_DTYPES = {torch.float32: np.dtype(np.float32), torch.float64: np.dtype(np.float64)}


_mode_cache: tuple[object, str] = (None, "auto")
# os.environ.get costs ~0.6 µs (key encoding, value decoding), a tenth of a small batch
# norm's kernel: read CPython's raw mapping, which os.environ keeps in sync, if present.
try:
    _ENV_DATA, _ENV_KEY = os.environ._data, os.environ.encodekey(KERNELS_ENV)  # type: ignore[attr-defined]
except AttributeError:  # pragma: no cover - other Pythons
    _ENV_DATA, _ENV_KEY = None, None


def mode() -> str:
    """The path selection from ``NORMLAB_KERNELS`` (read on every call, so tests and
    users can switch it at run time)."""
    global _mode_cache
    raw = _ENV_DATA.get(_ENV_KEY) if _ENV_DATA is not None else os.environ.get(KERNELS_ENV)
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
    _mode_cache = (
        _ENV_DATA.get(_ENV_KEY) if _ENV_DATA is not None else os.environ.get(KERNELS_ENV),
        value,
    )
    return value


class Plan(NamedTuple):
    """How to view a tensor for the kernels.

    ``layout`` 'cf': ``(N, C, S)`` of the contiguous tensor; 'cl': ``(M, C)`` of the
    tensor with the channel dim moved last. ``copy``: the input is in neither layout and
    is made contiguous first. ``keep``: the shape of a keepdim per-channel statistic.
    """

    layout: str
    channel_dim: int
    shape: tuple[int, ...]
    copy: bool
    keep: tuple[int, ...]

    @property
    def channels(self) -> int:
        return self.shape[1]

    def contiguous(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` (shaped like the planned input) with C-contiguous memory in this layout:
        itself if its strides fit (the usual case), else a copy."""
        if self.layout == "cl" and self.channel_dim != t.dim() - 1:
            t = t.movedim(self.channel_dim, -1)
        return t if t.is_contiguous() else t.contiguous()

    def array(self, t: torch.Tensor) -> np.ndarray:
        """``t`` as the kernel's C-contiguous 2-D/3-D array (see :meth:`contiguous`)."""
        # numpy's reshape of a C-contiguous array is always a view
        return self.contiguous(t).numpy(force=True).reshape(self.shape)


# Under torch.compile the engine's autograd.Function is traced with fake tensors: the
# kernels (which read real memory) must not run there.
_is_compiling = getattr(torch.compiler, "is_compiling", lambda: False)


def _eligible_tensor(x: torch.Tensor) -> bool:
    return (
        type(x) is torch.Tensor
        and x.dtype in _KERNEL_DTYPES
        and x.is_cpu
        and x.layout == torch.strided
        and x.dim() >= 2
        and not _is_compiling()
    )


def _per_channel(p: torch.Tensor | None, keep: tuple[int, ...], c: int) -> bool:
    """``p`` is None or a CPU floating tensor holding one value per channel, shaped to
    broadcast against the input: ``keep`` (the keepdim shape, channels at dim ``c``)
    right-aligned, possibly without some of its leading ones ((C,) for an (N, C) input)."""
    if p is None:
        return True
    if not (isinstance(p, torch.Tensor) and p.is_cpu and p.is_floating_point()):
        return False
    shape = p.shape
    skip = len(keep) - len(shape)
    return 0 <= skip <= c and shape == keep[skip:]


def _keep(shape: torch.Size, c: int) -> tuple[int, ...]:
    keep = [1] * len(shape)
    keep[c] = shape[c]
    return tuple(keep)


def _layout(x: torch.Tensor, c: int, keep: tuple[int, ...]) -> Plan:
    shape = x.shape
    channels = shape[c]
    n = 1
    for s in shape[:c]:
        n *= s
    numel = x.numel()
    s_inner = numel // (n * channels)
    if x.is_contiguous():
        if s_inner == 1:  # (N, C) or (N, C, 1, ...): the channels-last loop fits better
            return Plan("cl", c, (n, channels), False, keep)
        return Plan("cf", c, (n, channels, s_inner), False, keep)
    if x.movedim(c, -1).is_contiguous():
        return Plan("cl", c, (numel // channels, channels), False, keep)
    return Plan("cf", c, (n, channels, s_inner), True, keep)


def _use(x: torch.Tensor) -> bool:
    m = mode()
    return m == "numba" or (m == "auto" and x.numel() >= MIN_NUMEL)


def plan_batch(
    x: torch.Tensor,
    dims: tuple[int, ...],
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    center: bool,
) -> Plan | None:
    """A plan for training-mode batch norm of ``x`` over ``dims`` (ascending, canonical),
    or None for the torch-op path. ``weight``/``bias``: per channel, broadcastable."""
    if not center or not _eligible_tensor(x) or x.numel() == 0:
        return None
    ndim = x.dim()
    if len(dims) != ndim - 1:
        return None
    c = ndim * (ndim - 1) // 2 - sum(dims)  # the one dim not reduced
    keep = _keep(x.shape, c)
    if not (_per_channel(weight, keep, c) and _per_channel(bias, keep, c)) or not _use(x):
        return None
    return _layout(x, c, keep)


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
    if mean is None or not _eligible_tensor(x) or x.numel() == 0:
        return None
    if torch.is_grad_enabled() and (
        x.requires_grad
        or mean.requires_grad
        or var.requires_grad
        or (weight is not None and weight.requires_grad)
        or (bias is not None and bias.requires_grad)
    ):
        return None
    # The channel dim: where mean (right-aligned against x) is not 1.
    ndim, mshape = x.dim(), mean.shape
    offset = ndim - len(mshape)
    wide = [d for d in range(len(mshape)) if mshape[d] != 1]
    if offset < 0 or len(wide) != 1:
        return None  # not per channel (or a single channel: torch's ops do fine)
    c = wide[0] + offset
    keep = _keep(x.shape, c)
    if not (
        _per_channel(mean, keep, c)
        and _per_channel(var, keep, c)
        and _per_channel(weight, keep, c)
        and _per_channel(bias, keep, c)
        and _use(x)
    ):
        return None
    return _layout(x, c, keep)


# -- running the kernels -----------------------------------------------------------------
# Every wrapper below runs once per layer call: at (64, 100) the kernels take ~5 µs, so
# each torch op, view or numpy conversion here is a measurable share of the call.
_numba_module = None


def _kernels():
    global _numba_module
    if _numba_module is None:
        from normlab.kernels import _numba  # first use compiles or loads the cache

        _numba_module = _numba
    return _numba_module


def _threads(numel: int) -> int:
    """Threads for a kernel over ``numel`` elements: torch's count, or 1 (the serial
    twin, no thread team at all) below :data:`PARALLEL_MIN_NUMEL`."""
    if numel < PARALLEL_MIN_NUMEL:
        return 1
    import numba

    want = torch.get_num_threads()
    n = max(1, min(want, numba.config.NUMBA_NUM_THREADS))
    numba.set_num_threads(n)
    # Numba's first thread launch can reset the OpenMP thread count torch reads (both
    # use libgomp): put torch's back, or one big batch norm would change how many
    # threads every later torch op uses.
    if torch.get_num_threads() != want:
        torch.set_num_threads(want)
    return n


# One threaded launch at a time: Numba's fallback 'workqueue' threading layer (used where
# OpenMP is missing) aborts the process on concurrent launches; callers from several
# Python threads then queue here, each launch using every thread anyway.
_LAUNCH = threading.Lock()


def _kernel(name: str, threads: int):
    """The threaded kernel (serialised by a lock) or its serial twin."""
    if threads == 1:
        return getattr(_kernels(), name + "_serial")
    kernel = getattr(_kernels(), name)

    def launch(*args):
        with _LAUNCH:
            return kernel(*args)

    return launch


@functools.lru_cache(maxsize=64)
def _constant(c: int, dtype: torch.dtype, value: float) -> torch.Tensor:
    return torch.full((c,), value, dtype=dtype)  # shared: the kernels only read parameters


def _param(p: torch.Tensor | None, c: int, dtype: torch.dtype, fill: float) -> torch.Tensor:
    """A per-channel parameter as C contiguous values of the kernel's dtype (``p`` itself
    if it is one already: parameters of the input's dtype cost no copy)."""
    if p is None:
        return _constant(c, dtype, fill)
    if p.dtype != dtype:
        p = p.detach().to(dtype)
    return p if p.is_contiguous() else p.contiguous()


def _array(p: torch.Tensor, c: int) -> np.ndarray:
    return p.numpy(force=True).reshape(c)


@functools.lru_cache(maxsize=64)
def _activation(activation: str | None, negative_slope: float) -> np.ndarray:
    from normlab.functional.activations import get_activation  # validates, as the torch path

    return _kernels().activation_params(get_activation(activation).name, negative_slope)


# A value of the storage dtype: tells the by-address entries what the memory holds.
_WITNESS = {torch.float32: np.float32(0), torch.float64: np.float64(0)}


def _buffer_ok(t: torch.Tensor, c: int) -> bool:
    """Whether the kernel can update running buffer ``t`` in place."""
    return (
        type(t) is torch.Tensor
        and t.dtype in _KERNEL_DTYPES
        and t.is_cpu
        and t.numel() == c
        and t.is_contiguous()
        and not t.requires_grad
    )


def _fold_running(running, moments: np.ndarray, n: int) -> bool:
    """Fold this batch into an ``engine.RunningUpdate``'s buffers with
    :func:`_numba.running_update_at`; False (nothing done) if the buffers are not ones
    the kernel can update in place, and the engine then uses torch ops."""
    c = moments.shape[1]
    rm, rv, nbt = running.mean, running.var, running.num_batches_tracked
    if not (_buffer_ok(rm, c) and _buffer_ok(rv, c) and rm.dtype == rv.dtype):
        return False
    if nbt is None:
        count_at = 0
    elif type(nbt) is torch.Tensor and nbt.dtype == torch.int64 and nbt.is_cpu and nbt.dim() == 0:
        count_at = nbt.data_ptr()
    else:
        return False
    momentum = -1.0 if running.momentum is None else float(running.momentum)
    updated = _kernels().running_update_at(
        _WITNESS[rm.dtype],
        moments,
        n / (n - 1),
        momentum,
        bool(running.skip_nonfinite),
        rm.data_ptr(),
        rv.data_ptr(),
        count_at,
    )
    running.skipped = not updated
    return True


def _dims(plan: Plan) -> tuple[int, int, int]:
    """(rows, C, S) of the planned layout (S = 1 for channels-last)."""
    shape = plan.shape
    return (shape[0], shape[1], shape[2] if len(shape) == 3 else 1)


def batch_forward(
    plan: Plan,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    activation: str | None,
    negative_slope: float,
    running=None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, np.ndarray, bool]:
    """Training forward: ``(y, mean, var, stats, folded)``; ``mean``/``var`` keepdim
    (``plan.keep``) in x's dtype, ``stats`` the float64 (4, C) array [shift, delta, var,
    invstd] for :func:`batch_backward`. ``running`` (an ``engine.RunningUpdate`` or None)
    is folded in by a kernel when its buffers allow (``folded``); otherwise the caller
    does it."""
    act = _activation(activation, negative_slope)
    numel = x.numel()
    threads = _threads(numel)
    dtype = x.dtype
    rows, c, s = _dims(plan)
    stats = np.empty((4, c))
    moments = np.empty((2, c), dtype=_NUMPY_DTYPES[dtype])
    w, b = _param(weight, c, dtype, 1.0), _param(bias, c, dtype, 0.0)
    xc = plan.contiguous(x)
    y = empty_like(x, torch.contiguous_format if plan.copy else torch.preserve_format)
    cf = plan.layout == "cf"
    if threads == 1:
        _kernels().forward_at(
            _WITNESS[dtype], cf, xc.data_ptr(), y.data_ptr(), rows, c, s,
            w.data_ptr(), b.data_ptr(), float(eps), act, stats, moments,
        )  # fmt: skip
    else:
        xv, yv, wv, bv = plan.array(xc), plan.array(y), _array(w, c), _array(b, c)
        if cf:
            _kernel("forward_cf", threads)(xv, wv, bv, float(eps), act, yv, stats, moments)
        else:
            nblocks = max(1, min(threads, rows))
            _kernel("forward_cl", threads)(xv, wv, bv, float(eps), act, nblocks, yv, stats, moments)
    folded = running is not None and _fold_running(running, moments, numel // c)
    keep = plan.keep
    mean = torch.from_numpy(moments[0].reshape(keep))
    var = torch.from_numpy(moments[1].reshape(keep))
    return y, mean, var, stats, folded


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
    threads = _threads(x.numel())
    dtype = x.dtype
    rows, c, s = _dims(plan)
    xc = plan.contiguous(x)
    dyc = plan.contiguous(dy if dy.dtype == dtype else dy.to(dtype))
    need_dx = bool(needs[0])
    dx = (
        empty_like(x, torch.contiguous_format if plan.copy else torch.preserve_format)
        if need_dx
        else None
    )
    sums = np.empty((2, c), dtype=_NUMPY_DTYPES[dtype])  # [dβ, dγ]
    w, b = _param(weight, c, dtype, 1.0), _param(bias, c, dtype, 0.0)
    cf = plan.layout == "cf"
    if threads == 1:
        _kernels().backward_at(
            _WITNESS[dtype], cf, dyc.data_ptr(), xc.data_ptr(),
            dx.data_ptr() if need_dx else 0, rows, c, s, w.data_ptr(), b.data_ptr(),
            stats, act, need_dx, sums,
        )  # fmt: skip
    else:
        xv, dyv, wv, bv = plan.array(xc), plan.array(dyc), _array(w, c), _array(b, c)
        dx_arr = plan.array(dx) if need_dx else np.empty((1,) * len(plan.shape), xv.dtype)
        if cf:
            kernel = _kernel("backward_cf", threads)
            kernel(dyv, xv, wv, bv, stats, act, need_dx, dx_arr, sums)
        else:
            nblocks = max(1, min(threads, rows))
            kernel = _kernel("backward_cl", threads)
            kernel(dyv, xv, wv, bv, stats, act, nblocks, need_dx, dx_arr, sums)
    return dx, _grad(sums[1], weight, needs[1]), _grad(sums[0], bias, needs[2])


def _grad(row: np.ndarray, p: torch.Tensor | None, needed: bool) -> torch.Tensor | None:
    """A (C,) gradient row as a tensor of ``p``'s shape and dtype."""
    if p is None or not needed:
        return None
    g = torch.from_numpy(row.reshape(p.shape))
    return g if g.dtype == p.dtype else g.to(p.dtype)


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
    threads = _threads(x.numel())
    dtype = x.dtype
    rows, c, s = _dims(plan)
    m, v = _param(mean, c, dtype, 0.0), _param(var, c, dtype, 1.0)
    w, b = _param(weight, c, dtype, 1.0), _param(bias, c, dtype, 0.0)
    xc = plan.contiguous(x)
    y = empty_like(x, torch.contiguous_format if plan.copy else torch.preserve_format)
    cf = plan.layout == "cf"
    if threads == 1:
        _kernels().affine_at(
            _WITNESS[dtype], cf, xc.data_ptr(), y.data_ptr(), rows, c, s, m.data_ptr(),
            v.data_ptr(), w.data_ptr(), b.data_ptr(), float(eps), act,
        )  # fmt: skip
        return y
    xv, yv = plan.array(xc), plan.array(y)
    mv, vv, wv, bv = _array(m, c), _array(v, c), _array(w, c), _array(b, c)
    if cf:
        _kernel("affine_cf", threads)(xv, mv, vv, wv, bv, float(eps), act, yv)
    else:
        nblocks = max(1, min(threads, rows))
        _kernel("affine_cl", threads)(xv, mv, vv, wv, bv, float(eps), act, nblocks, yv)
    return y
