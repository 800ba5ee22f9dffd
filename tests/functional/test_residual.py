"""BN → add(residual) → activation as one layer (``batch_norm(..., residual=)``,
``BatchNorm2d.forward(input, residual)``) against the unfused torch reference, on both
engine paths, serial and threaded, eval, traced (torch.func), double backward, and what
it saves for backward."""

import pytest
import torch
import torch.nn.functional as F

import normlab as nl
from normlab import kernels

ACTS = {
    "identity": lambda z: z,
    "relu": F.relu,
    "leaky_relu": lambda z: F.leaky_relu(z, 0.01),
    "relu6": F.relu6,
    "hardswish": F.hardswish,  # not readable from y: r is saved
    "elu": F.elu,
    "silu": F.silu,
}
TOL = {torch.float32: {"rtol": 1e-4, "atol": 1e-5}, torch.float64: {"rtol": 1e-10, "atol": 1e-10}}


@pytest.fixture(params=["torch", "numba", "numba-threaded"])
def path(request, monkeypatch):
    monkeypatch.setenv(kernels.KERNELS_ENV, request.param.split("-")[0])
    if request.param.endswith("threaded"):
        request.getfixturevalue("threaded_kernels")
    return request.param


def _pair(act, dtype):
    fused = nl.nn.BatchNorm2d(5, activation=act, dtype=dtype)
    plain = torch.nn.BatchNorm2d(5, dtype=dtype)
    with torch.no_grad():
        for m in (fused, plain):
            m.weight.copy_(torch.linspace(0.5, 2.0, 5))
            m.bias.copy_(torch.linspace(-1.0, 1.0, 5))
    return fused, plain


def _inputs(dtype, cl, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 5, 6, 7, generator=g, dtype=dtype) * 2 + 1
    if cl:
        x = x.to(memory_format=torch.channels_last)
    # any strides: a transposed residual
    r = torch.randn(4, 5, 7, 6, generator=g, dtype=dtype).transpose(2, 3)
    return x, r


@pytest.mark.parametrize("cl", [False, True], ids=["cf", "cl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("act", sorted(ACTS))
def test_matches_bn_add_act(act, dtype, cl, path):
    fused, plain = _pair(act, dtype)
    x, r = _inputs(dtype, cl)
    x1, r1 = x.clone().requires_grad_(), r.clone().requires_grad_()
    x2, r2 = x.clone().requires_grad_(), r.clone().requires_grad_()
    y1, y2 = fused(x1, r1), ACTS[act](plain(x2) + r2)
    torch.testing.assert_close(y1, y2, **TOL[dtype])
    dy = torch.randn(y1.shape, dtype=dtype, generator=torch.Generator().manual_seed(3))
    got = torch.autograd.grad(y1, (x1, r1, fused.weight, fused.bias), dy)
    want = torch.autograd.grad(y2, (x2, r2, plain.weight, plain.bias), dy)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **TOL[dtype])
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(fused, name), getattr(plain, name), **TOL[dtype])
    fused.eval()
    plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(fused(x, r), ACTS[act](plain(x) + r), **TOL[dtype])


@pytest.mark.parametrize("mode", ["torch", "numba"])
@pytest.mark.parametrize("act", ["relu", "hardswish", "elu", "identity"])
def test_gradcheck_and_gradgradcheck(act, mode, monkeypatch):
    monkeypatch.setenv(kernels.KERNELS_ENV, mode)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    r = torch.randn(3, 4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(4, generator=g, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(4, generator=g, dtype=torch.float64, requires_grad=True)

    def f(x, r, w, b):
        return nl.functional.batch_norm(
            x, None, None, w, b, training=True, activation=act, residual=r
        )

    assert torch.autograd.gradcheck(f, (x, r, w, b))
    assert torch.autograd.gradgradcheck(f, (x, r, w, b))


def _saved(fn):
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = fn()
    return y, saved


@pytest.mark.parametrize("mode", ["torch", "numba"])
def test_relu_saves_x_and_output_not_residual(mode, monkeypatch):
    monkeypatch.setenv(kernels.KERNELS_ENV, mode)
    bn = nl.nn.BatchNorm2d(5, activation="relu")
    x = torch.randn(4, 5, 6, 6, requires_grad=True)
    r = torch.randn(4, 5, 6, 6, requires_grad=True)
    y, saved = _saved(lambda: bn(x, r))
    big = [t for t in saved if t.numel() == x.numel()]
    assert len(big) == 2
    assert any(t is x for t in big) and any(t.data_ptr() == y.data_ptr() for t in big)
    assert not any(t.data_ptr() == r.data_ptr() for t in big)
    # hardswish: y does not determine act'(z), so r is kept instead of y
    bn = nl.nn.BatchNorm2d(5, activation="hardswish")
    y, saved = _saved(lambda: bn(x, r))
    big = [t for t in saved if t.numel() == x.numel()]
    assert len(big) == 2 and any(t.data_ptr() == r.data_ptr() for t in big)


def test_traced_path_under_torch_func():
    fused, plain = _pair("relu", torch.float64)
    fused.track_running_stats = plain.track_running_stats = False
    x, r = _inputs(torch.float64, False)

    def loss(module, x, r):
        return module(x, r).pow(2).sum() if module is fused else F.relu(module(x) + r).pow(2).sum()

    gx, gr = torch.func.grad(lambda x, r: loss(fused, x, r), argnums=(0, 1))(x, r)
    x2, r2 = x.clone().requires_grad_(), r.clone().requires_grad_()
    want = torch.autograd.grad(loss(plain, x2, r2), (x2, r2))
    torch.testing.assert_close(gx, want[0])
    torch.testing.assert_close(gr, want[1])


def test_none_residual_is_plain_forward():
    bn = nl.nn.BatchNorm2d(3, activation="relu")
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(bn(x, None), F.relu(torch.nn.functional.batch_norm(
        x, None, None, bn.weight, bn.bias, True)))  # fmt: skip


@pytest.mark.parametrize(
    "r, pattern",
    [
        (torch.randn(2, 3, 4, 5), "residual must have the input's shape and dtype"),
        (torch.randn(2, 3, 4, 4, dtype=torch.float64), "residual must have the input's shape"),
    ],
)
def test_bad_residual_names_the_argument(r, pattern):
    bn = nl.nn.BatchNorm2d(3)
    with pytest.raises(ValueError, match=pattern):
        bn(torch.randn(2, 3, 4, 4), r)
