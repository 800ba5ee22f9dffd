import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import normlab.functional as NF
from tests import reference as ref


def _normalised_error(fn, x):
    """max |fn(x) − float64 two-pass reference|, in normalised units (γ = 1, β = 0)."""
    expected = ref.batch_norm_train(x)
    return float((fn(x).double() - expected).abs().max())


def _offset_batch(offset, std, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 3, 7, 7, generator=g, dtype=torch.float64) * std + offset
    return x.float()  # the float32 input both sides see


@pytest.fixture(params=["torch-ops", "kernel-serial", "kernel-threaded"])
def path(request, monkeypatch):
    """Every path the engine can take for this input: torch's ops, the serial kernels
    (by address, the small-tensor path) and the threaded kernels (numpy arrays)."""
    from normlab import kernels

    monkeypatch.setenv(kernels.KERNELS_ENV, "torch" if request.param == "torch-ops" else "numba")
    if request.param == "kernel-threaded":
        request.getfixturevalue("threaded_kernels")
    return request.param


@pytest.mark.parametrize("offset", [1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8])
@pytest.mark.parametrize("std", [1e-2, 1e-1, 1.0])
def test_large_offset_within_1e4_of_float64(offset, std, path):
    x = _offset_batch(offset, std)
    err = _normalised_error(lambda t: NF.batch_norm(t, None, None, training=True), x)
    assert err <= 1e-4, f"offset {offset}, std {std}, {path}: error {err}"


@pytest.mark.parametrize("offset", [1e4, 1e6, 1e7])
def test_running_statistics_at_large_offsets(offset, path):
    # momentum 1: the buffers hold this batch's mean and unbiased variance, within float32
    # rounding of the float64 values (torch's kernel loses the variance here).
    x = _offset_batch(offset, 1e-2)
    rm, rv, nbt = torch.zeros(3), torch.ones(3), torch.tensor(0)
    NF.batch_norm(x, rm, rv, training=True, momentum=1.0, num_batches_tracked=nbt)
    mean, _, unbiased, _ = ref.batch_stats(x)
    torch.testing.assert_close(rm.double(), mean, rtol=1e-7, atol=0)
    torch.testing.assert_close(rv.double(), unbiased, rtol=1e-5, atol=0)
    assert int(nbt) == 1


def test_torch_kernel_is_worse_at_offset_1e4():
    # The reason for the shifted two-pass scheme: torch's CPU kernel loses the variance.
    x = _offset_batch(1e4, 1e-2)
    ours = _normalised_error(lambda t: NF.batch_norm(t, None, None, training=True), x)
    theirs = _normalised_error(
        lambda t: torch.nn.functional.batch_norm(t, None, None, training=True), x
    )
    assert ours <= 1e-4
    assert theirs > 10 * ours


def test_constant_channel_maps_to_beta():
    x = torch.randn(16, 3, 5)
    x[:, 1] = 12345.678
    w, b = torch.tensor([1.0, 3.0, 1.0]), torch.tensor([0.0, -0.5, 0.0])
    y = NF.batch_norm(x, None, None, w, b, training=True)
    assert torch.equal(y[:, 1], torch.full_like(y[:, 1], -0.5))
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("magnitude", [1e18, 1e20, 1e30])
def test_huge_magnitudes_do_not_overflow(magnitude):
    # docs/reliability.md case 14 (torch#162489): e² overflows float32 from |x| ~ 1e19 on
    x = (torch.randn(32, 4, dtype=torch.float64) * magnitude).float()
    y = NF.batch_norm(x, None, None, training=True)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y.double(), ref.batch_norm_train(x), rtol=0, atol=1e-5)
    mean, var = NF.moments(x, 0)
    ref_mean, ref_var, _, _ = ref.batch_stats(x, channel_dim=1)
    torch.testing.assert_close(mean.double(), ref_mean, rtol=1e-5, atol=magnitude * 1e-6)
    if magnitude**2 < 3e38:  # the variance itself fits in float32
        torch.testing.assert_close(var.double(), ref_var, rtol=1e-5, atol=0)


def test_moments_matches_float64_and_keepdim():
    x = torch.randn(5, 6, 7)
    mean, var = NF.moments(x, (0, 2))
    torch.testing.assert_close(mean, x.double().mean((0, 2)).float())
    torch.testing.assert_close(var, x.double().var((0, 2), unbiased=False).float())
    mean_k, var_k = NF.moments(x, (0, 2), keepdim=True)
    assert mean_k.shape == (1, 6, 1) and var_k.shape == (1, 6, 1)
    m16, v16 = NF.moments(x.half(), 0)
    assert m16.dtype == torch.float32 and v16.dtype == torch.float32


def test_moments_rejects_integer_input():
    with pytest.raises(TypeError, match=r"x must be floating point.*\.float\(\)"):
        NF.moments(torch.arange(6), 0)


finite = st.floats(-1e6, 1e6, allow_nan=False)


@given(offset=finite, scale=st.floats(1e-2, 1e2), seed=st.integers(0, 2**16))
def test_shift_and_scale_invariance(offset, scale, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(24, 3, generator=g, dtype=torch.float64)
    base = NF.batch_norm(x, None, None, training=True, eps=0.0)
    moved = NF.batch_norm(x * scale + offset, None, None, training=True, eps=0.0)
    # float64: the input itself is rounded at |offset| ~ 1e6, so compare in normalised units
    torch.testing.assert_close(moved, base, rtol=0, atol=1e-7)


@given(seed=st.integers(0, 2**16))
def test_batch_permutation_equivariance(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(17, 4, 3, generator=g)
    perm = torch.randperm(17, generator=g)
    y = NF.batch_norm(x, None, None, training=True)
    torch.testing.assert_close(NF.batch_norm(x[perm], None, None, training=True), y[perm])


@given(seed=st.integers(0, 2**16), n=st.integers(2, 40), c=st.integers(1, 5))
def test_normalisation_identity(seed, n, c):
    # eps = 0, γ = 1, β = 0: every channel has mean 0 and biased variance 1
    # (docs/reliability.md case 6)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, 3, generator=g, dtype=torch.float64) * 5 + 2
    y = NF.batch_norm(x, None, None, training=True, eps=0.0)
    torch.testing.assert_close(
        y.mean((0, 2)), torch.zeros(c, dtype=torch.float64), atol=1e-12, rtol=0
    )
    torch.testing.assert_close(
        y.var((0, 2), unbiased=False), torch.ones(c, dtype=torch.float64), atol=1e-10, rtol=0
    )
