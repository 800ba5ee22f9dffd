"""The engine under tracers and transforms (normlab.functional.traced): the custom ops
against torch.library's opcheck and a float64 reference, the branch-free running-statistics
update against the eager rule, and the tensor forms of the schedules."""

from __future__ import annotations

import warnings

import pytest
import torch

import normlab as nl
from normlab import kernels
from normlab.functional import NonFiniteStatisticsWarning, renorm_clip_limits, traced
from normlab.functional.ema import ema_debias
from tests import reference as ref

ACTS = ["identity", "relu", "leaky_relu", "silu"]


@pytest.fixture(params=["torch", "numba"])
def kernel_mode(request, monkeypatch):
    monkeypatch.setenv(kernels.KERNELS_ENV, request.param)
    return request.param


def _inputs(shape, dtype, channels_last=False, affine=True, requires_grad=True):
    x = torch.randn(*shape, dtype=dtype) * 2 + 3
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    c = shape[1]
    w = (torch.rand(c, dtype=dtype) + 0.5) if affine else None
    b = torch.randn(c, dtype=dtype) if affine else None
    for t in (x, w, b):
        if t is not None:
            t.requires_grad_(requires_grad)
    return x, w, b


def _ref_act(z, name, slope=0.01):
    return {
        "identity": lambda: z,
        "relu": lambda: torch.relu(z),
        "leaky_relu": lambda: torch.nn.functional.leaky_relu(z, slope),
        "silu": lambda: torch.nn.functional.silu(z),
    }[name]()


@pytest.mark.parametrize(
    "dtype,channels_last,affine",
    [(torch.float32, False, True), (torch.float32, True, True), (torch.float64, True, False)],
)
def test_opcheck_train_ops(kernel_mode, dtype, channels_last, affine):
    # torch.library's own checks: schema, fake impl against the real one (shapes, strides,
    # dtypes), autograd registration, and that the ops survive functionalization.
    x, w, b = _inputs((4, 3, 5, 6), dtype, channels_last, affine)
    args = (x, w, b, 1, 1e-5, "relu", 0.01)
    torch.library.opcheck(traced.batch_norm_train, args)
    y, stats = traced.batch_norm_train(*args)
    dy = torch.randn_like(y)
    w0, b0 = (None, None) if not affine else (w.detach(), b.detach())
    back = (dy, x.detach(), w0, b0, stats, 1, "relu", 0.01, True, affine, affine)
    torch.library.opcheck(traced.batch_norm_train_backward, back)


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("shape,channel_dim", [((6, 4), 1), ((4, 3, 5, 6), 1), ((3, 5, 4), 2)])
def test_train_op_matches_float64_reference(kernel_mode, act, shape, channel_dim):
    x = (torch.randn(*shape, dtype=torch.float64) * 3 + 1e3).requires_grad_()
    c = shape[channel_dim]
    w = (torch.rand(c, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(c, dtype=torch.float64).requires_grad_()
    y, stats = traced.batch_norm_train(x, w, b, channel_dim, 1e-5, act, 0.01)
    y_ref = _ref_act(ref.batch_norm_train(x, w, b, channel_dim=channel_dim), act)
    torch.testing.assert_close(y, y_ref)
    mean, var, _, _ = ref.batch_stats(x.detach(), channel_dim)
    torch.testing.assert_close(stats[0] + stats[1], mean)
    torch.testing.assert_close(stats[2], var)
    torch.testing.assert_close(stats[3], torch.rsqrt(var + 1e-5))
    dy = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, w, b), dy)
    want = torch.autograd.grad(y_ref, (x, w, b), dy)
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("param_dtype", ["float32", "same"])
def test_opcheck_train_ops_with_half_inputs(kernel_mode, dtype, param_dtype):
    # the fake impls promise y and dx in the input's dtype, dγ/dβ in the parameters'
    # (float32 under autocast), stats float64; the kernels and the torch ops deliver that
    x, w, b = _inputs((4, 3, 5, 6), torch.float32, channels_last=True)
    x = x.detach().to(dtype).requires_grad_()
    if param_dtype == "same":
        w, b = (t.detach().to(dtype).requires_grad_() for t in (w, b))
    args = (x, w, b, 1, 1e-5, "relu", 0.01)
    torch.library.opcheck(traced.batch_norm_train, args)
    y, stats = traced.batch_norm_train(*args)
    assert y.dtype == dtype and stats.dtype == torch.float64
    back = (torch.randn_like(y), x.detach(), w.detach(), b.detach(), stats, 1, "relu", 0.01)
    torch.library.opcheck(traced.batch_norm_train_backward, (*back, True, True, True))
    r = torch.randn_like(x)
    res = (x, r, w, b, 1, 1e-5, "relu", 0.01)
    torch.library.opcheck(traced.batch_norm_residual_train, res)


@pytest.mark.parametrize("autocast", [False, True], ids=["bf16-input", "autocast"])
def test_compiled_bf16_training_step_matches_eager(autocast, monkeypatch):
    # bf16 activations, float32 parameters and buffers (what autocast leaves a BN layer
    # with): the compiled graph runs the same kernels through the custom ops, so outputs
    # and gradients equal eager's; the running statistics are updated by tensor code
    # (float32) rather than inside the kernel (float64), within float32's rounding.
    monkeypatch.setenv(kernels.KERNELS_ENV, "numba")
    calls = []
    real = kernels.batch_forward
    monkeypatch.setattr(kernels, "batch_forward", lambda *a, **k: calls.append(1) or real(*a, **k))

    def model():
        torch.manual_seed(0)
        bn = nl.nn.BatchNorm2d(4, activation="relu")
        return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), bn) if autocast else bn

    eager, comp = model(), model()
    compiled = torch.compile(comp, backend="aot_eager", fullgraph=True)
    g = torch.Generator().manual_seed(3)
    for step in range(2):
        x = torch.randn(5, 3 if autocast else 4, 6, 6, generator=g) * (step + 1) + step
        if not autocast:
            x = x.bfloat16()
        outs = []
        for m in (eager, compiled):
            xg = x.clone().requires_grad_()
            before = len(calls)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                y = m(xg)
            assert y.dtype == torch.bfloat16
            assert len(calls) == before + 1, "the layer did not run the kernels"
            y.float().pow(2).sum().backward()
            outs.append((y, xg.grad))
        (ye, gxe), (yc, gxc) = outs
        torch.testing.assert_close(yc, ye, rtol=0, atol=0)
        torch.testing.assert_close(gxc, gxe, rtol=0, atol=0)
    for (name, pe), pc in zip(eager.named_parameters(), comp.parameters()):
        assert pc.grad.dtype == pe.grad.dtype == torch.float32, name
        torch.testing.assert_close(pc.grad, pe.grad, rtol=0, atol=0, msg=name)
    for (name, be), bc in zip(eager.named_buffers(), comp.buffers()):
        assert bc.dtype == be.dtype, name
        torch.testing.assert_close(bc, be, rtol=1e-6, atol=1e-7, msg=name)
    torch._dynamo.reset()


def test_train_op_keeps_strides_of_an_unusual_layout():
    # (N, C, H, W) permuted to neither contiguous nor channels-last: the kernels write a
    # contiguous output, the op hands back empty_like(x)'s strides as its fake promises.
    x = torch.randn(3, 4, 5, 6).permute(0, 1, 3, 2)
    y, _ = traced.batch_norm_train(x, None, None, 1, 1e-5, "identity", 0.01)
    assert y.stride() == torch.empty_like(x).stride()
    torch.testing.assert_close(y.double(), ref.batch_norm_train(x), atol=1e-5, rtol=1e-5)


def test_compiled_layer_runs_the_kernels(monkeypatch):
    # The graph holds the custom op, and the op calls the fused kernels at run time.
    calls = []
    real = kernels.batch_forward
    monkeypatch.setattr(kernels, "batch_forward", lambda *a, **k: calls.append(1) or real(*a, **k))
    bn = nl.nn.BatchNorm2d(3, activation="relu")
    compiled = torch.compile(bn, backend="aot_eager", fullgraph=True)
    x = torch.randn(4, 3, 5, 5)
    y = compiled(x)
    assert calls, "the compiled layer did not reach the kernels"
    torch.testing.assert_close(
        y, torch.relu(torch.nn.functional.batch_norm(x, None, None, training=True))
    )
    torch._dynamo.reset()


def _torch_rule(rm, rv, nbt, mean, uvar, momentum):
    nbt += 1
    f = momentum if momentum is not None else 1.0 / float(nbt)
    return rm * (1 - f) + f * mean, rv * (1 - f) + f * uvar, nbt


@pytest.mark.parametrize("momentum", [0.1, 1.0, None])
def test_update_running_follows_torchs_rule(momentum):
    rm, rv, nbt = torch.randn(5), torch.rand(5) + 0.5, torch.tensor(3)
    mean, uvar = torch.randn(5), torch.rand(5)
    want = _torch_rule(rm.clone(), rv.clone(), nbt.clone(), mean, uvar, momentum)
    traced.update_running(rm, rv, nbt, mean, uvar, momentum, "skip", "bn")
    torch.testing.assert_close((rm, rv), want[:2])
    assert int(nbt) == int(want[2]) == 4


def test_update_running_masks_a_nonfinite_batch_under_skip():
    rm, rv, nbt = torch.randn(4), torch.rand(4) + 0.5, torch.tensor(7)
    before = (rm.clone(), rv.clone())
    mean = torch.tensor([0.0, float("nan"), 1.0, 2.0])
    traced.update_running(rm, rv, nbt, mean, torch.ones(4), None, "skip", "bn")
    assert torch.equal(rm, before[0]) and torch.equal(rv, before[1]) and int(nbt) == 7
    # 'propagate' is torch's behaviour: the bad channel is poisoned, the counter moves
    traced.update_running(rm, rv, nbt, mean, torch.ones(4), 0.1, "propagate", "bn")
    assert not torch.isfinite(rm[1]) and torch.isfinite(rm[[0, 2, 3]]).all() and int(nbt) == 8


def test_update_running_raise_asserts_before_any_change():
    rm, rv, nbt = torch.zeros(2), torch.ones(2), torch.tensor(0)
    with pytest.raises(RuntimeError, match="not finite"):
        traced.update_running(
            rm, rv, nbt, torch.tensor([float("inf"), 0.0]), torch.ones(2), 0.1, "raise", "bn"
        )
    assert torch.equal(rm, torch.zeros(2)) and torch.equal(rv, torch.ones(2)) and int(nbt) == 0


@pytest.mark.parametrize("nonfinite", ["skip", "propagate"])
def test_compiled_skip_keeps_its_meaning_and_warns_only_eagerly(nonfinite):
    # Under compile the update is masked (buffers and counter unchanged) for 'skip', with no
    # warning (a graph cannot warn on data); the eager layer still warns.
    bn = nl.nn.BatchNorm2d(3, nonfinite=nonfinite)
    compiled = torch.compile(bn, backend="aot_eager", fullgraph=True)
    good = torch.randn(4, 3, 5, 5)
    compiled(good)
    state = {k: v.clone() for k, v in bn.state_dict().items()}
    bad = good.clone()
    bad[0, 1, 0, 0] = float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("error", NonFiniteStatisticsWarning)
        compiled(bad)
    after = bn.state_dict()
    if nonfinite == "skip":
        for k, v in state.items():
            assert torch.equal(after[k], v), k
    else:
        assert int(after["num_batches_tracked"]) == 2 and not torch.isfinite(
            after["running_mean"][1]
        )
    torch._dynamo.reset()
    eager = nl.nn.BatchNorm2d(3, nonfinite="skip")
    with pytest.warns(NonFiniteStatisticsWarning):
        eager(bad)


def test_compiled_training_matches_eager_over_steps():
    # Outputs, gradients, running statistics and the counter over several compiled steps,
    # including momentum=None (the cumulative factor 1/t as a tensor).
    for momentum in (0.1, None):
        eager = nl.nn.BatchNorm2d(4, momentum=momentum)
        comp = nl.nn.BatchNorm2d(4, momentum=momentum)
        f = torch.compile(comp, backend="aot_eager", fullgraph=True)
        for step in range(3):
            x = torch.randn(5, 4, 3, 3) * (step + 1) + step
            xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
            ye, yc = eager(xe), f(xc)
            torch.testing.assert_close(yc, ye)
            ye.pow(2).sum().backward()
            yc.pow(2).sum().backward()
            torch.testing.assert_close(xc.grad, xe.grad)
            torch.testing.assert_close(comp.weight.grad, eager.weight.grad)
        for k, v in eager.state_dict().items():
            torch.testing.assert_close(comp.state_dict()[k], v)
        torch._dynamo.reset()


def test_renorm_clip_limits_tensor_schedule_equals_the_scalar_one():
    kw = {"r_max": 3.0, "d_max": 5.0, "warmup_steps": 10, "r_max_steps": 40, "d_max_steps": 10}
    for step in [0, 5, 9, 10, 11, 25, 39, 40, 100]:
        r, d = renorm_clip_limits(torch.tensor(step), **kw)
        assert (float(r), float(d)) == pytest.approx(renorm_clip_limits(step, **kw))


def test_ema_debias_tensor_steps_equals_int_steps():
    running = torch.randn(4)
    for steps in [0, 1, 7]:
        torch.testing.assert_close(
            ema_debias(running, 1.0, 0.1, torch.tensor(steps)), ema_debias(running, 1.0, 0.1, steps)
        )


def test_traced_predicate():
    x = torch.randn(3, 4)
    assert not kernels.traced(x)
    assert kernels.traced(torch.empty(3, 4, device="meta"))
    assert kernels.traced(torch.nn.Parameter(x))  # a subclass: its own dispatch decides
    seen = []
    torch.func.vmap(lambda t: seen.append(kernels.traced(t)) or t)(x)
    assert seen == [True]
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        assert kernels.traced(torch.empty(2, 2))


def test_vmap_training_with_running_stats_says_why_and_what_to_do():
    bn = nl.nn.BatchNorm2d(3)
    with pytest.raises(RuntimeError, match="track_running_stats=False"):
        torch.func.vmap(bn)(torch.randn(2, 4, 3, 5, 5))


def test_hessian_through_transforms_matches_eager_double_backward():
    # jacrev∘jacrev (composite path) against autograd's double backward of the eager layer.
    bn = nl.nn.BatchNorm1d(3, track_running_stats=False).double()
    x = torch.randn(5, 3, dtype=torch.float64)

    def loss(t):
        return bn(t).pow(3).sum()

    hess = torch.func.jacrev(torch.func.jacrev(loss))(x)
    xe = x.clone().requires_grad_()
    (g,) = torch.autograd.grad(loss(xe), xe, create_graph=True)
    rows = [torch.autograd.grad(g.reshape(-1)[i], xe, retain_graph=True)[0] for i in range(15)]
    torch.testing.assert_close(hess.reshape(15, 15), torch.stack(rows).reshape(15, 15))


@pytest.mark.parametrize(
    "layer,shape",
    [
        (lambda: nl.nn.LayerNorm(4), (3, 4)),  # one dim reduced, weight per feature, not per row
        (lambda: nl.nn.LayerNorm([3, 4]), (2, 3, 4)),
        (lambda: nl.nn.GroupNorm(2, 4), (3, 4, 5)),
        (lambda: nl.nn.RMSNorm(4), (3, 4)),
    ],
)
def test_compiled_sample_norms_match_eager(layer, shape):
    # A reduction that leaves one dim looks like the BatchNorm case, but LayerNorm's weight
    # is per feature: such calls take the composite path, not the per-channel custom op.
    m = layer()
    x = torch.randn(*shape)
    got = torch.compile(m, backend="aot_eager", fullgraph=True)(x)
    torch.testing.assert_close(got, m(x))
    torch._dynamo.reset()


@pytest.mark.parametrize(
    "kw, ref",
    [
        ({"activation": "elu", "alpha": 0.5}, lambda z: torch.nn.functional.elu(z, 0.5)),
        ({"activation": "hardtanh", "min_val": 0.0, "max_val": 2.0},
         lambda z: torch.nn.functional.hardtanh(z, 0.0, 2.0)),
    ],
)  # fmt: skip
def test_compiled_layer_keeps_activation_parameters(kernel_mode, kw, ref):
    # elu's alpha and hardtanh's bounds travel in the activation name: the traced path
    # must pass the whole name to the custom op, not the bare 'elu' / 'hardtanh'
    bn = nl.nn.BatchNorm2d(3, **kw)
    x = torch.randn(4, 3, 5, 5) * 2
    y = torch.compile(bn, backend="aot_eager", fullgraph=True)(x)
    torch.testing.assert_close(y, ref(torch.nn.functional.batch_norm(x, None, None, training=True)))
    torch._dynamo.reset()
