"""Training kernels: forward (batch statistics, then the output) and the closed-form
backward, channels-first (one task per channel) and channels-last (row blocks), with
the channels-first row helpers they use. Formulas: :mod:`normlab.kernels._numba`.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from normlab.kernels._elementwise import (
    _A,
    _C1,
    _C2,
    _C3,
    _FAMILY,
    _G1,
    _LOGISTIC,
    _OTHER,
    _PWL,
    _SLOPE,
    _finish_stats,
    _narrow,
    _other,
    _other_grad,
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
    _JIT,
)
from normlab.kernels._rows import (
    _STORAGE_SUM_MAX,
    _block_totals,
    _grad_rows_cl,
    _grad_rows_cl_storage,
    _grad_sums_rows_cl,
    _grad_sums_rows_cl_storage,
    _out_rows_cl,
    _out_rows_cl_storage,
    _scale_shift,
    _storage_constants,
    _storage_math_is_safe,
    _sums_rows_cl,
    _z_plain,
)


# -- one row, channels-first: x[i, c, :], S contiguous values (scalar parameters) --------
# Rows are addressed by index, not sliced: a slice per row costs more than a short row.
@njit(**_HELPER)
def _sums_row(x, i, c, k):
    s1 = 0.0
    s2 = 0.0
    for j in range(x.shape[2]):
        d = _wide(x[i, c, j]) - k
        s1 += d
        s2 += d * d
    return s1, s2


@njit(**_HELPER)
def _out_row(x, y, i, c, k, scale, shift, act):
    fam = act[_FAMILY]
    if fam >= _OTHER:
        a, b = act[_A], act[_C1]
        for j in range(x.shape[2]):
            y[i, c, j] = _narrow(_other((_wide(x[i, c, j]) - k) * scale + shift, fam, a, b), y)
    elif fam == _LOGISTIC:
        a, c1, c2, c3 = act[_A], act[_C1], act[_C2], act[_C3]
        for j in range(x.shape[2]):
            y[i, c, j] = _narrow(_smooth((_wide(x[i, c, j]) - k) * scale + shift, a, c1, c2, c3), y)
    else:
        slope = act[_SLOPE]
        for j in range(x.shape[2]):
            y[i, c, j] = _narrow(_pwl((_wide(x[i, c, j]) - k) * scale + shift, slope), y)


@njit(**_HELPER)
def _grad_sums_row(dy, x, i, c, k, delta, invstd, scale, shift, act):
    a_sum = 0.0
    b_sum = 0.0
    fam = act[_FAMILY]
    if fam >= _OTHER:
        a, b = act[_A], act[_G1]
        for j in range(x.shape[2]):
            d = _wide(x[i, c, j]) - k
            dz = _wide(dy[i, c, j]) * _other_grad(d * scale + shift, fam, a, b)
            a_sum += dz
            b_sum += dz * ((d - delta) * invstd)
    elif fam == _LOGISTIC:
        a, g1, c3 = act[_A], act[_G1], act[_C3]
        for j in range(x.shape[2]):
            d = _wide(x[i, c, j]) - k
            dz = _wide(dy[i, c, j]) * _smooth_grad(d * scale + shift, a, g1, c3)
            a_sum += dz
            b_sum += dz * ((d - delta) * invstd)
    else:
        slope = act[_SLOPE]
        for j in range(x.shape[2]):
            d = _wide(x[i, c, j]) - k
            dz = _wide(dy[i, c, j]) * _pwl_grad(d * scale + shift, slope)
            a_sum += dz
            b_sum += dz * ((d - delta) * invstd)
    return a_sum, b_sum


@njit(**_HELPER)
def _grad_row(dy, x, dx, i, c, k, delta, invstd, scale, shift, ma, mb, act):
    fam = act[_FAMILY]
    if fam >= _OTHER:
        a, b = act[_A], act[_G1]
        for j in range(x.shape[2]):
            d = _wide(x[i, c, j]) - k
            dz = _wide(dy[i, c, j]) * _other_grad(d * scale + shift, fam, a, b)
            dx[i, c, j] = _narrow(scale * (dz - ma - ((d - delta) * invstd) * mb), dx)
    elif fam == _LOGISTIC:
        a, g1, c3 = act[_A], act[_G1], act[_C3]
        for j in range(x.shape[2]):
            d = _wide(x[i, c, j]) - k
            dz = _wide(dy[i, c, j]) * _smooth_grad(d * scale + shift, a, g1, c3)
            dx[i, c, j] = _narrow(scale * (dz - ma - ((d - delta) * invstd) * mb), dx)
    else:
        slope = act[_SLOPE]
        for j in range(x.shape[2]):
            d = _wide(x[i, c, j]) - k
            dz = _wide(dy[i, c, j]) * _pwl_grad(d * scale + shift, slope)
            dx[i, c, j] = _narrow(scale * (dz - ma - ((d - delta) * invstd) * mb), dx)


# -- training forward --------------------------------------------------------------------
@njit(parallel=True, **_JIT)
def forward_cf(x, weight, bias, eps, act, y, stats, moments):
    """Training forward, channels-first ``x`` (N, C, S) → ``y`` (N, C, S).

    ``weight``/``bias``: (C,) in x's dtype. ``stats`` (out, float64 (4, C)): shift k,
    delta, biased var, invstd, for backward. ``moments`` (out, (2, C) in x's dtype): mean
    and biased var, for the caller. One task per channel: its statistics, then its output, so the
    second read of the channel comes from the core's cache when it fits (N·S·4 bytes
    against a 1-2 MiB L2). Fewer channels than threads leave threads idle; that case is
    rare and still far faster than the torch-op path.
    """
    N, C, S = x.shape
    n = N * S
    pwl = act[_FAMILY] == _PWL
    for c in prange(C):
        k = _wide(x[0, c, 0])
        s1 = 0.0
        s2 = 0.0
        for i in range(N):
            r1, r2 = _sums_row(x, i, c, k)
            s1 += r1
            s2 += r2
        delta, var, invstd = _finish_stats(s1, s2, n, eps)
        scale = np.float64(weight[c]) * invstd
        shift = np.float64(bias[c]) - delta * scale
        if pwl and _storage_math_is_safe(invstd, scale, shift, k):
            # In x's dtype (see the module notes): z = (x − k)·scale + shift.
            t = _work_empty(5, x)
            t[0], t[1], t[2], t[3], t[4] = k, scale, shift, act[_SLOPE], 0.0
            kt, sc, sh, slope, zero = t[0], t[1], t[2], t[3], t[4]
            for i in range(N):
                for j in range(S):
                    z = (_work(x[i, c, j]) - kt) * sc + sh
                    y[i, c, j] = _narrow(z if z > zero else z * slope, y)
        else:
            for i in range(N):
                _out_row(x, y, i, c, k, scale, shift, act)
        stats[0, c] = k
        stats[1, c] = delta
        stats[2, c] = var
        stats[3, c] = invstd
        moments[0, c] = k + delta
        moments[1, c] = var


@njit(parallel=True, **_JIT)
def forward_cl(x, weight, bias, eps, act, nblocks, y, stats, moments):
    """Training forward, channels-last ``x`` (M, C) → ``y`` (M, C).

    ``nblocks`` row blocks run in parallel, each summing every channel into its own
    float64 accumulators (vectorised over C); the blocks' sums are then added.
    """
    M, C = x.shape
    k = np.empty(C)
    for c in range(C):
        k[c] = _wide(x[0, c])
    part = np.empty((nblocks, 2, C))
    rows = (M + nblocks - 1) // nblocks
    for blk in prange(nblocks):
        acc1 = np.zeros(C)
        acc2 = np.zeros(C)
        _sums_rows_cl(x, blk * rows, min(M, (blk + 1) * rows), k, acc1, acc2)
        part[blk, 0] = acc1
        part[blk, 1] = acc2
    for c in range(C):
        s1, s2 = _block_totals(part, c)
        stats[0, c] = k[c]
        stats[1, c], stats[2, c], stats[3, c] = _finish_stats(s1, s2, M, eps)
        moments[0, c] = k[c] + stats[1, c]
        moments[1, c] = stats[2, c]
    scale, shift = _scale_shift(weight, bias, stats)
    tk = _storage_constants(x, stats, scale, shift, act)
    if tk.shape[0] != 0:
        for blk in prange(nblocks):
            _out_rows_cl_storage(x, y, blk * rows, min(M, (blk + 1) * rows), tk)
        return
    for blk in prange(nblocks):
        _out_rows_cl(x, x, y, blk * rows, min(M, (blk + 1) * rows), k, scale, shift, act, _z_plain)


# -- training backward -------------------------------------------------------------------
@njit(parallel=True, **_JIT)
def backward_cf(dy, x, weight, bias, stats, act, need_dx, dx, sums):
    """Closed-form training backward, channels-first (N, C, S), one task per channel.

    ``stats``: the forward's (4, C) float64 statistics. ``sums`` (out, (2, C) in x's
    dtype): A = Σdz (dβ) and B = Σdz·x̂ (dγ). ``dx`` is written only if ``need_dx``.
    """
    N, C, S = x.shape
    n = N * S
    scale, shift = _scale_shift(weight, bias, stats)
    storage_sums = x.itemsize == 8 or S <= _STORAGE_SUM_MAX
    pwl = act[_FAMILY] == _PWL
    for c in prange(C):
        k, delta, invstd = stats[0, c], stats[1, c], stats[3, c]
        if pwl and storage_sums and _storage_math_is_safe(invstd, scale[c], shift[c], k):
            # In x's dtype, each row's sums in x's dtype, added up in float64:
            #   dz = dy·act'(z),  A = Σ dz,  B = invstd·Σ dz·(d − delta)
            #   dx = p·dz + q·(d − delta) + r,  p = scale, q = −scale·invstd·B/n,
            #   r = −scale·A/n
            t = _work_empty(9, x)
            t[0], t[1], t[2], t[3], t[4], t[5] = k, scale[c], shift[c], act[_SLOPE], delta, 0.0
            kt, sc, sh, slope, de, zero = t[0], t[1], t[2], t[3], t[4], t[5]
            a_sum = 0.0
            b_sum = 0.0
            for i in range(N):
                ra = zero
                rb = zero
                for j in range(S):
                    d = _work(x[i, c, j]) - kt
                    z = d * sc + sh
                    dz = _work(dy[i, c, j]) if z > zero else _work(dy[i, c, j]) * slope
                    ra += dz
                    rb += dz * (d - de)
                a_sum += np.float64(ra)
                b_sum += np.float64(rb)
            b_sum *= invstd
            sums[0, c] = a_sum
            sums[1, c] = b_sum
            if need_dx:
                t[6] = scale[c]
                t[7] = -scale[c] * invstd * (b_sum / n)
                t[8] = -scale[c] * (a_sum / n)
                p, q, r = t[6], t[7], t[8]
                for i in range(N):
                    for j in range(S):
                        d = _work(x[i, c, j]) - kt
                        z = d * sc + sh
                        dz = _work(dy[i, c, j]) if z > zero else _work(dy[i, c, j]) * slope
                        dx[i, c, j] = _narrow(p * dz + q * (d - de) + r, dx)
            continue
        a_sum = 0.0
        b_sum = 0.0
        for i in range(N):
            ra, rb = _grad_sums_row(dy, x, i, c, k, delta, invstd, scale[c], shift[c], act)
            a_sum += ra
            b_sum += rb
        sums[0, c] = a_sum
        sums[1, c] = b_sum
        if need_dx:
            for i in range(N):
                _grad_row(
                    dy, x, dx, i, c, k, delta, invstd, scale[c], shift[c],
                    a_sum / n, b_sum / n, act,
                )  # fmt: skip


@njit(parallel=True, **_JIT)
def backward_cl(dy, x, weight, bias, stats, act, nblocks, need_dx, dx, sums):
    """Closed-form training backward, channels-last (M, C); see :func:`backward_cf`."""
    M, C = x.shape
    scale, shift = _scale_shift(weight, bias, stats)
    k, delta, invstd = stats[0], stats[1], stats[3]
    part = np.empty((nblocks, 2, C))
    rows = (M + nblocks - 1) // nblocks
    tk = _storage_constants(x, stats, scale, shift, act)
    if tk.shape[0] != 0:  # in x's dtype: B = invstd·Σdz·(d − delta), dx = p·dz + q·(d − delta) + r
        for blk in prange(nblocks):
            acc_a = np.zeros(C)
            acc_b = np.zeros(C)
            i0, i1 = blk * rows, min(M, (blk + 1) * rows)
            _grad_sums_rows_cl_storage(dy, x, i0, i1, tk, acc_a, acc_b)
            part[blk, 0] = acc_a
            part[blk, 1] = acc_b
        pqr = _work_empty((3, C), x)
        for c in range(C):
            a_sum, b_sum = _block_totals(part, c)
            b_sum *= invstd[c]
            sums[0, c] = a_sum
            sums[1, c] = b_sum
            pqr[0, c] = scale[c]
            pqr[1, c] = -scale[c] * invstd[c] * (b_sum / M)
            pqr[2, c] = -scale[c] * (a_sum / M)
        if need_dx:
            for blk in prange(nblocks):
                i0, i1 = blk * rows, min(M, (blk + 1) * rows)
                _grad_rows_cl_storage(dy, x, dx, i0, i1, tk, pqr)
        return
    for blk in prange(nblocks):
        acc_a = np.zeros(C)
        acc_b = np.zeros(C)
        i0, i1 = blk * rows, min(M, (blk + 1) * rows)
        _grad_sums_rows_cl(
            dy, x, x, i0, i1, k, delta, invstd, scale, shift, act, _z_plain, acc_a, acc_b
        )
        part[blk, 0] = acc_a
        part[blk, 1] = acc_b
    for c in range(C):
        a_sum, b_sum = _block_totals(part, c)
        sums[0, c] = a_sum
        sums[1, c] = b_sum
    if need_dx:
        ma = sums[0] / M
        mb = sums[1] / M
        for blk in prange(nblocks):
            i0, i1 = blk * rows, min(M, (blk + 1) * rows)
            _grad_rows_cl(
                dy, x, x, dx, i0, i1, k, delta, invstd, scale, shift, ma, mb, act, _z_plain
            )
