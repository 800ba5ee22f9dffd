"""One value at a time: the activation table (:func:`activation_params` and the
``act`` slots), the vectorisable :func:`_exp` and :func:`_expm1`, half-precision storage
(bit views of bfloat16/float16 and the ``_wide``/``_work``/``_narrow`` conversions every
element read or write goes through), the activations and their derivatives, and the
statistics' final step (:func:`_finish_stats`). Numerics: see :mod:`normlab.kernels._numba`.
"""

from __future__ import annotations

import math

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, overload

from normlab.kernels._jit import _HELPER

# act[...] slots
_FAMILY, _SLOPE, _A, _C1, _C2, _C3, _G1 = range(7)
# act[_FAMILY]: 0 piecewise linear through 0 (storage-dtype code allowed), 1 logistic,
# and from _OTHER on the float64-only ones: 2 hardtanh (A = min_val, C1 = G1 = max_val),
# 3 hardswish, 4 elu (A = alpha).
_PWL, _LOGISTIC, _HARDTANH, _HARDSWISH, _ELU = 0.0, 1.0, 2.0, 3.0, 4.0
_OTHER = _HARDTANH


def activation_params(
    name: str, negative_slope: float = 0.01, min_val: float = -1.0, max_val: float = 1.0
) -> np.ndarray:
    """The float64 ``act`` array the kernels take for activation ``name``.
    ``negative_slope``: leaky_relu's slope, or elu's alpha; ``min_val``/``max_val``:
    hardtanh's bounds (relu6 is hardtanh(0, 6))."""
    lo, hi = float(min_val), float(max_val)
    table = {  # family, slope, a, c1, c2, c3, g1 (= c1·a: the σ' coefficient)
        "identity": (_PWL, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0),
        "relu": (_PWL, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0),
        "leaky_relu": (_PWL, float(negative_slope), 0.0, 0.0, 0.0, 0.0, 0.0),
        "sigmoid": (_LOGISTIC, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0),
        "tanh": (_LOGISTIC, 0.0, 2.0, 2.0, -1.0, 0.0, 4.0),
        "silu": (_LOGISTIC, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0),
        "relu6": (_HARDTANH, 0.0, 0.0, 6.0, 0.0, 0.0, 6.0),
        "hardtanh": (_HARDTANH, 0.0, lo, hi, 0.0, 0.0, hi),
        "hardswish": (_HARDSWISH, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0),
        "elu": (_ELU, 0.0, float(negative_slope), 0.0, 0.0, 0.0, 0.0),
    }
    return np.array(table[name], dtype=np.float64)


# -- a vectorisable exp ------------------------------------------------------------------
@intrinsic
def _int64_bits_as_float64(typingctx, bits):
    if bits != types.int64:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.DoubleType())

    return types.float64(types.int64), codegen


_LOG2E = 1.4426950408889634
_LN2_HI = 6.93147180369123816490e-01  # fdlibm's split of ln 2: k·_LN2_HI is exact
_LN2_LO = 1.90821492927058770002e-10


# Not inlined by Numba and without 'reassoc': LLVM still inlines and vectorises it, but
# keeps the Cody-Waite reduction in order (reassociated, it loses ~100 ulp near ±700).
@njit(cache=True, fastmath={"contract"}, error_model="numpy")
def _exp_reduced(x):
    """The reduction shared by :func:`_exp` and :func:`_expm1`: (k, r, P(r)) with
    x = k·ln2 + r, |r| ≤ ln2/2 (x clipped to [−708, 709]), and P the degree-12 Taylor
    polynomial of (e^r − 1)/r, so e^r = r·P(r) + 1 (Cody & Waite 1980, ch. 6)."""
    xc = min(max(x, -708.0), 709.0)
    kf = math.floor(xc * _LOG2E + 0.5)
    r = (xc - kf * _LN2_HI) - kf * _LN2_LO
    p = 1.0 / 6227020800.0
    p = p * r + 1.0 / 479001600.0
    p = p * r + 1.0 / 39916800.0
    p = p * r + 1.0 / 3628800.0
    p = p * r + 1.0 / 362880.0
    p = p * r + 1.0 / 40320.0
    p = p * r + 1.0 / 5040.0
    p = p * r + 1.0 / 720.0
    p = p * r + 1.0 / 120.0
    p = p * r + 1.0 / 24.0
    p = p * r + 1.0 / 6.0
    p = p * r + 0.5
    p = p * r + 1.0
    return kf, r, p


# Own njit, 'contract' only, as _exp_reduced.
@njit(cache=True, fastmath={"contract"}, error_model="numpy")
def _exp(x):
    """exp(x) within ~1 ulp for |x| ≤ 708; 0 below −708, inf above 709, NaN for NaN.

    Cody & Waite range reduction x = k·ln2 + r, |r| ≤ ln2/2, then the degree-13 Taylor
    polynomial of exp(r) (truncation < 1e-17) and 2^k from the exponent bits (Cody &
    Waite, "Software Manual for the Elementary Functions", 1980, ch. 6). The logistic
    activations and elu's derivative α·e^z use it, where the clipped tail (e^x < 1e-307
    → 0 instead of a subnormal) does not matter. A libm ``math.exp`` call per element
    would keep the loops scalar: LLVM vectorises this one.
    """
    kf, r, p = _exp_reduced(x)
    res = (p * r + 1.0) * _int64_bits_as_float64((np.int64(kf) + 1023) << 52)
    if x > 709.0:
        res = math.inf
    if x < -708.0:
        res = 0.0
    if x != x:
        res = x
    return res


# Same rules as _exp (own njit, 'contract' only): the reduction must stay in order.
@njit(cache=True, fastmath={"contract"}, error_model="numpy")
def _expm1(x):
    """expm1(x) = e^x − 1 within ~2 ulp for x ≤ 709, with full relative accuracy near 0;
    −1 below −708, inf above 709, NaN for NaN, −0.0 for −0.0.

    The reduction of :func:`_exp`, x = k·ln2 + r with |r| ≤ ln2/2, then
    expm1(r) = r·P(r), P the degree-12 Taylor polynomial of (e^r − 1)/r (exp's polynomial
    without its final "+1"), and expm1(x) = 2^k·expm1(r) + (2^k − 1). For |x| < ln2/2,
    k = 0 and r = x exactly, so the result is x·P(x): no cancellation of e^x against 1
    (Tang, "Table-driven implementation of the expm1 function in IEEE floating-point
    arithmetic", ACM TOMS 18(2), 1992, uses the same split). For k ≠ 0 the two terms
    have the result's sign or (k = ±1) partly cancel by at most a factor ~2, ≤ 1 ulp
    more. Replaces ``math.expm1``, a libm call LLVM cannot vectorise (elu was 3-280x
    slower than torch; issue 12).
    """
    kf, r, p = _exp_reduced(x)
    em = r * p
    t = _int64_bits_as_float64((np.int64(kf) + 1023) << 52)
    res = t * em + (t - 1.0)
    if kf == 0.0:  # keeps −0.0 and skips the (exact) 1·em + 0
        res = em
    if x > 709.0:
        res = math.inf
    if x < -708.0:
        res = -1.0
    if x != x:
        res = x
    return res


# -- half-precision storage --------------------------------------------------------------
# Numba has no float16 type on the CPU (numba#4402, #8138; an np.float16 array raises
# NotImplementedError) and no bfloat16 at all, so half-precision tensors come in as
# 16-bit integer views of their bits: uint16 holds bfloat16, int16 holds float16 (the
# signedness is only a tag that picks the format at compile time). Every element read
# goes through _wide (to float64) or _work (to the storage-dtype arithmetic's type, which
# for half storage is float32), every write through _narrow, and the per-channel
# parameters of a half tensor are float32 (_param_witness). For float32/float64 arrays
# these are the identity (the old code, unchanged); for half storage they are the
# conversions below (float16: the CPU's instructions where it has them, F16C; else, like
# bfloat16 always, integer code), branch-free so that LLVM vectorises the loops, exact
# (every one of the 65536 values widens to its float32; float32 → half rounds to nearest,
# ties to even, NaN stays NaN, overflow goes to ±inf: tests/kernels/test_half.py checks
# them against torch bit for bit). A float64 result is narrowed via float32: two
# roundings, within 2^-24 relative of one, far below the half format's 2^-8 or 2^-11.
_I16, _I32, _F32 = ir.IntType(16), ir.IntType(32), ir.FloatType()


def _u32(v: int) -> ir.Constant:
    return ir.Constant(_I32, v & 0xFFFFFFFF)


@intrinsic
def _bf16_to_f32(typingctx, bits):
    """bfloat16 bits (uint16) → float32: the top half of the float32's bits."""
    if bits != types.uint16:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(builder.shl(builder.zext(args[0], _I32), _u32(16)), _F32)

    return types.float32(types.uint16), codegen


@intrinsic
def _f32_to_bf16(typingctx, value):
    """float32 → bfloat16 bits (uint16), round to nearest even: add 0x7FFF plus the kept
    part's lowest bit, keep the top 16 bits (a carry into the exponent is the correct
    rounding up, to inf past the largest finite value); NaN → quiet NaN, sign kept."""
    if value != types.float32:
        return None

    def codegen(context, builder, signature, args):
        f = args[0]
        u = builder.bitcast(f, _I32)
        high = builder.lshr(u, _u32(16))
        lsb = builder.and_(high, _u32(1))
        rounded = builder.lshr(builder.add(builder.add(u, _u32(0x7FFF)), lsb), _u32(16))
        quiet = builder.or_(high, _u32(0x40))
        out = builder.select(builder.fcmp_unordered("uno", f, f), quiet, rounded)
        return builder.trunc(out, _I16)

    return types.uint16(types.float32), codegen


@intrinsic
def _fp16_to_f32_bits(typingctx, bits):
    """float16 bits (int16) → float32, exact (F. Giesen, "half_to_float", public domain,
    https://gist.github.com/rygorous/2144712): re-bias the exponent; Inf/NaN get the
    float32 maximum exponent; subnormals are renormalised by one float subtraction."""
    if bits != types.int16:
        return None

    def codegen(context, builder, signature, args):
        h = builder.zext(args[0], _I32)
        o = builder.shl(builder.and_(h, _u32(0x7FFF)), _u32(13))  # exponent, mantissa
        exp = builder.and_(o, _u32(0x7C00 << 13))
        o = builder.add(o, _u32((127 - 15) << 23))
        inf_nan = builder.add(o, _u32((128 - 16) << 23))
        magic = builder.bitcast(_u32(113 << 23), _F32)  # 2^-14
        sub = builder.fsub(builder.bitcast(builder.add(o, _u32(1 << 23)), _F32), magic)
        o = builder.select(builder.icmp_unsigned("==", exp, _u32(0)), builder.bitcast(sub, _I32), o)
        o = builder.select(builder.icmp_unsigned("==", exp, _u32(0x7C00 << 13)), inf_nan, o)
        o = builder.or_(o, builder.shl(builder.and_(h, _u32(0x8000)), _u32(16)))  # sign
        return builder.bitcast(o, _F32)

    return types.float32(types.int16), codegen


@intrinsic
def _f32_to_fp16_bits(typingctx, value):
    """float32 → float16 bits (int16), round to nearest even (Giesen's
    "float_to_half_fast3_rtne", same source): |x| ≥ 2^16 (after rounding: overflow),
    Inf, NaN by the exponent; results below 2^-14 (subnormal or zero) by a float addition
    of 0.5, whose rounding is the one wanted; normal results by adding the rounding bias
    0xFFF plus the kept mantissa's lowest bit to the re-biased bits."""
    if value != types.float32:
        return None

    def codegen(context, builder, signature, args):
        u = builder.bitcast(args[0], _I32)
        sign = builder.and_(u, _u32(0x80000000))
        a = builder.xor(u, sign)
        big = builder.select(
            builder.icmp_unsigned(">", a, _u32(255 << 23)), _u32(0x7E00), _u32(0x7C00)
        )
        half = builder.bitcast(_u32(126 << 23), _F32)  # 0.5
        small = builder.fadd(builder.bitcast(a, _F32), half)
        small = builder.sub(builder.bitcast(small, _I32), _u32(126 << 23))
        odd = builder.and_(builder.lshr(a, _u32(13)), _u32(1))
        normal = builder.add(builder.add(a, _u32(((15 - 127) << 23) + 0xFFF)), odd)
        normal = builder.lshr(normal, _u32(13))
        o = builder.select(builder.icmp_unsigned("<", a, _u32(113 << 23)), small, normal)
        o = builder.select(builder.icmp_unsigned(">=", a, _u32((127 + 16) << 23)), big, o)
        o = builder.or_(o, builder.lshr(sign, _u32(16)))
        return builder.trunc(o, _I16)

    return types.int16(types.float32), codegen


@intrinsic
def _fp16_to_f32_native(typingctx, bits):
    """float16 bits (int16) → float32 by LLVM's ``fpext half`` (x86 F16C: vcvtph2ps)."""
    if bits != types.int16:
        return None

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), _F32)

    return types.float32(types.int16), codegen


@intrinsic
def _f32_to_fp16_native(typingctx, value):
    """float32 → float16 bits (int16) by LLVM's ``fptrunc`` (F16C: vcvtps2ph), which
    rounds to nearest even as IEEE 754 requires."""
    if value != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), _I16)

    return types.int16(types.float32), codegen


def _native_float16() -> bool:
    """Whether float16 conversions compile to instructions: an x86-64 CPU with F16C, the
    host Numba compiles for (a user's NUMBA_CPU_NAME/NUMBA_CPU_FEATURES, e.g. a generic
    target for portable caches, gets the integer code). Elsewhere LLVM would call
    compiler-rt's __extendhfsf2/__truncsfhf2, which a JIT cannot count on. Both give the
    same bits (tests/kernels/test_half.py); F16C's are ~2-4x faster (a (32, 64, 56, 56)
    sum 0.8 against 1.5 ms, a write pass 0.6 against 2.4 ms)."""
    import platform

    from numba.core import config

    if config.CPU_NAME or config.CPU_FEATURES:
        return False
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        from llvmlite import binding

        return bool(binding.get_host_cpu_features().get("f16c", False))
    except RuntimeError:  # pragma: no cover - features unknown: the portable code
        return False


NATIVE_FLOAT16 = _native_float16()
_fp16_to_f32 = _fp16_to_f32_native if NATIVE_FLOAT16 else _fp16_to_f32_bits
_f32_to_fp16 = _f32_to_fp16_native if NATIVE_FLOAT16 else _f32_to_fp16_bits

_HALF_STORAGE = (types.uint16, types.int16)


def _wide(v):  # pragma: no cover - compiled only, see the overload
    """An element read as float64."""


@overload(_wide, inline="always")
def _wide_impl(v):
    if isinstance(v, types.Float):
        return lambda v: np.float64(v)
    if v == types.uint16:
        return lambda v: np.float64(_bf16_to_f32(v))
    if v == types.int16:
        return lambda v: np.float64(_fp16_to_f32(v))
    return None


def _work(v):  # pragma: no cover - compiled only, see the overload
    """An element read in the type of the storage-dtype arithmetic: itself for float32
    and float64, float32 for half storage."""


@overload(_work, inline="always")
def _work_impl(v):
    if isinstance(v, types.Float):
        return lambda v: v
    if v == types.uint16:
        return lambda v: _bf16_to_f32(v)
    if v == types.int16:
        return lambda v: _fp16_to_f32(v)
    return None


def _narrow(v, a):  # pragma: no cover - compiled only, see the overload
    """``v`` as a value to store into array ``a``: itself for float arrays (the store
    converts), the rounded bits for half storage."""


@overload(_narrow, inline="always")
def _narrow_impl(v, a):
    if isinstance(a.dtype, types.Float):
        return lambda v, a: v
    if a.dtype == types.uint16:
        return lambda v, a: _f32_to_bf16(np.float32(v))
    if a.dtype == types.int16:
        return lambda v, a: _f32_to_fp16(np.float32(v))
    return None


def _work_empty(shape, x):  # pragma: no cover - compiled only, see the overload
    """``np.empty(shape)`` of the storage-dtype arithmetic's type for array ``x``."""


@overload(_work_empty, inline="always")
def _work_empty_impl(shape, x):
    if x.dtype in _HALF_STORAGE:
        return lambda shape, x: np.empty(shape, dtype=np.float32)
    return lambda shape, x: np.empty(shape, dtype=x.dtype)


def _param_witness(w0):  # pragma: no cover - compiled only, see the overload
    """A value of the parameters' dtype for storage witness ``w0``: float32 for half
    storage, else ``w0`` itself."""


@overload(_param_witness, inline="always")
def _param_witness_impl(w0):
    if w0 in _HALF_STORAGE:
        return lambda w0: np.float32(0.0)
    return lambda w0: w0


# -- elementwise pieces ------------------------------------------------------------------
# The activation constants are read into scalars before each loop: loads from the `act`
# array inside the loop could alias the output and would block vectorisation.
@njit(**_HELPER)
def _pwl(z, slope):
    return z if z > 0.0 else z * slope  # NaN stays NaN, as torch.relu


@njit(**_HELPER)
def _pwl_grad(z, slope):
    return 1.0 if z > 0.0 else slope


@njit(**_HELPER)
def _smooth(z, a, c1, c2, c3):
    s = 1.0 / (1.0 + _exp(-a * z))
    return c1 * s + c2 + c3 * z * s


@njit(**_HELPER)
def _smooth_grad(z, a, g1, c3):
    s = 1.0 / (1.0 + _exp(-a * z))
    q = s * (1.0 - s)
    return g1 * q + c3 * (s + z * q)


@njit(**_HELPER)
def _hardtanh(z, a, b):
    return a if z < a else (b if z > b else z)  # NaN stays NaN, as F.hardtanh


@njit(**_HELPER)
def _hardtanh_grad(z, a, b):
    return 0.0 if (z <= a or z >= b) else 1.0  # hardtanh_backward: 0 at the bounds


@njit(**_HELPER)
def _hardswish(z):
    return 0.0 if z < -3.0 else (z if z > 3.0 else z * (z + 3.0) * (1.0 / 6.0))


@njit(**_HELPER)
def _hardswish_grad(z):
    return 0.0 if z < -3.0 else (z * (1.0 / 3.0) + 0.5 if z <= 3.0 else 1.0)


@njit(**_HELPER)
def _elu(z, a):
    return z if z > 0.0 else a * _expm1(z)


@njit(**_HELPER)
def _elu_grad(z, a):
    return a * _exp(z) if z <= 0.0 else 1.0  # elu_backward: α·e^z for z ≤ 0


@njit(**_HELPER)
def _other(z, fam, a, b):
    """hardtanh (fam 2, bounds a, b), hardswish (3), elu (4, alpha a), as torch's
    ``F.hardtanh``, ``F.hardswish``, ``F.elu`` (NaN stays NaN)."""
    if fam == _HARDTANH:
        return _hardtanh(z, a, b)
    if fam == _HARDSWISH:
        return _hardswish(z)
    return _elu(z, a)


@njit(**_HELPER)
def _other_grad(z, fam, a, b):
    """d act/dz of :func:`_other` at z, with torch's choices at the kinks
    (``hardtanh_backward``: 0 at the bounds; ``hardswish_backward``: z/3 + 1/2 on
    [−3, 3]; ``elu_backward``: α·e^z for z ≤ 0)."""
    if fam == _HARDTANH:
        return _hardtanh_grad(z, a, b)
    if fam == _HARDSWISH:
        return _hardswish_grad(z)
    return _elu_grad(z, a)


@njit(**_HELPER)
def _finish_stats(s1, s2, n, eps):
    """(delta, var, invstd) from the shifted sums Σd, Σd² over n values."""
    delta = s1 / n
    var = s2 / n - delta * delta
    if var < 0.0:  # rounding of an (almost) constant channel
        var = 0.0
    return delta, var, 1.0 / math.sqrt(var + eps)
