"""Eval kernels: y = act((x − mean)·γ/sqrt(var + ε) + β) with running statistics,
channels-first and channels-last.
"""

from __future__ import annotations

from numba import njit, prange

from normlab.kernels._elementwise import (
    _FAMILY,
    _HARDSWISH,
    _HARDTANH,
    _LOGISTIC,
    _PWL,
    _narrow,
    _wide,
    _work,
)
from normlab.kernels._jit import (
    _HELPER,
    _JIT,
)
from normlab.kernels._rows import (
    _act_tuple,
    _elu_f,
    _eval_constants,
    _eval_stats,
    _hardswish_f,
    _hardtanh_f,
    _out_rows_cl,
    _out_rows_cl_storage,
    _pwl_f,
    _smooth_f,
    _storage_constants,
    _z_plain,
)


# Channels-first eval rows x[i, c, :] with one loop per activation family, chosen once
# per row (S values) from ``fam``: a loop whose body tests the family per element (and
# held elu's libm call) stayed scalar, 2x relu's time for hardtanh/relu6/hardswish (issue
# 12). The element functions are compile-time arguments, as in ``_rows``.
@njit(**_HELPER)
def _row_cf(x, y, i, c, k, scale, shift, f, p):
    """y[i, c, :] = f((x[i, c, :] − k)·scale + shift, p)."""
    for j in range(x.shape[2]):
        y[i, c, j] = _narrow(f((_wide(x[i, c, j]) - k) * scale + shift, p), y)


@njit(**_HELPER)
def _out_row_cf(x, y, i, c, k, scale, shift, fam, p):
    """:func:`_row_cf` with the loop of family ``fam`` (``p``: :func:`_act_tuple`)."""
    if fam == _PWL:
        _row_cf(x, y, i, c, k, scale, shift, _pwl_f, p)
    elif fam == _LOGISTIC:
        _row_cf(x, y, i, c, k, scale, shift, _smooth_f, p)
    elif fam == _HARDTANH:
        _row_cf(x, y, i, c, k, scale, shift, _hardtanh_f, p)
    elif fam == _HARDSWISH:
        _row_cf(x, y, i, c, k, scale, shift, _hardswish_f, p)
    else:
        _row_cf(x, y, i, c, k, scale, shift, _elu_f, p)


# -- eval forward ------------------------------------------------------------------------
@njit(parallel=True, **_JIT)
def affine_cf(x, mean, var, weight, bias, eps, act, y):
    """Eval forward, channels-first (N, C, S): y = act((x − mean)·γ/sqrt(var + ε) + β),
    per-channel parameters (C,) in x's dtype, combined in float64."""
    N, C, S = x.shape
    m, scale, b = _eval_constants(mean, var, weight, bias, eps)
    tk = _storage_constants(x, _eval_stats(m, var, eps), scale, b, act)
    if tk.shape[0] != 0:  # piecewise linear, in x's dtype
        for r in prange(N * C):
            i, c = r // C, r % C
            kt, sc, sh, slope, zero = tk[0, c], tk[1, c], tk[2, c], tk[4, c], tk[5, c]
            for j in range(S):
                z = (_work(x[i, c, j]) - kt) * sc + sh
                y[i, c, j] = _narrow(z if z > zero else z * slope, y)
        return
    fam, p = act[_FAMILY], _act_tuple(act)
    for r in prange(N * C):
        i, c = r // C, r % C
        _out_row_cf(x, y, i, c, m[c], scale[c], b[c], fam, p)


@njit(parallel=True, **_JIT)
def affine_cl(x, mean, var, weight, bias, eps, act, nblocks, y):
    """Eval forward, channels-last (M, C); see :func:`affine_cf`."""
    M = x.shape[0]
    m, scale, b = _eval_constants(mean, var, weight, bias, eps)
    rows = (M + nblocks - 1) // nblocks
    tk = _storage_constants(x, _eval_stats(m, var, eps), scale, b, act)
    if tk.shape[0] != 0:
        for blk in prange(nblocks):
            _out_rows_cl_storage(x, y, blk * rows, min(M, (blk + 1) * rows), tk)
        return
    for blk in prange(nblocks):
        _out_rows_cl(x, x, y, blk * rows, min(M, (blk + 1) * rows), m, scale, b, act, _z_plain)
