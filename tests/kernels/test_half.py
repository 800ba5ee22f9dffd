"""Half precision (bfloat16, float16) on the fused kernels: the bit conversions against
torch's bit for bit, outputs and gradients against a float64 reference computed from the
same (upcast) half input within the format's rounding, float32 (autocast) or matching
parameters, statistics and running statistics from float64, float16 variance overflow."""

import numpy as np
import pytest
import torch
from numba import njit

import normlab.functional as NF
from normlab import kernels
from normlab.kernels import _numba
from tests import reference as ref

HALF = [torch.bfloat16, torch.float16]
ACTS = [
    "identity", "relu", "leaky_relu", "sigmoid", "tanh", "silu",
    "relu6", "hardtanh(-0.5, 2.0)", "hardswish", "elu(0.5)",
]  # fmt: skip
LAYOUTS = ["cf", "cl", "strided"]
# Elements equal to the correctly rounded reference (float64 → the half format) at least:
# float32 arithmetic moves a result across a rounding boundary only when it lies within
# ~1e-7 relative of one; a wrong rounding rule (truncation) misses about half of them.
EXACT = 0.99


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


# -- the bit conversions ------------------------------------------------------------------
def _converters(widen, narrow):
    @njit
    def widen_all(bits, out):
        for i in range(bits.shape[0]):
            out[i] = widen(bits[i])

    @njit
    def narrow_all(values, out):
        for i in range(values.shape[0]):
            out[i] = narrow(np.float32(values[i]))

    return widen_all, narrow_all


# how the kernels see the bits, and the conversions: each format's integer code, float16's
# instructions (F16C) where the CPU has them, and what the kernels use (_work, _narrow)
_TAG = {torch.bfloat16: np.uint16, torch.float16: np.int16}
CONVERSIONS = [
    (torch.bfloat16, "bits", _numba._bf16_to_f32, _numba._f32_to_bf16),
    (torch.float16, "bits", _numba._fp16_to_f32_bits, _numba._f32_to_fp16_bits),
    *(
        [(torch.float16, "native", _numba._fp16_to_f32_native, _numba._f32_to_fp16_native)]
        if _numba.NATIVE_FLOAT16
        else []
    ),
    (torch.bfloat16, "kernels", _numba._work, None),
    (torch.float16, "kernels", _numba._work, None),
]


def _bits(t: torch.Tensor, dtype) -> np.ndarray:
    return t.view(torch.int16).numpy().view(_TAG[dtype])


@njit
def _kernels_narrow(values, out):
    for i in range(values.shape[0]):
        out[i] = _numba._narrow(values[i], out)


def _float32_probes() -> np.ndarray:
    """float32 bit patterns: random ones, and for every exponent the mantissas at and
    around both formats' rounding points (ties to even and odd), both signs, plus the
    float16 subnormal ties and the overflow boundaries."""
    rng = np.random.default_rng(0)
    random = rng.integers(0, 2**32, size=1 << 18, dtype=np.uint64).astype(np.uint32)
    tails = []
    for cut in (16, 13):  # bits dropped by bfloat16, float16 (normal range)
        half = 1 << (cut - 1)
        for low in (0, 1, half - 1, half, half + 1, (1 << cut) - 1):
            for kept_lsb in (0, 1):
                tails.append((kept_lsb << cut) | low)
    tails.append(0x7FFFFF)
    exps = np.arange(256, dtype=np.uint32) << 23
    edges = (exps[:, None] | np.array(tails, dtype=np.uint32)[None, :]).ravel()
    sub = (np.arange(1 << 11, dtype=np.float32) * np.float32(2.0**-25)).view(np.uint32)
    limits = np.array([65504, 65519.99, 65520, 65536, 3.3895e38, 3.4e38], np.float32)
    probes = np.concatenate([random, edges, sub, limits.view(np.uint32)])
    return np.concatenate([probes, probes | np.uint32(0x80000000)]).view(np.float32)


@pytest.mark.parametrize(
    "dtype, impl, widen, narrow", CONVERSIONS, ids=[f"{d}-{i}" for d, i, *_ in CONVERSIONS]
)
def test_bit_conversions_are_torchs_bit_for_bit(dtype, impl, widen, narrow):
    if narrow is None:  # the kernels' store: _narrow(value, array of the storage type)
        narrow_into = _kernels_narrow
    else:
        narrow_into = _converters(widen, narrow)[1]
    widen_all = _converters(widen, _numba._f32_to_bf16)[0]
    # widening: all 65536 bit patterns
    every = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    got = np.empty(every.numel(), np.float32)
    widen_all(_bits(every, dtype), got)
    want = every.float().numpy()
    nan = np.isnan(want)
    assert np.array_equal(np.isnan(got), nan)
    assert np.array_equal(got[~nan].view(np.uint32), want[~nan].view(np.uint32))
    # narrowing: round to nearest even, overflow to ±inf, NaN stays NaN
    values = _float32_probes()
    out = np.empty(values.shape, _TAG[dtype])
    narrow_into(values, out)
    got16 = torch.from_numpy(out.view(np.int16)).view(dtype)
    want16 = torch.from_numpy(values).to(dtype)
    nan = np.isnan(values)
    assert torch.isnan(got16[torch.from_numpy(nan)].float()).all()
    keep = torch.from_numpy(~nan)
    mismatch = got16[keep].view(torch.int16) != want16[keep].view(torch.int16)
    assert not mismatch.any(), values[~nan][mismatch.numpy()][:5]


def test_a_users_cpu_target_gets_the_portable_float16_code(monkeypatch):
    # NUMBA_CPU_NAME (e.g. 'generic', for caches shared between machines) may lack F16C:
    # then the integer code, which needs no instruction or runtime function
    from numba.core import config

    monkeypatch.setattr(config, "CPU_NAME", "generic")
    assert _numba._native_float16() is False
    monkeypatch.setattr(config, "CPU_NAME", None)
    monkeypatch.setattr(config, "CPU_FEATURES", "-f16c")
    assert _numba._native_float16() is False


# -- outputs and gradients ----------------------------------------------------------------
def _make(shape, layout, dtype, param_dtype, seed=0, offset=1.0, std=2.0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * std + offset).to(dtype)
    if layout == "cl":
        x = x.to(memory_format=torch.channels_last)
    elif layout == "strided":  # every other column of a wider tensor: neither layout
        x = torch.cat([x, x], dim=-1)[..., ::2]
    c = shape[1]
    w = (torch.rand(c, generator=g, dtype=torch.float64) + 0.5).to(param_dtype)
    b = torch.randn(c, generator=g, dtype=torch.float64).to(param_dtype)
    return x, w, b


def _check(name, got, want, dtype):
    """``got`` (of ``dtype``) against the float64 ``want``: within the format's rounding
    plus 2 ulps at the channel's scale, and mostly the correctly rounded value itself."""
    assert got.dtype == dtype, name
    ref.assert_half_close(got, want, msg=name)
    exact = (got == want.float().to(dtype)).double().mean()
    assert exact >= EXACT, f"{name}: only {float(exact):.3f} correctly rounded"


def _check_train(x, w, b, act, calls):
    dtype = x.dtype
    before = calls["batch_forward"], calls["batch_backward"]
    xg, wg, bg = (t.detach().requires_grad_() for t in (x, w, b))
    y = NF.batch_norm(xg, None, None, wg, bg, training=True, activation=act)
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
    y64 = ref.ACTIVATIONS[act](ref.batch_norm_train(x64, w64, b64))
    _check("y", y, y64, dtype)
    g = torch.Generator().manual_seed(5)
    dy = torch.randn(x.shape, generator=g, dtype=torch.float64).to(dtype)
    dx, dw, db = torch.autograd.grad(y, (xg, wg, bg), dy)
    dx64, dw64, db64 = torch.autograd.grad(y64, (x64, w64, b64), dy.double())
    _check("dx", dx, dx64, dtype)
    for name, got, want, p in (("dweight", dw, dw64, w), ("dbias", db, db64, b)):
        assert got.dtype == p.dtype, name
        if p.dtype in HALF:  # rounded to the parameters' format
            ref.assert_half_close(got, want, msg=name, channel_dim=0)
        else:  # a sum of N·S products, in float32 row sums added in float64
            scale = float(want.abs().max()) + 1.0
            torch.testing.assert_close(got.double() / scale, want / scale, rtol=1e-5, atol=1e-5)
    assert (calls["batch_forward"], calls["batch_backward"]) == (before[0] + 1, before[1] + 1)
    return y


@pytest.mark.parametrize("params", ["float32", "same"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_train_forward_backward_match_float64(dtype, act, layout, params, calls):
    param_dtype = torch.float32 if params == "float32" else dtype
    x, w, b = _make((4, 5, 6, 7), layout, dtype, param_dtype)
    y = _check_train(x, w, b, act, calls)
    if layout == "cl":  # the memory format is kept
        assert y.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_eval_forward_matches_float64(dtype, act, layout, calls):
    x, w, b = _make((4, 5, 6, 7), layout, dtype, torch.float32)
    g = torch.Generator().manual_seed(1)
    mean = torch.randn(5, generator=g)  # float32 buffers, as autocast leaves them
    var = torch.rand(5, generator=g) + 0.1
    with torch.no_grad():
        y = NF.batch_norm(x, mean, var, w, b, training=False, activation=act)
    _check("y", y, ref.ACTIVATIONS[act](ref.batch_norm_eval(x, mean, var, w, b)), dtype)
    assert calls["affine_forward"] == 1


@pytest.mark.parametrize("layout", ["cf", "cl"])
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_threaded_kernels(threaded_kernels, dtype, layout, calls):
    x, w, b = _make((6, 5, 4, 3), layout, dtype, torch.float32, seed=2)
    _check_train(x, w, b, "relu", calls)
    mean, var = torch.randn(5), torch.rand(5) + 0.5
    with torch.no_grad():
        y = NF.batch_norm(x, mean, var, w, b, training=False, activation="silu")
    want = torch.nn.functional.silu(ref.batch_norm_eval(x, mean, var, w, b))
    _check("eval y", y, want, dtype)


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_threaded_kernels_smooth_activation(threaded_kernels, dtype, calls):
    x, w, b = _make((6, 5, 4, 3), "cl", dtype, dtype, seed=3)
    _check_train(x, w, b, "tanh", calls)


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_float64_parameters_are_taken_too_and_get_float64_gradients(dtype, calls):
    # torch refuses this mix ("expect parameter to have scalar type of Float"); normlab's
    # torch-op path has always taken it, so the kernels do (in float32, like that path)
    x, w, b = _make((8, 3, 5), "cf", dtype, torch.float64)
    _check_train(x, w, b, "relu", calls)


# -- statistics ---------------------------------------------------------------------------
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_running_statistics_stay_float32_updated_from_float64_statistics(dtype, momentum):
    g = torch.Generator().manual_seed(4)
    x = (torch.randn(32, 3, 7, generator=g, dtype=torch.float64) * 3 + 50).to(dtype)
    rm, rv, nbt = torch.full((3,), 0.5), torch.full((3,), 2.0), torch.tensor(0)
    NF.batch_norm(x, rm, rv, training=True, momentum=momentum, num_batches_tracked=nbt)
    mean, _, unbiased, _ = ref.batch_stats(x)
    f = 0.1 if momentum is not None else 1.0
    assert rm.dtype == rv.dtype == torch.float32 and int(nbt) == 1
    torch.testing.assert_close(rm.double(), (1 - f) * 0.5 + f * mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(rv.double(), (1 - f) * 2.0 + f * unbiased, rtol=1e-6, atol=0)
    # the statistics the engine returns: float32, as the torch-op path's working dtype
    from normlab.functional.engine import normalize_batch

    _, m, v = normalize_batch(x, (0, 2))
    assert m.dtype == v.dtype == torch.float32
    torch.testing.assert_close(m.reshape(-1).double(), mean, rtol=1e-7, atol=1e-6)
    torch.testing.assert_close(v.reshape(-1).double(), ref.batch_stats(x)[1], rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_buffers_of_the_input_dtype_follow_torch(dtype):
    # A layer moved to half entirely (.to(bfloat16)): the kernels normalise, the running
    # update runs as torch ops into the half buffers, as torch's all-half BN does.
    g = torch.Generator().manual_seed(6)
    x = (torch.randn(16, 4, 5, generator=g) * 2 + 3).to(dtype)
    ours = [torch.zeros(4, dtype=dtype), torch.ones(4, dtype=dtype)]
    theirs = [t.clone() for t in ours]
    for _ in range(3):
        NF.batch_norm(x, *ours, training=True)
        torch.nn.functional.batch_norm(x, *theirs, training=True)
    for a, b in zip(ours, theirs):
        assert a.dtype == dtype
        torch.testing.assert_close(a.float(), b.float(), rtol=4 * ref.UNIT_ROUNDOFF[dtype], atol=0)


def test_float16_variance_overflowing_float16_still_normalises(calls):
    # |x| up to ~6e4: the variance (~4e8) and x² are far beyond float16's 65504; the
    # statistics are float64 sums in the kernels, so nothing overflows.
    g = torch.Generator().manual_seed(7)
    x = (torch.randn(64, 3, 9, generator=g, dtype=torch.float64) * 2e4).clamp(-6e4, 6e4)
    x = x.half()
    assert (x.float().var((0, 2)) > 65504).all()
    rm, rv = torch.zeros(3), torch.ones(3)
    w, b = torch.rand(3) + 0.5, torch.randn(3)
    _check_train(x, w, b, "relu", calls)
    y = NF.batch_norm(x, rm, rv, w, b, training=True, activation="relu")
    assert torch.isfinite(y.float()).all() and torch.isfinite(rv).all()
    torch.testing.assert_close(rv.double(), 0.9 + 0.1 * ref.batch_stats(x)[2], rtol=1e-6, atol=0)


def test_both_paths_agree_for_half_inputs(monkeypatch):
    # the kernels and the torch-op path (float32 arithmetic either way) within one ulp
    g = torch.Generator().manual_seed(8)
    for dtype in HALF:
        x = (torch.randn(8, 3, 4, 4, generator=g) * 2 + 1).to(dtype)
        out = []
        for mode in ("torch", "numba"):
            monkeypatch.setenv(kernels.KERNELS_ENV, mode)
            assert (kernels.plan_batch(x, (0, 2, 3), None, None, True) is None) == (mode == "torch")
            out.append(NF.batch_norm(x, None, None, training=True, activation="relu"))
        ulp = 2 * ref.UNIT_ROUNDOFF[dtype] * out[0].float().abs().clamp(min=2**-14)
        assert ((out[0].float() - out[1].float()).abs() <= ulp).all()
