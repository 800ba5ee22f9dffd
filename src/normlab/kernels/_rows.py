"""The loops over rows the kernels are built from, inlined into them: the storage-dtype
code of the piecewise-linear activations (channels-last rows with (6, C) constants), the
channels-last row loops specialised per activation family, and the per-channel
constants (scale/shift, eval constants, row-block totals).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from normlab.kernels._elementwise import (
    _A,
    _C1,
    _C2,
    _C3,
    _FAMILY,
    _G1,
    _HARDSWISH,
    _HARDTANH,
    _LOGISTIC,
    _PWL,
    _SLOPE,
    _elu,
    _elu_grad,
    _hardswish,
    _hardswish_grad,
    _hardtanh,
    _hardtanh_grad,
    _narrow,
    _pwl,
    _pwl_grad,
    _smooth,
    _smooth_grad,
    _wide,
    _work,
    _work_empty,
)
from normlab.kernels._jit import (
    _HELPER,
)

# -- arithmetic in the storage dtype ----------------------------------------------------
# The piecewise-linear activations (identity, relu, leaky_relu) of channels-first tensors
# compute elementwise in x's own dtype, twice as many float32 values per instruction as
# float64, where that is as exact as the output's rounding: the statistics stay float64
# (from the forward's float64 sums), d = x − k is exact for float32 values near k
# (Sterbenz), and z = d·scale + shift then carries a few float32 roundings of terms of
# the size of |z| (≤ 4e-7 from the float64 result at offset 1e6, std 1e-2; the output's
# own rounding is 6e-8·|z|). Backward sums a row (at most _STORAGE_SUM_MAX values, split
# over the vector lanes) in x's dtype, then rows in float64. Channels whose constants
# could overflow or underflow in float32 take the float64 code.
_STORAGE_SUM_MAX = 4096


@njit(**_HELPER)
def _storage_math_is_safe(invstd, scale, shift, k):
    """Whether (x − k)·scale + shift can be formed in float32 without overflow: a
    variance below 1e60 bounds |x − k| far below float32's range."""
    return invstd > 1e-30 and abs(scale) < 1e30 and abs(shift) < 1e30 and abs(k) < 1e30


# Channels-last rows hold every channel: the storage-dtype code runs when every channel is
# safe, with the per-channel constants in one (6, C) array of x's dtype (see below; the
# eval kernels use it for both layouts).
_STORAGE_ROWS = 32  # rows summed in x's dtype per channel before adding into float64


@njit(**_HELPER)
def _storage_constants(x, stats, scale, shift, act):
    """Rows k, scale, shift, delta, slope, 0 as a (6, C) array of x's dtype, or a (0, C)
    array when the activation is not piecewise linear through 0 or a channel is not safe
    for x's dtype."""
    C = x.shape[1]
    if act[_FAMILY] != _PWL:
        return _work_empty((0, C), x)
    for c in range(C):
        if not _storage_math_is_safe(stats[3, c], scale[c], shift[c], stats[0, c]):
            return _work_empty((0, C), x)
    tk = _work_empty((6, C), x)
    for c in range(C):
        tk[0, c] = stats[0, c]
        tk[1, c] = scale[c]
        tk[2, c] = shift[c]
        tk[3, c] = stats[1, c]
        tk[4, c] = act[_SLOPE]
        tk[5, c] = 0.0
    return tk


@njit(**_HELPER)
def _out_rows_cl_storage(x, y, i0, i1, tk):
    """y = act((x − k)·scale + shift) for rows i0..i1 in x's dtype (piecewise linear).
    The constants are copied into their own arrays and the slope read once: LLVM cannot
    tell that y's stores leave ``tk`` alone, and would reload it for every value."""
    k, scale, shift = tk[0].copy(), tk[1].copy(), tk[2].copy()
    slope, zero = tk[4, 0], tk[5, 0]
    for i in range(i0, i1):
        xr = x[i]
        yr = y[i]
        for c in range(xr.shape[0]):
            z = (_work(xr[c]) - k[c]) * scale[c] + shift[c]
            yr[c] = _narrow(z if z > zero else z * slope, yr)


@njit(**_HELPER)
def _grad_sums_rows_cl_storage(dy, x, i0, i1, tk, acc_a, acc_b):
    """Σdz and Σdz·(d − delta) over rows i0..i1 per channel: blocks of _STORAGE_ROWS
    rows in x's dtype, added into the float64 ``acc_a``, ``acc_b``."""
    C = x.shape[1]
    k, scale, shift, delta = tk[0].copy(), tk[1].copy(), tk[2].copy(), tk[3].copy()
    slope, zero = tk[4, 0], tk[5, 0]
    pa = _work_empty(C, x)
    pb = _work_empty(C, x)
    i = i0
    while i < i1:
        i_end = min(i1, i + _STORAGE_ROWS)
        pa[:] = zero
        pb[:] = zero
        for r in range(i, i_end):
            xr = x[r]
            dyr = dy[r]
            for c in range(C):
                d = _work(xr[c]) - k[c]
                z = d * scale[c] + shift[c]
                dz = _work(dyr[c]) if z > zero else _work(dyr[c]) * slope
                pa[c] += dz
                pb[c] += dz * (d - delta[c])
        for c in range(C):
            acc_a[c] += pa[c]
            acc_b[c] += pb[c]
        i = i_end


@njit(**_HELPER)
def _grad_rows_cl_storage(dy, x, dx, i0, i1, tk, pqr):
    """dx = p·dz + q·(d − delta) + r for rows i0..i1 in x's dtype; ``pqr`` (3, C)."""
    k, scale, shift, delta = tk[0].copy(), tk[1].copy(), tk[2].copy(), tk[3].copy()
    p, q, rr = pqr[0].copy(), pqr[1].copy(), pqr[2].copy()
    slope, zero = tk[4, 0], tk[5, 0]
    for r in range(i0, i1):
        xr = x[r]
        dyr = dy[r]
        dxr = dx[r]
        for c in range(xr.shape[0]):
            d = _work(xr[c]) - k[c]
            z = d * scale[c] + shift[c]
            dz = _work(dyr[c]) if z > zero else _work(dyr[c]) * slope
            dxr[c] = _narrow(p[c] * dz + q[c] * (d - delta[c]) + rr[c], dxr)


# -- one row, channels-last: x[i, :], all C channels of one position (vector parameters) -
@njit(**_HELPER)
def _sums_rows_cl(x, i0, i1, k, acc1, acc2):
    """Add rows i0..i1 of x − k into the per-channel sums; four rows per pass over the
    accumulators, so they are loaded and stored a quarter as often."""
    i = i0
    while i + 4 <= i1:
        for c in range(x.shape[1]):
            kc = k[c]
            d0 = _wide(x[i, c]) - kc
            d1 = _wide(x[i + 1, c]) - kc
            d2 = _wide(x[i + 2, c]) - kc
            d3 = _wide(x[i + 3, c]) - kc
            acc1[c] += (d0 + d1) + (d2 + d3)
            acc2[c] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)
        i += 4
    while i < i1:
        for c in range(x.shape[1]):
            d = _wide(x[i, c]) - k[c]
            acc1[c] += d
            acc2[c] += d * d
        i += 1


# Channels-last rows: x[i, :] holds all C channels of one position, so every loop runs
# over the contiguous channels with per-channel constants from arrays, and the compiler
# vectorises it only when its body is one activation: the family is tested once per call
# and selects a loop nest specialised for it (the element functions below are passed as
# compile-time arguments: ``_rows_*`` holds each loop once). A family tested per element,
# in a body that also holds elu's libm call, kept these loops scalar: 7x the
# channels-first time for a BN + ReLU6 training step (issue 12). The constants are
# copied into fresh arrays first: LLVM cannot tell that the stores leave the caller's
# arrays alone and would check or reload them.
@njit(**_HELPER)
def _act_tuple(act):
    """act's slots after the family: (slope, a, c1, c2, c3, g1)."""
    return (act[_SLOPE], act[_A], act[_C1], act[_C2], act[_C3], act[_G1])


# z as the element functions take it: from z = (x − k)·scale + shift and the value ``sv``
# of the second input (none, the residual r, or the output y).
@njit(**_HELPER)
def _z_plain(z, sv):
    return z


@njit(**_HELPER)
def _z_res(z, sv):
    return z + sv


@njit(**_HELPER)
def _z_y(z, sv):
    return sv


# act(z) per family, p = _act_tuple(act)
@njit(**_HELPER)
def _pwl_f(z, p):
    return _pwl(z, p[0])


@njit(**_HELPER)
def _smooth_f(z, p):
    return _smooth(z, p[1], p[2], p[3], p[4])


@njit(**_HELPER)
def _hardtanh_f(z, p):
    return _hardtanh(z, p[1], p[2])


@njit(**_HELPER)
def _hardswish_f(z, p):
    return _hardswish(z)


@njit(**_HELPER)
def _elu_f(z, p):
    return _elu(z, p[1])


# act'(z) per family
@njit(**_HELPER)
def _pwl_g(z, p):
    return _pwl_grad(z, p[0])


@njit(**_HELPER)
def _smooth_g(z, p):
    return _smooth_grad(z, p[1], p[5], p[4])


@njit(**_HELPER)
def _hardtanh_g(z, p):
    return _hardtanh_grad(z, p[1], p[5])


@njit(**_HELPER)
def _hardswish_g(z, p):
    return _hardswish_grad(z)


@njit(**_HELPER)
def _elu_g(z, p):
    return _elu_grad(z, p[1])


# act'(z) from y = act(z) per family (see _grad_from_output)
@njit(**_HELPER)
def _pwl_gy(y, p):
    return 1.0 if y > 0.0 else p[0]


@njit(**_HELPER)
def _logistic_gy(y, p):
    s = (y - p[3]) / p[2]
    return p[5] * s * (1.0 - s)


@njit(**_HELPER)
def _hardtanh_gy(y, p):
    return 0.0 if (y <= p[1] or y >= p[2]) else 1.0


@njit(**_HELPER)
def _elu_gy(y, p):
    return 1.0 if y > 0.0 else y + p[1]


@njit(**_HELPER)
def _rows_out(x, src, y, i0, i1, k, scale, shift, zf, f, p):
    """y = f(zf((x − k)·scale + shift, src)) for rows i0..i1."""
    k, scale, shift = k.copy(), scale.copy(), shift.copy()
    for i in range(i0, i1):
        xr = x[i]
        sr = src[i]
        yr = y[i]
        for c in range(xr.shape[0]):
            z = zf((_wide(xr[c]) - k[c]) * scale[c] + shift[c], _wide(sr[c]))
            yr[c] = _narrow(f(z, p), yr)


@njit(**_HELPER)
def _rows_sums(dy, x, src, i0, i1, k, delta, invstd, scale, shift, zf, g, p, acc_a, acc_b):
    """A = Σdz and B = Σdz·x̂ over rows i0..i1 added into ``acc_a``, ``acc_b``, with
    dz = dy·g(zf((x − k)·scale + shift, src))."""
    k, delta, invstd = k.copy(), delta.copy(), invstd.copy()
    scale, shift = scale.copy(), shift.copy()
    for i in range(i0, i1):
        xr = x[i]
        dyr = dy[i]
        sr = src[i]
        for c in range(xr.shape[0]):
            d = _wide(xr[c]) - k[c]
            dz = _wide(dyr[c]) * g(zf(d * scale[c] + shift[c], _wide(sr[c])), p)
            acc_a[c] += dz
            acc_b[c] += dz * ((d - delta[c]) * invstd[c])


@njit(**_HELPER)
def _rows_dx(dy, x, src, dx, i0, i1, k, delta, invstd, scale, shift, ma, mb, zf, g, p):
    """dx = scale·(dz − A/n − x̂·B/n) for rows i0..i1 (dz: see :func:`_rows_sums`)."""
    k, delta, invstd = k.copy(), delta.copy(), invstd.copy()
    scale, shift, ma, mb = scale.copy(), shift.copy(), ma.copy(), mb.copy()
    for i in range(i0, i1):
        xr = x[i]
        dyr = dy[i]
        sr = src[i]
        dxr = dx[i]
        for c in range(xr.shape[0]):
            d = _wide(xr[c]) - k[c]
            dz = _wide(dyr[c]) * g(zf(d * scale[c] + shift[c], _wide(sr[c])), p)
            dxr[c] = _narrow(scale[c] * (dz - ma[c] - ((d - delta[c]) * invstd[c]) * mb[c]), dxr)


@njit(**_HELPER)
def _rows_dx_dr(dy, x, src, dx, dr, i0, i1, k, delta, invstd, scale, shift, ma, mb, zf, g, p):
    """dx (where ``dx`` has rows, see :func:`_rows_dx`) and dr = dz (where ``dr`` has rows)
    for rows i0..i1."""
    if dr.shape[0] == 0:
        _rows_dx(dy, x, src, dx, i0, i1, k, delta, invstd, scale, shift, ma, mb, zf, g, p)
        return
    k, delta, invstd = k.copy(), delta.copy(), invstd.copy()
    scale, shift, ma, mb = scale.copy(), shift.copy(), ma.copy(), mb.copy()
    C = x.shape[1]
    if dx.shape[0] == 0:
        for i in range(i0, i1):
            xr = x[i]
            dyr = dy[i]
            sr = src[i]
            drr = dr[i]
            for c in range(C):
                d = _wide(xr[c]) - k[c]
                drr[c] = _narrow(
                    _wide(dyr[c]) * g(zf(d * scale[c] + shift[c], _wide(sr[c])), p), drr
                )
        return
    for i in range(i0, i1):
        xr = x[i]
        dyr = dy[i]
        sr = src[i]
        dxr = dx[i]
        drr = dr[i]
        for c in range(C):
            d = _wide(xr[c]) - k[c]
            dz = _wide(dyr[c]) * g(zf(d * scale[c] + shift[c], _wide(sr[c])), p)
            dxr[c] = _narrow(scale[c] * (dz - ma[c] - ((d - delta[c]) * invstd[c]) * mb[c]), dxr)
            drr[c] = _narrow(dz, drr)


@njit(**_HELPER)
def _out_rows_cl(x, src, y, i0, i1, k, scale, shift, act, zf):
    """y = act(zf((x − k)·scale + shift, src)) for rows i0..i1: ``zf`` :func:`_z_plain`
    (``src`` unread) or :func:`_z_res` (``src``: the residual)."""
    fam, p = act[_FAMILY], _act_tuple(act)
    if fam == _PWL:
        _rows_out(x, src, y, i0, i1, k, scale, shift, zf, _pwl_f, p)
    elif fam == _LOGISTIC:
        _rows_out(x, src, y, i0, i1, k, scale, shift, zf, _smooth_f, p)
    elif fam == _HARDTANH:
        _rows_out(x, src, y, i0, i1, k, scale, shift, zf, _hardtanh_f, p)
    elif fam == _HARDSWISH:
        _rows_out(x, src, y, i0, i1, k, scale, shift, zf, _hardswish_f, p)
    else:
        _rows_out(x, src, y, i0, i1, k, scale, shift, zf, _elu_f, p)


# Which loop runs: the family is read once here. The plain kernels reach only the loops
# of dz from z and of dx (10 loop nests), the residual ones also dz from y and dr: a loop
# not reachable from a kernel is not compiled into it.
# fmt: off
@njit(**_HELPER)
def _grad_sums_rows_cl(dy, x, src, i0, i1, k, delta, invstd, scale, shift, act, zf, acc_a,
                       acc_b):
    """:func:`_rows_sums` for ``act``, dz from z (``zf``, ``src`` as in
    :func:`_out_rows_cl`)."""
    fam, p = act[_FAMILY], _act_tuple(act)
    if fam == _PWL:
        _rows_sums(dy, x, src, i0, i1, k, delta, invstd, scale, shift,
                   zf, _pwl_g, p, acc_a, acc_b)
    elif fam == _LOGISTIC:
        _rows_sums(dy, x, src, i0, i1, k, delta, invstd, scale, shift,
                   zf, _smooth_g, p, acc_a, acc_b)
    elif fam == _HARDTANH:
        _rows_sums(dy, x, src, i0, i1, k, delta, invstd, scale, shift,
                   zf, _hardtanh_g, p, acc_a, acc_b)
    elif fam == _HARDSWISH:
        _rows_sums(dy, x, src, i0, i1, k, delta, invstd, scale, shift,
                   zf, _hardswish_g, p, acc_a, acc_b)
    else:
        _rows_sums(dy, x, src, i0, i1, k, delta, invstd, scale, shift,
                   zf, _elu_g, p, acc_a, acc_b)


@njit(**_HELPER)
def _grad_sums_rows_cl_y(dy, x, src, i0, i1, k, delta, invstd, scale, shift, act, acc_a,
                         acc_b):
    """:func:`_rows_sums` for ``act``, dz from the outputs (``src`` is y; not for
    hardswish, silu)."""
    fam, p = act[_FAMILY], _act_tuple(act)
    if fam == _PWL:
        _rows_sums(dy, x, src, i0, i1, k, delta, invstd, scale, shift,
                   _z_y, _pwl_gy, p, acc_a, acc_b)
    elif fam == _LOGISTIC:
        _rows_sums(dy, x, src, i0, i1, k, delta, invstd, scale, shift,
                   _z_y, _logistic_gy, p, acc_a, acc_b)
    elif fam == _HARDTANH:
        _rows_sums(dy, x, src, i0, i1, k, delta, invstd, scale, shift,
                   _z_y, _hardtanh_gy, p, acc_a, acc_b)
    else:
        _rows_sums(dy, x, src, i0, i1, k, delta, invstd, scale, shift,
                   _z_y, _elu_gy, p, acc_a, acc_b)


@njit(**_HELPER)
def _grad_rows_cl(dy, x, src, dx, i0, i1, k, delta, invstd, scale, shift, ma, mb, act, zf):
    """:func:`_rows_dx` for ``act``, dz from z (see :func:`_grad_sums_rows_cl`)."""
    fam, p = act[_FAMILY], _act_tuple(act)
    if fam == _PWL:
        _rows_dx(dy, x, src, dx, i0, i1, k, delta, invstd, scale, shift, ma, mb,
                 zf, _pwl_g, p)
    elif fam == _LOGISTIC:
        _rows_dx(dy, x, src, dx, i0, i1, k, delta, invstd, scale, shift, ma, mb,
                 zf, _smooth_g, p)
    elif fam == _HARDTANH:
        _rows_dx(dy, x, src, dx, i0, i1, k, delta, invstd, scale, shift, ma, mb,
                 zf, _hardtanh_g, p)
    elif fam == _HARDSWISH:
        _rows_dx(dy, x, src, dx, i0, i1, k, delta, invstd, scale, shift, ma, mb,
                 zf, _hardswish_g, p)
    else:
        _rows_dx(dy, x, src, dx, i0, i1, k, delta, invstd, scale, shift, ma, mb,
                 zf, _elu_g, p)


@njit(**_HELPER)
def _grad_rows_res_cl(dy, x, src, from_y, dx, dr, i0, i1, k, delta, invstd, scale, shift,
                      ma, mb, act):
    """:func:`_rows_dx_dr` for ``act``: dz from the outputs (``from_y``: ``src`` is y) or
    from z + r (``src`` is r)."""
    fam, p = act[_FAMILY], _act_tuple(act)
    if from_y:
        if fam == _PWL:
            _rows_dx_dr(dy, x, src, dx, dr, i0, i1, k, delta, invstd, scale, shift, ma, mb,
                        _z_y, _pwl_gy, p)
        elif fam == _LOGISTIC:
            _rows_dx_dr(dy, x, src, dx, dr, i0, i1, k, delta, invstd, scale, shift, ma, mb,
                        _z_y, _logistic_gy, p)
        elif fam == _HARDTANH:
            _rows_dx_dr(dy, x, src, dx, dr, i0, i1, k, delta, invstd, scale, shift, ma, mb,
                        _z_y, _hardtanh_gy, p)
        else:
            _rows_dx_dr(dy, x, src, dx, dr, i0, i1, k, delta, invstd, scale, shift, ma, mb,
                        _z_y, _elu_gy, p)
    elif fam == _PWL:
        _rows_dx_dr(dy, x, src, dx, dr, i0, i1, k, delta, invstd, scale, shift, ma, mb,
                    _z_res, _pwl_g, p)
    elif fam == _LOGISTIC:
        _rows_dx_dr(dy, x, src, dx, dr, i0, i1, k, delta, invstd, scale, shift, ma, mb,
                    _z_res, _smooth_g, p)
    elif fam == _HARDTANH:
        _rows_dx_dr(dy, x, src, dx, dr, i0, i1, k, delta, invstd, scale, shift, ma, mb,
                    _z_res, _hardtanh_g, p)
    elif fam == _HARDSWISH:
        _rows_dx_dr(dy, x, src, dx, dr, i0, i1, k, delta, invstd, scale, shift, ma, mb,
                    _z_res, _hardswish_g, p)
    else:
        _rows_dx_dr(dy, x, src, dx, dr, i0, i1, k, delta, invstd, scale, shift, ma, mb,
                    _z_res, _elu_g, p)
# fmt: on


@njit(**_HELPER)
def _eval_constants(mean, var, weight, bias, eps):
    """float64 (mean, γ/sqrt(var + ε), β) per channel."""
    C = mean.shape[0]
    m = np.empty(C)
    scale = np.empty(C)
    b = np.empty(C)
    for c in range(C):
        m[c] = mean[c]
        scale[c] = np.float64(weight[c]) / math.sqrt(np.float64(var[c]) + eps)
        b[c] = bias[c]
    return m, scale, b


@njit(**_HELPER)
def _block_totals(part, c):
    """Channel ``c``'s two sums added over the row blocks' partial sums ``part``
    (nblocks, 2, C)."""
    s1 = 0.0
    s2 = 0.0
    for blk in range(part.shape[0]):
        s1 += part[blk, 0, c]
        s2 += part[blk, 1, c]
    return s1, s2


@njit(**_HELPER)
def _eval_stats(m, var, eps):
    """Eval's constants in the training statistics' layout (k = mean, delta = 0, var,
    invstd), for :func:`_storage_constants`."""
    C = m.shape[0]
    st = np.empty((4, C))
    for c in range(C):
        st[0, c] = m[c]
        st[1, c] = 0.0
        st[2, c] = var[c]
        st[3, c] = 1.0 / math.sqrt(np.float64(var[c]) + eps)
    return st


@njit(**_HELPER)
def _scale_shift(weight, bias, stats):
    """Per-channel scale = γ·invstd and shift = β − delta·scale (stats: k, delta, var,
    invstd rows)."""
    scale = weight.astype(np.float64) * stats[3]
    return scale, bias.astype(np.float64) - stats[1] * scale
