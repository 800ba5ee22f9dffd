"""BN → add(residual) → activation: the training forward and backward with a residual
r added before the activation, channels-first and channels-last.
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
    _HARDTANH,
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
    _grad_rows_res_cl,
    _grad_sums_rows_cl,
    _grad_sums_rows_cl_y,
    _out_rows_cl,
    _scale_shift,
    _storage_math_is_safe,
    _sums_rows_cl,
    _z_res,
)
from normlab.kernels._train import (
    _sums_row,
)


# -- residual: y = act(γ·x̂ + β + r) -----------------------------------------------------
# BN → add → activation in the same two passes as the plain kernels: the residual r is
# read in the write pass (z = (x − k)·scale + shift + r), and backward produces dx and
# dr = dz = dy·act'(z) in one two-pass kernel. act'(z) comes from the saved output y
# where y determines it (``from_y``: identity, relu, leaky_relu with slope > 0, relu6,
# hardtanh, elu with α > 0, sigmoid, tanh; as ``activations.derivative_from_output``),
# so r need not be kept; otherwise ``src`` is r and z is recomputed from x and r.
# The storage-dtype code runs for the piecewise-linear activations of channels-first
# tensors under the rule above (forward; backward only with ``from_y``: there dz needs
# only y's sign); everything else computes elementwise in float64.
@njit(**_HELPER)
def _out_row_res(x, res, y, i, c, k, scale, shift, act):
    fam = act[_FAMILY]
    if fam >= _OTHER:
        a, b = act[_A], act[_C1]
        for j in range(x.shape[2]):
            z = (_wide(x[i, c, j]) - k) * scale + shift + _wide(res[i, c, j])
            y[i, c, j] = _narrow(_other(z, fam, a, b), y)
    elif fam == _LOGISTIC:
        a, c1, c2, c3 = act[_A], act[_C1], act[_C2], act[_C3]
        for j in range(x.shape[2]):
            z = (_wide(x[i, c, j]) - k) * scale + shift + _wide(res[i, c, j])
            y[i, c, j] = _narrow(_smooth(z, a, c1, c2, c3), y)
    else:
        slope = act[_SLOPE]
        for j in range(x.shape[2]):
            z = (_wide(x[i, c, j]) - k) * scale + shift + _wide(res[i, c, j])
            y[i, c, j] = _narrow(_pwl(z, slope), y)


@njit(**_HELPER)
def _grad_from_output(y, fam, slope, a, b, c1, c2, g1):
    """act'(z) from y = act(z) (see above; not for hardswish, silu)."""
    if fam == _PWL:
        return 1.0 if y > 0.0 else slope
    if fam == _LOGISTIC:  # sigmoid, tanh: y = c1·s + c2, act' = g1·s·(1 − s)
        s = (y - c2) / c1
        return g1 * s * (1.0 - s)
    if fam == _HARDTANH:
        return 0.0 if (y <= a or y >= b) else 1.0
    return 1.0 if y > 0.0 else y + a  # elu: α·e^z = y + α below 0


@njit(**_HELPER)
def _grad_at(z, fam, slope, a, b, g1, c3):
    if fam == _PWL:
        return _pwl_grad(z, slope)
    if fam == _LOGISTIC:
        return _smooth_grad(z, a, g1, c3)
    return _other_grad(z, fam, a, b)


@njit(**_HELPER)
def _dz_res(dyv, d, sv, scale, shift, from_y, act):
    """dz = dy·act'(z) for one value: from y (``sv`` = y) or from z = d·scale + shift + r
    (``sv`` = r)."""
    fam, slope, a, c1, c2, c3, g1 = act[0], act[1], act[2], act[3], act[4], act[5], act[6]
    if from_y:
        return dyv * _grad_from_output(sv, fam, slope, a, c1, c1, c2, g1)
    return dyv * _grad_at(d * scale + shift + sv, fam, slope, a, g1, g1, c3)


@njit(parallel=True, **_JIT)
def forward_res_cf(x, res, weight, bias, eps, act, y, stats, moments):
    """:func:`forward_cf` with a residual: y = act((x − k)·scale + shift + r); ``res``
    (N, C, S) like x."""
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
            # in x's dtype: the add of r is the one rounding torch's `bn(x) + r` makes too
            t = _work_empty(5, x)
            t[0], t[1], t[2], t[3], t[4] = k, scale, shift, act[_SLOPE], 0.0
            kt, sc, sh, slope, zero = t[0], t[1], t[2], t[3], t[4]
            for i in range(N):
                for j in range(S):
                    z = (_work(x[i, c, j]) - kt) * sc + sh + _work(res[i, c, j])
                    y[i, c, j] = _narrow(z if z > zero else z * slope, y)
        else:
            for i in range(N):
                _out_row_res(x, res, y, i, c, k, scale, shift, act)
        stats[0, c] = k
        stats[1, c] = delta
        stats[2, c] = var
        stats[3, c] = invstd
        moments[0, c] = k + delta
        moments[1, c] = var


@njit(parallel=True, **_JIT)
def forward_res_cl(x, res, weight, bias, eps, act, nblocks, y, stats, moments):
    """:func:`forward_cl` with a residual ``res`` (M, C); the write pass in float64."""
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
    for blk in prange(nblocks):
        _out_rows_cl(x, res, y, blk * rows, min(M, (blk + 1) * rows), k, scale, shift, act, _z_res)


@njit(parallel=True, **_JIT)
def backward_res_cf(dy, x, src, weight, bias, stats, act, from_y, need_dx, need_dr, dx, dr,
                    sums):  # fmt: skip
    """Backward of :func:`forward_res_cf`, one task per channel, two passes:

        dz = dy·act'(z),  A = Σdz,  B = Σdz·x̂
        dx = γ·invstd·(dz − A/n − x̂·B/n),   dr = dz,   dγ = B,   dβ = A

    ``src``: the output y (``from_y``) or the residual r. ``dx`` / ``dr`` are written only
    if ``need_dx`` / ``need_dr``; ``sums`` (out, (2, C)): A, B."""
    N, C, S = x.shape
    n = N * S
    scale, shift = _scale_shift(weight, bias, stats)
    storage = from_y and act[_FAMILY] == _PWL and (x.itemsize == 8 or S <= _STORAGE_SUM_MAX)
    for c in prange(C):
        k, delta, invstd = stats[0, c], stats[1, c], stats[3, c]
        if storage and _storage_math_is_safe(invstd, scale[c], shift[c], k):
            # dz = dy where y > 0, else dy·slope: no z needed, only y's sign
            t = _work_empty(7, x)
            t[0], t[1], t[2], t[3] = k, act[_SLOPE], delta, 0.0
            kt, slope, de, zero = t[0], t[1], t[2], t[3]
            a_sum = 0.0
            b_sum = 0.0
            for i in range(N):
                ra = zero
                rb = zero
                for j in range(S):
                    g = _work(dy[i, c, j])
                    dz = g if _work(src[i, c, j]) > zero else g * slope
                    ra += dz
                    rb += dz * ((_work(x[i, c, j]) - kt) - de)
                a_sum += np.float64(ra)
                b_sum += np.float64(rb)
            b_sum *= invstd
            sums[0, c] = a_sum
            sums[1, c] = b_sum
            t[4] = scale[c]
            t[5] = -scale[c] * invstd * (b_sum / n)
            t[6] = -scale[c] * (a_sum / n)
            p, q, r = t[4], t[5], t[6]
            if need_dx and need_dr:
                for i in range(N):
                    for j in range(S):
                        g = _work(dy[i, c, j])
                        dz = g if _work(src[i, c, j]) > zero else g * slope
                        e = (_work(x[i, c, j]) - kt) - de
                        dx[i, c, j] = _narrow(p * dz + q * e + r, dx)
                        dr[i, c, j] = _narrow(dz, dr)
            elif need_dx:
                for i in range(N):
                    for j in range(S):
                        g = _work(dy[i, c, j])
                        dz = g if _work(src[i, c, j]) > zero else g * slope
                        e = (_work(x[i, c, j]) - kt) - de
                        dx[i, c, j] = _narrow(p * dz + q * e + r, dx)
            elif need_dr:
                for i in range(N):
                    for j in range(S):
                        g = _work(dy[i, c, j])
                        dr[i, c, j] = _narrow(g if _work(src[i, c, j]) > zero else g * slope, dr)
            continue
        sc, sh = scale[c], shift[c]
        a_sum = 0.0
        b_sum = 0.0
        for i in range(N):
            for j in range(S):
                d = _wide(x[i, c, j]) - k
                dz = _dz_res(_wide(dy[i, c, j]), d, _wide(src[i, c, j]), sc, sh,
                             from_y, act)  # fmt: skip
                a_sum += dz
                b_sum += dz * ((d - delta) * invstd)
        sums[0, c] = a_sum
        sums[1, c] = b_sum
        ma, mb = a_sum / n, b_sum / n
        if need_dx or need_dr:
            for i in range(N):
                for j in range(S):
                    d = _wide(x[i, c, j]) - k
                    dz = _dz_res(_wide(dy[i, c, j]), d, _wide(src[i, c, j]), sc, sh,
                                 from_y, act)  # fmt: skip
                    if need_dx:
                        dx[i, c, j] = _narrow(sc * (dz - ma - ((d - delta) * invstd) * mb), dx)
                    if need_dr:
                        dr[i, c, j] = _narrow(dz, dr)


@njit(parallel=True, **_JIT)
def backward_res_cl(dy, x, src, weight, bias, stats, act, from_y, nblocks, need_dx, need_dr,
                    dx, dr, sums):  # fmt: skip
    """Backward of :func:`forward_res_cl`, channels-last (M, C), in float64; see
    :func:`backward_res_cf`."""
    M, C = x.shape
    scale, shift = _scale_shift(weight, bias, stats)
    k, delta, invstd = stats[0], stats[1], stats[3]
    part = np.empty((nblocks, 2, C))
    rows = (M + nblocks - 1) // nblocks
    for blk in prange(nblocks):
        acc_a = np.zeros(C)
        acc_b = np.zeros(C)
        i0, i1 = blk * rows, min(M, (blk + 1) * rows)
        if from_y:
            _grad_sums_rows_cl_y(dy, x, src, i0, i1, k, delta, invstd, scale, shift, act,
                                 acc_a, acc_b)  # fmt: skip
        else:
            _grad_sums_rows_cl(dy, x, src, i0, i1, k, delta, invstd, scale, shift, act,
                               _z_res, acc_a, acc_b)  # fmt: skip
        part[blk, 0] = acc_a
        part[blk, 1] = acc_b
    for c in range(C):
        a_sum, b_sum = _block_totals(part, c)
        sums[0, c] = a_sum
        sums[1, c] = b_sum
    if not (need_dx or need_dr):
        return
    ma = sums[0] / M
    mb = sums[1] / M
    n_dx = M if need_dx else 0
    n_dr = M if need_dr else 0
    for blk in prange(nblocks):
        i0, i1 = blk * rows, min(M, (blk + 1) * rows)
        _grad_rows_res_cl(dy, x, src, from_y, dx[:n_dx], dr[:n_dr], i0, i1, k, delta,
                          invstd, scale, shift, ma, mb, act)  # fmt: skip
