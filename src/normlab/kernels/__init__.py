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
from dataclasses import dataclass

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


def mode() -> str:
    """The path selection from ``NORMLAB_KERNELS`` (read on every call, so tests and
    users can switch it at run time)."""
    value = os.environ.get(KERNELS_ENV, "auto").strip().lower() or "auto"
    if value not in MODES:
        raise ValueError(
            f"{KERNELS_ENV}={value!r} is not one of {MODES}: 'auto' (default) picks the fused "
            f"kernels or torch's ops by size, 'torch' always uses torch's ops, 'numba' uses the "
            f"kernels wherever they apply."
        )
    return value


@dataclass(frozen=True)
class Plan:
    """How to view a tensor for the kernels.

    ``layout`` 'cf': ``(N, C, S)`` of the contiguous tensor; 'cl': ``(M, C)`` of the
    tensor with the channel dim moved last. ``copy``: the input is in neither layout and
    is made contiguous first.
    """

    layout: str
    channel_dim: int
    shape: tuple[int, ...]
    copy: bool

    @property
    def channels(self) -> int:
        return self.shape[1]

    def array(self, t: torch.Tensor) -> np.ndarray:
        """``t`` (shaped like the planned input) as the kernel's C-contiguous 2-D/3-D
        array, sharing memory unless its strides differ from the layout (then a copy)."""
        if self.layout == "cl" and self.channel_dim != t.dim() - 1:
            t = t.movedim(self.channel_dim, -1)
        if not t.is_contiguous():
            t = t.contiguous()
        # numpy's reshape of a C-contiguous array is always a view
        return t.numpy(force=True).reshape(self.shape)

    def empty(self, like: torch.Tensor) -> tuple[torch.Tensor, np.ndarray]:
        """A new tensor shaped like ``like`` in this layout, and its kernel array."""
        out = empty_like(like, torch.contiguous_format if self.copy else torch.preserve_format)
        return out, self.array(out)


# Under torch.compile the engine's autograd.Function is traced with fake tensors: the
# kernels (which read real memory) must not run there.
_is_compiling = getattr(torch.compiler, "is_compiling", lambda: False)


def _eligible_tensor(x: torch.Tensor) -> bool:
    return (
        type(x) is torch.Tensor
        and x.dtype in _KERNEL_DTYPES
        and x.device.type == "cpu"
        and x.layout == torch.strided
        and x.dim() >= 2
        and not _is_compiling()
    )


def _per_channel(p: torch.Tensor | None, keep_shape: list[int]) -> bool:
    return p is None or (
        isinstance(p, torch.Tensor)
        and p.device.type == "cpu"
        and p.is_floating_point()
        and list(p.shape) == keep_shape
    )


def _layout(x: torch.Tensor, c: int) -> Plan:
    shape = x.shape
    n = 1
    for s in shape[:c]:
        n *= s
    s_inner = x.numel() // (n * shape[c])
    if x.is_contiguous():
        if s_inner == 1:  # (N, C) or (N, C, 1, ...): the channels-last loop fits better
            return Plan("cl", c, (n, shape[c]), False)
        return Plan("cf", c, (n, shape[c], s_inner), False)
    if x.movedim(c, -1).is_contiguous():
        return Plan("cl", c, (x.numel() // shape[c], shape[c]), False)
    return Plan("cf", c, (n, shape[c], s_inner), True)


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
    """A plan for training-mode batch norm of ``x`` over ``dims``, or None for the
    torch-op path."""
    if not center or not _eligible_tensor(x) or x.numel() == 0 or len(dims) != x.dim() - 1:
        return None
    c = next(d for d in range(x.dim()) if d not in dims)
    keep = [x.shape[d] if d == c else 1 for d in range(x.dim())]
    if not (_per_channel(weight, keep) and _per_channel(bias, keep)) or not _use(x):
        return None
    return _layout(x, c)


def plan_affine(
    x: torch.Tensor,
    mean: torch.Tensor | None,
    var: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
) -> Plan | None:
    """A plan for eval-mode (given statistics) batch norm, or None for the torch-op path.
    Only for inference: nothing may require a gradient."""
    if mean is None or not _eligible_tensor(x) or x.numel() == 0:
        return None
    params = [t for t in (mean, var, weight, bias) if t is not None]
    if torch.is_grad_enabled() and (x.requires_grad or any(t.requires_grad for t in params)):
        return None
    if mean.dim() != x.dim():
        return None
    wide = [d for d in range(x.dim()) if mean.shape[d] != 1]
    if len(wide) != 1 or mean.shape[wide[0]] != x.shape[wide[0]]:
        return None  # not per channel (or a single channel: torch's ops do fine)
    c = wide[0]
    keep = list(mean.shape)
    if not all(_per_channel(t, keep) for t in params) or not _use(x):
        return None
    return _layout(x, c)


# -- running the kernels -----------------------------------------------------------------
def _kernels():
    from normlab.kernels import _numba  # first use compiles or loads the cache

    return _numba


def _threads(numel: int) -> int:
    """Threads for a kernel over ``numel`` elements: torch's count, or 1 (the serial
    twin, no thread team at all) below :data:`PARALLEL_MIN_NUMEL`."""
    if numel < PARALLEL_MIN_NUMEL:
        return 1
    import numba

    n = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    numba.set_num_threads(n)
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
def _constant(c: int, dtype: np.dtype, value: float) -> np.ndarray:
    return np.full(c, value, dtype=dtype)  # shared: the kernels only read parameters


def _param(p: torch.Tensor | None, c: int, dtype: torch.dtype, fill: float) -> np.ndarray:
    """A per-channel parameter as a (C,) array in the kernel's dtype (a view if it is
    one already: parameters of the input's dtype cost no copy)."""
    if p is None:
        return _constant(c, _NUMPY_DTYPES[dtype], fill)
    if p.dtype != dtype:
        p = p.detach().to(dtype)
    return p.numpy(force=True).reshape(c)


@functools.lru_cache(maxsize=64)
def _activation(activation: str | None, negative_slope: float) -> np.ndarray:
    from normlab.functional.activations import get_activation  # validates, as the torch path

    return _kernels().activation_params(get_activation(activation).name, negative_slope)


def batch_forward(
    plan: Plan,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    activation: str | None,
    negative_slope: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training forward: ``(y, mean, var, stats)``; ``mean``/``var`` keepdim in x's dtype,
    ``stats`` the float64 (4, C) tensor [shift, delta, var, invstd] for backward."""
    act = _activation(activation, negative_slope)
    threads = _threads(x.numel())
    c = plan.channels
    xv = plan.array(x)
    y, yv = plan.empty(x)
    stats = np.empty((4, c))
    moments = np.empty((2, c), dtype=xv.dtype)
    w, b = _param(weight, c, x.dtype, 1.0), _param(bias, c, x.dtype, 0.0)
    if plan.layout == "cf":
        _kernel("forward_cf", threads)(xv, w, b, float(eps), act, yv, stats, moments)
    else:
        nblocks = max(1, min(threads, plan.shape[0]))
        _kernel("forward_cl", threads)(xv, w, b, float(eps), act, nblocks, yv, stats, moments)
    keep = [c if d == plan.channel_dim else 1 for d in range(x.dim())]
    mv = torch.from_numpy(moments)
    return y, mv[0].view(keep), mv[1].view(keep), torch.from_numpy(stats)


def batch_backward(
    plan: Plan,
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    stats: torch.Tensor,
    activation: str | None,
    negative_slope: float,
    needs: tuple[bool, bool, bool],
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Closed-form training backward: ``(dx, dweight, dbias)`` (None where not needed)."""
    act = _activation(activation, negative_slope)
    threads = _threads(x.numel())
    c = plan.channels
    xv = plan.array(x)
    dyv = plan.array(dy if dy.dtype == x.dtype else dy.to(x.dtype))
    need_dx = bool(needs[0])
    if need_dx:
        dx, dx_arr = plan.empty(x)
    else:
        dx = None
        dx_arr = np.empty((1,) * len(plan.shape), dtype=xv.dtype)
    sums = np.empty((2, c), dtype=xv.dtype)  # [dβ, dγ]
    w, b = _param(weight, c, x.dtype, 1.0), _param(bias, c, x.dtype, 0.0)
    s = stats.numpy()
    if plan.layout == "cf":
        kernel = _kernel("backward_cf", threads)
        kernel(dyv, xv, w, b, s, act, need_dx, dx_arr, sums)
    else:
        nblocks = max(1, min(threads, plan.shape[0]))
        kernel = _kernel("backward_cl", threads)
        kernel(dyv, xv, w, b, s, act, nblocks, need_dx, dx_arr, sums)
    dw = db = None
    grads = torch.from_numpy(sums)
    if weight is not None and needs[1]:
        dw = grads[1].view(weight.shape).to(weight.dtype)
    if bias is not None and needs[2]:
        db = grads[0].view(bias.shape).to(bias.dtype)
    return dx, dw, db


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
    c, dt = plan.channels, x.dtype
    m, v = _param(mean, c, dt, 0.0), _param(var, c, dt, 1.0)
    w, b = _param(weight, c, dt, 1.0), _param(bias, c, dt, 0.0)
    xv = plan.array(x)
    y, yv = plan.empty(x)
    if plan.layout == "cf":
        _kernel("affine_cf", threads)(xv, m, v, w, b, float(eps), act, yv)
    else:
        nblocks = max(1, min(threads, plan.shape[0]))
        _kernel("affine_cl", threads)(xv, m, v, w, b, float(eps), act, nblocks, yv)
    return y
