"""save="output" (In-Place ABN, Rota Bulò, Porzi & Kontschieder, CVPR 2018 §3): the layer
keeps only y and rebuilds x̂ = (act⁻¹(y) − β)/γ in backward. Gradients against the
default save="input" mode on both engine paths, serial and threaded; gradcheck; what is
saved; the memory of a Conv→BN→Conv net against torch's; errors; nl.fuse(save=)."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import normlab as nl
from normlab import kernels

ACTS = [("identity", {}), ("leaky_relu", {"negative_slope": 0.1}), ("elu", {"alpha": 0.7})]
TOL = {torch.float32: {"rtol": 1e-4, "atol": 1e-4}, torch.float64: {"rtol": 1e-10, "atol": 1e-10}}


@pytest.fixture(params=["torch", "numba", "numba-threaded"])
def path(request, monkeypatch):
    monkeypatch.setenv(kernels.KERNELS_ENV, request.param.split("-")[0])
    if request.param.endswith("threaded"):
        request.getfixturevalue("threaded_kernels")
    return request.param


def _pair(act, kw, dtype):
    a = nl.nn.BatchNorm2d(5, activation=act, dtype=dtype, **kw)
    b = nl.nn.BatchNorm2d(5, activation=act, dtype=dtype, save="output", **kw)
    with torch.no_grad():
        for m in (a, b):
            m.weight.copy_(torch.tensor([0.5, -1.5, 2.0, 0.8, -0.3]))  # signs: 1/γ matters
            m.bias.copy_(torch.linspace(-1.0, 1.0, 5))
    return a, b


@pytest.mark.parametrize("cl", [False, True], ids=["cf", "cl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("act, kw", ACTS, ids=[a for a, _ in ACTS])
def test_gradients_equal_save_input(act, kw, dtype, cl, path):
    default, inplace = _pair(act, kw, dtype)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 5, 6, 7, generator=g, dtype=dtype) * 2 + 3
    if cl:
        x = x.to(memory_format=torch.channels_last)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = default(x1), inplace(x2)
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)
    dy = torch.randn(y1.shape, generator=g, dtype=dtype)
    got = torch.autograd.grad(y2, (x2, inplace.weight, inplace.bias), dy)
    want = torch.autograd.grad(y1, (x1, default.weight, default.bias), dy)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **TOL[dtype])
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(inplace, name), getattr(default, name))


@pytest.mark.parametrize("mode", ["torch", "numba"])
@pytest.mark.parametrize("act, kw", ACTS, ids=[a for a, _ in ACTS])
def test_gradcheck(act, kw, mode, monkeypatch):
    monkeypatch.setenv(kernels.KERNELS_ENV, mode)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(4, generator=g, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(4, generator=g, dtype=torch.float64, requires_grad=True)
    slope = kw.get("negative_slope", 0.01)
    name = nl.functional.activations.activation_name(act, alpha=kw.get("alpha", 1.0))

    def f(x, w, b):
        return nl.functional.batch_norm(
            x, None, None, w, b, training=True, activation=name, negative_slope=slope,
            save="output",
        )  # fmt: skip

    assert torch.autograd.gradcheck(f, (x, w, b))


def _saved(fn):
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = fn()
    return y, saved


@pytest.mark.parametrize("mode", ["torch", "numba"])
def test_keeps_y_not_x(mode, monkeypatch):
    monkeypatch.setenv(kernels.KERNELS_ENV, mode)
    x = torch.randn(4, 5, 6, 6, requires_grad=True)
    for save, keeps_x in (("input", True), ("output", False)):
        bn = nl.nn.BatchNorm2d(5, activation="leaky_relu", save=save)
        y, saved = _saved(lambda bn=bn: bn(x))
        big = [t for t in saved if t.numel() == x.numel()]
        assert len(big) == 1
        assert (big[0].data_ptr() == x.data_ptr()) is keeps_x
        assert (big[0].data_ptr() == y.data_ptr()) is not keeps_x


def _storage_bytes(model, x):
    """Bytes of the distinct storages autograd keeps for ``model(x)``'s backward."""
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x).sum()
    return sum(storages.values())


def test_conv_bn_conv_saves_about_half_of_torchs():
    torch.manual_seed(0)
    x = torch.randn(8, 16, 24, 24, requires_grad=True)

    def net(bn, act):
        layers = [nn.Conv2d(16, 32, 3, padding=1, bias=False), bn]
        layers += [act] if act is not None else []
        return nn.Sequential(*layers, nn.Conv2d(32, 16, 3, padding=1, bias=False))

    torch_bytes = _storage_bytes(net(nn.BatchNorm2d(32), nn.LeakyReLU(0.01)), x)
    ours = _storage_bytes(net(nl.nn.BatchNorm2d(32, activation="leaky_relu", save="output"),
                              None), x)  # fmt: skip
    default = _storage_bytes(net(nl.nn.BatchNorm2d(32, activation="leaky_relu"), None), x)
    assert ours <= 0.6 * torch_bytes, (ours, default, torch_bytes)
    assert ours < default < torch_bytes


@pytest.mark.parametrize(
    "kw, pattern",
    [
        ({"activation": "relu", "save": "output"}, "needs an invertible activation"),
        ({"activation": "leaky_relu", "negative_slope": 0.0, "save": "output"}, "invertible"),
        ({"activation": "elu", "alpha": -1.0, "save": "output"}, "invertible"),
        ({"activation": "identity", "save": "both"}, "save must be 'input' or 'output'"),
    ],
)
def test_bad_configurations_are_refused(kw, pattern):
    with pytest.raises(ValueError, match=pattern):
        nl.nn.BatchNorm2d(3, **kw)


def test_zero_weight_is_refused_naming_the_fix():
    bn = nl.nn.BatchNorm2d(3, activation="leaky_relu", save="output")
    with torch.no_grad():
        bn.weight[1] = 0.0
    with pytest.raises(ValueError, match=r"weight \(γ\) has a zero entry.*save='input'"):
        bn(torch.randn(4, 3, 5, 5))


def test_double_backward_says_why():
    bn = nl.nn.BatchNorm2d(3, activation="elu", save="output", dtype=torch.float64)
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(bn(x).pow(2).sum(), x, create_graph=False)
    y = bn(x).pow(2).sum()
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(y, x, create_graph=True)
    assert torch.isfinite(g).all()


@pytest.mark.parametrize("cl", [False, True], ids=["cf", "cl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("act, kw", ACTS, ids=[a for a, _ in ACTS])
def test_residual_gradients_equal_save_input_and_keep_r_not_x(act, kw, dtype, cl, path):
    default, inplace = _pair(act, kw, dtype)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 5, 6, 7, generator=g, dtype=dtype) * 2 + 3
    r = torch.randn(4, 5, 6, 7, generator=g, dtype=dtype)
    if cl:
        x = x.to(memory_format=torch.channels_last)
    x1, r1 = x.clone().requires_grad_(), r.clone().requires_grad_()
    x2, r2 = x.clone().requires_grad_(), r.clone().requires_grad_()
    y1 = default(x1, r1)
    y2, saved = _saved(lambda: inplace(x2, r2))
    big = {t.data_ptr() for t in saved if t.numel() == x.numel()}
    assert big == {r2.data_ptr(), y2.data_ptr()}
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)
    dy = torch.randn(y1.shape, generator=g, dtype=dtype)
    got = torch.autograd.grad(y2, (x2, r2, inplace.weight, inplace.bias), dy)
    want = torch.autograd.grad(y1, (x1, r1, default.weight, default.bias), dy)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **TOL[dtype])


@pytest.mark.parametrize("mode", ["torch", "numba"])
def test_residual_gradcheck(mode, monkeypatch):
    monkeypatch.setenv(kernels.KERNELS_ENV, mode)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    r = torch.randn(3, 4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(4, generator=g, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(4, generator=g, dtype=torch.float64, requires_grad=True)

    def f(x, r, w, b):
        return nl.functional.batch_norm(
            x, None, None, w, b, training=True, activation="elu", residual=r, save="output"
        )

    assert torch.autograd.gradcheck(f, (x, r, w, b))


def test_eval_calls_are_unchanged():
    bn = nl.nn.BatchNorm2d(3, activation="leaky_relu", save="output")
    ref = nl.nn.BatchNorm2d(3, activation="leaky_relu")
    x = torch.randn(4, 3, 5, 5)
    bn.eval()
    ref.eval()
    torch.testing.assert_close(bn(x), ref(x))
    assert "save='output'" in repr(bn)


def test_fuse_applies_save_output_where_allowed():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = nn.Conv2d(4, 4, 3, padding=1)
            self.b1 = nn.BatchNorm2d(4)
            self.a1 = nn.LeakyReLU(0.2)
            self.c2 = nn.Conv2d(4, 4, 3, padding=1)
            self.b2 = nn.BatchNorm2d(4)
            self.c3 = nn.Conv2d(4, 4, 3, padding=1)
            self.b3 = nn.BatchNorm2d(4)

        def forward(self, x):
            h = self.a1(self.b1(self.c1(x)))
            h = F.relu(self.b2(self.c2(h)))
            return F.leaky_relu(self.b3(self.c3(h)) + x, 0.2)

    model = Block()
    fused = nl.fuse(model, save="output")
    assert fused.b1.save == "output"  # BN → LeakyReLU: invertible
    assert fused.b2.save == "input"  # relu is not invertible
    assert fused.b3.save == "output"  # BN → add → leaky_relu: keeps y and r
    x = torch.randn(2, 4, 6, 6)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = fused(x1), model(x2)
    torch.testing.assert_close(y1, y2, rtol=1e-4, atol=1e-5)
    y1.sum().backward()
    y2.sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="save must be 'input' or 'output'"):
        nl.fuse(model, save="x")


class _DownsampleBlock(nn.Module):
    """A ResNet downsample block with LeakyReLU: b2 → add(downsample BN) → leaky."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.b1 = nn.BatchNorm2d(4)
        self.c2 = nn.Conv2d(4, 4, 3, padding=1)
        self.b2 = nn.BatchNorm2d(4)
        self.down = nn.Sequential(nn.Conv2d(3, 4, 1, stride=2), nn.BatchNorm2d(4))

    def forward(self, x):
        h = F.leaky_relu(self.b1(self.c1(x)), 0.1)
        return F.leaky_relu(self.b2(self.c2(h)) + self.down(x), 0.1)


def _saved_bytes(model, x):
    from normlab.bench.memory import saved_for_backward

    params = list(model.parameters())
    saved = saved_for_backward(lambda: model(x).sum(), exclude=params)
    return saved["bytes"] - saved["excluded_bytes"]


def test_fuse_save_output_turns_the_residual_operand_bn_into_a_save_output_layer():
    # The fused add → leaky layer keeps its residual r (the other BN's output) to rebuild
    # x̂; that BN then keeps its output (r itself) instead of its input: one tensor less.
    torch.manual_seed(0)
    model = _DownsampleBlock().train()
    fused, report = nl.fuse(model, save="output", report=True)
    layers = dict(fused.named_modules())
    identity = [n for n, what in report.fused.items() if what.startswith("identity")]
    assert len(identity) == 1 and not report.unfused
    assert layers[identity[0]].save == "output" and layers[identity[0]].activation is None
    plain, plain_report = nl.fuse(model, report=True)
    assert list(plain_report.unfused) == identity  # save='input' leaves it as it was
    x = torch.randn(4, 3, 8, 8)
    assert _saved_bytes(fused, x) < _saved_bytes(plain, x)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = fused(x1), model(x2)
    torch.testing.assert_close(y1, y2, rtol=1e-4, atol=1e-5)
    g = torch.randn_like(y1)
    y1.backward(g)
    y2.backward(g)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-4, atol=1e-4)
    for (n1, p1), (n2, p2) in zip(fused.named_parameters(), model.named_parameters()):
        assert n1 == n2
        torch.testing.assert_close(p1.grad, p2.grad, rtol=1e-4, atol=1e-4)
    assert fused.state_dict().keys() == model.state_dict().keys()


def test_fuse_save_output_keeps_the_input_where_gamma_has_a_zero():
    # torchvision's zero_init_residual sets the last BN's γ of each block to 0: x̂ cannot
    # be rebuilt from y there, so fuse keeps x for those layers instead of failing later.
    torch.manual_seed(0)
    model = _DownsampleBlock().train()
    nn.init.zeros_(model.b2.weight)
    nn.init.zeros_(model.down[1].weight)
    fused, report = nl.fuse(model, save="output", report=True)
    layers = dict(fused.named_modules())
    assert layers["b1"].save == "output"
    assert report.fused == {"b1": "leaky_relu", "b2": "add+leaky_relu"}
    assert layers["b2"].save == "input"
    assert list(report.unfused) == ["down.1"] and "residual operand" in report.unfused["down.1"]
    x1 = torch.randn(4, 3, 8, 8, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_()
    y1, y2 = fused(x1), model(x2)
    torch.testing.assert_close(y1, y2, rtol=1e-4, atol=1e-5)
    y1.sum().backward()
    y2.sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("act, kw", ACTS, ids=[a for a, _ in ACTS])
def test_half_input_gradients_match_float64(act, kw, dtype, residual, path):
    # bf16/fp16 input, float32 parameters: x̂ is rebuilt from the half output y, so it
    # carries y's rounding, but the rebuilt x − mean stays float32 on both paths (rounded
    # to half again, dx was off by up to 8 ulps of its scale; now within ~1.1)
    from tests import reference as ref

    f = {"identity": lambda z: z, "leaky_relu": lambda z: F.leaky_relu(z, 0.1),
         "elu": lambda z: F.elu(z, 0.7)}[act]  # fmt: skip
    for seed in range(3):
        _, inplace = _pair(act, kw, torch.float32)
        g = torch.Generator().manual_seed(seed)
        x = (torch.randn(4, 5, 6, 7, generator=g) * 2 + 3).to(dtype)
        dy = torch.randn(x.shape, generator=g).to(dtype)
        r = torch.randn(x.shape, generator=g).to(dtype) if residual else None
        x1 = x.clone().requires_grad_()
        args = (x1,) if r is None else (x1, r.clone().requires_grad_())
        y = inplace(*args)
        assert y.dtype == dtype
        x64 = x.double().requires_grad_()
        w64, b64 = (p.detach().double().requires_grad_() for p in (inplace.weight, inplace.bias))
        leaves = (x64, w64, b64)
        z64 = ref.batch_norm_train(x64, w64, b64)
        if r is not None:
            r64 = r.double().requires_grad_()
            z64 = z64 + r64
            leaves = (x64, r64, w64, b64)
        y64 = f(z64)
        ref.assert_half_close(y, y64, msg="y")
        got = torch.autograd.grad(y, (*args, inplace.weight, inplace.bias), dy)
        want = torch.autograd.grad(y64, leaves, dy.double())
        ref.assert_half_close(got[0], want[0], msg=f"dx, seed {seed}")
        if r is not None:
            ref.assert_half_close(got[1], want[1], msg="dr")
        # dγ = Σdz·x̂ with x̂ rebuilt from the rounded y (off by u·|y|/|γ|, |γ| ≥ 0.3
        # here): measured up to 2.8u of its scale, so 4u
        tol = 4 * ref.UNIT_ROUNDOFF[dtype]
        for name, a, b in zip(("dweight", "dbias"), got[-2:], want[-2:]):
            assert a.dtype == torch.float32
            scale = float(b.abs().max()) + 1.0
            torch.testing.assert_close(a.double() / scale, b / scale, rtol=tol, atol=tol, msg=name)
