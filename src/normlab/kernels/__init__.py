"""Fast fused CPU kernels for batch normalization, and the rule for when to use them.

Only :mod:`normlab.functional.engine` calls this package: it asks for a *plan*
(:func:`plan_batch`, :func:`plan_affine`) and, if it gets one, runs the kernels instead of
its torch-op path, which stays the reference. A plan exists only for the BatchNorm case:

* statistics per channel over every other dim (training), or per-channel constants
  (eval), with weight/bias per channel;
* a plain CPU float32/float64/bfloat16/float16 ``torch.Tensor`` (no subclass, not meta,
  not traced by ``torch.compile``) with at least :data:`MIN_NUMEL` elements; half
  precision is read and written as such, computed in float32 with float64 statistics,
  with per-channel tensors taken as float32 and parameter gradients returned in each
  parameter's dtype (torch's rule under autocast: bf16 input, float32 parameters);
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

Two ways in, same kernels. Below :data:`PARALLEL_MIN_NUMEL` elements (or on one thread)
the serial kernels are called *by address* (``forward_at``, ``backward_at``, ``affine_at``): each tensor goes
in as its data pointer (~0.1 µs) rather than as a numpy view (~0.6 µs), which at
(64, 100) — a ~4 µs forward kernel — is most of the difference. Larger inputs go to the
threaded kernels as numpy arrays. The training forward also folds the batch into the
running statistics (``engine.RunningUpdate``) in the same kernel call when the buffers
are plain contiguous CPU tensors; otherwise the engine does it with torch ops.

BN → add(residual) → activation (``engine._NormalizeBatchResidual``, ``nl.fuse``) has its
own pair, :func:`batch_forward_residual` / :func:`batch_backward_residual`: r is read in
the forward's write pass, and one backward call returns dx and dr = dy·act'(z) together.

Activation-sized outputs (4 MiB and more) come from a reuse pool that spares the page
faults of fresh memory at every step (:mod:`normlab.kernels._memory`; ``NORMLAB_POOL_MB``,
:func:`empty_cache`, :func:`pool_info`, :func:`set_pool_limit`).
"""

from __future__ import annotations

import functools
import math
import os
import threading
from typing import NamedTuple

import numpy as np
import torch

from normlab import _private
from normlab.kernels._memory import empty_cache, empty_like, pool_info, set_pool_limit

__all__ = [
    "KERNELS_ENV",
    "MIN_NUMEL",
    "MODES",
    "PARALLEL_MIN_NUMEL",
    "affine_channels",
    "empty_cache",
    "mode",
    "plan_affine",
    "plan_batch",
    "pool_info",
    "set_pool_limit",
    "traced",
]

KERNELS_ENV = "NORMLAB_KERNELS"
MODES = ("auto", "torch", "numba")

# Below this many elements, `auto` keeps the torch-op path. `normlab bench --paths` on the
# development machine (2 cores, shared) found the kernel path at least as fast as the
# torch-op path at every size, down to (64, 100), in training and eval: each torch op
# costs as much Python and dispatch as a whole kernel call. Hence 0.
MIN_NUMEL = 0
# Below this many elements the kernels run on the calling thread only. A threaded launch
# costs ~10 µs on an idle machine and milliseconds on a busy one (the whole team must be
# scheduled). 2^16: at (256, 512) (2^17) with 2 threads on an idle machine, `normlab
# bench --case mlp` measured 0.75x torch serial and 0.82-0.85x threaded (torch itself
# threads from 2^15 elements per op); on a busy machine torch's own threaded ops stall
# far longer than these two launches.
PARALLEL_MIN_NUMEL = 1 << 16

# The kernels' dtypes: per input dtype, the dtype of the (2, C) moments they return and of
# the per-channel parameters they read. Half-precision inputs (read and written as 16-bit
# patterns, computed in float32/float64: kernels._numba, "half-precision storage") take
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
    return affine_forward(plan, x, mean, var, weight, bias, eps, activation, negative_slope)


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
    """Threads for a kernel over ``numel`` elements: torch's count (1: the serial
    kernels, no thread team at all; also in a child forked from a process whose Numba
    threads are GNU OpenMP's, which Numba kills if it launches them)."""
    want = torch.get_num_threads()
    if want == 1 or _SERIAL_AFTER_FORK:
        return 1
    _kernels()  # first: importing it picks the threading layer before Numba's threads start
    import numba

    n = min(want, numba.config.NUMBA_NUM_THREADS)
    if n == 1:
        return 1
    numba.set_num_threads(n)
    # On Numba's 'omp' layer (a user's choice; see _numba._choose_threading_layer) the
    # first thread launch can reset the OpenMP thread count torch reads: put torch's
    # back, or one big batch norm would change how many threads every later torch op
    # uses. (Never true on 'workqueue', which does not touch OpenMP.)
    if torch.get_num_threads() != want:
        torch.set_num_threads(want)
    return n


# One threaded launch at a time: Numba's 'workqueue' threading layer (normlab's choice,
# see _numba._choose_threading_layer) aborts the process on concurrent launches; callers
# from several Python threads queue here, each launch using every thread anyway.
_LAUNCH = threading.Lock()
_SERIAL_AFTER_FORK = False


def _numba_threading_layer() -> str | None:
    """The threading layer Numba's threads run on, or None before they started."""
    import sys

    parallel = sys.modules.get("numba.np.ufunc.parallel")
    return None if parallel is None else getattr(parallel, "_threading_layer", None)


# fork(): the child gets a copy of memory and only the forking thread. A lock another
# thread held at that moment would stay locked in the child forever, so the fork waits
# for a running launch to end (the kernels release the GIL: another thread may be in
# one) and the child starts with a free lock. Numba's 'workqueue' pool is rebuilt in the
# child on its first launch; GNU OpenMP's cannot be, so on the 'omp' layer the child
# runs the serial kernels.
def _before_fork() -> None:
    _LAUNCH.acquire()


def _after_fork_in_parent() -> None:
    _LAUNCH.release()


def _after_fork_in_child() -> None:
    global _LAUNCH, _SERIAL_AFTER_FORK
    _LAUNCH = threading.Lock()
    if _numba_threading_layer() == "omp":
        _SERIAL_AFTER_FORK = True


if hasattr(os, "register_at_fork"):
    os.register_at_fork(
        before=_before_fork,
        after_in_parent=_after_fork_in_parent,
        after_in_child=_after_fork_in_child,
    )


def _entry(name: str, numel: int, rows: int):
    """``(entry, nblocks)``: the by-address kernel entry ``name`` for a tensor of
    ``numel`` elements and ``rows`` rows, serial below :data:`PARALLEL_MIN_NUMEL`
    elements or on one thread, else threaded (serialised by a lock), with the
    channels-last kernels' row-block count."""
    threads = 1 if numel < PARALLEL_MIN_NUMEL else _threads(numel)
    if threads == 1:
        return getattr(_kernels(), name), 1
    kernel = getattr(_kernels(), name + "_threaded")

    def launch(*args):
        with _LAUNCH:
            return kernel(*args)

    return launch, max(1, min(threads, rows))


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
# int16 float16; see kernels._numba).
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
