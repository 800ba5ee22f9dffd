"""Eval kernels: y = act((x − mean)·γ/sqrt(var + ε) + β) with running statistics,
channels-first and channels-last.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from normlab.kernels._elementwise import (
    _A,
    _C1,
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


# hardtanh (relu6) in eval takes the storage-dtype code of the piecewise-linear
# activations too: a clamp of that z to [min_val, max_val] is as exact as the output's
# rounding (bounds and z within an ulp of the float64 ones), and float32 arithmetic halves
# the row's vector work (relu6 was 1.4x relu in float64). Rows 4, 5 of the (6, C)
# constants then hold the bounds instead of (slope, 0).
_IDENTITY = np.array([_PWL, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0])


@njit(**_HELPER)
def _eval_storage_constants(x, stats, scale, shift, act):
    """:func:`_storage_constants`, for hardtanh too (bounds in rows 4, 5)."""
    if act[_FAMILY] != _HARDTANH:
        return _storage_constants(x, stats, scale, shift, act)
    tk = _storage_constants(x, stats, scale, shift, _IDENTITY)
    for c in range(tk.shape[1] if tk.shape[0] != 0 else 0):
        tk[4, c] = act[_A]
        tk[5, c] = act[_C1]
    return tk


@njit(**_HELPER)
def _clamp_rows_cl_storage(x, y, i0, i1, tk):
    """y = clamp((x − k)·scale + shift, tk[4], tk[5]) for rows i0..i1 in x's dtype (see
    ``_rows._out_rows_cl_storage``; NaN stays NaN, as F.hardtanh)."""
    k, scale, shift = tk[0].copy(), tk[1].copy(), tk[2].copy()
    lo, hi = tk[4, 0], tk[5, 0]
    for i in range(i0, i1):
        xr = x[i]
        yr = y[i]
        for c in range(xr.shape[0]):
            z = (_work(xr[c]) - k[c]) * scale[c] + shift[c]
            yr[c] = _narrow(lo if z < lo else (hi if z > hi else z), yr)


# -- eval forward ------------------------------------------------------------------------
@njit(parallel=True, **_JIT)
def affine_cf(x, mean, var, weight, bias, eps, act, y):
    """Eval forward, channels-first (N, C, S): y = act((x − mean)·γ/sqrt(var + ε) + β),
    per-channel parameters (C,) in x's dtype, combined in float64."""
    N, C, S = x.shape
    m, scale, b = _eval_constants(mean, var, weight, bias, eps)
    tk = _eval_storage_constants(x, _eval_stats(m, var, eps), scale, b, act)
    if tk.shape[0] != 0:  # piecewise linear or hardtanh, in x's dtype
        clamp = act[_FAMILY] == _HARDTANH
        for r in prange(N * C):
            i, c = r // C, r % C
            kt, sc, sh, t4, t5 = tk[0, c], tk[1, c], tk[2, c], tk[4, c], tk[5, c]
            if clamp:  # t4, t5: the bounds
                for j in range(S):
                    z = (_work(x[i, c, j]) - kt) * sc + sh
                    y[i, c, j] = _narrow(t4 if z < t4 else (t5 if z > t5 else z), y)
            else:  # t4: the slope, t5: 0
                for j in range(S):
                    z = (_work(x[i, c, j]) - kt) * sc + sh
                    y[i, c, j] = _narrow(z if z > t5 else z * t4, y)
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
    tk = _eval_storage_constants(x, _eval_stats(m, var, eps), scale, b, act)
    if tk.shape[0] != 0:
        clamp = act[_FAMILY] == _HARDTANH
        for blk in prange(nblocks):
            if clamp:
                _clamp_rows_cl_storage(x, y, blk * rows, min(M, (blk + 1) * rows), tk)
            else:
                _out_rows_cl_storage(x, y, blk * rows, min(M, (blk + 1) * rows), tk)
        return
    for blk in prange(nblocks):
        _out_rows_cl(x, x, y, blk * rows, min(M, (blk + 1) * rows), m, scale, b, act, _z_plain)
