"""The channels-last kernels called directly, parallel and serial, against float64
autograd: every activation family, plain and with a residual (dz from z + r and from the
saved output y), forward, backward with each combination of dx/dr, and eval, over row
blocks of unequal length and an odd channel count (issue 12: these loops are now one
specialised loop per activation family, so each family needs its own check)."""

import numpy as np
import pytest
import torch

from normlab.kernels import _numba as K
from tests import reference as ref

# (name for activation_params, its arguments, the reference's key, y determines act'(z))
ACTS = [
    ("identity", (), "identity", True),
    ("relu", (), "relu", True),
    ("leaky_relu", (0.01,), "leaky_relu", True),
    ("sigmoid", (), "sigmoid", True),
    ("tanh", (), "tanh", True),
    ("silu", (), "silu", False),
    ("relu6", (), "relu6", True),
    ("hardtanh", (0.01, -0.5, 2.0), "hardtanh(-0.5, 2.0)", True),
    ("hardswish", (), "hardswish", False),
    ("elu", (0.5,), "elu(0.5)", True),
]
TOL = {np.float32: {"rtol": 2e-5, "atol": 2e-5}, np.float64: {"rtol": 1e-9, "atol": 1e-9}}
M, C = 67, 7  # rows: three blocks of 23, 23, 21; channels: not a vector width


def _kernel(name, parallel):
    return getattr(K, name if parallel else name + "_serial")


def _inputs(dtype, seed):
    g = np.random.default_rng(seed)
    # offsets and scales per channel, so that every activation sees both of its sides
    x = (g.standard_normal((M, C)) * np.linspace(0.5, 3.0, C) + np.linspace(-1, 1, C)).astype(dtype)
    r = g.standard_normal((M, C)).astype(dtype)
    dy = g.standard_normal((M, C)).astype(dtype)
    w = np.linspace(0.5, 2.0, C).astype(dtype)
    b = np.linspace(-1.0, 1.0, C).astype(dtype)
    return x, r, dy, w, b


def _reference(x, r, dy, w, b, key):
    """y, dx, dr, dγ, dβ of act(BN(x) + r) in float64 (``r`` None: no residual)."""
    t = [torch.from_numpy(a).double().requires_grad_() for a in (x, w, b)]
    z = ref.batch_norm_train(*t)
    tr = None
    if r is not None:
        tr = torch.from_numpy(r).double().requires_grad_()
        z = z + tr
    y = ref.ACTIVATIONS[key](z)
    grads = torch.autograd.grad(
        y, (*t, *(() if tr is None else (tr,))), torch.from_numpy(dy).double()
    )
    dx, dw, db = grads[:3]
    dr = grads[3] if tr is not None else None
    return y.detach(), dx, dr, dw, db


def _close(got, want, dtype, name, scale=1.0):
    torch.testing.assert_close(
        torch.from_numpy(np.asarray(got, dtype=np.float64)) / scale,
        want / scale,
        **TOL[dtype],
        msg=lambda m: f"{name}: {m}",
    )


@pytest.mark.parametrize("parallel", [True, False], ids=["parallel", "serial"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("act", ACTS, ids=[a[2] for a in ACTS])
def test_train_forward_backward(act, dtype, parallel):
    name, args, key, _ = act
    params = K.activation_params(name, *args)
    x, _, dy, w, b = _inputs(dtype, 0)
    y_ref, dx_ref, _, dw_ref, db_ref = _reference(x, None, dy, w, b, key)
    y = np.empty_like(x)
    stats = np.empty((4, C))
    moments = np.empty((2, C), dtype)
    _kernel("forward_cl", parallel)(x, w, b, 1e-5, params, 3, y, stats, moments)
    _close(y, y_ref, dtype, "y")
    for need_dx in (True, False):
        dx = np.full_like(x, np.nan)
        sums = np.empty((2, C), dtype)
        _kernel("backward_cl", parallel)(dy, x, w, b, stats, params, 3, need_dx, dx, sums)
        _close(sums[0], db_ref, dtype, "dbias", M)
        _close(sums[1], dw_ref, dtype, "dweight", M)
        if need_dx:
            _close(dx, dx_ref, dtype, "dx")
        else:
            assert np.isnan(dx).all()  # not written


@pytest.mark.parametrize("parallel", [True, False], ids=["parallel", "serial"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("act", ACTS, ids=[a[2] for a in ACTS])
def test_residual_forward_backward(act, dtype, parallel):
    name, args, key, y_determines_grad = act
    params = K.activation_params(name, *args)
    x, r, dy, w, b = _inputs(dtype, 1)
    y_ref, dx_ref, dr_ref, dw_ref, db_ref = _reference(x, r, dy, w, b, key)
    y = np.empty_like(x)
    stats = np.empty((4, C))
    moments = np.empty((2, C), dtype)
    _kernel("forward_res_cl", parallel)(x, r, w, b, 1e-5, params, 3, y, stats, moments)
    _close(y, y_ref, dtype, "y")
    sources = [(False, r)] + ([(True, y)] if y_determines_grad else [])
    for from_y, src in sources:
        for need_dx, need_dr in ((True, True), (True, False), (False, True), (False, False)):
            dx = np.full_like(x, np.nan)
            dr = np.full_like(x, np.nan)
            sums = np.empty((2, C), dtype)
            _kernel("backward_res_cl", parallel)(
                dy, x, src, w, b, stats, params, from_y, 3, need_dx, need_dr, dx, dr, sums
            )
            tag = f"from_y={from_y} need_dx={need_dx} need_dr={need_dr}"
            _close(sums[0], db_ref, dtype, f"dbias {tag}", M)
            _close(sums[1], dw_ref, dtype, f"dweight {tag}", M)
            if need_dx:
                _close(dx, dx_ref, dtype, f"dx {tag}")
            else:
                assert np.isnan(dx).all()
            if need_dr:
                _close(dr, dr_ref, dtype, f"dr {tag}")
            else:
                assert np.isnan(dr).all()


@pytest.mark.parametrize("parallel", [True, False], ids=["parallel", "serial"])
@pytest.mark.parametrize("act", ACTS, ids=[a[2] for a in ACTS])
def test_eval_forward(act, parallel):
    name, args, key, _ = act
    x, _, _, w, b = _inputs(np.float32, 2)
    g = np.random.default_rng(3)
    mean = g.standard_normal(C).astype(np.float32)
    var = (g.random(C) + 0.1).astype(np.float32)
    y = np.empty_like(x)
    params = K.activation_params(name, *args)
    _kernel("affine_cl", parallel)(x, mean, var, w, b, 1e-5, params, 3, y)
    t = (torch.from_numpy(a).double() for a in (x, mean, var, w, b))
    want = ref.ACTIVATIONS[key](ref.batch_norm_eval(*t))
    _close(y, want, np.float32, "y")
