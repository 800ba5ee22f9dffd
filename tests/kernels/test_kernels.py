"""The fused kernels against float64 references: every activation × layout × dtype,
forward and backward, eval, hypothesis shapes, and the numerics of the foundation."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import normlab.functional as NF
from normlab import kernels
from tests import reference as ref

ACTS = [
    "identity", "relu", "leaky_relu", "sigmoid", "tanh", "silu",
    "relu6", "hardtanh(-0.5, 2.0)", "hardswish", "elu(0.5)",
]  # fmt: skip
LAYOUTS = ["cf", "cl", "strided"]
DTYPES = [torch.float32, torch.float64]
# float32: statistics in float64; relu/leaky_relu/identity elementwise in float32 with
# float32 row sums added in float64 (kernels/_rows.py, kernels/_train.py), the rest in float64.
TOL = {torch.float32: {"rtol": 2e-5, "atol": 2e-5}, torch.float64: {"rtol": 1e-9, "atol": 1e-9}}


@pytest.fixture(autouse=True)
def _kernels_everywhere(monkeypatch):
    monkeypatch.setenv(kernels.KERNELS_ENV, "numba")


@pytest.fixture
def calls(monkeypatch):
    """Counts the kernel entry points the engine reaches (proves the path under test)."""
    counts = {"batch_forward": 0, "batch_backward": 0, "affine_forward": 0}
    for name in counts:
        original = getattr(kernels, name)

        def spy(*args, _name=name, _original=original, **kw):
            counts[_name] += 1
            return _original(*args, **kw)

        monkeypatch.setattr(kernels, name, spy)
    return counts


def _make(shape, layout, dtype, seed=0, offset=1.0, std=2.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * std + offset
    x = x.to(dtype)
    if layout == "cl":
        x = x.to(memory_format=torch.channels_last) if x.dim() == 4 else x
    elif layout == "strided":  # every other column of a wider tensor: neither layout
        wide = torch.cat([x, x], dim=-1)
        x = wide[..., ::2]
        x.copy_(torch.randn(shape, generator=g, dtype=torch.float64).to(dtype) * std + offset)
    c = shape[1]
    w = (torch.rand(c, generator=g, dtype=torch.float64) + 0.5).to(dtype)
    b = torch.randn(c, generator=g, dtype=torch.float64).to(dtype)
    return x, w, b


def _check_train(x, w, b, act, tol, affine=True):
    xg = x.detach().requires_grad_()
    params = (w.detach().requires_grad_(), b.detach().requires_grad_()) if affine else ()
    y = NF.batch_norm(xg, None, None, *params, training=True, activation=act)
    assert y.dtype == x.dtype and y.shape == x.shape
    x64 = x.detach().double().requires_grad_()
    p64 = tuple(p.detach().double().requires_grad_() for p in params)
    y_ref = ref.ACTIVATIONS[act](ref.batch_norm_train(x64, *p64))
    torch.testing.assert_close(y.double(), y_ref, **tol)
    dy = torch.randn(x.shape, dtype=torch.float64)
    got = torch.autograd.grad(y, (xg, *params), dy.to(x.dtype))
    want = torch.autograd.grad(y_ref, (x64, *p64), dy)
    for name, g, e in zip(("dx", "dweight", "dbias"), got, want):
        scale = max(1.0, float(e.abs().max()))  # dγ, dβ are sums over N·S values
        torch.testing.assert_close(
            g.double() / scale, e / scale, **tol, msg=lambda m, n=name: f"{n}: {m}"
        )
    return y


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("act", ACTS)
def test_train_forward_backward_match_float64(act, layout, dtype, calls):
    x, w, b = _make((3, 5, 4, 3), layout, dtype)
    y = _check_train(x, w, b, act, TOL[dtype])
    assert calls["batch_forward"] == 1 and calls["batch_backward"] == 1
    if layout == "cl":  # docs/reliability.md case 11: the memory format is kept
        assert y.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("act", ACTS)
def test_eval_forward_matches_float64(act, layout, dtype, calls):
    x, w, b = _make((3, 5, 4, 3), layout, dtype)
    g = torch.Generator().manual_seed(1)
    mean = torch.randn(5, generator=g, dtype=dtype)
    var = torch.rand(5, generator=g, dtype=dtype) + 0.1
    with torch.no_grad():
        y = NF.batch_norm(x, mean, var, w, b, training=False, activation=act)
    want = ref.ACTIVATIONS[act](ref.batch_norm_eval(x, mean, var, w, b))
    torch.testing.assert_close(y.double(), want, **TOL[dtype])
    assert calls["affine_forward"] == 1


shapes = st.tuples(
    st.integers(1, 5),  # N
    st.integers(1, 9),  # C (odd counts included)
    st.lists(st.integers(1, 6), min_size=0, max_size=2),  # spatial, size 1 included
)


@settings(max_examples=30)
@given(
    spec=shapes,
    layout=st.sampled_from(LAYOUTS),
    act=st.sampled_from(ACTS),
    dtype=st.sampled_from(DTYPES),
    affine=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_hypothesis_shapes(spec, layout, act, dtype, affine, seed):
    n, c, spatial = spec
    shape = (n, c, *spatial)
    if math.prod(shape) // c < 2:  # one value per channel: training is an error
        shape = (n + 1, c, *spatial)
    if layout == "cl" and len(shape) != 4:
        layout = "cf"
    x, w, b = _make(shape, layout, dtype, seed=seed)
    _check_train(x, w, b, act, TOL[dtype], affine=affine)


def test_empty_batch_gives_empty_output_and_zero_parameter_grads():
    x = torch.randn(0, 3, 4, 4, requires_grad=True)
    w = torch.ones(3, requires_grad=True)
    b = torch.zeros(3, requires_grad=True)
    y = NF.batch_norm(x, None, None, w, b, training=True, activation="relu")
    assert y.shape == x.shape
    gw, gb = torch.autograd.grad(y.sum(), (w, b))
    assert torch.equal(gw, torch.zeros(3)) and torch.equal(gb, torch.zeros(3))


@pytest.mark.parametrize("layout", ["cf", "cl"])
@pytest.mark.parametrize("offset", [1e2, 1e4, 1e6])
@pytest.mark.parametrize("std", [1e-2, 1.0])
def test_large_offsets_within_1e4_of_float64_two_pass(layout, offset, std, calls):
    # The foundation's bound (tests/functional/test_stats.py), now on the kernels.
    x, _, _ = _make((64, 3, 7, 7), layout, torch.float32, offset=offset, std=std)
    y = NF.batch_norm(x, None, None, training=True)
    assert calls["batch_forward"] == 1
    err = float((y.double() - ref.batch_norm_train(x)).abs().max())
    assert err <= 1e-4, f"offset {offset}, std {std}: {err}"


def test_outlier_first_element_keeps_the_bound():
    # The kernels shift by each channel's first value; make it 1e4 std from the mean.
    x, _, _ = _make((64, 3, 7, 7), "cf", torch.float32, offset=1e5, std=1e-2)
    x[0, :, 0, 0] += 100.0
    y = NF.batch_norm(x, None, None, training=True)
    err = float((y.double() - ref.batch_norm_train(x)).abs().max())
    assert err <= 1e-4


def test_constant_channel_maps_to_beta_and_huge_values_stay_finite():
    x = torch.randn(16, 3, 5)
    x[:, 1] = 12345.678
    x[:, 2] *= 1e30  # e² overflows float32, not the kernels' float64 sums
    b = torch.tensor([0.0, -0.5, 0.0])
    y = NF.batch_norm(x, None, None, None, b, training=True)
    assert torch.equal(y[:, 1], torch.full_like(y[:, 1], -0.5))
    torch.testing.assert_close(y.double(), ref.batch_norm_train(x, None, b), rtol=0, atol=1e-5)


@pytest.mark.parametrize("s", [4096, 4097])  # the longest row summed in float32, and past it
@pytest.mark.parametrize("act", ["identity", "relu", "leaky_relu"])
def test_storage_dtype_arithmetic_keeps_the_float32_tolerance(act, s, calls):
    x, w, b = _make((6, 3, s), "cf", torch.float32, offset=50.0, std=3.0)
    _check_train(x, w, b, act, TOL[torch.float32])
    assert calls["batch_backward"] == 1


@pytest.mark.parametrize("act", ["identity", "relu", "leaky_relu"])
def test_storage_dtype_arithmetic_channels_last(act, calls):
    # rows are summed in float32 in blocks of 32, then in float64
    x, w, b = _make((16, 5, 7, 3), "cl", torch.float32, offset=50.0, std=3.0)
    _check_train(x, w, b, act, TOL[torch.float32])
    x, w, b = _make((301, 9), "cf", torch.float32, offset=-20.0, std=0.5)  # (N, C): rows
    _check_train(x, w, b, act, TOL[torch.float32])
    assert calls["batch_backward"] == 2


@pytest.mark.parametrize("layout", ["cf", "cl"])
@pytest.mark.parametrize("act", ["relu", "leaky_relu"])
def test_huge_channels_with_piecewise_linear_activations(act, layout):
    x, w, b = _make((16, 4, 5, 1), layout, torch.float32)
    x[:, 1] *= 1e30  # still float32 arithmetic
    x[:, 2] = torch.sign(x[:, 2]) * 3e38  # x − k overflows float32: the float64 code
    x[:, 3] = x[:, 2] * (1 - 1e-3 * x[:, 3].abs())
    _check_train(x, w, b, act, TOL[torch.float32])


@pytest.mark.parametrize("layout", ["cf", "cl"])
def test_eval_with_huge_constants_matches_float64(layout, calls):
    x, w, b = _make((6, 4, 3, 2), layout, torch.float32)
    mean = torch.tensor([0.5, -1e29, -3e38, 1e35])  # channel 2: the float64 code
    var = torch.tensor([1.0, 4.0, 1e38, 1e36])
    x[:, 1] = 3e38 * torch.sign(x[:, 1])  # near float32's largest value
    x[:, 2] = 3e38  # x − mean overflows float32, not the result
    x[:, 3] = 1e35 + 1e33 * x[:, 3]
    with torch.no_grad():
        y = NF.batch_norm(x, mean, var, w, b, training=False, activation="leaky_relu")
    want = ref.ACTIVATIONS["leaky_relu"](ref.batch_norm_eval(x, mean, var, w, b))
    assert calls["affine_forward"] == 1
    torch.testing.assert_close(y.double(), want.to(torch.float32).double(), rtol=2e-5, atol=2e-5)


def test_nan_propagates_to_output_and_statistics():
    x = torch.randn(8, 2, 3)
    x[3, 0, 1] = float("nan")
    y, mean, var = NF.normalize_batch(x, (0, 2), activation="relu")
    assert torch.isnan(y[:, 0]).all() and torch.isfinite(y[:, 1]).all()
    assert torch.isnan(mean[0, 0, 0]) and torch.isfinite(mean[0, 1, 0])
    assert torch.isnan(var[0, 0, 0]) and torch.isfinite(var[0, 1, 0])


def test_returned_statistics_match_float64():
    x, _, _ = _make((6, 4, 5), "cf", torch.float32, offset=1e3)
    _, mean, var = NF.normalize_batch(x, (0, 2))
    m, v, _, _ = ref.batch_stats(x)
    torch.testing.assert_close(mean.view(4).double(), m, rtol=1e-7, atol=0)
    torch.testing.assert_close(var.view(4).double(), v, rtol=1e-5, atol=0)
    assert mean.shape == (1, 4, 1) and mean.dtype == torch.float32


def test_input_not_needing_grad_skips_dx_but_gives_parameter_grads():
    x, w, b = _make((4, 3, 5), "cf", torch.float64)
    w.requires_grad_()
    b.requires_grad_()
    y = NF.batch_norm(x, None, None, w, b, training=True, activation="silu")
    got = torch.autograd.grad(y.sum(), (w, b))
    w64, b64 = w.detach().requires_grad_(), b.detach().requires_grad_()
    want = torch.autograd.grad(
        ref.ACTIVATIONS["silu"](ref.batch_norm_train(x, w64, b64)).sum(), (w64, b64)
    )
    for g, e in zip(got, want):
        torch.testing.assert_close(g, e)


def test_expanded_upstream_gradient():
    # dy from .sum() is an expanded (stride-0) tensor: copied into the layout, not misread
    x, w, b = _make((4, 3, 5, 2), "cl", torch.float32)
    xg = x.requires_grad_()
    (dx,) = torch.autograd.grad(
        NF.batch_norm(xg, None, None, w, b, training=True, activation="tanh").sum(), xg
    )
    x64 = x.detach().double().requires_grad_()
    (want,) = torch.autograd.grad(
        torch.tanh(ref.batch_norm_train(x64, w.double(), b.double())).sum(), x64
    )
    torch.testing.assert_close(dx.double(), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "shape, channel_dim, channels_last",
    [((4, 7, 5), -1, False), ((3, 5, 2, 4, 3), 1, True), ((6, 3, 4, 5), 2, False)],
    ids=["NLC", "channels_last_3d", "channel-dim-2"],
)
def test_other_channel_dims_and_ranks(shape, channel_dim, channels_last, calls):
    import normlab.nn as nln

    g = torch.Generator().manual_seed(3)
    x = torch.randn(shape, generator=g) * 3 + 2
    if channels_last:
        x = x.to(memory_format=torch.channels_last_3d)
    x.requires_grad_()
    c = shape[channel_dim]
    bn = nln.BatchNorm(c, channel_dim=channel_dim, activation="silu")
    y = bn(x)
    x64 = x.detach().double().requires_grad_()
    y_ref = ref.ACTIVATIONS["silu"](ref.batch_norm_train(x64, channel_dim=channel_dim))
    torch.testing.assert_close(y.double(), y_ref, **TOL[torch.float32])
    dy = torch.randn(shape, generator=g)
    (dx,) = torch.autograd.grad(y, x, dy)
    (dx_ref,) = torch.autograd.grad(y_ref, x64, dy.double())
    torch.testing.assert_close(dx.double(), dx_ref, **TOL[torch.float32])
    assert calls["batch_forward"] == 1 and calls["batch_backward"] == 1
    with torch.inference_mode():  # eval kernel under inference mode too
        bn.eval()
        y_eval = bn(x.detach())
    assert calls["affine_forward"] == 1
    want = ref.ACTIVATIONS["silu"](
        ref.batch_norm_eval(x.detach(), bn.running_mean, bn.running_var, channel_dim=channel_dim)
    )
    torch.testing.assert_close(y_eval.double(), want, **TOL[torch.float32])
