"""The vectorisable ``_exp`` and ``_expm1`` against libm's float64 ``exp``/``expm1`` (via
NumPy) in ulp over dense grids and at their edges, and elu through the kernels (which
now use them instead of ``math.expm1``/``math.exp``; issue 12) against torch's float64
``F.elu`` and its autograd, channels-first and channels-last, training and eval."""

import math

import numpy as np
import pytest
import torch
from numba import njit

import normlab.functional as NF
from normlab import kernels
from normlab.kernels._elementwise import _exp, _expm1
from normlab.kernels._jit import _FASTMATH
from tests import reference as ref


def _looped(f, fastmath):
    """f over an array in a loop LLVM can vectorise, compiled as the kernels compile
    their loops (``fastmath``: the kernels' flags) or plainly."""

    @njit(fastmath=fastmath, error_model="numpy")
    def many(xs):
        out = np.empty_like(xs)
        for i in range(xs.shape[0]):
            out[i] = f(xs[i])
        return out

    return many


@pytest.fixture(scope="module", params=[False, True], ids=["plain", "kernel-fastmath"])
def fns(request):
    fm = _FASTMATH if request.param else False
    return _looped(_exp, fm), _looped(_expm1, fm)


def _ulps(got, want):
    """|got − want| in units of the last place of ``want`` (NumPy's spacing)."""
    return np.abs(got - want) / np.spacing(np.abs(want))


_H = math.log(2) / 2  # the reduction's |r| bound: k changes there
GRIDS = {
    "dense": np.linspace(-708.0, 709.0, 200001),
    "k in -1, 0, 1": np.linspace(-1.2, 1.2, 100001),
    "tiny": np.concatenate(
        [np.logspace(-300, -8, 3001), -np.logspace(-300, -8, 3001), [5e-324, -5e-324]]
    ),
    "around ±ln2/2": np.concatenate(
        [s * _H + np.linspace(-1e-6, 1e-6, 4001) for s in (1.0, -1.0)]
        + [np.nextafter([_H, -_H], d) for d in (np.inf, -np.inf)]
    ),
    "near -708 and 709": np.concatenate(
        [np.linspace(-708.0, -700.0, 4001), np.linspace(700.0, 709.0, 4001)]
    ),
    "expm1 → -1": np.linspace(-40.0, -30.0, 4001),
}


@pytest.mark.parametrize("grid", list(GRIDS), ids=list(GRIDS))
def test_expm1_and_exp_within_two_ulp_of_libm(grid, fns):
    exp, expm1 = fns
    xs = GRIDS[grid]
    assert _ulps(expm1(xs), np.expm1(xs)).max() <= 2.0
    assert _ulps(exp(xs), np.exp(xs)).max() <= 2.0


def test_expm1_is_exact_to_one_ulp_for_tiny_arguments(fns):
    # expm1(x) = x(1 + x/2 + ...) : e^x − 1 formed by subtraction would lose everything here
    xs = np.concatenate([np.logspace(-300, -8, 301), -np.logspace(-300, -8, 301)])
    got = fns[1](xs)
    assert _ulps(got, np.expm1(xs)).max() <= 1.0
    assert np.all(np.sign(got) == np.sign(xs))


def test_expm1_edges(fns):
    exp, expm1 = fns
    xs = np.array([np.inf, -np.inf, np.nan, 800.0, -800.0, 709.5, -708.5, 0.0, -0.0])
    got = expm1(xs)
    assert got[0] == np.inf and got[3] == np.inf and got[5] == np.inf
    assert got[1] == -1.0 and got[4] == -1.0 and got[6] == -1.0
    assert np.isnan(got[2])
    assert got[7] == 0.0 and not np.signbit(got[7])
    assert got[8] == 0.0 and np.signbit(got[8])  # as math.expm1(-0.0)
    assert expm1(np.array([709.0]))[0] == pytest.approx(math.expm1(709.0), rel=4e-16)
    assert expm1(np.array([-708.0]))[0] == -1.0
    e = exp(xs)
    assert e[0] == np.inf and e[1] == 0.0 and np.isnan(e[2]) and e[3] == np.inf
    assert e[4] == 0.0 and e[7] == 1.0 and e[8] == 1.0


# -- elu through the kernels -------------------------------------------------------------
@pytest.fixture(autouse=True)
def _kernels_everywhere(monkeypatch):
    monkeypatch.setenv(kernels.KERNELS_ENV, "numba")


def _elu_input(layout, scale):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, 6, 5, 7, generator=g, dtype=torch.float64)
    x[0, 0, 0, 0] = 40.0  # the other values of channel 0 then normalise near −0.2
    if layout == "cl":
        x = x.to(memory_format=torch.channels_last)
    # γ spreads z from ±1e-12 (expm1's relative accuracy near 0) to ±60 (−α far below 0)
    w = torch.tensor([scale, 1.0, 3.0, 20.0, 60.0, 1e-3], dtype=torch.float64)
    b = torch.tensor([0.0, -0.5, 0.0, -30.0, 0.0, 0.0], dtype=torch.float64)
    return x, w, b


def _close_with_tiny_channel(y, want):
    # channel 0's values are ~1e-13 (one 1e-11) and must keep their digits (relative, no
    # atol); the others' z = γ·x̂ + β may cancel to near 0, where x̂'s rounding is absolute
    torch.testing.assert_close(y[:, 0], want[:, 0], rtol=1e-12, atol=0.0)
    assert (y[:, 0].abs() < 1e-10).all() and (y[:, 0] < 0).any()
    torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("layout", ["cf", "cl"])
@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_elu_training_forward_backward_match_torch_float64(layout, alpha):
    x, w, b = _elu_input(layout, 1e-12)
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    act = "elu" if alpha == 1.0 else f"elu({alpha})"
    t = [a.clone().requires_grad_() for a in (x, w, b)]
    y = NF.batch_norm(t[0], None, None, t[1], t[2], training=True, activation=act)
    got = torch.autograd.grad(y, t, dy)
    r = [a.clone().requires_grad_() for a in (x, w, b)]
    want_y = torch.nn.functional.elu(ref.batch_norm_train(*r), alpha)
    want = torch.autograd.grad(want_y, r, dy)
    _close_with_tiny_channel(y, want_y)
    for g_, w_ in zip(got, want):
        torch.testing.assert_close(g_, w_, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("layout", ["cf", "cl"])
def test_elu_eval_matches_torch_float64(layout):
    x, w, b = _elu_input(layout, 1e-12)
    mean = torch.linspace(-1.0, 1.0, 6, dtype=torch.float64)
    var = torch.linspace(0.5, 2.0, 6, dtype=torch.float64)
    y = NF.batch_norm(x, mean, var, w, b, training=False, activation="elu(0.5)")
    z = torch.nn.functional.batch_norm(x, mean, var, w, b, training=False)
    _close_with_tiny_channel(y, torch.nn.functional.elu(z, 0.5))
