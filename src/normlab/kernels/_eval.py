"""Eval kernels: y = act((x − mean)·γ/sqrt(var + ε) + β) with running statistics,
channels-first and channels-last.
"""

from __future__ import annotations

from numba import njit, prange

from normlab.kernels._elementwise import (
    _narrow,
    _work,
)
from normlab.kernels._jit import (
    _JIT,
)
from normlab.kernels._rows import (
    _eval_constants,
    _eval_stats,
    _out_rows_cl,
    _out_rows_cl_storage,
    _storage_constants,
    _z_plain,
)
from normlab.kernels._train import (
    _out_row,
)


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
    for r in prange(N * C):
        i, c = r // C, r % C
        _out_row(x, y, i, c, m[c], scale[c], b[c], act)


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
