import copy
import io
import pickle
import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import normlab as nl
import normlab.functional as NF
from tests import reference as ref

PAIRS = {
    1: (nl.nn.BatchNorm1d, torch.nn.BatchNorm1d),
    2: (nl.nn.BatchNorm2d, torch.nn.BatchNorm2d),
    3: (nl.nn.BatchNorm3d, torch.nn.BatchNorm3d),
}


@st.composite
def configs(draw):
    kind = draw(st.sampled_from([1, 1, 2, 3]))
    n = draw(st.integers(2, 6))
    c = draw(st.integers(1, 5))
    spatial = {1: draw(st.sampled_from([(), (3,)])), 2: (3, 2), 3: (2, 2, 2)}[kind]
    if kind == 1 and spatial == () and n < 2:
        n = 2
    return {
        "kind": kind,
        "shape": (n, c, *spatial),
        "momentum": draw(st.sampled_from([None, 0.1, 1.0, 0.0, draw(st.floats(0.01, 0.99))])),
        "affine": draw(st.booleans()),
        "track": draw(st.booleans()),
        "eps": draw(st.sampled_from([1e-5, 1e-3])),
        "dtype": draw(st.sampled_from([torch.float32, torch.float64])),
        "seed": draw(st.integers(0, 2**16)),
    }


def _tol(dtype):
    return {} if dtype == torch.float32 else {"rtol": 1e-10, "atol": 1e-10}


@given(cfg=configs())
def test_equivalent_to_torch_over_training_steps(cfg):
    ours_cls, torch_cls = PAIRS[cfg["kind"]]
    kw = dict(
        eps=cfg["eps"],
        momentum=cfg["momentum"],
        affine=cfg["affine"],
        track_running_stats=cfg["track"],
        dtype=cfg["dtype"],
    )
    c = cfg["shape"][1]
    ours, theirs = ours_cls(c, **kw), torch_cls(c, **kw)
    g = torch.Generator().manual_seed(cfg["seed"])
    if cfg["affine"]:
        with torch.no_grad():
            for m in (ours, theirs):
                m.weight.copy_(torch.linspace(0.5, 1.5, c))
                m.bias.copy_(torch.linspace(-1, 1, c))
    tol = _tol(cfg["dtype"])
    for step in range(22):
        training = step < 20 or step == 21
        ours.train(training)
        theirs.train(training)
        x = torch.randn(cfg["shape"], generator=g, dtype=cfg["dtype"]) * (1 + step % 3) + step % 5
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = ours(xa), theirs(xb)
        torch.testing.assert_close(ya, yb, **tol)
        dy = torch.randn(ya.shape, generator=g, dtype=cfg["dtype"])
        ya.backward(dy)
        yb.backward(dy)
        torch.testing.assert_close(xa.grad, xb.grad, **tol)
        if cfg["affine"]:
            torch.testing.assert_close(ours.weight.grad, theirs.weight.grad, **tol)
            torch.testing.assert_close(ours.bias.grad, theirs.bias.grad, **tol)
            ours.zero_grad()
            theirs.zero_grad()
        if cfg["track"]:
            torch.testing.assert_close(ours.running_mean, theirs.running_mean, **tol)
            torch.testing.assert_close(ours.running_var, theirs.running_var, **tol)
            assert int(ours.num_batches_tracked) == int(theirs.num_batches_tracked)


def test_same_signature_defaults_buffers_and_keys():
    import inspect

    for ours_cls, torch_cls in PAIRS.values():
        ours_sig = inspect.signature(ours_cls.__init__).parameters
        for name, p in inspect.signature(torch_cls.__init__).parameters.items():
            assert name in ours_sig and ours_sig[name].default == p.default, name
            assert ours_sig[name].kind == p.kind, name
        a, b = ours_cls(7), torch_cls(7)
        assert list(a.state_dict()) == list(b.state_dict())
        for k, v in b.state_dict().items():
            assert a.state_dict()[k].dtype == v.dtype and torch.equal(a.state_dict()[k], v)
        assert isinstance(a, torch_cls)
        assert a._version == b._version == 2


def _trained(cls, steps=3):
    m = cls(4)
    for _ in range(steps):
        m(
            torch.randn(8, 4, 3, 3)
            if cls in (nl.nn.BatchNorm2d, torch.nn.BatchNorm2d)
            else torch.randn(8, 4)
        )
    with torch.no_grad():
        m.weight.uniform_()
        m.bias.uniform_()
    return m


@pytest.mark.parametrize("direction", ["torch->normlab", "normlab->torch"])
def test_state_dict_round_trips_both_ways(direction, tmp_path):
    src_cls, dst_cls = (torch.nn.BatchNorm2d, nl.nn.BatchNorm2d)
    if direction == "normlab->torch":
        src_cls, dst_cls = dst_cls, src_cls
    src = _trained(src_cls)
    path = tmp_path / "ckpt.pt"
    torch.save(src.state_dict(), path)
    dst = dst_cls(4)
    dst.load_state_dict(torch.load(path, weights_only=True))
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k
    x = torch.randn(5, 4, 3, 3)
    src.eval()
    dst.eval()
    torch.testing.assert_close(dst(x), src(x))


def test_old_checkpoint_without_num_batches_tracked_loads():
    src = _trained(torch.nn.BatchNorm1d)
    sd = src.state_dict()
    del sd["num_batches_tracked"]
    sd._metadata[""]["version"] = 1  # saved before torch added the buffer
    dst = nl.nn.BatchNorm1d(4)
    dst.load_state_dict(sd)
    assert int(dst.num_batches_tracked) == 0
    torch.testing.assert_close(dst.running_mean, src.running_mean)


def test_strict_false_with_missing_keys_keeps_values():
    m = _trained(nl.nn.BatchNorm1d)
    kept = m.running_var.clone()
    result = m.load_state_dict({"weight": torch.ones(4)}, strict=False)
    assert "running_var" in result.missing_keys
    assert torch.equal(m.running_var, kept) and torch.equal(m.weight, torch.ones(4))


def test_pickle_deepcopy_repr_and_moves():
    m = nl.nn.BatchNorm2d(3, activation="leaky_relu", negative_slope=0.2, nonfinite="raise")
    for clone in (pickle.loads(pickle.dumps(m)), copy.deepcopy(m)):
        assert repr(clone) == repr(m)
        assert clone.nonfinite == "raise" and clone.activation == "leaky_relu"
    assert repr(m) == (
        "BatchNorm2d(3, eps=1e-05, momentum=0.1, affine=True, bias=True, "
        "track_running_stats=True, activation='leaky_relu', negative_slope=0.2, nonfinite='raise')"
    )
    assert repr(nl.nn.BatchNorm2d(3)) == repr(torch.nn.BatchNorm2d(3))
    m64 = m.double()
    assert m64.running_mean.dtype == torch.float64 and m64.num_batches_tracked.dtype == torch.int64
    meta = nl.nn.BatchNorm2d(3, device="meta")
    assert meta.weight.is_meta
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    assert isinstance(torch.load(buf, weights_only=False), nl.nn.BatchNorm2d)


def test_worked_example_of_seed_003():
    # x = [1, 2, 3, 4], γ = 2, β = 1: μ = 2.5, σ² = 1.25 (docs/sources.md#seed-003). The
    # seed then writes x_hat = [-1.118, -0.447, 0.447, 1.118]; the outer two are wrong:
    # (1 − 2.5)/sqrt(1.25) = -1.342, so y = [-1.683, 0.106, 1.894, 3.683], not the seed's
    # [-1.236, …, 3.236].
    bn = nl.nn.BatchNorm1d(1, eps=0.0, dtype=torch.float64)
    with torch.no_grad():
        bn.weight.fill_(2.0)
        bn.bias.fill_(1.0)
    x = torch.tensor([[1.0], [2.0], [3.0], [4.0]], dtype=torch.float64)
    y = bn(x).detach().flatten()
    torch.testing.assert_close(
        y, torch.tensor([-1.683, 0.106, 1.894, 3.683], dtype=torch.float64), atol=1e-3, rtol=0
    )
    seed_y = torch.tensor([-1.236, 0.106, 1.894, 3.236], dtype=torch.float64)
    torch.testing.assert_close(y[1:3], seed_y[1:3], atol=1e-3, rtol=0)  # the middle two agree
    torch.testing.assert_close(bn.running_mean, torch.tensor([0.25], dtype=torch.float64))
    t = torch.nn.BatchNorm1d(1, eps=1e-12, dtype=torch.float64)  # torch 2.13 refuses eps=0
    with torch.no_grad():
        t.weight.fill_(2.0)
        t.bias.fill_(1.0)
    torch.testing.assert_close(y, t(x).detach().flatten(), rtol=1e-9, atol=1e-9)


def test_nonfinite_skip_equals_never_seeing_the_bad_batch():
    g = torch.Generator().manual_seed(0)
    clean = [torch.randn(16, 3, 4, generator=g) * 2 + 1 for _ in range(2)]
    bad = clean[0].clone()
    bad[0, 2, 1] = float("nan")
    a, b = nl.nn.BatchNorm1d(3), nl.nn.BatchNorm1d(3)
    with pytest.warns(NF.NonFiniteStatisticsWarning, match="once|silent"):
        for x in (clean[0], bad, clean[1]):
            a(x)
    for x in clean:
        b(x)
    for k in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(a, k), getattr(b, k)), k
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        a(bad)  # warns once per layer: the second skip is silent
    torch_bn = torch.nn.BatchNorm1d(3)
    for x in (clean[0], bad, clean[1]):
        torch_bn(x)
    assert torch.isnan(torch_bn.running_mean).any()  # why the policy exists (torch#88474)


def test_nonfinite_raise_changes_no_state_and_propagate_is_torch():
    bad = torch.randn(8, 2)
    bad[0, 0] = float("inf")
    m = nl.nn.BatchNorm1d(2, nonfinite="raise")
    sd = copy.deepcopy(m.state_dict())
    with pytest.raises(FloatingPointError):
        m(bad)
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in sd.items())
    p, t = nl.nn.BatchNorm1d(2, nonfinite="propagate"), torch.nn.BatchNorm1d(2)
    p(bad)
    t(bad)
    # both poisoned on channel 0 (inf vs NaN: torch's mean is inf, ours inf − inf), equal elsewhere
    assert torch.equal(torch.isfinite(p.running_mean), torch.isfinite(t.running_mean))
    torch.testing.assert_close(p.running_mean[1:], t.running_mean[1:])
    assert int(p.num_batches_tracked) == int(t.num_batches_tracked) == 1


def test_ema_debias_in_eval():
    m = nl.nn.BatchNorm1d(2, momentum=0.1, ema_debias=True)
    data = torch.randn(64, 2) * 3 + torch.tensor([5.0, -2.0])
    for _ in range(3):
        m(data)
    mean, _var, unbiased, _ = ref.batch_stats(data)
    pm, pv = m.population_stats()
    # constant data: the de-biased EMA is exact up to the float32 buffers' rounding, which
    # the de-biasing divides by 1 − 0.9³ ≈ 0.27 (a few float32 ulps: float32 tolerances)
    f32 = {"rtol": 2e-6, "atol": 2e-6}
    torch.testing.assert_close(pm.double(), mean, **f32)
    torch.testing.assert_close(pv.double(), unbiased, **f32)
    assert not torch.allclose(m.running_mean.double(), mean)  # raw buffer stays torch's EMA
    m.eval()
    torch.testing.assert_close(
        m(data).double(), ref.batch_norm_eval(data, pm, pv, m.weight, m.bias), rtol=1e-5, atol=1e-5
    )
    assert "ema_debias=True" in repr(m)


def test_track_running_stats_flip_behaves_as_torch():
    # docs/reliability.md case 9 / torch#20967
    x = torch.randn(6, 3)
    for flip_to in (False, True):
        ours = nl.nn.BatchNorm1d(3, track_running_stats=not flip_to)
        theirs = torch.nn.BatchNorm1d(3, track_running_stats=not flip_to)
        for m in (ours, theirs):
            m(x + 1)
            m.track_running_stats = flip_to
            m(x)
            m.eval()
        torch.testing.assert_close(ours(x), theirs(x))
        for k, v in theirs.state_dict().items():
            torch.testing.assert_close(ours.state_dict()[k], v)


def test_eval_is_deterministic_and_untracked_train_equals_eval():
    m = _trained(nl.nn.BatchNorm1d).eval()
    x = torch.randn(5, 4)
    assert torch.equal(m(x), m(x))
    u = nl.nn.BatchNorm1d(4, track_running_stats=False)
    y_train = u(x)
    assert torch.equal(u.eval()(x), y_train)


def test_affine_false_equals_unit_affine():
    x = torch.randn(6, 3, 2, dtype=torch.float64, requires_grad=True)
    a = nl.nn.BatchNorm1d(3, affine=False, dtype=torch.float64)
    b = nl.nn.BatchNorm1d(3, dtype=torch.float64)
    ya, yb = a(x), b(x)
    torch.testing.assert_close(ya, yb)
    (ga,) = torch.autograd.grad(ya.sum() + (ya**2).sum(), x)
    (gb,) = torch.autograd.grad(yb.sum() + (yb**2).sum(), x)
    torch.testing.assert_close(ga, gb)


def test_channels_last_and_non_contiguous_inputs():
    m, t = nl.nn.BatchNorm2d(5), torch.nn.BatchNorm2d(5)
    x = torch.randn(4, 5, 6, 7).to(memory_format=torch.channels_last)
    y = m(x)
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, t(x))
    xt = torch.randn(4, 6, 5, 7).transpose(1, 2)  # non-contiguous (4, 5, 6, 7)
    torch.testing.assert_close(m(xt), t(xt))
    torch.testing.assert_close(m.running_var, t.running_var)


def test_any_rank_batchnorm_with_channel_dim():
    m = nl.nn.BatchNorm(6, channel_dim=-1)
    x = torch.randn(3, 4, 5, 6)
    y = m(x)
    t = torch.nn.BatchNorm3d(6)
    torch.testing.assert_close(y, t(x.movedim(-1, 1).unsqueeze(-1)).squeeze(-1).movedim(1, -1))
    torch.testing.assert_close(m.running_mean, t.running_mean)
    assert "channel_dim=-1" in repr(m)
    wide = nl.nn.BatchNorm(2)(torch.randn(2, 2, 2, 2, 2, 2))  # rank 6, no torch counterpart
    assert wide.shape == (2, 2, 2, 2, 2, 2)


def test_half_input_with_float32_parameters():
    m = nl.nn.BatchNorm2d(3)
    for dtype in (torch.float16, torch.bfloat16):
        x = torch.randn(4, 3, 5, 5).to(dtype)
        y = m(x)
        assert y.dtype == dtype and m.running_mean.dtype == torch.float32
        assert torch.isfinite(m.running_var).all()


@pytest.mark.parametrize("channels_last", [False, True], ids=["cf", "cl"])
def test_autocast_conv_bn_relu_matches_torch_on_the_kernels(channels_last, monkeypatch):
    # torch.autocast("cpu", bfloat16) around Conv → BN → ReLU: the conv hands BN a bf16
    # tensor, BN keeps float32 parameters and buffers. normlab's fused layer runs the
    # kernels on it and agrees with torch's BN + ReLU within bf16's rounding: outputs
    # and input gradients within 2 ulps at the channel's scale beyond rounding, the
    # float32 parameter gradients and running statistics to a few bf16 epsilons.
    from normlab import kernels

    monkeypatch.setenv(kernels.KERNELS_ENV, "numba")
    calls = []
    real = kernels.batch_forward
    monkeypatch.setattr(kernels, "batch_forward", lambda *a, **k: calls.append(1) or real(*a, **k))
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 8, 3)
    theirs = torch.nn.Sequential(copy.deepcopy(conv), torch.nn.BatchNorm2d(8), torch.nn.ReLU())
    ours = torch.nn.Sequential(copy.deepcopy(conv), nl.nn.BatchNorm2d(8, activation="relu"))
    with torch.no_grad():
        for m in (theirs[1], ours[1]):
            m.weight.copy_(torch.linspace(0.5, 1.5, 8))
            m.bias.copy_(torch.linspace(-0.5, 0.5, 8))
    g = torch.Generator().manual_seed(1)
    u = ref.UNIT_ROUNDOFF[torch.bfloat16]
    for step in range(2):
        x = torch.randn(6, 3, 10, 10, generator=g) * (step + 1) + step
        if channels_last:
            x = x.to(memory_format=torch.channels_last)
        dy = torch.randn(6, 8, 8, 8, generator=g)
        grads, outs = [], []
        for model in (theirs, ours):
            xg = x.clone().requires_grad_()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                h = model[0](xg)
                assert h.dtype == torch.bfloat16
                y = model[1:](h)
            assert y.dtype == torch.bfloat16
            h.retain_grad()
            y.backward(dy.to(y.dtype))
            outs.append(y)
            grads.append([h.grad, *(p.grad.clone() for p in model.parameters())])
            model.zero_grad()
        assert len(calls) == step + 1, "normlab's layer did not run the kernels"
        ref.assert_half_close(outs[1], outs[0].double(), msg=f"y, step {step}")
        ref.assert_half_close(grads[1][0], grads[0][0].double(), msg=f"BN's dx, step {step}")
        for a, b in zip(grads[1][1:], grads[0][1:]):  # conv w, b; BN γ, β: float32
            assert a.dtype == b.dtype == torch.float32
            scale = float(b.abs().max()) + 1e-3
            torch.testing.assert_close(a / scale, b / scale, rtol=4 * u, atol=4 * u)
    for name in ("running_mean", "running_var"):
        a, b = getattr(ours[1], name), getattr(theirs[1], name)
        assert a.dtype == b.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=u, atol=u)
    assert int(ours[1].num_batches_tracked) == 2
    ours.eval(), theirs.eval()
    real_affine = kernels.affine_forward
    monkeypatch.setattr(
        kernels, "affine_forward", lambda *a, **k: calls.append(2) or real_affine(*a, **k)
    )
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ya, yb = ours(x), theirs(x)
    assert calls[-1] == 2 and ya.dtype == torch.bfloat16  # eval: the affine kernel
    ref.assert_half_close(ya, yb.double(), msg="eval y")


def test_fused_activation_matches_composition():
    x = torch.randn(8, 3, 4, 4, requires_grad=True)
    for act, fn in [
        ("relu", torch.relu),
        ("sigmoid", torch.sigmoid),
        ("tanh", torch.tanh),
        ("silu", torch.nn.functional.silu),
        ("leaky_relu", lambda z: torch.nn.functional.leaky_relu(z, 0.1)),
    ]:
        fused = nl.nn.BatchNorm2d(3, activation=act, negative_slope=0.1)
        plain = torch.nn.BatchNorm2d(3)
        y1, y2 = fused(x), fn(plain(x))
        torch.testing.assert_close(y1, y2)
        g1 = torch.autograd.grad(y1.pow(2).sum(), x)[0]
        g2 = torch.autograd.grad(y2.pow(2).sum(), x)[0]
        torch.testing.assert_close(g1, g2)


@pytest.mark.parametrize(
    "make, x, exc, pattern",
    [
        (
            lambda: nl.nn.BatchNorm2d(3),
            torch.randn(2, 3, 4),
            ValueError,
            r"expected 4-D.*BatchNorm1d",
        ),
        (
            lambda: nl.nn.BatchNorm1d(3),
            torch.randn(2, 3, 4, 4),
            ValueError,
            r"expected 2-D.*BatchNorm2d",
        ),
        (lambda: nl.nn.BatchNorm3d(3), torch.randn(2, 3, 4, 4), ValueError, r"expected 5-D"),
        (
            lambda: nl.nn.BatchNorm2d(16),
            torch.randn(2, 8, 4, 4),
            ValueError,
            r"num_features=16.*8 channels.*num_features=8",
        ),
        (
            lambda: nl.nn.BatchNorm1d(3),
            torch.randn(1, 3),
            ValueError,
            r"more than 1 value per channel.*eval",
        ),
        (
            lambda: nl.nn.BatchNorm1d(3),
            torch.ones(4, 3, dtype=torch.int32),
            TypeError,
            r"floating point",
        ),
        (
            lambda: nl.nn.BatchNorm(3, channel_dim=4),
            torch.randn(2, 3),
            ValueError,
            r"channel_dim=4",
        ),
    ],
)
def test_bad_input_errors(make, x, exc, pattern):
    with pytest.raises(exc, match=pattern):
        make()(x)


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"eps": -1.0}, r"eps must be"),
        ({"momentum": 1.5}, r"momentum must be in \[0, 1\]"),
        ({"momentum": -0.1}, r"momentum must be in \[0, 1\]"),
        ({"nonfinite": "nan"}, r"nonfinite must be one of"),
        ({"activation": "softplus"}, r"activation must be one of"),
    ],
)
def test_constructor_rejects_bad_arguments(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        nl.nn.BatchNorm2d(3, **kwargs)
    with pytest.raises(ValueError, match="num_features must be a positive int"):
        nl.nn.BatchNorm2d(0)


def test_one_value_per_channel_error_leaves_state_unchanged():
    m = nl.nn.BatchNorm1d(3)
    with pytest.raises(ValueError):
        m(torch.randn(1, 3))
    assert int(m.num_batches_tracked) == 0  # torch counts the failed batch; normlab does not
