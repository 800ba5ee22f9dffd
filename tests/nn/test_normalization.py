"""LayerNorm, GroupNorm, InstanceNorm, RMSNorm: drop-in for torch's, and the
equivalences of the family (LayerNorm over (C, H, W) ≡ GroupNorm(1); InstanceNorm ≡
GroupNorm(C))."""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch

import normlab as nl
import normlab.functional as NF
from tests import reference as ref

PAIRS = [
    (nl.nn.LayerNorm, torch.nn.LayerNorm, ((3, 4),)),
    (nl.nn.GroupNorm, torch.nn.GroupNorm, (2, 4)),
    (nl.nn.InstanceNorm1d, torch.nn.InstanceNorm1d, (4,)),
    (nl.nn.InstanceNorm2d, torch.nn.InstanceNorm2d, (4,)),
    (nl.nn.InstanceNorm3d, torch.nn.InstanceNorm3d, (4,)),
    (nl.nn.RMSNorm, torch.nn.RMSNorm, ((3, 4),)),
]


@pytest.mark.parametrize("ours, theirs, args", PAIRS, ids=[p[0].__name__ for p in PAIRS])
def test_same_signature_defaults_state_dict_and_repr_as_torch(ours, theirs, args):
    ours_sig = inspect.signature(ours.__init__).parameters
    for name, p in inspect.signature(theirs.__init__).parameters.items():
        assert name in ours_sig, name
        assert ours_sig[name].default == p.default and ours_sig[name].kind == p.kind, name
    for extra in ("activation", "negative_slope"):
        assert ours_sig[extra].kind == inspect.Parameter.KEYWORD_ONLY
    a, b = ours(*args), theirs(*args)
    assert isinstance(a, theirs)
    assert list(a.state_dict()) == list(b.state_dict())
    for k, v in b.state_dict().items():
        assert torch.equal(a.state_dict()[k], v), k
    assert repr(a) == repr(b)
    kw = {"bias": False} if theirs is not torch.nn.RMSNorm else {"elementwise_affine": False}
    assert list(ours(*args, **kw).state_dict()) == list(theirs(*args, **kw).state_dict())


@pytest.mark.parametrize("momentum", [0.1, 1.0, None])
@pytest.mark.parametrize("affine", [False, True])
def test_instance_norm_tracking_equals_torch_over_steps(momentum, affine):
    kw = {"momentum": momentum, "affine": affine, "track_running_stats": True}
    ours, theirs = nl.nn.InstanceNorm2d(3, **kw), torch.nn.InstanceNorm2d(3, **kw)
    g = torch.Generator().manual_seed(0)
    for step in range(6):
        training = step != 4
        ours.train(training)
        theirs.train(training)
        x = torch.randn(4, 3, 3, 5, generator=g) * (1 + step) + step
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = ours(xa), theirs(xb)
        torch.testing.assert_close(ya, yb)
        dy = torch.randn(ya.shape, generator=g)
        ya.backward(dy)
        yb.backward(dy)
        torch.testing.assert_close(xa.grad, xb.grad)
        if affine:
            torch.testing.assert_close(ours.weight.grad, theirs.weight.grad)
            torch.testing.assert_close(ours.bias.grad, theirs.bias.grad)
        for k, v in theirs.state_dict().items():
            torch.testing.assert_close(ours.state_dict()[k], v, msg=k)
    if momentum is None:  # torch passes momentum 0: the running statistics never move
        assert torch.equal(ours.running_mean, torch.zeros(3))


def test_instance_norm_unbatched_input_and_mismatch_warning_as_torch():
    x = torch.randn(3, 7)  # (C, L) without a batch dim
    torch.testing.assert_close(nl.nn.InstanceNorm1d(3)(x), torch.nn.InstanceNorm1d(3)(x))
    y = torch.randn(2, 5, 6)
    with pytest.warns(UserWarning, match="does not match num_features") as ours:
        a = nl.nn.InstanceNorm1d(3)(y)  # affine=False: num_features is unused
    with pytest.warns(UserWarning, match="does not match num_features") as theirs:
        b = torch.nn.InstanceNorm1d(3)(y)
    assert str(ours[0].message) == str(theirs[0].message)
    torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match=r"num_features=3\) got an input with 5 channels"):
        nl.nn.InstanceNorm1d(3, affine=True)(y)


def test_no_warnings_in_ordinary_use():
    # torch's layers are silent here; ours must be too (warnings become errors)
    x4 = torch.randn(2, 4, 3, 3, requires_grad=True)
    layers = [
        nl.nn.InstanceNorm2d(4),
        nl.nn.InstanceNorm2d(4, affine=True, track_running_stats=True),
        nl.nn.GroupNorm(2, 4),
        nl.nn.LayerNorm((4, 3, 3)),
        nl.nn.RMSNorm(3),
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for m in layers:
            m(x4).sum().backward()
            m.eval()(x4)


def test_instance_norm_one_spatial_element():
    m = nl.nn.InstanceNorm2d(3, track_running_stats=True)
    with pytest.raises(ValueError, match="more than 1 spatial element when training"):
        m(torch.randn(2, 3, 1, 1))
    with pytest.raises(ValueError, match="more than 1 spatial element"):
        torch.nn.InstanceNorm2d(3)(torch.randn(2, 3, 1, 1))  # torch agrees
    m.eval()  # with running statistics a single position is fine
    assert m(torch.randn(2, 3, 1, 1)).shape == (2, 3, 1, 1)


def test_instance_norm_nonfinite_batch_keeps_running_statistics():
    m = nl.nn.InstanceNorm1d(2, track_running_stats=True)
    bad = torch.randn(3, 2, 4)
    bad[1, 0, 2] = float("inf")
    with pytest.warns(NF.NonFiniteStatisticsWarning):
        m(bad)
    assert torch.equal(m.running_mean, torch.zeros(2))
    t = torch.nn.InstanceNorm1d(2, track_running_stats=True)
    t(bad)
    assert not torch.isfinite(t.running_mean).all()  # torch is poisoned


def test_layer_norm_over_chw_equals_group_norm_with_one_group():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 5, 2, generator=g, dtype=torch.float64) * 3 + 2
    gamma = torch.rand(4, generator=g, dtype=torch.float64) + 0.5
    beta = torch.randn(4, generator=g, dtype=torch.float64)
    ln = nl.nn.LayerNorm((4, 5, 2), dtype=torch.float64)
    gn = nl.nn.GroupNorm(1, 4, dtype=torch.float64)
    with torch.no_grad():
        ln.weight.copy_(gamma.view(4, 1, 1).expand(4, 5, 2))  # GN's affine is per channel
        ln.bias.copy_(beta.view(4, 1, 1).expand(4, 5, 2))
        gn.weight.copy_(gamma)
        gn.bias.copy_(beta)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = ln(xa), gn(xb)
    torch.testing.assert_close(ya, yb)
    torch.testing.assert_close(ya, ref.group_norm(x, 1, gamma, beta))
    dy = torch.randn(x.shape, generator=g, dtype=torch.float64)
    ya.backward(dy)
    yb.backward(dy)
    torch.testing.assert_close(xa.grad, xb.grad)
    torch.testing.assert_close(ln.weight.grad.sum((1, 2)), gn.weight.grad)
    torch.testing.assert_close(ln.bias.grad.sum((1, 2)), gn.bias.grad)


@pytest.mark.parametrize("spatial", [(7,), (3, 4), (2, 2, 3)])
def test_instance_norm_equals_group_norm_with_one_channel_per_group(spatial):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, *spatial, generator=g, dtype=torch.float64) * 2 - 1
    cls = {1: nl.nn.InstanceNorm1d, 2: nl.nn.InstanceNorm2d, 3: nl.nn.InstanceNorm3d}
    inorm = cls[len(spatial)](3, affine=True, dtype=torch.float64)
    gn = nl.nn.GroupNorm(3, 3, dtype=torch.float64)
    with torch.no_grad():
        for m in (inorm, gn):
            m.weight.copy_(torch.tensor([0.5, 1.0, 2.0]))
            m.bias.copy_(torch.tensor([0.1, 0.0, -0.3]))
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = inorm(xa), gn(xb)
    torch.testing.assert_close(ya, yb)
    ya.backward(torch.ones_like(ya) + x)
    yb.backward(torch.ones_like(yb) + x)
    torch.testing.assert_close(xa.grad, xb.grad)
    torch.testing.assert_close(inorm.weight.grad, gn.weight.grad)


def test_group_norm_errors():
    with pytest.raises(
        ValueError, match=r"num_channels=6 is not divisible by num_groups=4.*\[1, 2, 3, 6\]"
    ):
        nl.nn.GroupNorm(4, 6)
    with pytest.raises(ValueError, match="not divisible"):
        NF.group_norm(torch.randn(2, 6, 3), 4)
    with pytest.raises(ValueError, match="num_groups must be a positive int"):
        nl.nn.GroupNorm(0, 6)
    with pytest.raises(ValueError, match=r"shape \(N, C, \*\)"):
        NF.group_norm(torch.randn(6), 2)


def test_layer_norm_and_rms_norm_shape_mismatch():
    with pytest.raises(ValueError, match=r"normalized_shape=\[4, 5\] must equal the last 2"):
        nl.nn.LayerNorm((4, 5))(torch.randn(2, 5, 4))
    with pytest.raises(ValueError, match="weight must have shape"):
        NF.layer_norm(torch.randn(2, 4), (4,), torch.ones(5))
    with pytest.raises(ValueError, match=r"normalized_shape=\[8\]"):
        nl.nn.RMSNorm(8)(torch.randn(2, 4))


@pytest.mark.parametrize("dtype, scale", [(torch.float64, 1e-9), (torch.float32, 1e-4)])
def test_rms_norm_default_eps_is_machine_epsilon_of_the_computation(dtype, scale):
    # at these scales mean(x²) is comparable to eps, so a wrong default would show
    x = torch.randn(3, 8, dtype=dtype) * scale
    ours = nl.nn.RMSNorm(8, dtype=dtype)(x)
    torch.testing.assert_close(ours, torch.nn.RMSNorm(8, dtype=dtype)(x))
    torch.testing.assert_close(ours, ref.rms_norm(x, 1, eps=torch.finfo(dtype).eps).to(dtype))
    assert not torch.allclose(ours, ref.rms_norm(x, 1, eps=0.0).to(dtype), rtol=1e-3)
    h = (torch.randn(3, 8) * 1e-3).to(torch.bfloat16)  # half: float32's epsilon, as torch
    torch.testing.assert_close(
        NF.rms_norm(h, (8,)).float(),
        ref.rms_norm(h, 1, eps=torch.finfo(torch.float32).eps).float(),
        rtol=0.01,
        atol=0.01,
    )


FUSED = [
    lambda a: nl.nn.LayerNorm((3, 4, 4), **a),
    lambda a: nl.nn.GroupNorm(3, 3, **a),
    lambda a: nl.nn.InstanceNorm2d(3, affine=True, **a),
    lambda a: nl.nn.RMSNorm(4, **a),
    lambda a: nl.nn.BatchRenorm2d(3, **a),
    lambda a: nl.nn.GhostBatchNorm2d(3, virtual_batch_size=2, **a),
    lambda a: nl.nn.FrozenBatchNorm2d(3, **a),
]


@pytest.mark.parametrize("make", FUSED, ids=lambda f: "")
@pytest.mark.parametrize(
    "act, fn",
    [
        ("relu", torch.relu),
        ("leaky_relu", lambda z: torch.nn.functional.leaky_relu(z, 0.2)),
        ("tanh", torch.tanh),
    ],
)
def test_fused_activation_matches_composition(make, act, fn):
    x = torch.randn(5, 3, 4, 4, requires_grad=True)
    fused, plain = make({"activation": act, "negative_slope": 0.2}), make({})
    y1, y2 = fused(x), fn(plain(x))
    torch.testing.assert_close(y1, y2)
    g1, g2 = (torch.autograd.grad(y.pow(2).sum(), x)[0] for y in (y1, y2))
    torch.testing.assert_close(g1, g2)
    assert f"activation='{act}'" in repr(fused)
    with pytest.raises(ValueError, match="activation must be one of"):
        make({"activation": "softplus"})
