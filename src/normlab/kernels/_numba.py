"""The Numba kernels: fused batch normalization + activation on CPU.

Layouts (the caller makes the views; nothing here knows about torch):

* ``cf`` (channels-first): ``x`` is a C-contiguous ``(N, C, S)`` array; channel ``c`` is
  the N rows ``x[n, c, :]`` of S contiguous values.
* ``cl`` (channels-last): ``x`` is a C-contiguous ``(M, C)`` array; channel ``c`` is the
  column ``x[:, c]``.

One kernel per (direction, layout) — training forward, training backward, eval
("affine"), and the training pair with a residual added before the activation
(``forward_res_*``, ``backward_res_*``; see "residual" below) — each with a serial twin for
small tensors, compiled for float32, float64, bfloat16 and float16 storage
on first use and cached on disk (~2 s of compilation each). The wrappers reach them
through entry points that take data pointers (``forward_at``, ``backward_at``,
``affine_at`` for the serial twins, ``*_at_threaded`` for the threaded kernels; see
there), and the forward entry also folds the batch into BatchNorm's running statistics
(``running_update_at``). The activation is data, not code: ``act`` is a float64 array (see
:func:`activation_params`), so the six activations add no specialisations. They come in
two families, each with one loop the compiler vectorises:

* piecewise linear (identity, relu, leaky_relu): ``y = z if z > 0 else slope·z``;
* logistic (sigmoid, tanh, silu): ``s = σ(a·z)``, ``y = c1·s + c2 + c3·z·s``
  (tanh z = 2σ(2z) − 1, silu z = z·σ(z)), with a vectorisable ``exp``.

Statistics and every total are float64 whatever the storage dtype. The smooth
activations compute elementwise in float64 too; the piecewise-linear ones compute in
the storage dtype where that is safe (see "arithmetic in the storage dtype" below), in
float32 for half storage.

Half precision (bfloat16, float16; "half-precision storage" below): the same kernels
read and write 16-bit storage, widening each value exactly on load and rounding to
nearest even on store, with float32 parameters (as ``torch.autocast`` leaves a layer)
and float32 moments. Half inputs thus get float32 arithmetic and float64 statistics
without a float32 copy of the tensor, as torch's CPU kernels do (opmath float32).

Statistics (shifted one-pass sums; Chan, Golub & LeVeque, "Algorithms for computing
the sample variance: analysis and recommendations", The American Statistician, 1983): with ``k`` a value of the
channel itself (its first element),

    d = x − k,   Σd, Σd²  (float64)   →   mean = k + Σd/n,   var = Σd²/n − (Σd/n)²

``x − k`` is exact in float64 for float32 input, and the cancellation in the variance is
bounded by (mean − k)²/var, which a sample of the channel keeps small. The output is
formed as ``(x − k)·scale + shift`` with ``scale = γ·invstd`` and
``shift = β − (Σd/n)·scale``, so a large offset never meets a rounded mean: float32 input
at offsets up to 1e6 with std 1e-2 normalises within 3e-7 of a float64 two-pass
reference (the rounding of the float32 output; the bound required is 1e-4).

Backward (closed form, Ioffe & Szegedy 2015 §3, fused with the activation derivative):

    dz = dy · act'(z),  A = Σ dz,  B = Σ dz · x̂
    dx = γ · invstd · (dz − A/n − x̂ · B/n),   dγ = B,   dβ = A

x̂ and z are recomputed from the saved x; nothing else activation-sized is kept.
"""

from __future__ import annotations

import math
import os
import types as types_module

import numpy as np
from llvmlite import ir
from numba import carray, njit, prange, types
from numba.extending import intrinsic, overload

# -- the threading layer --------------------------------------------------------------------
THREADING_LAYER_PRIORITY = ["omp", "workqueue", "tbb"]


def _choose_threading_layer() -> list[str] | None:
    """Run the threaded kernels on Numba's ``omp`` threading layer (falling back to
    ``workqueue`` where no OpenMP runtime loads) unless the user chose one
    (``NUMBA_THREADING_LAYER``, ``NUMBA_THREADING_LAYER_PRIORITY`` or
    ``numba.config.THREADING_LAYER``) or Numba's threads are already running; returns the
    priority set, or None when left alone.

    Why ``omp``: with torch imported first, the OpenMP calls of Numba's ``omp`` extension
    bind to the libgomp torch bundles (``LD_DEBUG=bindings`` shows ``GOMP_parallel``
    resolved there), so a kernel's parallel regions run on torch's own thread team,
    already awake after torch's ops: a launch costs ~1-3 µs and no second team competes
    for the cores (``benchmarks/side_effects.py --part spin``: the CPU a normlab step
    leaves spinning equals a torch BN step's). ``workqueue`` costs ~75 µs of
    condition-variable hand-offs per parallel region on the development VM: resnet-stem
    training 2.9-3.6x torch against 5.1-5.5x on ``omp`` (``benchmarks/README.md``,
    "Threads, fork and torch's ops"). ``tbb`` (Numba's own first choice when the ``tbb``
    package is installed) would bring a second thread pool next to torch's.

    GNU OpenMP is not fork-safe: a child forked after a threaded kernel ran has no thread
    team (Numba kills a direct child that launches one; a grandchild would hang), so a
    forked child runs the serial kernels (``normlab.kernels._launch``). On ``workqueue``
    (``NUMBA_THREADING_LAYER=workqueue``), which is fork-safe, children run threaded.
    Numba docs, "The Threading Layers".
    """
    from numba.core import config
    from numba.np.ufunc import parallel

    if (
        parallel._is_initialized
        or "NUMBA_THREADING_LAYER" in os.environ
        or "NUMBA_THREADING_LAYER_PRIORITY" in os.environ
        or str(config.THREADING_LAYER).lower() != "default"
    ):
        return None
    config.THREADING_LAYER_PRIORITY = list(THREADING_LAYER_PRIORITY)
    return config.THREADING_LAYER_PRIORITY


# Before any parallel kernel below is compiled or loaded: that starts Numba's threads.
_choose_threading_layer()

# Reassociation lets LLVM vectorise the float64 sums; no 'nnan'/'ninf', so NaN and Inf
# propagate as in torch's ops (the running-statistics policy depends on it).
_FASTMATH = {"reassoc", "contract", "nsz", "arcp"}
_JIT = {"cache": True, "fastmath": _FASTMATH, "error_model": "numpy", "nogil": True}
_HELPER = {"cache": True, "fastmath": _FASTMATH, "error_model": "numpy", "inline": "always"}

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
def _exp(x):
    """exp(x) within ~1 ulp for |x| ≤ 708; 0 below −708, inf above 709, NaN for NaN.

    Cody & Waite range reduction x = k·ln2 + r, |r| ≤ ln2/2, then the degree-13 Taylor
    polynomial of exp(r) (truncation < 1e-17) and 2^k from the exponent bits. Only the
    logistic activations use it, where the clipped tails (σ < 1e-307) do not matter.
    """
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
    p = p * r + 1.0
    res = p * _int64_bits_as_float64((np.int64(kf) + 1023) << 52)
    if x > 709.0:
        res = math.inf
    if x < -708.0:
        res = 0.0
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
    return z if z > 0.0 else a * math.expm1(z)


@njit(**_HELPER)
def _elu_grad(z, a):
    return a * math.exp(z) if z <= 0.0 else 1.0  # elu_backward: α·e^z for z ≤ 0


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


# -- arithmetic in the storage dtype ----------------------------------------------------
# The piecewise-linear activations (identity, relu, leaky_relu) of channels-first tensors
# compute elementwise in x's own dtype, twice as many float32 values per instruction as
# float64, where that is as exact as the output's rounding: the statistics stay float64
# (from the forward's float64 sums), d = x − k is exact for float32 values near k
# (Sterbenz), and z = d·scale + shift then carries a few float32 roundings of terms of
# the size of |z| (≤ 4e-7 from the float64 result at offset 1e6, std 1e-2; the output's
# own rounding is 6e-8·|z|). Backward sums a row (at most _STORAGE_SUM_MAX values, split
# over the vector lanes) in x's dtype, then rows in float64. Channels whose constants
# could overflow or underflow in float32 take the float64 code.
_STORAGE_SUM_MAX = 4096


@njit(**_HELPER)
def _storage_math_is_safe(invstd, scale, shift, k):
    """Whether (x − k)·scale + shift can be formed in float32 without overflow: a
    variance below 1e60 bounds |x − k| far below float32's range."""
    return invstd > 1e-30 and abs(scale) < 1e30 and abs(shift) < 1e30 and abs(k) < 1e30


# Channels-last rows hold every channel: the storage-dtype code runs when every channel is
# safe, with the per-channel constants in one (6, C) array of x's dtype (see below; the
# eval kernels use it for both layouts).
_STORAGE_ROWS = 32  # rows summed in x's dtype per channel before adding into float64


@njit(**_HELPER)
def _storage_constants(x, stats, scale, shift, act):
    """Rows k, scale, shift, delta, slope, 0 as a (6, C) array of x's dtype, or a (0, C)
    array when the activation is not piecewise linear through 0 or a channel is not safe
    for x's dtype."""
    C = x.shape[1]
    if act[_FAMILY] != _PWL:
        return _work_empty((0, C), x)
    for c in range(C):
        if not _storage_math_is_safe(stats[3, c], scale[c], shift[c], stats[0, c]):
            return _work_empty((0, C), x)
    tk = _work_empty((6, C), x)
    for c in range(C):
        tk[0, c] = stats[0, c]
        tk[1, c] = scale[c]
        tk[2, c] = shift[c]
        tk[3, c] = stats[1, c]
        tk[4, c] = act[_SLOPE]
        tk[5, c] = 0.0
    return tk


@njit(**_HELPER)
def _out_rows_cl_storage(x, y, i0, i1, tk):
    """y = act((x − k)·scale + shift) for rows i0..i1 in x's dtype (piecewise linear).
    The constants are copied into their own arrays and the slope read once: LLVM cannot
    tell that y's stores leave ``tk`` alone, and would reload it for every value."""
    k, scale, shift = tk[0].copy(), tk[1].copy(), tk[2].copy()
    slope, zero = tk[4, 0], tk[5, 0]
    for i in range(i0, i1):
        xr = x[i]
        yr = y[i]
        for c in range(xr.shape[0]):
            z = (_work(xr[c]) - k[c]) * scale[c] + shift[c]
            yr[c] = _narrow(z if z > zero else z * slope, yr)


@njit(**_HELPER)
def _grad_sums_rows_cl_storage(dy, x, i0, i1, tk, acc_a, acc_b):
    """Σdz and Σdz·(d − delta) over rows i0..i1 per channel: blocks of _STORAGE_ROWS
    rows in x's dtype, added into the float64 ``acc_a``, ``acc_b``."""
    C = x.shape[1]
    k, scale, shift, delta = tk[0].copy(), tk[1].copy(), tk[2].copy(), tk[3].copy()
    slope, zero = tk[4, 0], tk[5, 0]
    pa = _work_empty(C, x)
    pb = _work_empty(C, x)
    i = i0
    while i < i1:
        i_end = min(i1, i + _STORAGE_ROWS)
        pa[:] = zero
        pb[:] = zero
        for r in range(i, i_end):
            xr = x[r]
            dyr = dy[r]
            for c in range(C):
                d = _work(xr[c]) - k[c]
                z = d * scale[c] + shift[c]
                dz = _work(dyr[c]) if z > zero else _work(dyr[c]) * slope
                pa[c] += dz
                pb[c] += dz * (d - delta[c])
        for c in range(C):
            acc_a[c] += pa[c]
            acc_b[c] += pb[c]
        i = i_end


@njit(**_HELPER)
def _grad_rows_cl_storage(dy, x, dx, i0, i1, tk, pqr):
    """dx = p·dz + q·(d − delta) + r for rows i0..i1 in x's dtype; ``pqr`` (3, C)."""
    k, scale, shift, delta = tk[0].copy(), tk[1].copy(), tk[2].copy(), tk[3].copy()
    p, q, rr = pqr[0].copy(), pqr[1].copy(), pqr[2].copy()
    slope, zero = tk[4, 0], tk[5, 0]
    for r in range(i0, i1):
        xr = x[r]
        dyr = dy[r]
        dxr = dx[r]
        for c in range(xr.shape[0]):
            d = _work(xr[c]) - k[c]
            z = d * scale[c] + shift[c]
            dz = _work(dyr[c]) if z > zero else _work(dyr[c]) * slope
            dxr[c] = _narrow(p[c] * dz + q[c] * (d - delta[c]) + rr[c], dxr)


# -- one row, channels-first: x[i, c, :], S contiguous values (scalar parameters) --------
# Rows are addressed by index, not sliced: a slice per row costs more than a short row.
@njit(**_HELPER)
def _sums_row(x, i, c, k):
    s1 = 0.0
    s2 = 0.0
    for j in range(x.shape[2]):
        d = _wide(x[i, c, j]) - k
        s1 += d
        s2 += d * d
    return s1, s2


@njit(**_HELPER)
def _out_row(x, y, i, c, k, scale, shift, act):
    fam = act[_FAMILY]
    if fam >= _OTHER:
        a, b = act[_A], act[_C1]
        for j in range(x.shape[2]):
            y[i, c, j] = _narrow(_other((_wide(x[i, c, j]) - k) * scale + shift, fam, a, b), y)
    elif fam == _LOGISTIC:
        a, c1, c2, c3 = act[_A], act[_C1], act[_C2], act[_C3]
        for j in range(x.shape[2]):
            y[i, c, j] = _narrow(_smooth((_wide(x[i, c, j]) - k) * scale + shift, a, c1, c2, c3), y)
    else:
        slope = act[_SLOPE]
        for j in range(x.shape[2]):
            y[i, c, j] = _narrow(_pwl((_wide(x[i, c, j]) - k) * scale + shift, slope), y)


@njit(**_HELPER)
def _grad_sums_row(dy, x, i, c, k, delta, invstd, scale, shift, act):
    a_sum = 0.0
    b_sum = 0.0
    fam = act[_FAMILY]
    if fam >= _OTHER:
        a, b = act[_A], act[_G1]
        for j in range(x.shape[2]):
            d = _wide(x[i, c, j]) - k
            dz = _wide(dy[i, c, j]) * _other_grad(d * scale + shift, fam, a, b)
            a_sum += dz
            b_sum += dz * ((d - delta) * invstd)
    elif fam == _LOGISTIC:
        a, g1, c3 = act[_A], act[_G1], act[_C3]
        for j in range(x.shape[2]):
            d = _wide(x[i, c, j]) - k
            dz = _wide(dy[i, c, j]) * _smooth_grad(d * scale + shift, a, g1, c3)
            a_sum += dz
            b_sum += dz * ((d - delta) * invstd)
    else:
        slope = act[_SLOPE]
        for j in range(x.shape[2]):
            d = _wide(x[i, c, j]) - k
            dz = _wide(dy[i, c, j]) * _pwl_grad(d * scale + shift, slope)
            a_sum += dz
            b_sum += dz * ((d - delta) * invstd)
    return a_sum, b_sum


@njit(**_HELPER)
def _grad_row(dy, x, dx, i, c, k, delta, invstd, scale, shift, ma, mb, act):
    fam = act[_FAMILY]
    if fam >= _OTHER:
        a, b = act[_A], act[_G1]
        for j in range(x.shape[2]):
            d = _wide(x[i, c, j]) - k
            dz = _wide(dy[i, c, j]) * _other_grad(d * scale + shift, fam, a, b)
            dx[i, c, j] = _narrow(scale * (dz - ma - ((d - delta) * invstd) * mb), dx)
    elif fam == _LOGISTIC:
        a, g1, c3 = act[_A], act[_G1], act[_C3]
        for j in range(x.shape[2]):
            d = _wide(x[i, c, j]) - k
            dz = _wide(dy[i, c, j]) * _smooth_grad(d * scale + shift, a, g1, c3)
            dx[i, c, j] = _narrow(scale * (dz - ma - ((d - delta) * invstd) * mb), dx)
    else:
        slope = act[_SLOPE]
        for j in range(x.shape[2]):
            d = _wide(x[i, c, j]) - k
            dz = _wide(dy[i, c, j]) * _pwl_grad(d * scale + shift, slope)
            dx[i, c, j] = _narrow(scale * (dz - ma - ((d - delta) * invstd) * mb), dx)


# -- one row, channels-last: x[i, :], all C channels of one position (vector parameters) -
@njit(**_HELPER)
def _sums_rows_cl(x, i0, i1, k, acc1, acc2):
    """Add rows i0..i1 of x − k into the per-channel sums; four rows per pass over the
    accumulators, so they are loaded and stored a quarter as often."""
    i = i0
    while i + 4 <= i1:
        for c in range(x.shape[1]):
            kc = k[c]
            d0 = _wide(x[i, c]) - kc
            d1 = _wide(x[i + 1, c]) - kc
            d2 = _wide(x[i + 2, c]) - kc
            d3 = _wide(x[i + 3, c]) - kc
            acc1[c] += (d0 + d1) + (d2 + d3)
            acc2[c] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)
        i += 4
    while i < i1:
        for c in range(x.shape[1]):
            d = _wide(x[i, c]) - k[c]
            acc1[c] += d
            acc2[c] += d * d
        i += 1


# Channels-last rows: x[i, :] holds all C channels of one position, so every loop runs
# over the contiguous channels with per-channel constants from arrays, and the compiler
# vectorises it only when its body is one activation: the family is tested once per call
# and selects a loop nest specialised for it (the element functions below are passed as
# compile-time arguments: ``_rows_*`` holds each loop once). A family tested per element,
# in a body that also holds elu's libm call, kept these loops scalar: 7x the
# channels-first time for a BN + ReLU6 training step (issue 12). The constants are
# copied into fresh arrays first: LLVM cannot tell that the stores leave the caller's
# arrays alone and would check or reload them.
@njit(**_HELPER)
def _act_tuple(act):
    """act's slots after the family: (slope, a, c1, c2, c3, g1)."""
    return (act[_SLOPE], act[_A], act[_C1], act[_C2], act[_C3], act[_G1])


# z as the element functions take it: from z = (x − k)·scale + shift and the value ``sv``
# of the second input (none, the residual r, or the output y).
@njit(**_HELPER)
def _z_plain(z, sv):
    return z


@njit(**_HELPER)
def _z_res(z, sv):
    return z + sv


@njit(**_HELPER)
def _z_y(z, sv):
    return sv


# act(z) per family, p = _act_tuple(act)
@njit(**_HELPER)
def _pwl_f(z, p):
    return _pwl(z, p[0])


@njit(**_HELPER)
def _smooth_f(z, p):
    return _smooth(z, p[1], p[2], p[3], p[4])


@njit(**_HELPER)
def _hardtanh_f(z, p):
    return _hardtanh(z, p[1], p[2])


@njit(**_HELPER)
def _hardswish_f(z, p):
    return _hardswish(z)


@njit(**_HELPER)
def _elu_f(z, p):
    return _elu(z, p[1])


# act'(z) per family
@njit(**_HELPER)
def _pwl_g(z, p):
    return _pwl_grad(z, p[0])


@njit(**_HELPER)
def _smooth_g(z, p):
    return _smooth_grad(z, p[1], p[5], p[4])


@njit(**_HELPER)
def _hardtanh_g(z, p):
    return _hardtanh_grad(z, p[1], p[5])


@njit(**_HELPER)
def _hardswish_g(z, p):
    return _hardswish_grad(z)


@njit(**_HELPER)
def _elu_g(z, p):
    return _elu_grad(z, p[1])


# act'(z) from y = act(z) per family (see _grad_from_output)
@njit(**_HELPER)
def _pwl_gy(y, p):
    return 1.0 if y > 0.0 else p[0]


@njit(**_HELPER)
def _logistic_gy(y, p):
    s = (y - p[3]) / p[2]
    return p[5] * s * (1.0 - s)


@njit(**_HELPER)
def _hardtanh_gy(y, p):
    return 0.0 if (y <= p[1] or y >= p[2]) else 1.0


@njit(**_HELPER)
def _elu_gy(y, p):
    return 1.0 if y > 0.0 else y + p[1]


@njit(**_HELPER)
def _rows_out(x, src, y, i0, i1, k, scale, shift, zf, f, p):
    """y = f(zf((x − k)·scale + shift, src)) for rows i0..i1."""
    k, scale, shift = k.copy(), scale.copy(), shift.copy()
    for i in range(i0, i1):
        xr = x[i]
        sr = src[i]
        yr = y[i]
        for c in range(xr.shape[0]):
            z = zf((_wide(xr[c]) - k[c]) * scale[c] + shift[c], _wide(sr[c]))
            yr[c] = _narrow(f(z, p), yr)


@njit(**_HELPER)
def _rows_sums(dy, x, src, i0, i1, k, delta, invstd, scale, shift, zf, g, p, acc_a, acc_b):
    """A = Σdz and B = Σdz·x̂ over rows i0..i1 added into ``acc_a``, ``acc_b``, with
    dz = dy·g(zf((x − k)·scale + shift, src))."""
    k, delta, invstd = k.copy(), delta.copy(), invstd.copy()
    scale, shift = scale.copy(), shift.copy()
    for i in range(i0, i1):
        xr = x[i]
        dyr = dy[i]
        sr = src[i]
        for c in range(xr.shape[0]):
            d = _wide(xr[c]) - k[c]
            dz = _wide(dyr[c]) * g(zf(d * scale[c] + shift[c], _wide(sr[c])), p)
            acc_a[c] += dz
            acc_b[c] += dz * ((d - delta[c]) * invstd[c])


@njit(**_HELPER)
def _rows_grad(dy, x, src, dx, dr, i0, i1, k, delta, invstd, scale, shift, ma, mb, zf, g, p):
    """dx = scale·(dz − A/n − x̂·B/n) where ``dx`` has rows, dr = dz where ``dr`` has
    rows, for rows i0..i1 (dz: see :func:`_rows_sums`)."""
    k, delta, invstd = k.copy(), delta.copy(), invstd.copy()
    scale, shift, ma, mb = scale.copy(), shift.copy(), ma.copy(), mb.copy()
    C = x.shape[1]
    if dr.shape[0] == 0:
        for i in range(i0, i1):
            xr = x[i]
            dyr = dy[i]
            sr = src[i]
            dxr = dx[i]
            for c in range(C):
                d = _wide(xr[c]) - k[c]
                dz = _wide(dyr[c]) * g(zf(d * scale[c] + shift[c], _wide(sr[c])), p)
                dxr[c] = _narrow(
                    scale[c] * (dz - ma[c] - ((d - delta[c]) * invstd[c]) * mb[c]), dxr
                )
    elif dx.shape[0] == 0:
        for i in range(i0, i1):
            xr = x[i]
            dyr = dy[i]
            sr = src[i]
            drr = dr[i]
            for c in range(C):
                d = _wide(xr[c]) - k[c]
                dz = _wide(dyr[c]) * g(zf(d * scale[c] + shift[c], _wide(sr[c])), p)
                drr[c] = _narrow(dz, drr)
    else:
        for i in range(i0, i1):
            xr = x[i]
            dyr = dy[i]
            sr = src[i]
            dxr = dx[i]
            drr = dr[i]
            for c in range(C):
                d = _wide(xr[c]) - k[c]
                dz = _wide(dyr[c]) * g(zf(d * scale[c] + shift[c], _wide(sr[c])), p)
                dxr[c] = _narrow(
                    scale[c] * (dz - ma[c] - ((d - delta[c]) * invstd[c]) * mb[c]), dxr
                )
                drr[c] = _narrow(dz, drr)


@njit(**_HELPER)
def _out_rows_cl(x, src, y, i0, i1, k, scale, shift, act, zf):
    """y = act(zf((x − k)·scale + shift, src)) for rows i0..i1: ``zf`` :func:`_z_plain`
    (``src`` unread) or :func:`_z_res` (``src``: the residual)."""
    fam, p = act[_FAMILY], _act_tuple(act)
    if fam == _PWL:
        _rows_out(x, src, y, i0, i1, k, scale, shift, zf, _pwl_f, p)
    elif fam == _LOGISTIC:
        _rows_out(x, src, y, i0, i1, k, scale, shift, zf, _smooth_f, p)
    elif fam == _HARDTANH:
        _rows_out(x, src, y, i0, i1, k, scale, shift, zf, _hardtanh_f, p)
    elif fam == _HARDSWISH:
        _rows_out(x, src, y, i0, i1, k, scale, shift, zf, _hardswish_f, p)
    else:
        _rows_out(x, src, y, i0, i1, k, scale, shift, zf, _elu_f, p)


@njit(**_HELPER)
def _grad_sums_rows_cl(dy, x, src, from_y, i0, i1, k, delta, invstd, scale, shift, act, zf,
                       acc_a, acc_b):  # fmt: skip
    """:func:`_rows_sums` for ``act``: dz from the outputs (``from_y``: ``src`` is y) or
    from z (``zf``, ``src`` as in :func:`_out_rows_cl`)."""
    fam, p = act[_FAMILY], _act_tuple(act)
    if from_y:
        if fam == _PWL:
            _rows_sums(
                dy, x, src, i0, i1, k, delta, invstd, scale, shift, _z_y, _pwl_gy, p, acc_a, acc_b
            )
        elif fam == _LOGISTIC:
            _rows_sums(
                dy,
                x,
                src,
                i0,
                i1,
                k,
                delta,
                invstd,
                scale,
                shift,
                _z_y,
                _logistic_gy,
                p,
                acc_a,
                acc_b,
            )
        elif fam == _HARDTANH:
            _rows_sums(
                dy,
                x,
                src,
                i0,
                i1,
                k,
                delta,
                invstd,
                scale,
                shift,
                _z_y,
                _hardtanh_gy,
                p,
                acc_a,
                acc_b,
            )
        else:
            _rows_sums(
                dy, x, src, i0, i1, k, delta, invstd, scale, shift, _z_y, _elu_gy, p, acc_a, acc_b
            )
    elif fam == _PWL:
        _rows_sums(dy, x, src, i0, i1, k, delta, invstd, scale, shift, zf, _pwl_g, p, acc_a, acc_b)
    elif fam == _LOGISTIC:
        _rows_sums(
            dy, x, src, i0, i1, k, delta, invstd, scale, shift, zf, _smooth_g, p, acc_a, acc_b
        )
    elif fam == _HARDTANH:
        _rows_sums(
            dy, x, src, i0, i1, k, delta, invstd, scale, shift, zf, _hardtanh_g, p, acc_a, acc_b
        )
    elif fam == _HARDSWISH:
        _rows_sums(
            dy, x, src, i0, i1, k, delta, invstd, scale, shift, zf, _hardswish_g, p, acc_a, acc_b
        )
    else:
        _rows_sums(dy, x, src, i0, i1, k, delta, invstd, scale, shift, zf, _elu_g, p, acc_a, acc_b)


@njit(**_HELPER)
def _grad_rows_cl(dy, x, src, from_y, dx, dr, i0, i1, k, delta, invstd, scale, shift, ma,
                  mb, act, zf):  # fmt: skip
    """:func:`_rows_grad` for ``act`` (see :func:`_grad_sums_rows_cl`)."""
    fam, p = act[_FAMILY], _act_tuple(act)
    if from_y:
        if fam == _PWL:
            _rows_grad(
                dy, x, src, dx, dr, i0, i1, k, delta, invstd, scale, shift, ma, mb, _z_y, _pwl_gy, p
            )
        elif fam == _LOGISTIC:
            _rows_grad(
                dy,
                x,
                src,
                dx,
                dr,
                i0,
                i1,
                k,
                delta,
                invstd,
                scale,
                shift,
                ma,
                mb,
                _z_y,
                _logistic_gy,
                p,
            )
        elif fam == _HARDTANH:
            _rows_grad(
                dy,
                x,
                src,
                dx,
                dr,
                i0,
                i1,
                k,
                delta,
                invstd,
                scale,
                shift,
                ma,
                mb,
                _z_y,
                _hardtanh_gy,
                p,
            )
        else:
            _rows_grad(
                dy, x, src, dx, dr, i0, i1, k, delta, invstd, scale, shift, ma, mb, _z_y, _elu_gy, p
            )
    elif fam == _PWL:
        _rows_grad(
            dy, x, src, dx, dr, i0, i1, k, delta, invstd, scale, shift, ma, mb, zf, _pwl_g, p
        )
    elif fam == _LOGISTIC:
        _rows_grad(
            dy, x, src, dx, dr, i0, i1, k, delta, invstd, scale, shift, ma, mb, zf, _smooth_g, p
        )
    elif fam == _HARDTANH:
        _rows_grad(
            dy, x, src, dx, dr, i0, i1, k, delta, invstd, scale, shift, ma, mb, zf, _hardtanh_g, p
        )
    elif fam == _HARDSWISH:
        _rows_grad(
            dy, x, src, dx, dr, i0, i1, k, delta, invstd, scale, shift, ma, mb, zf, _hardswish_g, p
        )
    else:
        _rows_grad(
            dy, x, src, dx, dr, i0, i1, k, delta, invstd, scale, shift, ma, mb, zf, _elu_g, p
        )


@njit(**_HELPER)
def _eval_constants(mean, var, weight, bias, eps):
    """float64 (mean, γ/sqrt(var + ε), β) per channel."""
    C = mean.shape[0]
    m = np.empty(C)
    scale = np.empty(C)
    b = np.empty(C)
    for c in range(C):
        m[c] = mean[c]
        scale[c] = np.float64(weight[c]) / math.sqrt(np.float64(var[c]) + eps)
        b[c] = bias[c]
    return m, scale, b


@njit(**_HELPER)
def _block_totals(part, c):
    """Channel ``c``'s two sums added over the row blocks' partial sums ``part``
    (nblocks, 2, C)."""
    s1 = 0.0
    s2 = 0.0
    for blk in range(part.shape[0]):
        s1 += part[blk, 0, c]
        s2 += part[blk, 1, c]
    return s1, s2


@njit(**_HELPER)
def _eval_stats(m, var, eps):
    """Eval's constants in the training statistics' layout (k = mean, delta = 0, var,
    invstd), for :func:`_storage_constants`."""
    C = m.shape[0]
    st = np.empty((4, C))
    for c in range(C):
        st[0, c] = m[c]
        st[1, c] = 0.0
        st[2, c] = var[c]
        st[3, c] = 1.0 / math.sqrt(np.float64(var[c]) + eps)
    return st


@njit(**_HELPER)
def _scale_shift(weight, bias, stats):
    """Per-channel scale = γ·invstd and shift = β − delta·scale (stats: k, delta, var,
    invstd rows)."""
    scale = weight.astype(np.float64) * stats[3]
    return scale, bias.astype(np.float64) - stats[1] * scale


# -- training forward --------------------------------------------------------------------
@njit(parallel=True, **_JIT)
def forward_cf(x, weight, bias, eps, act, y, stats, moments):
    """Training forward, channels-first ``x`` (N, C, S) → ``y`` (N, C, S).

    ``weight``/``bias``: (C,) in x's dtype. ``stats`` (out, float64 (4, C)): shift k,
    delta, biased var, invstd, for backward. ``moments`` (out, (2, C) in x's dtype): mean
    and biased var, for the caller. One task per channel: its statistics, then its output, so the
    second read of the channel comes from the core's cache when it fits (N·S·4 bytes
    against a 1-2 MiB L2). Fewer channels than threads leave threads idle; that case is
    rare and still far faster than the torch-op path.
    """
    N, C, S = x.shape
    n = N * S
    pwl = act[_FAMILY] == _PWL
    for c in prange(C):
        k = _wide(x[0, c, 0])
        s1 = 0.0
        s2 = 0.0
        for i in range(N):
            r1, r2 = _sums_row(x, i, c, k)
            s1 += r1
            s2 += r2
        delta, var, invstd = _finish_stats(s1, s2, n, eps)
        scale = np.float64(weight[c]) * invstd
        shift = np.float64(bias[c]) - delta * scale
        if pwl and _storage_math_is_safe(invstd, scale, shift, k):
            # In x's dtype (see the module notes): z = (x − k)·scale + shift.
            t = _work_empty(5, x)
            t[0], t[1], t[2], t[3], t[4] = k, scale, shift, act[_SLOPE], 0.0
            kt, sc, sh, slope, zero = t[0], t[1], t[2], t[3], t[4]
            for i in range(N):
                for j in range(S):
                    z = (_work(x[i, c, j]) - kt) * sc + sh
                    y[i, c, j] = _narrow(z if z > zero else z * slope, y)
        else:
            for i in range(N):
                _out_row(x, y, i, c, k, scale, shift, act)
        stats[0, c] = k
        stats[1, c] = delta
        stats[2, c] = var
        stats[3, c] = invstd
        moments[0, c] = k + delta
        moments[1, c] = var


@njit(parallel=True, **_JIT)
def forward_cl(x, weight, bias, eps, act, nblocks, y, stats, moments):
    """Training forward, channels-last ``x`` (M, C) → ``y`` (M, C).

    ``nblocks`` row blocks run in parallel, each summing every channel into its own
    float64 accumulators (vectorised over C); the blocks' sums are then added.
    """
    M, C = x.shape
    k = np.empty(C)
    for c in range(C):
        k[c] = _wide(x[0, c])
    part = np.empty((nblocks, 2, C))
    rows = (M + nblocks - 1) // nblocks
    for blk in prange(nblocks):
        acc1 = np.zeros(C)
        acc2 = np.zeros(C)
        _sums_rows_cl(x, blk * rows, min(M, (blk + 1) * rows), k, acc1, acc2)
        part[blk, 0] = acc1
        part[blk, 1] = acc2
    for c in range(C):
        s1, s2 = _block_totals(part, c)
        stats[0, c] = k[c]
        stats[1, c], stats[2, c], stats[3, c] = _finish_stats(s1, s2, M, eps)
        moments[0, c] = k[c] + stats[1, c]
        moments[1, c] = stats[2, c]
    scale, shift = _scale_shift(weight, bias, stats)
    tk = _storage_constants(x, stats, scale, shift, act)
    if tk.shape[0] != 0:
        for blk in prange(nblocks):
            _out_rows_cl_storage(x, y, blk * rows, min(M, (blk + 1) * rows), tk)
        return
    for blk in prange(nblocks):
        _out_rows_cl(x, x, y, blk * rows, min(M, (blk + 1) * rows), k, scale, shift, act, _z_plain)


# -- training backward -------------------------------------------------------------------
@njit(parallel=True, **_JIT)
def backward_cf(dy, x, weight, bias, stats, act, need_dx, dx, sums):
    """Closed-form training backward, channels-first (N, C, S), one task per channel.

    ``stats``: the forward's (4, C) float64 statistics. ``sums`` (out, (2, C) in x's
    dtype): A = Σdz (dβ) and B = Σdz·x̂ (dγ). ``dx`` is written only if ``need_dx``.
    """
    N, C, S = x.shape
    n = N * S
    scale, shift = _scale_shift(weight, bias, stats)
    storage_sums = x.itemsize == 8 or S <= _STORAGE_SUM_MAX
    pwl = act[_FAMILY] == _PWL
    for c in prange(C):
        k, delta, invstd = stats[0, c], stats[1, c], stats[3, c]
        if pwl and storage_sums and _storage_math_is_safe(invstd, scale[c], shift[c], k):
            # In x's dtype, each row's sums in x's dtype, added up in float64:
            #   dz = dy·act'(z),  A = Σ dz,  B = invstd·Σ dz·(d − delta)
            #   dx = p·dz + q·(d − delta) + r,  p = scale, q = −scale·invstd·B/n,
            #   r = −scale·A/n
            t = _work_empty(9, x)
            t[0], t[1], t[2], t[3], t[4], t[5] = k, scale[c], shift[c], act[_SLOPE], delta, 0.0
            kt, sc, sh, slope, de, zero = t[0], t[1], t[2], t[3], t[4], t[5]
            a_sum = 0.0
            b_sum = 0.0
            for i in range(N):
                ra = zero
                rb = zero
                for j in range(S):
                    d = _work(x[i, c, j]) - kt
                    z = d * sc + sh
                    dz = _work(dy[i, c, j]) if z > zero else _work(dy[i, c, j]) * slope
                    ra += dz
                    rb += dz * (d - de)
                a_sum += np.float64(ra)
                b_sum += np.float64(rb)
            b_sum *= invstd
            sums[0, c] = a_sum
            sums[1, c] = b_sum
            if need_dx:
                t[6] = scale[c]
                t[7] = -scale[c] * invstd * (b_sum / n)
                t[8] = -scale[c] * (a_sum / n)
                p, q, r = t[6], t[7], t[8]
                for i in range(N):
                    for j in range(S):
                        d = _work(x[i, c, j]) - kt
                        z = d * sc + sh
                        dz = _work(dy[i, c, j]) if z > zero else _work(dy[i, c, j]) * slope
                        dx[i, c, j] = _narrow(p * dz + q * (d - de) + r, dx)
            continue
        a_sum = 0.0
        b_sum = 0.0
        for i in range(N):
            ra, rb = _grad_sums_row(dy, x, i, c, k, delta, invstd, scale[c], shift[c], act)
            a_sum += ra
            b_sum += rb
        sums[0, c] = a_sum
        sums[1, c] = b_sum
        if need_dx:
            for i in range(N):
                _grad_row(
                    dy, x, dx, i, c, k, delta, invstd, scale[c], shift[c],
                    a_sum / n, b_sum / n, act,
                )  # fmt: skip


@njit(parallel=True, **_JIT)
def backward_cl(dy, x, weight, bias, stats, act, nblocks, need_dx, dx, sums):
    """Closed-form training backward, channels-last (M, C); see :func:`backward_cf`."""
    M, C = x.shape
    scale, shift = _scale_shift(weight, bias, stats)
    k, delta, invstd = stats[0], stats[1], stats[3]
    part = np.empty((nblocks, 2, C))
    rows = (M + nblocks - 1) // nblocks
    tk = _storage_constants(x, stats, scale, shift, act)
    if tk.shape[0] != 0:  # in x's dtype: B = invstd·Σdz·(d − delta), dx = p·dz + q·(d − delta) + r
        for blk in prange(nblocks):
            acc_a = np.zeros(C)
            acc_b = np.zeros(C)
            i0, i1 = blk * rows, min(M, (blk + 1) * rows)
            _grad_sums_rows_cl_storage(dy, x, i0, i1, tk, acc_a, acc_b)
            part[blk, 0] = acc_a
            part[blk, 1] = acc_b
        pqr = _work_empty((3, C), x)
        for c in range(C):
            a_sum, b_sum = _block_totals(part, c)
            b_sum *= invstd[c]
            sums[0, c] = a_sum
            sums[1, c] = b_sum
            pqr[0, c] = scale[c]
            pqr[1, c] = -scale[c] * invstd[c] * (b_sum / M)
            pqr[2, c] = -scale[c] * (a_sum / M)
        if need_dx:
            for blk in prange(nblocks):
                i0, i1 = blk * rows, min(M, (blk + 1) * rows)
                _grad_rows_cl_storage(dy, x, dx, i0, i1, tk, pqr)
        return
    for blk in prange(nblocks):
        acc_a = np.zeros(C)
        acc_b = np.zeros(C)
        i0, i1 = blk * rows, min(M, (blk + 1) * rows)
        _grad_sums_rows_cl(
            dy, x, x, False, i0, i1, k, delta, invstd, scale, shift, act, _z_plain, acc_a, acc_b
        )
        part[blk, 0] = acc_a
        part[blk, 1] = acc_b
    for c in range(C):
        a_sum, b_sum = _block_totals(part, c)
        sums[0, c] = a_sum
        sums[1, c] = b_sum
    if need_dx:
        ma = sums[0] / M
        mb = sums[1] / M
        for blk in prange(nblocks):
            i0, i1 = blk * rows, min(M, (blk + 1) * rows)
            _grad_rows_cl(
                dy, x, x, False, dx, dx[:0], i0, i1, k, delta, invstd, scale, shift, ma, mb,
                act, _z_plain,
            )  # fmt: skip


# -- eval forward ------------------------------------------------------------------------
@njit(parallel=True, **_JIT)
def affine_cf(x, mean, var, weight, bias, eps, act, y):
    """Eval forward, channels-first (N, C, S): y = act((x − mean)·γ/sqrt(var + ε) + β),
    per-channel parameters (C,) in x's dtype, combined in float64."""
    N, C, S = x.shape
    m, scale, b = _eval_constants(mean, var, weight, bias, eps)
    tk = _storage_constants(x, _eval_stats(m, var, eps), scale, b, act)
    if tk.shape[0] != 0:  # piecewise linear, in x's dtype
        for r in prange(N * C):
            i, c = r // C, r % C
            kt, sc, sh, slope, zero = tk[0, c], tk[1, c], tk[2, c], tk[4, c], tk[5, c]
            for j in range(S):
                z = (_work(x[i, c, j]) - kt) * sc + sh
                y[i, c, j] = _narrow(z if z > zero else z * slope, y)
        return
    for r in prange(N * C):
        i, c = r // C, r % C
        _out_row(x, y, i, c, m[c], scale[c], b[c], act)


@njit(parallel=True, **_JIT)
def affine_cl(x, mean, var, weight, bias, eps, act, nblocks, y):
    """Eval forward, channels-last (M, C); see :func:`affine_cf`."""
    M = x.shape[0]
    m, scale, b = _eval_constants(mean, var, weight, bias, eps)
    rows = (M + nblocks - 1) // nblocks
    tk = _storage_constants(x, _eval_stats(m, var, eps), scale, b, act)
    if tk.shape[0] != 0:
        for blk in prange(nblocks):
            _out_rows_cl_storage(x, y, blk * rows, min(M, (blk + 1) * rows), tk)
        return
    for blk in prange(nblocks):
        _out_rows_cl(x, x, y, blk * rows, min(M, (blk + 1) * rows), m, scale, b, act, _z_plain)


# -- residual: y = act(γ·x̂ + β + r) -----------------------------------------------------
# BN → add → activation in the same two passes as the plain kernels: the residual r is
# read in the write pass (z = (x − k)·scale + shift + r), and backward produces dx and
# dr = dz = dy·act'(z) in one two-pass kernel. act'(z) comes from the saved output y
# where y determines it (``from_y``: identity, relu, leaky_relu with slope > 0, relu6,
# hardtanh, elu with α > 0, sigmoid, tanh; as ``activations.derivative_from_output``),
# so r need not be kept; otherwise ``src`` is r and z is recomputed from x and r.
# The storage-dtype code runs for the piecewise-linear activations of channels-first
# tensors under the rule above (forward; backward only with ``from_y``: there dz needs
# only y's sign); everything else computes elementwise in float64.
@njit(**_HELPER)
def _out_row_res(x, res, y, i, c, k, scale, shift, act):
    fam = act[_FAMILY]
    if fam >= _OTHER:
        a, b = act[_A], act[_C1]
        for j in range(x.shape[2]):
            z = (_wide(x[i, c, j]) - k) * scale + shift + _wide(res[i, c, j])
            y[i, c, j] = _narrow(_other(z, fam, a, b), y)
    elif fam == _LOGISTIC:
        a, c1, c2, c3 = act[_A], act[_C1], act[_C2], act[_C3]
        for j in range(x.shape[2]):
            z = (_wide(x[i, c, j]) - k) * scale + shift + _wide(res[i, c, j])
            y[i, c, j] = _narrow(_smooth(z, a, c1, c2, c3), y)
    else:
        slope = act[_SLOPE]
        for j in range(x.shape[2]):
            z = (_wide(x[i, c, j]) - k) * scale + shift + _wide(res[i, c, j])
            y[i, c, j] = _narrow(_pwl(z, slope), y)


@njit(**_HELPER)
def _grad_from_output(y, fam, slope, a, b, c1, c2, g1):
    """act'(z) from y = act(z) (see above; not for hardswish, silu)."""
    if fam == _PWL:
        return 1.0 if y > 0.0 else slope
    if fam == _LOGISTIC:  # sigmoid, tanh: y = c1·s + c2, act' = g1·s·(1 − s)
        s = (y - c2) / c1
        return g1 * s * (1.0 - s)
    if fam == _HARDTANH:
        return 0.0 if (y <= a or y >= b) else 1.0
    return 1.0 if y > 0.0 else y + a  # elu: α·e^z = y + α below 0


@njit(**_HELPER)
def _grad_at(z, fam, slope, a, b, g1, c3):
    if fam == _PWL:
        return _pwl_grad(z, slope)
    if fam == _LOGISTIC:
        return _smooth_grad(z, a, g1, c3)
    return _other_grad(z, fam, a, b)


@njit(**_HELPER)
def _dz_res(dyv, d, sv, scale, shift, from_y, act):
    """dz = dy·act'(z) for one value: from y (``sv`` = y) or from z = d·scale + shift + r
    (``sv`` = r)."""
    fam, slope, a, c1, c2, c3, g1 = act[0], act[1], act[2], act[3], act[4], act[5], act[6]
    if from_y:
        return dyv * _grad_from_output(sv, fam, slope, a, c1, c1, c2, g1)
    return dyv * _grad_at(d * scale + shift + sv, fam, slope, a, g1, g1, c3)


@njit(parallel=True, **_JIT)
def forward_res_cf(x, res, weight, bias, eps, act, y, stats, moments):
    """:func:`forward_cf` with a residual: y = act((x − k)·scale + shift + r); ``res``
    (N, C, S) like x."""
    N, C, S = x.shape
    n = N * S
    pwl = act[_FAMILY] == _PWL
    for c in prange(C):
        k = _wide(x[0, c, 0])
        s1 = 0.0
        s2 = 0.0
        for i in range(N):
            r1, r2 = _sums_row(x, i, c, k)
            s1 += r1
            s2 += r2
        delta, var, invstd = _finish_stats(s1, s2, n, eps)
        scale = np.float64(weight[c]) * invstd
        shift = np.float64(bias[c]) - delta * scale
        if pwl and _storage_math_is_safe(invstd, scale, shift, k):
            # in x's dtype: the add of r is the one rounding torch's `bn(x) + r` makes too
            t = _work_empty(5, x)
            t[0], t[1], t[2], t[3], t[4] = k, scale, shift, act[_SLOPE], 0.0
            kt, sc, sh, slope, zero = t[0], t[1], t[2], t[3], t[4]
            for i in range(N):
                for j in range(S):
                    z = (_work(x[i, c, j]) - kt) * sc + sh + _work(res[i, c, j])
                    y[i, c, j] = _narrow(z if z > zero else z * slope, y)
        else:
            for i in range(N):
                _out_row_res(x, res, y, i, c, k, scale, shift, act)
        stats[0, c] = k
        stats[1, c] = delta
        stats[2, c] = var
        stats[3, c] = invstd
        moments[0, c] = k + delta
        moments[1, c] = var


@njit(parallel=True, **_JIT)
def forward_res_cl(x, res, weight, bias, eps, act, nblocks, y, stats, moments):
    """:func:`forward_cl` with a residual ``res`` (M, C); the write pass in float64."""
    M, C = x.shape
    k = np.empty(C)
    for c in range(C):
        k[c] = _wide(x[0, c])
    part = np.empty((nblocks, 2, C))
    rows = (M + nblocks - 1) // nblocks
    for blk in prange(nblocks):
        acc1 = np.zeros(C)
        acc2 = np.zeros(C)
        _sums_rows_cl(x, blk * rows, min(M, (blk + 1) * rows), k, acc1, acc2)
        part[blk, 0] = acc1
        part[blk, 1] = acc2
    for c in range(C):
        s1, s2 = _block_totals(part, c)
        stats[0, c] = k[c]
        stats[1, c], stats[2, c], stats[3, c] = _finish_stats(s1, s2, M, eps)
        moments[0, c] = k[c] + stats[1, c]
        moments[1, c] = stats[2, c]
    scale, shift = _scale_shift(weight, bias, stats)
    for blk in prange(nblocks):
        _out_rows_cl(x, res, y, blk * rows, min(M, (blk + 1) * rows), k, scale, shift, act, _z_res)


@njit(parallel=True, **_JIT)
def backward_res_cf(dy, x, src, weight, bias, stats, act, from_y, need_dx, need_dr, dx, dr,
                    sums):  # fmt: skip
    """Backward of :func:`forward_res_cf`, one task per channel, two passes:

        dz = dy·act'(z),  A = Σdz,  B = Σdz·x̂
        dx = γ·invstd·(dz − A/n − x̂·B/n),   dr = dz,   dγ = B,   dβ = A

    ``src``: the output y (``from_y``) or the residual r. ``dx`` / ``dr`` are written only
    if ``need_dx`` / ``need_dr``; ``sums`` (out, (2, C)): A, B."""
    N, C, S = x.shape
    n = N * S
    scale, shift = _scale_shift(weight, bias, stats)
    storage = from_y and act[_FAMILY] == _PWL and (x.itemsize == 8 or S <= _STORAGE_SUM_MAX)
    for c in prange(C):
        k, delta, invstd = stats[0, c], stats[1, c], stats[3, c]
        if storage and _storage_math_is_safe(invstd, scale[c], shift[c], k):
            # dz = dy where y > 0, else dy·slope: no z needed, only y's sign
            t = _work_empty(7, x)
            t[0], t[1], t[2], t[3] = k, act[_SLOPE], delta, 0.0
            kt, slope, de, zero = t[0], t[1], t[2], t[3]
            a_sum = 0.0
            b_sum = 0.0
            for i in range(N):
                ra = zero
                rb = zero
                for j in range(S):
                    g = _work(dy[i, c, j])
                    dz = g if _work(src[i, c, j]) > zero else g * slope
                    ra += dz
                    rb += dz * ((_work(x[i, c, j]) - kt) - de)
                a_sum += np.float64(ra)
                b_sum += np.float64(rb)
            b_sum *= invstd
            sums[0, c] = a_sum
            sums[1, c] = b_sum
            t[4] = scale[c]
            t[5] = -scale[c] * invstd * (b_sum / n)
            t[6] = -scale[c] * (a_sum / n)
            p, q, r = t[4], t[5], t[6]
            if need_dx and need_dr:
                for i in range(N):
                    for j in range(S):
                        g = _work(dy[i, c, j])
                        dz = g if _work(src[i, c, j]) > zero else g * slope
                        e = (_work(x[i, c, j]) - kt) - de
                        dx[i, c, j] = _narrow(p * dz + q * e + r, dx)
                        dr[i, c, j] = _narrow(dz, dr)
            elif need_dx:
                for i in range(N):
                    for j in range(S):
                        g = _work(dy[i, c, j])
                        dz = g if _work(src[i, c, j]) > zero else g * slope
                        e = (_work(x[i, c, j]) - kt) - de
                        dx[i, c, j] = _narrow(p * dz + q * e + r, dx)
            elif need_dr:
                for i in range(N):
                    for j in range(S):
                        g = _work(dy[i, c, j])
                        dr[i, c, j] = _narrow(g if _work(src[i, c, j]) > zero else g * slope, dr)
            continue
        sc, sh = scale[c], shift[c]
        a_sum = 0.0
        b_sum = 0.0
        for i in range(N):
            for j in range(S):
                d = _wide(x[i, c, j]) - k
                dz = _dz_res(_wide(dy[i, c, j]), d, _wide(src[i, c, j]), sc, sh,
                             from_y, act)  # fmt: skip
                a_sum += dz
                b_sum += dz * ((d - delta) * invstd)
        sums[0, c] = a_sum
        sums[1, c] = b_sum
        ma, mb = a_sum / n, b_sum / n
        if need_dx or need_dr:
            for i in range(N):
                for j in range(S):
                    d = _wide(x[i, c, j]) - k
                    dz = _dz_res(_wide(dy[i, c, j]), d, _wide(src[i, c, j]), sc, sh,
                                 from_y, act)  # fmt: skip
                    if need_dx:
                        dx[i, c, j] = _narrow(sc * (dz - ma - ((d - delta) * invstd) * mb), dx)
                    if need_dr:
                        dr[i, c, j] = _narrow(dz, dr)


@njit(parallel=True, **_JIT)
def backward_res_cl(dy, x, src, weight, bias, stats, act, from_y, nblocks, need_dx, need_dr,
                    dx, dr, sums):  # fmt: skip
    """Backward of :func:`forward_res_cl`, channels-last (M, C), in float64; see
    :func:`backward_res_cf`."""
    M, C = x.shape
    scale, shift = _scale_shift(weight, bias, stats)
    k, delta, invstd = stats[0], stats[1], stats[3]
    part = np.empty((nblocks, 2, C))
    rows = (M + nblocks - 1) // nblocks
    for blk in prange(nblocks):
        acc_a = np.zeros(C)
        acc_b = np.zeros(C)
        i0, i1 = blk * rows, min(M, (blk + 1) * rows)
        _grad_sums_rows_cl(dy, x, src, from_y, i0, i1, k, delta, invstd, scale, shift, act,
                           _z_res, acc_a, acc_b)  # fmt: skip
        part[blk, 0] = acc_a
        part[blk, 1] = acc_b
    for c in range(C):
        a_sum, b_sum = _block_totals(part, c)
        sums[0, c] = a_sum
        sums[1, c] = b_sum
    if not (need_dx or need_dr):
        return
    ma = sums[0] / M
    mb = sums[1] / M
    n_dx = M if need_dx else 0
    n_dr = M if need_dr else 0
    for blk in prange(nblocks):
        i0, i1 = blk * rows, min(M, (blk + 1) * rows)
        _grad_rows_cl(dy, x, src, from_y, dx[:n_dx], dr[:n_dr], i0, i1, k, delta, invstd,
                      scale, shift, ma, mb, act, _z_res)  # fmt: skip


# -- serial twins for small tensors -------------------------------------------------------
def _serial_twin(kernel):
    """The same kernel compiled without threads (``prange`` runs as ``range``).

    A parallel launch costs microseconds on an idle machine and milliseconds on a busy
    one (every thread of the team must be scheduled), so small tensors run on the calling
    thread only, as torch's own CPU kernels do below their grain size. The twin gets its
    own name so that Numba's on-disk cache keeps the two apart.
    """
    return _recompiled(kernel, "_serial", kernel.py_func.__globals__)


def _recompiled(kernel, suffix: str, scope: dict):
    """``kernel``'s Python code compiled again (without ``parallel``) as ``name + suffix``,
    its global names looked up in ``scope``."""
    f = kernel.py_func
    twin = types_module.FunctionType(
        f.__code__, scope, f.__name__ + suffix, f.__defaults__, f.__closure__
    )
    twin.__qualname__ = f.__qualname__ + suffix
    twin.__doc__ = f.__doc__
    return njit(**_JIT)(twin)


forward_cf_serial = _serial_twin(forward_cf)
forward_cl_serial = _serial_twin(forward_cl)
backward_cf_serial = _serial_twin(backward_cf)
backward_cl_serial = _serial_twin(backward_cl)
affine_cf_serial = _serial_twin(affine_cf)
affine_cl_serial = _serial_twin(affine_cl)
forward_res_cf_serial = _serial_twin(forward_res_cf)
forward_res_cl_serial = _serial_twin(forward_res_cl)
backward_res_cf_serial = _serial_twin(backward_res_cf)
backward_res_cl_serial = _serial_twin(backward_res_cl)


# -- running statistics --------------------------------------------------------------------
@njit(**_HELPER)
def _running_update(moments, correction, momentum, skip_nonfinite, running_mean, running_var,
                    count, has_count):  # fmt: skip
    """Fold a training batch's statistics into BatchNorm's running estimates, in place:

        running ← (1 − f)·running + f·batch,   f = momentum, or 1/t if momentum < 0

    (torch's rule; t: the updated ``count[0]``). ``moments`` (2, C), the forward's mean
    and biased var in x's dtype; the batch variance is ``var · correction`` (n/(n − 1)),
    rounded to that dtype, as the torch-op path computes it. ``count`` (1,) int64 is
    incremented first when ``has_count``. With ``skip_nonfinite``, a NaN/Inf batch
    statistic leaves everything unchanged. Returns whether the buffers were updated.
    The EMA is formed in float64 and rounded once into the buffers' dtype.
    """
    C = moments.shape[1]
    unbiased = np.empty(C, dtype=moments.dtype)
    finite = True
    for c in range(C):
        unbiased[c] = moments[1, c] * correction
        if not (np.isfinite(moments[0, c]) and np.isfinite(unbiased[c])):
            finite = False
    if skip_nonfinite and not finite:
        return False
    if has_count:
        count[0] += 1
    f = momentum if momentum >= 0.0 else 1.0 / np.float64(count[0])
    for c in range(C):
        running_mean[c] = (1.0 - f) * np.float64(running_mean[c]) + f * np.float64(moments[0, c])
        running_var[c] = (1.0 - f) * np.float64(running_var[c]) + f * np.float64(unbiased[c])
    return True


# -- entry points by address --------------------------------------------------------------
# Small tensors are dominated by the cost of the call, not of the work: turning a torch
# tensor into a numpy array costs ~0.6 µs, a pointer ~0.1 µs, and a (64, 100) forward
# kernel runs in ~4 µs. So the serial kernels are also reachable by address: the caller
# passes each tensor's data pointer (C-contiguous memory of the stated shape, kept alive
# for the call) and a scalar of the storage dtype as a type witness; these entries view
# the memory as arrays and call the serial kernels above (same code, same results).
@intrinsic
def _pointer(typingctx, address, witness):
    """``address`` (an integer) as a pointer to values of ``witness``'s type."""
    if not isinstance(address, types.Integer) or not isinstance(
        witness, (types.Float, types.Integer)
    ):
        return None
    pointer = types.CPointer(witness)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(pointer))

    return pointer(address, witness), codegen


@njit(**_JIT)
def forward_at(w0, cf, x_at, y_at, rows, C, S, w_at, b_at, eps, act, stats, moments,
               r0, mean_at, var_at, count_at, correction, momentum, skip_nonfinite,
               nblocks):  # fmt: skip
    """:func:`forward_cf` (``cf``: x is (rows, C, S)) or :func:`forward_cl` (x is
    (rows, C)), serial, on memory given by address; ``w0``: a value of x's dtype.

    Then, if ``mean_at`` is not 0, :func:`running_update_at` (``r0`` … ``skip_nonfinite``)
    in the same call. Returns 0 without running buffers, else 1 if they were updated and
    2 if a non-finite statistic skipped the update.
    """
    p0 = _param_witness(w0)  # the parameters' dtype
    w = carray(_pointer(w_at, p0), (C,))
    b = carray(_pointer(b_at, p0), (C,))
    if cf:
        x = carray(_pointer(x_at, w0), (rows, C, S))
        y = carray(_pointer(y_at, w0), (rows, C, S))
        forward_cf_serial(x, w, b, eps, act, y, stats, moments)
    else:
        x2 = carray(_pointer(x_at, w0), (rows, C))
        y2 = carray(_pointer(y_at, w0), (rows, C))
        forward_cl_serial(x2, w, b, eps, act, nblocks, y2, stats, moments)
    if mean_at == 0:
        return 0
    updated = running_update_at(
        r0, moments, correction, momentum, skip_nonfinite, mean_at, var_at, count_at
    )
    return 1 if updated else 2


@njit(**_JIT)
def backward_at(w0, cf, dy_at, x_at, dx_at, rows, C, S, w_at, b_at, stats, act, need_dx,
                dbias_at, dweight_at, nblocks):  # fmt: skip
    """:func:`backward_cf` / :func:`backward_cl`, serial, by address (see
    :func:`forward_at`); ``dx_at`` is not touched unless ``need_dx``, nor ``dbias_at``
    / ``dweight_at`` (C values each: Σdz, Σdz·x̂) when 0."""
    p0 = _param_witness(w0)  # the parameters' dtype
    w = carray(_pointer(w_at, p0), (C,))
    b = carray(_pointer(b_at, p0), (C,))
    sums = np.empty((2, C), dtype=w.dtype)
    n_dx = rows if need_dx else 0
    if cf:
        dy = carray(_pointer(dy_at, w0), (rows, C, S))
        x = carray(_pointer(x_at, w0), (rows, C, S))
        dx = carray(_pointer(dx_at, w0), (n_dx, C, S))
        backward_cf_serial(dy, x, w, b, stats, act, need_dx, dx, sums)
    else:
        dy2 = carray(_pointer(dy_at, w0), (rows, C))
        x2 = carray(_pointer(x_at, w0), (rows, C))
        dx2 = carray(_pointer(dx_at, w0), (n_dx, C))
        backward_cl_serial(dy2, x2, w, b, stats, act, nblocks, need_dx, dx2, sums)
    if dbias_at != 0:
        carray(_pointer(dbias_at, p0), (C,))[:] = sums[0]
    if dweight_at != 0:
        carray(_pointer(dweight_at, p0), (C,))[:] = sums[1]


@njit(**_JIT)
def affine_at(w0, cf, x_at, y_at, rows, C, S, m_at, v_at, w_at, b_at, eps, act, nblocks):
    """:func:`affine_cf` / :func:`affine_cl`, serial, by address (see
    :func:`forward_at`)."""
    p0 = _param_witness(w0)  # the parameters' dtype
    m = carray(_pointer(m_at, p0), (C,))
    v = carray(_pointer(v_at, p0), (C,))
    w = carray(_pointer(w_at, p0), (C,))
    b = carray(_pointer(b_at, p0), (C,))
    if cf:
        x = carray(_pointer(x_at, w0), (rows, C, S))
        y = carray(_pointer(y_at, w0), (rows, C, S))
        affine_cf_serial(x, m, v, w, b, eps, act, y)
    else:
        x2 = carray(_pointer(x_at, w0), (rows, C))
        y2 = carray(_pointer(y_at, w0), (rows, C))
        affine_cl_serial(x2, m, v, w, b, eps, act, nblocks, y2)


@njit(**_JIT)
def forward_res_at(w0, cf, x_at, res_at, y_at, rows, C, S, w_at, b_at, eps, act, stats,
                   moments, r0, mean_at, var_at, count_at, correction, momentum,
                   skip_nonfinite, nblocks):  # fmt: skip
    """:func:`forward_res_cf` / :func:`forward_res_cl` by address, as :func:`forward_at`
    (``res_at``: the residual, laid out like x)."""
    p0 = _param_witness(w0)  # the parameters' dtype
    w = carray(_pointer(w_at, p0), (C,))
    b = carray(_pointer(b_at, p0), (C,))
    if cf:
        x = carray(_pointer(x_at, w0), (rows, C, S))
        res = carray(_pointer(res_at, w0), (rows, C, S))
        y = carray(_pointer(y_at, w0), (rows, C, S))
        forward_res_cf_serial(x, res, w, b, eps, act, y, stats, moments)
    else:
        x2 = carray(_pointer(x_at, w0), (rows, C))
        res2 = carray(_pointer(res_at, w0), (rows, C))
        y2 = carray(_pointer(y_at, w0), (rows, C))
        forward_res_cl_serial(x2, res2, w, b, eps, act, nblocks, y2, stats, moments)
    if mean_at == 0:
        return 0
    updated = running_update_at(
        r0, moments, correction, momentum, skip_nonfinite, mean_at, var_at, count_at
    )
    return 1 if updated else 2


@njit(**_JIT)
def backward_res_at(w0, cf, dy_at, x_at, src_at, from_y, dx_at, dr_at, rows, C, S, w_at,
                    b_at, stats, act, need_dx, need_dr, dbias_at, dweight_at,
                    nblocks):  # fmt: skip
    """:func:`backward_res_cf` / :func:`backward_res_cl` by address, as
    :func:`backward_at`; ``src_at``: the saved output y (``from_y``) or the residual."""
    p0 = _param_witness(w0)  # the parameters' dtype
    w = carray(_pointer(w_at, p0), (C,))
    b = carray(_pointer(b_at, p0), (C,))
    sums = np.empty((2, C), dtype=w.dtype)
    n_dx = rows if need_dx else 0
    n_dr = rows if need_dr else 0
    if cf:
        dy = carray(_pointer(dy_at, w0), (rows, C, S))
        x = carray(_pointer(x_at, w0), (rows, C, S))
        src = carray(_pointer(src_at, w0), (rows, C, S))
        dx = carray(_pointer(dx_at, w0), (n_dx, C, S))
        dr = carray(_pointer(dr_at, w0), (n_dr, C, S))
        backward_res_cf_serial(dy, x, src, w, b, stats, act, from_y, need_dx, need_dr, dx, dr,
                               sums)  # fmt: skip
    else:
        dy2 = carray(_pointer(dy_at, w0), (rows, C))
        x2 = carray(_pointer(x_at, w0), (rows, C))
        src2 = carray(_pointer(src_at, w0), (rows, C))
        dx2 = carray(_pointer(dx_at, w0), (n_dx, C))
        dr2 = carray(_pointer(dr_at, w0), (n_dr, C))
        backward_res_cl_serial(dy2, x2, src2, w, b, stats, act, from_y, nblocks, need_dx,
                               need_dr, dx2, dr2, sums)  # fmt: skip
    if dbias_at != 0:
        carray(_pointer(dbias_at, p0), (C,))[:] = sums[0]
    if dweight_at != 0:
        carray(_pointer(dweight_at, p0), (C,))[:] = sums[1]


@njit(**_JIT)
def running_update_at(r0, moments, correction, momentum, skip_nonfinite, mean_at, var_at,
                      count_at):  # fmt: skip
    """:func:`_running_update` on running buffers (C,) of ``r0``'s dtype and an int64
    counter (``count_at`` 0: none) given by address."""
    C = moments.shape[1]
    running_mean = carray(_pointer(mean_at, r0), (C,))
    running_var = carray(_pointer(var_at, r0), (C,))
    has_count = count_at != 0
    if has_count:
        count = carray(_pointer(count_at, np.int64(0)), (1,))
    else:
        count = np.zeros(1, dtype=np.int64)
    return _running_update(moments, correction, momentum, skip_nonfinite, running_mean,
                           running_var, count, has_count)  # fmt: skip


def _threaded_entry(entry):
    """``entry`` (``forward_at``, ...) calling the threaded kernels instead of the serial
    twins: the same by-address call for large tensors, whose numpy views and the
    gradients' copies cost ~20 µs a step at (256, 512). A distinct name keeps its
    on-disk cache apart."""
    scope = dict(entry.py_func.__globals__)
    for name in ("forward", "backward", "affine", "forward_res", "backward_res"):
        for layout in ("cf", "cl"):
            scope[f"{name}_{layout}_serial"] = scope[f"{name}_{layout}"]
    return _recompiled(entry, "_threaded", scope)


forward_at_threaded = _threaded_entry(forward_at)
backward_at_threaded = _threaded_entry(backward_at)
affine_at_threaded = _threaded_entry(affine_at)
forward_res_at_threaded = _threaded_entry(forward_res_at)
backward_res_at_threaded = _threaded_entry(backward_res_at)


KERNELS = (
    *(
        f"{direction}_{layout}{suffix}"
        for direction in ("forward", "backward", "affine", "forward_res", "backward_res")
        for layout in ("cf", "cl")
        for suffix in ("", "_serial")
    ),
    "forward_at",
    "backward_at",
    "affine_at",
    "forward_res_at",
    "backward_res_at",
    "forward_at_threaded",
    "backward_at_threaded",
    "affine_at_threaded",
    "forward_res_at_threaded",
    "backward_res_at_threaded",
    "running_update_at",
)
