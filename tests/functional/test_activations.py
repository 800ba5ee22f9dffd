"""The activations added for fusion (relu6, hardtanh, hardswish, elu) against torch's own
``F.relu6/hardtanh/hardswish/elu`` applied after torch's BatchNorm: outputs and
gradients, training and eval, both engine paths, serial and threaded kernels,
channels-first and channels-last, float32 and float64."""

import pytest
import torch
import torch.nn.functional as F

import normlab as nl
from normlab import kernels
from normlab.functional.activations import activation_name, get_activation

# (layer keywords, torch's activation after torch's BN)
CASES = {
    "relu6": ({"activation": "relu6"}, F.relu6),
    "hardtanh": ({"activation": "hardtanh"}, F.hardtanh),
    "hardtanh_bounds": (
        {"activation": "hardtanh", "min_val": -0.5, "max_val": 2.0},
        lambda z: F.hardtanh(z, -0.5, 2.0),
    ),
    "hardswish": ({"activation": "hardswish"}, F.hardswish),
    "elu": ({"activation": "elu"}, F.elu),
    "elu_alpha": ({"activation": "elu", "alpha": 0.3}, lambda z: F.elu(z, 0.3)),
}
TOL = {torch.float32: {"rtol": 1e-4, "atol": 1e-5}, torch.float64: {"rtol": 1e-10, "atol": 1e-10}}


def _pair(kw, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    fused = nl.nn.BatchNorm2d(5, dtype=dtype, **kw)
    plain = torch.nn.BatchNorm2d(5, dtype=dtype)
    with torch.no_grad():
        w = torch.rand(5, generator=g, dtype=dtype) * 2 + 0.5
        b = torch.randn(5, generator=g, dtype=dtype)
        for m in (fused, plain):
            m.weight.copy_(w)
            m.bias.copy_(b)
    return fused, plain


@pytest.fixture(params=["torch", "numba", "numba-threaded"])
def path(request, monkeypatch):
    mode = request.param.split("-")[0]
    monkeypatch.setenv(kernels.KERNELS_ENV, mode)
    if request.param.endswith("threaded"):
        request.getfixturevalue("threaded_kernels")
    return request.param


@pytest.mark.parametrize("cl", [False, True], ids=["cf", "cl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_torch_activation_after_torch_batch_norm(case, dtype, cl, path):
    kw, act = CASES[case]
    fused, plain = _pair(kw, dtype)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 5, 6, 7, generator=g, dtype=dtype) * 3 + 1
    if cl:
        x = x.to(memory_format=torch.channels_last)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = fused(x1), act(plain(x2))
    torch.testing.assert_close(y1, y2, **TOL[dtype])
    dy = torch.randn(y1.shape, generator=g, dtype=dtype)
    got = torch.autograd.grad(y1, (x1, fused.weight, fused.bias), dy)
    want = torch.autograd.grad(y2, (x2, plain.weight, plain.bias), dy)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **TOL[dtype])
    torch.testing.assert_close(fused.running_mean, plain.running_mean, **TOL[dtype])
    torch.testing.assert_close(fused.running_var, plain.running_var, **TOL[dtype])
    fused.eval()
    plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(fused(x), act(plain(x)), **TOL[dtype])


@pytest.mark.parametrize("name", ["relu6", "hardtanh(-0.5, 2.0)", "hardswish", "elu(0.3)"])
def test_double_backward_torch_op_path(name):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(3, generator=g, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(3, generator=g, dtype=torch.float64, requires_grad=True)

    def f(x, w, b):
        return nl.functional.batch_norm(x, None, None, w, b, training=True, activation=name)

    assert torch.autograd.gradcheck(f, (x, w, b))
    assert torch.autograd.gradgradcheck(f, (x, w, b))


def test_activation_name_and_layer_attributes():
    assert activation_name("relu6") == "relu6"
    assert activation_name("hardtanh") == "hardtanh"
    assert activation_name("hardtanh", min_val=0.0, max_val=2.0) == "hardtanh(0.0, 2.0)"
    assert activation_name("elu", alpha=0.5) == "elu(0.5)"
    assert activation_name("identity") is None and activation_name(None) is None
    assert get_activation("hardtanh(0.0, 2.0)").params == (0.0, 2.0)
    assert get_activation("relu6").params == (0.0, 6.0)
    bn = nl.nn.BatchNorm2d(3, activation="hardtanh", min_val=0.0, max_val=2.0)
    assert bn.activation == "hardtanh(0.0, 2.0)" and "hardtanh(0.0, 2.0)" in repr(bn)
    assert nl.nn.BatchNorm1d(3, activation="elu", alpha=0.5).activation == "elu(0.5)"


@pytest.mark.parametrize(
    "kw, pattern",
    [
        ({"activation": "hardtanh", "min_val": 2.0, "max_val": 1.0}, "min_val < max_val"),
        ({"activation": "elu", "alpha": float("nan")}, "alpha must be finite"),
        ({"activation": "hardtanh(1.0)"}, "activation must be one of"),
        ({"activation": "gelu"}, "activation must be one of"),
    ],
)
def test_bad_parameters_name_the_argument(kw, pattern):
    with pytest.raises(ValueError, match=pattern):
        nl.nn.BatchNorm2d(3, **kw)
