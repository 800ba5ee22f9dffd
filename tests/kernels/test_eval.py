"""Eval kernels (``affine_cf``/``affine_cl`` through ``NF.batch_norm``) against float64
references: one loop per activation family in channels-first rows long enough for the
vector loop and its remainder, and hardtanh/relu6 in the storage dtype (issue 12) within
the float32 output's rounding, NaN kept, and the float64 code for channels whose
constants are unsafe in float32."""

import pytest
import torch

import normlab.functional as NF
from normlab import kernels
from tests import reference as ref

ACTS = [
    "identity", "relu", "leaky_relu", "sigmoid", "tanh", "silu",
    "relu6", "hardtanh(-0.5, 2.0)", "hardswish", "elu(0.5)",
]  # fmt: skip


@pytest.fixture(autouse=True)
def _kernels_everywhere(monkeypatch):
    monkeypatch.setenv(kernels.KERNELS_ENV, "numba")


def _case(layout, dtype, c=6, s=(7, 11)):
    g = torch.Generator().manual_seed(11)
    x = (torch.randn(3, c, *s, generator=g, dtype=torch.float64) * 3).to(dtype)
    if layout == "cl":
        x = x.to(memory_format=torch.channels_last)
    mean = torch.linspace(-1.0, 1.0, c, dtype=torch.float64).to(dtype)
    var = torch.linspace(0.3, 2.0, c, dtype=torch.float64).to(dtype)
    w = torch.linspace(0.5, 4.0, c, dtype=torch.float64).to(dtype)
    b = torch.linspace(-2.0, 2.0, c, dtype=torch.float64).to(dtype)
    return x, mean, var, w, b


def _want(x, mean, var, w, b, act):
    # written out, not F.batch_norm: torch folds it into x·a + (β − mean·a), which
    # cancels catastrophically for the huge γ below
    x, mean, var, w, b = (t.double() for t in (x, mean, var, w, b))
    sh = (1, -1) + (1,) * (x.dim() - 2)
    z = (x - mean.view(sh)) / torch.sqrt(var.view(sh) + 1e-5) * w.view(sh) + b.view(sh)
    return ref.ACTIVATIONS[act](z)


@pytest.mark.parametrize("layout", ["cf", "cl"])
@pytest.mark.parametrize("act", ACTS)
def test_every_family_matches_float64(act, layout):
    args = _case(layout, torch.float64)
    y = NF.batch_norm(*args, training=False, activation=act)
    torch.testing.assert_close(y, _want(*args, act), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("layout", ["cf", "cl"])
@pytest.mark.parametrize("act", ["relu6", "hardtanh(-0.5, 2.0)"])
def test_hardtanh_in_float32_within_the_output_rounding(act, layout):
    x, mean, var, w, b = _case(layout, torch.float32)
    x[0, 0, 0, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    y = NF.batch_norm(x, mean, var, w, b, training=False, activation=act)
    want = _want(x, mean, var, w, b, act)
    lo, hi = (0.0, 6.0) if act == "relu6" else (-0.5, 2.0)
    assert torch.isnan(y[0, 0, 0, 0]) and y[0, 0, 0, 1] == hi and y[0, 0, 0, 2] == lo
    # z in float32 is within a few float32 ulp of float64's z; the clamp adds nothing
    torch.testing.assert_close(y.double(), want, rtol=4e-7, atol=4e-7, equal_nan=True)
    assert ((y == lo) | (y == hi)).sum() > 0 and ((y > lo) & (y < hi)).sum() > 0


@pytest.mark.parametrize("layout", ["cf", "cl"])
def test_hardtanh_with_constants_unsafe_in_float32_takes_float64(layout):
    x, mean, var, w, b = _case(layout, torch.float32)
    w[2] = 1e33  # γ/sqrt(var + ε) > 1e30: not safe in float32 (every channel then float64)
    x[:, 2] = mean[2]
    x[0, 2, 0, :2] = mean[2] + torch.tensor([1.0, -1.0])
    y = NF.batch_norm(x, mean, var, w, b, training=False, activation="hardtanh(-0.5, 2.0)")
    want = _want(x, mean, var, w, b, "hardtanh(-0.5, 2.0)")
    torch.testing.assert_close(y.double(), want, rtol=4e-7, atol=4e-7)
    assert y[0, 2, 0, 0] == 2.0 and y[0, 2, 0, 1] == -0.5 and (y[1:, 2] == b[2]).all()
