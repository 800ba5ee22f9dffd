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
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "hardtanh": F.hardtanh,
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


@pytest.mark.parametrize("cl", [False, True], ids=["cf", "cl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize(
    "act, kw, ref",
    [
        ("leaky_relu", {"negative_slope": -0.2}, lambda z: F.leaky_relu(z, -0.2)),
        ("leaky_relu", {"negative_slope": 0.3}, lambda z: F.leaky_relu(z, 0.3)),
        ("elu", {"alpha": -0.5}, lambda z: F.elu(z, -0.5)),  # not from y: r is kept
        ("hardtanh", {"min_val": -0.5, "max_val": 2.0}, lambda z: F.hardtanh(z, -0.5, 2.0)),
    ],
    ids=["leaky-neg", "leaky", "elu-neg-alpha", "hardtanh-bounds"],
)
def test_parametrised_activations_match(act, kw, ref, dtype, cl, path):
    fused = nl.nn.BatchNorm2d(5, activation=act, dtype=dtype, **kw)
    plain = torch.nn.BatchNorm2d(5, dtype=dtype)
    x, r = _inputs(dtype, cl, seed=2)
    x1, r1 = x.clone().requires_grad_(), r.clone().requires_grad_()
    x2, r2 = x.clone().requires_grad_(), r.clone().requires_grad_()
    y1, y2 = fused(x1, r1), ref(plain(x2) + r2)
    torch.testing.assert_close(y1, y2, **TOL[dtype])
    dy = torch.randn(y1.shape, dtype=dtype, generator=torch.Generator().manual_seed(4))
    got = torch.autograd.grad(y1, (x1, r1, fused.weight, fused.bias), dy)
    want = torch.autograd.grad(y2, (x2, r2, plain.weight, plain.bias), dy)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **TOL[dtype])


@pytest.mark.parametrize("needs", [(True, False), (False, True), (True, True)], ids=str)
@pytest.mark.parametrize("act", ["relu", "silu"])
@pytest.mark.parametrize("cl", [False, True], ids=["cf", "cl"])
def test_partial_gradients(needs, act, cl, path):
    """Only dx or only dr asked for: the kernel writes just that one."""
    fused, plain = _pair(act, torch.float32)
    x, r = _inputs(torch.float32, cl, seed=5)
    x1, r1 = x.clone().requires_grad_(needs[0]), r.clone().requires_grad_(needs[1])
    x2, r2 = x.clone().requires_grad_(needs[0]), r.clone().requires_grad_(needs[1])
    y1, y2 = fused(x1, r1), ACTS[act](plain(x2) + r2)
    inputs1 = [t for t in (x1, r1) if t.requires_grad] + [fused.weight]
    inputs2 = [t for t in (x2, r2) if t.requires_grad] + [plain.weight]
    dy = torch.randn(y1.shape, generator=torch.Generator().manual_seed(6))
    for a, b in zip(torch.autograd.grad(y1, inputs1, dy), torch.autograd.grad(y2, inputs2, dy)):
        torch.testing.assert_close(a, b, **TOL[torch.float32])


def test_kernel_path_is_one_call_each_way(monkeypatch):
    """On the kernel path the add and the activation run inside the kernels: one residual
    kernel call forward, one backward, and no BN-only kernel call."""
    monkeypatch.setenv(kernels.KERNELS_ENV, "numba")
    calls = []
    for name in ("batch_forward_residual", "batch_backward_residual", "batch_forward",
                 "batch_backward"):  # fmt: skip
        real = getattr(kernels, name)

        def spy(*args, _real=real, _name=name, **kw):
            calls.append(_name)
            return _real(*args, **kw)

        monkeypatch.setattr(kernels, name, spy)
    bn = nl.nn.BatchNorm2d(5, activation="relu")
    x = torch.randn(4, 5, 6, 6, requires_grad=True)
    r = torch.randn(4, 5, 6, 6, requires_grad=True)
    bn(x, r).sum().backward()
    assert calls == ["batch_forward_residual", "batch_backward_residual"]


def test_large_channels_first_storage_path_matches():
    """Rows longer than the small test shapes (the storage-dtype code of the cf kernels,
    threaded by size) against float64 torch math."""
    fused = nl.nn.BatchNorm2d(8, activation="relu")
    x = torch.randn(4, 8, 40, 40) * 3 + 100  # an offset: the shifted sums matter
    r = torch.randn(4, 8, 40, 40)
    x1, r1 = x.clone().requires_grad_(), r.clone().requires_grad_()
    y = fused(x1, r1)
    xd, rd = x.double().requires_grad_(), r.double().requires_grad_()
    want = F.relu(F.batch_norm(xd, None, None, training=True) + rd)
    torch.testing.assert_close(y.double(), want, rtol=1e-4, atol=2e-5)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(7))
    gx, gr = torch.autograd.grad(y, (x1, r1), dy)
    wx, wr = torch.autograd.grad(want, (xd, rd), dy.double())
    torch.testing.assert_close(gx.double(), wx, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gr.double(), wr, rtol=1e-4, atol=1e-5)


# -- the traced path: one custom op per BN + add + act ----------------------------------
@pytest.mark.parametrize("mode", ["torch", "numba"])
@pytest.mark.parametrize(
    "act, dtype, cl",
    [("relu", torch.float32, False), ("hardswish", torch.float32, True),
     ("elu(0.5)", torch.float64, False)],
)  # fmt: skip
def test_opcheck_residual_ops(mode, act, dtype, cl, monkeypatch):
    from normlab.functional import traced

    monkeypatch.setenv(kernels.KERNELS_ENV, mode)
    x, r = _inputs(dtype, cl, seed=8)
    w = torch.linspace(0.5, 2.0, 5, dtype=dtype).requires_grad_()
    b = torch.linspace(-1.0, 1.0, 5, dtype=dtype).requires_grad_()
    args = (x.requires_grad_(), r.requires_grad_(), w, b, 1, 1e-5, act, 0.01)
    torch.library.opcheck(traced.batch_norm_residual_train, args)
    y, stats = traced.batch_norm_residual_train(*args)
    src = y.detach() if act != "hardswish" else r.detach()
    back = (torch.randn_like(y), x.detach(), src, w.detach(), b.detach(), stats, 1, act, 0.01,
            True, True, True, True)  # fmt: skip
    torch.library.opcheck(traced.batch_norm_residual_train_backward, back)


@pytest.mark.parametrize("mode", ["torch", "numba"])
@pytest.mark.parametrize("act", ["relu", "silu", "elu(0.5)"])
def test_compiled_fused_block_is_one_op_and_matches(mode, act, monkeypatch):
    monkeypatch.setenv(kernels.KERNELS_ENV, mode)
    fused = nl.nn.BatchNorm2d(5, activation=act)
    plain = torch.nn.BatchNorm2d(5)
    ref_act = {"relu": F.relu, "silu": F.silu, "elu(0.5)": lambda z: F.elu(z, 0.5)}[act]
    graphs = []

    def backend(gm, example_inputs):
        from torch._dynamo.backends.common import aot_autograd

        def fw(g, _):
            graphs.append(g)
            return g

        return aot_autograd(fw_compiler=fw, bw_compiler=fw)(gm, example_inputs)

    compiled = torch.compile(fused, backend=backend, fullgraph=True)
    x, r = _inputs(torch.float32, False, seed=9)
    x1, r1 = x.clone().requires_grad_(), r.clone().requires_grad_()
    x2, r2 = x.clone().requires_grad_(), r.clone().requires_grad_()
    y1, y2 = compiled(x1, r1), ref_act(plain(x2) + r2)
    torch.testing.assert_close(y1, y2, **TOL[torch.float32])
    dy = torch.randn_like(y1)
    got = torch.autograd.grad(y1, (x1, r1, fused.weight, fused.bias), dy)
    want = torch.autograd.grad(y2, (x2, r2, plain.weight, plain.bias), dy)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **TOL[torch.float32])
    torch.testing.assert_close(fused.running_mean, plain.running_mean, **TOL[torch.float32])
    torch.testing.assert_close(fused.running_var, plain.running_var, **TOL[torch.float32])
    fw_graph, bw_graph = graphs[0].graph, graphs[1].graph
    targets = [str(n.target) for n in fw_graph.nodes if n.op == "call_function"]
    assert sum("batch_norm_residual_train" in t for t in targets) == 1
    # the add and the activation are inside the op: no other activation-sized op
    big = [
        str(n.target)
        for n in fw_graph.nodes
        if n.op == "call_function"
        and "getitem" not in str(n.target)
        and str(n.target) != "aten.detach.default"  # the saved y: no computation
        and isinstance(n.meta.get("val"), torch.Tensor)
        and n.meta["val"].shape == x.shape
    ]
    assert big == [], targets
    bw = [str(n.target) for n in bw_graph.nodes if n.op == "call_function"]
    assert sum("batch_norm_residual_train_backward" in t for t in bw) == 1
    torch._dynamo.reset()


@pytest.mark.parametrize("cl", [False, True], ids=["cf", "cl"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("act", ["relu", "identity", "tanh", "hardswish", "silu"])
def test_half_input_matches_float64(act, dtype, cl, path, monkeypatch):
    # bf16/fp16 x and r, float32 parameters and buffers (autocast's layout): y, dx, dr
    # within the format's rounding of a float64 reference computed from the same upcast
    # values (relu: y decides act'; hardswish, silu: r is kept and z recomputed)
    from tests import reference as ref

    calls = []
    real = kernels.batch_forward_residual
    monkeypatch.setattr(
        kernels, "batch_forward_residual", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    fused, _ = _pair(act, torch.float32)
    x, r = (t.to(dtype) for t in _inputs(torch.float32, cl, seed=4))
    x1, r1 = x.clone().requires_grad_(), r.clone().requires_grad_()
    y = fused(x1, r1)
    assert y.dtype == dtype and bool(calls) == path.startswith("numba")
    x64, r64 = x.double().requires_grad_(), r.double().requires_grad_()
    w64, b64 = (p.detach().double().requires_grad_() for p in (fused.weight, fused.bias))
    y64 = ACTS[act](ref.batch_norm_train(x64, w64, b64) + r64)
    ref.assert_half_close(y, y64, msg="y")
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(5)).to(dtype)
    dx, dr, dw, db = torch.autograd.grad(y, (x1, r1, fused.weight, fused.bias), dy)
    want = torch.autograd.grad(y64, (x64, r64, w64, b64), dy.double())
    ref.assert_half_close(dx, want[0], msg="dx")
    ref.assert_half_close(dr, want[1], msg="dr")
    assert dw.dtype == db.dtype == torch.float32
    # tanh's act'(z) = 1 − y² is read from the saved half y (as torch's tanh_backward
    # reads its output): each dz then carries ~2u·|dy| and the sums dγ, dβ a few u of
    # their scale; relu reads only y's sign, hardswish and silu recompute z
    tol = 4 * ref.UNIT_ROUNDOFF[dtype] if act == "tanh" else 1e-5
    for got, exp in zip((dw, db), want[2:]):
        scale = float(exp.abs().max()) + 1.0
        torch.testing.assert_close(got.double() / scale, exp / scale, rtol=tol, atol=tol)
    mean, _, unbiased, _ = ref.batch_stats(x)
    torch.testing.assert_close(fused.running_mean.double(), 0.1 * mean, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(fused.running_var.double(), 0.9 + 0.1 * unbiased, rtol=1e-6, atol=0)


@pytest.mark.parametrize(
    "act, kw, ref",
    [
        ("leaky_relu", {"negative_slope": 0.3}, lambda z: F.leaky_relu(z, 0.3)),
        ("elu", {"alpha": 0.5}, lambda z: F.elu(z, 0.5)),
        ("hardtanh", {"min_val": -0.5, "max_val": 2.0}, lambda z: F.hardtanh(z, -0.5, 2.0)),
        ("hardswish", {}, F.hardswish),
        ("silu", {}, F.silu),
    ],
    ids=["leaky", "elu", "hardtanh", "hardswish", "silu"],
)
@pytest.mark.parametrize("cl", [False, True], ids=["cf", "cl"])
def test_eval_adds_and_activates_in_place_without_touching_the_operands(act, kw, ref, cl, path):
    # Inference writes the add and the activation into the layer's own output (as
    # torchvision's block does): x and r are left as they were, and with grad enabled the
    # out-of-place form runs so autograd differentiates it.
    fused = nl.nn.BatchNorm2d(5, activation=act, **kw).eval()
    plain = torch.nn.BatchNorm2d(5).eval()
    with torch.no_grad():
        for m in (fused, plain):
            m.running_mean.copy_(torch.linspace(-0.5, 0.5, 5))
            m.running_var.copy_(torch.linspace(0.5, 2.0, 5))
    x, r = _inputs(torch.float32, cl, seed=5)
    x0, r0 = x.clone(), r.clone()
    with torch.no_grad():
        y = fused(x, r)
    torch.testing.assert_close(y, ref(plain(x) + r), **TOL[torch.float32])
    assert torch.equal(x, x0) and torch.equal(r, r0)
    assert y.data_ptr() not in (x.data_ptr(), r.data_ptr())
    x1, r1 = x.clone().requires_grad_(), r.clone().requires_grad_()
    x2, r2 = x.clone().requires_grad_(), r.clone().requires_grad_()
    y1, y2 = fused(x1, r1), ref(plain(x2) + r2)
    dy = torch.randn(y1.shape, generator=torch.Generator().manual_seed(6))
    got = torch.autograd.grad(y1, (x1, r1, fused.weight, fused.bias), dy)
    want = torch.autograd.grad(y2, (x2, r2, plain.weight, plain.bias), dy)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **TOL[torch.float32])


def test_eval_vmap_over_the_residual_only():
    # Under torch.func the output may be unbatched while r is batched: no in-place add.
    fused = nl.nn.BatchNorm2d(5, activation="relu").eval()
    plain = torch.nn.BatchNorm2d(5).eval()
    x = torch.randn(4, 5, 6, 7)
    rs = torch.randn(3, 4, 5, 6, 7)
    with torch.no_grad():
        got = torch.func.vmap(lambda r: fused(x, r))(rs)
        want = torch.stack([F.relu(plain(x) + r) for r in rs])
    torch.testing.assert_close(got, want, **TOL[torch.float32])
