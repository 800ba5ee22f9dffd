import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck, gradgradcheck

import normlab.functional as NF
from tests import reference as ref

ACTS = ["identity", "relu", "leaky_relu", "sigmoid", "tanh", "silu"]


def _inputs(shape=(6, 3, 4), dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=dtype) * 2 + 1).requires_grad_()
    c = shape[1]
    w = (torch.rand(c, generator=g, dtype=dtype) + 0.5).requires_grad_()
    b = torch.randn(c, generator=g, dtype=dtype).requires_grad_()
    return x, w, b


@pytest.mark.parametrize("act", ACTS)
def test_forward_and_closed_form_backward_match_float64_autograd(act):
    x, w, b = _inputs()
    y = NF.batch_norm(x, None, None, w, b, training=True, activation=act)
    y_ref = ref.ACTIVATIONS[act](ref.batch_norm_train(x, w, b))
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, w, b), dy)
    grads_ref = torch.autograd.grad(y_ref, (x, w, b), dy)
    for got, want in zip(grads, grads_ref):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("act", ACTS)
def test_float32_backward_close_to_float64(act):
    x, w, b = _inputs(dtype=torch.float32)
    y = NF.batch_norm(x, None, None, w, b, training=True, activation=act)
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
    y_ref = ref.ACTIVATIONS[act](ref.batch_norm_train(x64, w64, b64))
    dy = torch.randn_like(y)
    for got, want in zip(
        torch.autograd.grad(y, (x, w, b), dy),
        torch.autograd.grad(y_ref, (x64, w64, b64), dy.double()),
    ):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)


def test_elementwise_affine_and_rms_variant():
    # The engine's general form: weight broadcast per element (LayerNorm), no centring (RMSNorm).
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    y, _mean, _var = NF.normalize_batch(x, (1, 2), w, b, eps=1e-6)
    y_ref = torch.nn.functional.layer_norm(x, (5, 6), w, b, eps=1e-6)
    torch.testing.assert_close(y, y_ref)
    dy = torch.randn_like(y)
    for got, want in zip(
        torch.autograd.grad(y, (x, w, b), dy), torch.autograd.grad(y_ref, (x, w, b), dy)
    ):
        torch.testing.assert_close(got, want)
    y, _, _ms = NF.normalize_batch(x, (2,), w[0], None, eps=1e-6, center=False)
    y_ref = x * torch.rsqrt(x.pow(2).mean(2, keepdim=True) + 1e-6) * w[0]
    torch.testing.assert_close(y, y_ref)
    for got, want in zip(
        torch.autograd.grad(y, (x, w), dy), torch.autograd.grad(y_ref, (x, w), dy)
    ):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("act", ["identity", "sigmoid"])
def test_gradcheck_and_gradgradcheck_training(affine, act):
    x, w, b = _inputs(shape=(4, 2, 3))
    args = (x, w, b) if affine else (x,)

    def fn(*a):
        return NF.batch_norm(a[0], None, None, *a[1:], training=True, activation=act)

    assert gradcheck(fn, args)
    assert gradgradcheck(fn, args)


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("zero_var", [False, True])
def test_gradcheck_and_gradgradcheck_eval(affine, zero_var):
    x, w, b = _inputs(shape=(4, 2, 3))
    rm = torch.randn(2, dtype=torch.float64)
    rv = (
        torch.zeros(2, dtype=torch.float64)
        if zero_var
        else torch.rand(2, dtype=torch.float64) + 0.5
    )
    args = (x, w, b) if affine else (x,)

    def fn(*a):
        return NF.batch_norm(a[0], rm, rv, *a[1:], training=False, eps=1e-3)

    assert gradcheck(fn, args)
    assert gradgradcheck(fn, args)


def test_rms_gradgradcheck():
    x, w, _ = _inputs(shape=(3, 4))
    assert gradgradcheck(
        lambda a, b: NF.normalize_batch(a, (1,), b.view(1, -1), center=False)[0], (x, w)
    )


def _saved_bytes(fn):
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, saved


def test_fused_relu_saves_one_activation_sized_tensor():
    x = torch.randn(8, 16, 5, 5, requires_grad=True)
    w, b = torch.ones(16, requires_grad=True), torch.zeros(16, requires_grad=True)
    _, ours = _saved_bytes(
        lambda: NF.batch_norm(x, None, None, w, b, training=True, activation="relu")
    )
    _, theirs = _saved_bytes(
        lambda: torch.relu(torch.nn.functional.batch_norm(x, None, None, w, b, training=True))
    )
    big = lambda ts: [t for t in ts if t.numel() == x.numel()]  # noqa: E731
    assert len(big(ours)) == 1
    assert len(big(theirs)) == 2


def test_half_precision_input_with_float32_parameters():
    for dtype in (torch.float16, torch.bfloat16):
        x = (torch.randn(16, 4, 3) * 3 + 100).to(dtype).requires_grad_()
        w = torch.rand(4, requires_grad=True)
        b = torch.randn(4, requires_grad=True)
        rm, rv = torch.zeros(4), torch.ones(4)
        y = NF.batch_norm(x, rm, rv, w, b, training=True)
        assert y.dtype == dtype and rm.dtype == torch.float32
        torch.testing.assert_close(
            y.double(), ref.batch_norm_train(x.detach().float(), w, b), atol=0.05, rtol=0.02
        )
        y.sum().backward()
        assert x.grad.dtype == dtype and w.grad.dtype == torch.float32
        assert torch.isfinite(x.grad.float()).all()


def test_half_precision_large_tensor_does_not_overflow():
    x = (torch.randn(512, 2, 64) * 200).half()  # x² overflows float16 (max 65504)
    y = NF.batch_norm(x, None, None, training=True)
    assert torch.isfinite(y.float()).all()
    torch.testing.assert_close(y.double(), ref.batch_norm_train(x.float()), atol=0.01, rtol=0.01)


def test_stats_source_simulating_two_identical_ranks():
    # A rank holding x, with a twin rank holding the same x: global statistics over cat(x, x)
    # and backward sums all-reduced (doubled) must equal BN on the concatenated batch.
    from normlab.functional.stats import Moments

    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 3, 2, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.rand(3, generator=g, dtype=torch.float64, requires_grad=True)
    both = torch.cat([x, x]).detach().requires_grad_()
    mean = both.detach().mean((0, 2), keepdim=True)
    var = both.detach().var((0, 2), unbiased=False, keepdim=True)
    source = NF.StatsSource(Moments(mean, torch.zeros_like(mean), var), 20, lambda s: 2 * s)
    y, _, _ = NF.normalize_batch(x, (0, 2), w.view(1, 3, 1), source=source, activation="tanh")
    y_ref = torch.tanh(ref.batch_norm_train(both, w))
    torch.testing.assert_close(y, y_ref[:5])
    dy = torch.randn(5, 3, 2, generator=g, dtype=torch.float64)
    (gx,) = torch.autograd.grad(y, x, dy)
    (g_ref,) = torch.autograd.grad(y_ref, both, torch.cat([dy, dy]))
    torch.testing.assert_close(gx, g_ref[:5])


# -- running statistics updated by the engine's forward ---------------------------------
@pytest.fixture(params=["torch", "numba"])
def kernel_mode(request, monkeypatch):
    from normlab import kernels

    monkeypatch.setenv(kernels.KERNELS_ENV, request.param)
    return request.param


@pytest.mark.parametrize("momentum", [0.3, None])
def test_running_update_follows_torchs_rule(kernel_mode, momentum):
    g = torch.Generator().manual_seed(3)
    rm, rv = torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
    nbt = torch.tensor(0)
    want_m, want_v = rm.clone(), rv.clone()
    for t in range(1, 4):
        x = torch.randn(6, 4, 3, generator=g, dtype=torch.float64) * t + t
        running = NF.RunningUpdate(rm, rv, momentum, nbt, skip_nonfinite=True)
        y, mean, var = NF.normalize_batch(x, (0, 2), running=running)
        y0, mean0, var0 = NF.normalize_batch(x, (0, 2))
        assert torch.equal(y, y0) and torch.equal(mean, mean0) and torch.equal(var, var0)
        assert not running.skipped and int(nbt) == t
        m, _, unbiased, _ = ref.batch_stats(x)
        f = momentum if momentum is not None else 1 / t
        want_m, want_v = (1 - f) * want_m + f * m, (1 - f) * want_v + f * unbiased
        torch.testing.assert_close(rm, want_m, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(rv, want_v, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("skip", [True, False])
def test_running_update_with_nonfinite_statistics(kernel_mode, skip):
    x = torch.randn(8, 3)
    x[2, 0] = float("inf")
    rm, rv, nbt = torch.zeros(3), torch.ones(3), torch.tensor(0)
    running = NF.RunningUpdate(rm, rv, 0.1, nbt, skip_nonfinite=skip)
    NF.normalize_batch(x, (0,), running=running)
    assert running.skipped == skip
    if skip:  # nothing changed, counter included
        assert torch.equal(rm, torch.zeros(3)) and torch.equal(rv, torch.ones(3)) and int(nbt) == 0
    else:  # torch's behaviour: the bad channel is poisoned, the others updated
        assert not torch.isfinite(rm[0]) and torch.isfinite(rm[1:]).all() and int(nbt) == 1


def test_functorch_transforms_take_the_traceable_path():
    # Under torch.func transforms the engine never reaches its autograd.Function (which
    # calls kernels by address): vmap over samples equals a loop of torch's batch norm.
    x = torch.randn(3, 8, 4, dtype=torch.float64)
    got = torch.func.vmap(lambda t: NF.batch_norm(t, None, None, training=True))(x)
    want = torch.stack([F.batch_norm(t, None, None, training=True) for t in x])
    torch.testing.assert_close(got, want)
