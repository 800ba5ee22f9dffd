"""What the wrappers call: the serial twins of the parallel kernels, BatchNorm's
running-statistics update, and the entry points by address (``forward_at``, ...), built
once for the serial kernels and once for the threaded ones.
"""

from __future__ import annotations

import types as types_module

import numpy as np
from numba import carray, njit, types
from numba.extending import intrinsic

from normlab.kernels._elementwise import (
    _param_witness,
)
from normlab.kernels._eval import (
    affine_cf,
    affine_cl,
)
from normlab.kernels._jit import (
    _HELPER,
    _JIT,
)
from normlab.kernels._residual import (
    backward_res_cf,
    backward_res_cl,
    forward_res_cf,
    forward_res_cl,
)
from normlab.kernels._train import (
    backward_cf,
    backward_cl,
    forward_cf,
    forward_cl,
)


# -- serial twins for small tensors -------------------------------------------------------
def _serial_twin(kernel):
    """The same kernel compiled without threads (``prange`` runs as ``range``).

    A parallel launch costs microseconds on an idle machine and milliseconds on a busy
    one (every thread of the team must be scheduled), so small tensors run on the calling
    thread only, as torch's own CPU kernels do below their grain size. The twin gets its
    own name so that Numba's on-disk cache keeps the two apart.
    """
    return _recompiled(kernel.py_func, "_serial", kernel.py_func.__globals__)


def _recompiled(f, suffix: str, scope: dict, name: str | None = None):
    """Python function ``f`` compiled (without ``parallel``) as ``name + suffix`` (``name``:
    f's own by default), its global names looked up in ``scope``."""
    name = f.__name__ if name is None else name
    twin = types_module.FunctionType(
        f.__code__, scope, name + suffix, f.__defaults__, f.__closure__
    )
    twin.__qualname__ = name + suffix
    twin.__doc__ = f.__doc__
    return njit(**_JIT)(twin)


forward_cf_serial = _serial_twin(forward_cf)
forward_cl_serial = _serial_twin(forward_cl)
backward_cf_serial = _serial_twin(backward_cf)
backward_cl_serial = _serial_twin(backward_cl)
affine_cf_serial = _serial_twin(affine_cf)
affine_cl_serial = _serial_twin(affine_cl)
forward_res_cf_serial = _serial_twin(forward_res_cf)
forward_res_cl_serial = _serial_twin(forward_res_cl)
backward_res_cf_serial = _serial_twin(backward_res_cf)
backward_res_cl_serial = _serial_twin(backward_res_cl)


# -- running statistics --------------------------------------------------------------------
@njit(**_HELPER)
def _running_update(moments, correction, momentum, skip_nonfinite, running_mean, running_var,
                    count, has_count):  # fmt: skip
    """Fold a training batch's statistics into BatchNorm's running estimates, in place:

        running ← (1 − f)·running + f·batch,   f = momentum, or 1/t if momentum < 0

    (torch's rule; t: the updated ``count[0]``). ``moments`` (2, C), the forward's mean
    and biased var in x's dtype; the batch variance is ``var · correction`` (n/(n − 1)),
    rounded to that dtype, as the torch-op path computes it. ``count`` (1,) int64 is
    incremented first when ``has_count``. With ``skip_nonfinite``, a NaN/Inf batch
    statistic leaves everything unchanged. Returns whether the buffers were updated.
    The EMA is formed in float64 and rounded once into the buffers' dtype.
    """
    C = moments.shape[1]
    unbiased = np.empty(C, dtype=moments.dtype)
    finite = True
    for c in range(C):
        unbiased[c] = moments[1, c] * correction
        if not (np.isfinite(moments[0, c]) and np.isfinite(unbiased[c])):
            finite = False
    if skip_nonfinite and not finite:
        return False
    if has_count:
        count[0] += 1
    f = momentum if momentum >= 0.0 else 1.0 / np.float64(count[0])
    for c in range(C):
        running_mean[c] = (1.0 - f) * np.float64(running_mean[c]) + f * np.float64(moments[0, c])
        running_var[c] = (1.0 - f) * np.float64(running_var[c]) + f * np.float64(unbiased[c])
    return True


# The kernel set the entry templates below call: bound by :func:`_entries_for` (these
# module-level names are never called).
_forward_cf = _forward_cl = _backward_cf = _backward_cl = _affine_cf = _affine_cl = None
_forward_res_cf = _forward_res_cl = _backward_res_cf = _backward_res_cl = None


# -- entry points by address --------------------------------------------------------------
# Small tensors are dominated by the cost of the call, not of the work: turning a torch
# tensor into a numpy array costs ~0.6 µs, a pointer ~0.1 µs, and a (64, 100) forward
# kernel runs in ~4 µs. So the serial kernels are also reachable by address: the caller
# passes each tensor's data pointer (C-contiguous memory of the stated shape, kept alive
# for the call) and a scalar of the storage dtype as a type witness; these entries view
# the memory as arrays and call the kernels. The functions below are templates: they
# call the kernel set ``_forward_cf`` … ``_backward_res_cl`` that :func:`_entries_for`
# binds, once to the serial twins (``forward_at`` …) and once to the parallel kernels
# (``forward_at_threaded`` …), so each name says what runs.
@intrinsic
def _pointer(typingctx, address, witness):
    """``address`` (an integer) as a pointer to values of ``witness``'s type."""
    if not isinstance(address, types.Integer) or not isinstance(
        witness, (types.Float, types.Integer)
    ):
        return None
    pointer = types.CPointer(witness)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(pointer))

    return pointer(address, witness), codegen


def _forward_at(w0, cf, x_at, y_at, rows, C, S, w_at, b_at, eps, act, stats, moments,
               r0, mean_at, var_at, count_at, correction, momentum, skip_nonfinite,
               nblocks):  # fmt: skip
    """:func:`forward_cf` (``cf``: x is (rows, C, S)) or :func:`forward_cl` (x is
    (rows, C)), serial, on memory given by address; ``w0``: a value of x's dtype.

    Then, if ``mean_at`` is not 0, :func:`running_update_at` (``r0`` … ``skip_nonfinite``)
    in the same call. Returns 0 without running buffers, else 1 if they were updated and
    2 if a non-finite statistic skipped the update.
    """
    p0 = _param_witness(w0)  # the parameters' dtype
    w = carray(_pointer(w_at, p0), (C,))
    b = carray(_pointer(b_at, p0), (C,))
    if cf:
        x = carray(_pointer(x_at, w0), (rows, C, S))
        y = carray(_pointer(y_at, w0), (rows, C, S))
        _forward_cf(x, w, b, eps, act, y, stats, moments)
    else:
        x2 = carray(_pointer(x_at, w0), (rows, C))
        y2 = carray(_pointer(y_at, w0), (rows, C))
        _forward_cl(x2, w, b, eps, act, nblocks, y2, stats, moments)
    if mean_at == 0:
        return 0
    updated = running_update_at(
        r0, moments, correction, momentum, skip_nonfinite, mean_at, var_at, count_at
    )
    return 1 if updated else 2


def _backward_at(w0, cf, dy_at, x_at, dx_at, rows, C, S, w_at, b_at, stats, act, need_dx,
                dbias_at, dweight_at, nblocks):  # fmt: skip
    """:func:`backward_cf` / :func:`backward_cl`, serial, by address (see
    :func:`forward_at`); ``dx_at`` is not touched unless ``need_dx``, nor ``dbias_at``
    / ``dweight_at`` (C values each: Σdz, Σdz·x̂) when 0."""
    p0 = _param_witness(w0)  # the parameters' dtype
    w = carray(_pointer(w_at, p0), (C,))
    b = carray(_pointer(b_at, p0), (C,))
    sums = np.empty((2, C), dtype=w.dtype)
    n_dx = rows if need_dx else 0
    if cf:
        dy = carray(_pointer(dy_at, w0), (rows, C, S))
        x = carray(_pointer(x_at, w0), (rows, C, S))
        dx = carray(_pointer(dx_at, w0), (n_dx, C, S))
        _backward_cf(dy, x, w, b, stats, act, need_dx, dx, sums)
    else:
        dy2 = carray(_pointer(dy_at, w0), (rows, C))
        x2 = carray(_pointer(x_at, w0), (rows, C))
        dx2 = carray(_pointer(dx_at, w0), (n_dx, C))
        _backward_cl(dy2, x2, w, b, stats, act, nblocks, need_dx, dx2, sums)
    if dbias_at != 0:
        carray(_pointer(dbias_at, p0), (C,))[:] = sums[0]
    if dweight_at != 0:
        carray(_pointer(dweight_at, p0), (C,))[:] = sums[1]


def _affine_at(w0, cf, x_at, y_at, rows, C, S, m_at, v_at, w_at, b_at, eps, act, nblocks):
    """:func:`affine_cf` / :func:`affine_cl`, serial, by address (see
    :func:`forward_at`)."""
    p0 = _param_witness(w0)  # the parameters' dtype
    m = carray(_pointer(m_at, p0), (C,))
    v = carray(_pointer(v_at, p0), (C,))
    w = carray(_pointer(w_at, p0), (C,))
    b = carray(_pointer(b_at, p0), (C,))
    if cf:
        x = carray(_pointer(x_at, w0), (rows, C, S))
        y = carray(_pointer(y_at, w0), (rows, C, S))
        _affine_cf(x, m, v, w, b, eps, act, y)
    else:
        x2 = carray(_pointer(x_at, w0), (rows, C))
        y2 = carray(_pointer(y_at, w0), (rows, C))
        _affine_cl(x2, m, v, w, b, eps, act, nblocks, y2)


def _forward_res_at(w0, cf, x_at, res_at, y_at, rows, C, S, w_at, b_at, eps, act, stats,
                   moments, r0, mean_at, var_at, count_at, correction, momentum,
                   skip_nonfinite, nblocks):  # fmt: skip
    """:func:`forward_res_cf` / :func:`forward_res_cl` by address, as :func:`forward_at`
    (``res_at``: the residual, laid out like x)."""
    p0 = _param_witness(w0)  # the parameters' dtype
    w = carray(_pointer(w_at, p0), (C,))
    b = carray(_pointer(b_at, p0), (C,))
    if cf:
        x = carray(_pointer(x_at, w0), (rows, C, S))
        res = carray(_pointer(res_at, w0), (rows, C, S))
        y = carray(_pointer(y_at, w0), (rows, C, S))
        _forward_res_cf(x, res, w, b, eps, act, y, stats, moments)
    else:
        x2 = carray(_pointer(x_at, w0), (rows, C))
        res2 = carray(_pointer(res_at, w0), (rows, C))
        y2 = carray(_pointer(y_at, w0), (rows, C))
        _forward_res_cl(x2, res2, w, b, eps, act, nblocks, y2, stats, moments)
    if mean_at == 0:
        return 0
    updated = running_update_at(
        r0, moments, correction, momentum, skip_nonfinite, mean_at, var_at, count_at
    )
    return 1 if updated else 2


def _backward_res_at(w0, cf, dy_at, x_at, src_at, from_y, dx_at, dr_at, rows, C, S, w_at,
                    b_at, stats, act, need_dx, need_dr, dbias_at, dweight_at,
                    nblocks):  # fmt: skip
    """:func:`backward_res_cf` / :func:`backward_res_cl` by address, as
    :func:`backward_at`; ``src_at``: the saved output y (``from_y``) or the residual."""
    p0 = _param_witness(w0)  # the parameters' dtype
    w = carray(_pointer(w_at, p0), (C,))
    b = carray(_pointer(b_at, p0), (C,))
    sums = np.empty((2, C), dtype=w.dtype)
    n_dx = rows if need_dx else 0
    n_dr = rows if need_dr else 0
    if cf:
        dy = carray(_pointer(dy_at, w0), (rows, C, S))
        x = carray(_pointer(x_at, w0), (rows, C, S))
        src = carray(_pointer(src_at, w0), (rows, C, S))
        dx = carray(_pointer(dx_at, w0), (n_dx, C, S))
        dr = carray(_pointer(dr_at, w0), (n_dr, C, S))
        _backward_res_cf(dy, x, src, w, b, stats, act, from_y, need_dx, need_dr, dx, dr,
                               sums)  # fmt: skip
    else:
        dy2 = carray(_pointer(dy_at, w0), (rows, C))
        x2 = carray(_pointer(x_at, w0), (rows, C))
        src2 = carray(_pointer(src_at, w0), (rows, C))
        dx2 = carray(_pointer(dx_at, w0), (n_dx, C))
        dr2 = carray(_pointer(dr_at, w0), (n_dr, C))
        _backward_res_cl(dy2, x2, src2, w, b, stats, act, from_y, nblocks, need_dx,
                               need_dr, dx2, dr2, sums)  # fmt: skip
    if dbias_at != 0:
        carray(_pointer(dbias_at, p0), (C,))[:] = sums[0]
    if dweight_at != 0:
        carray(_pointer(dweight_at, p0), (C,))[:] = sums[1]


@njit(**_JIT)
def running_update_at(r0, moments, correction, momentum, skip_nonfinite, mean_at, var_at,
                      count_at):  # fmt: skip
    """:func:`_running_update` on running buffers (C,) of ``r0``'s dtype and an int64
    counter (``count_at`` 0: none) given by address."""
    C = moments.shape[1]
    running_mean = carray(_pointer(mean_at, r0), (C,))
    running_var = carray(_pointer(var_at, r0), (C,))
    has_count = count_at != 0
    if has_count:
        count = carray(_pointer(count_at, np.int64(0)), (1,))
    else:
        count = np.zeros(1, dtype=np.int64)
    return _running_update(moments, correction, momentum, skip_nonfinite, running_mean,
                           running_var, count, has_count)  # fmt: skip


_ENTRIES = ("forward_at", "backward_at", "affine_at", "forward_res_at", "backward_res_at")


def _entries_for(kernels: dict, suffix: str) -> dict:
    """The by-address entries compiled against the kernel set ``kernels`` (the names
    ``_forward_cf`` … ``_backward_res_cl`` the templates call, mapped to the serial twins
    or to the parallel kernels), named ``entry + suffix`` so that each set has its own
    on-disk cache: the serial set for small tensors, the threaded one for large tensors,
    whose numpy views and the gradients' copies would cost ~20 µs a step at (256, 512)."""
    scope = dict(globals())
    scope.update(kernels)
    return {name: _recompiled(globals()["_" + name], suffix, scope, name) for name in _ENTRIES}


def _kernel_set(suffix: str) -> dict:
    """``_forward_cf`` … ``_backward_res_cl`` → the kernels named ``forward_cf + suffix`` …"""
    return {
        f"_{direction}_{layout}": globals()[f"{direction}_{layout}{suffix}"]
        for direction in ("forward", "backward", "affine", "forward_res", "backward_res")
        for layout in ("cf", "cl")
    }


_serial_entries = _entries_for(_kernel_set("_serial"), "")
_threaded_entries = _entries_for(_kernel_set(""), "_threaded")
forward_at = _serial_entries["forward_at"]
backward_at = _serial_entries["backward_at"]
affine_at = _serial_entries["affine_at"]
forward_res_at = _serial_entries["forward_res_at"]
backward_res_at = _serial_entries["backward_res_at"]
forward_at_threaded = _threaded_entries["forward_at"]
backward_at_threaded = _threaded_entries["backward_at"]
affine_at_threaded = _threaded_entries["affine_at"]
forward_res_at_threaded = _threaded_entries["forward_res_at"]
backward_res_at_threaded = _threaded_entries["backward_res_at"]
