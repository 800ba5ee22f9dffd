"""The Numba kernels: fused batch normalization + activation on CPU.

Layouts (the caller makes the views; nothing here knows about torch):

* ``cf`` (channels-first): ``x`` is a C-contiguous ``(N, C, S)`` array; channel ``c`` is
  the N rows ``x[n, c, :]`` of S contiguous values.
* ``cl`` (channels-last): ``x`` is a C-contiguous ``(M, C)`` array; channel ``c`` is the
  column ``x[:, c]``.

One kernel per (direction, layout) — training forward, training backward, eval
("affine"), and the training pair with a residual added before the activation
(``forward_res_*``, ``backward_res_*``; see ``_residual``) — each with a serial twin for
small tensors, compiled for float32, float64, bfloat16 and float16 storage
on first use and cached on disk (~2 s of compilation each). The wrappers reach them
through entry points that take data pointers (``forward_at``, ``backward_at``,
``affine_at`` for the serial twins, ``*_at_threaded`` for the threaded kernels; see
there), and the forward entry also folds the batch into BatchNorm's running statistics
(``running_update_at``). The activation is data, not code: ``act`` is a float64 array (see
:func:`activation_params`), so the ten activations add no specialisations of the kernels.
They come in five families, each with its own loop (tested once per call, never per
element), which the compiler vectorises (elu too: ``expm1``/``exp`` are polynomials,
not libm calls):

* piecewise linear (identity, relu, leaky_relu): ``y = z if z > 0 else slope·z``;
* logistic (sigmoid, tanh, silu): ``s = σ(a·z)``, ``y = c1·s + c2 + c3·z·s``
  (tanh z = 2σ(2z) − 1, silu z = z·σ(z)), with a vectorisable ``exp``;
* hardtanh (relu6 = hardtanh(0, 6)), hardswish, elu.

Where the code is: ``_jit`` (threading layer, ``njit`` options), ``_elementwise`` (the
activation table, ``exp``/``expm1``, half-precision storage, one value's activation),
``_rows`` (row loops and per-channel constants), ``_train``, ``_eval``, ``_residual``
(the kernels), ``_entries`` (serial twins, running statistics, entries by address);
this module re-exports them all.

Statistics and every total are float64 whatever the storage dtype. The smooth
activations compute elementwise in float64 too; the piecewise-linear ones (and hardtanh
in eval, a clamp: ``_eval``) compute in the storage dtype where that is safe (see
"arithmetic in the storage dtype" in ``_rows``), in float32 for half storage.

Half precision (bfloat16, float16; "half-precision storage" in ``_elementwise``): the same kernels
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

from normlab.kernels._elementwise import (  # noqa: F401
    _A,
    _C1,
    _C2,
    _C3,
    _ELU,
    _F32,
    _FAMILY,
    _G1,
    _HALF_STORAGE,
    _HARDSWISH,
    _HARDTANH,
    _I16,
    _I32,
    _LN2_HI,
    _LN2_LO,
    _LOG2E,
    _LOGISTIC,
    _OTHER,
    _PWL,
    _SLOPE,
    NATIVE_FLOAT16,
    _bf16_to_f32,
    _elu,
    _elu_grad,
    _exp,
    _expm1,
    _f32_to_bf16,
    _f32_to_fp16,
    _f32_to_fp16_bits,
    _f32_to_fp16_native,
    _finish_stats,
    _fp16_to_f32,
    _fp16_to_f32_bits,
    _fp16_to_f32_native,
    _hardswish,
    _hardswish_grad,
    _hardtanh,
    _hardtanh_grad,
    _int64_bits_as_float64,
    _narrow,
    _narrow_impl,
    _native_float16,
    _other,
    _other_grad,
    _param_witness,
    _param_witness_impl,
    _pwl,
    _pwl_grad,
    _smooth,
    _smooth_grad,
    _u32,
    _wide,
    _wide_impl,
    _work,
    _work_empty,
    _work_empty_impl,
    _work_impl,
    activation_params,
)
from normlab.kernels._entries import (  # noqa: F401
    _entries_for,
    _pointer,
    _recompiled,
    _running_update,
    _serial_twin,
    affine_at,
    affine_at_threaded,
    affine_cf_serial,
    affine_cl_serial,
    backward_at,
    backward_at_threaded,
    backward_cf_serial,
    backward_cl_serial,
    backward_res_at,
    backward_res_at_threaded,
    backward_res_cf_serial,
    backward_res_cl_serial,
    forward_at,
    forward_at_threaded,
    forward_cf_serial,
    forward_cl_serial,
    forward_res_at,
    forward_res_at_threaded,
    forward_res_cf_serial,
    forward_res_cl_serial,
    running_update_at,
)
from normlab.kernels._eval import (  # noqa: F401
    affine_cf,
    affine_cl,
)

# The kernels live in the modules below, one idea each; this module keeps every name the
# package, the tests and the benchmarks reach as ``_numba.<name>``. ``_jit``, imported
# first by each of them, chooses the threading layer before any parallel kernel compiles.
from normlab.kernels._jit import (  # noqa: F401
    _FASTMATH,
    _HELPER,
    _JIT,
    THREADING_LAYER_PRIORITY,
    _choose_threading_layer,
)
from normlab.kernels._residual import (  # noqa: F401
    backward_res_cf,
    backward_res_cl,
    forward_res_cf,
    forward_res_cl,
)
from normlab.kernels._train import (  # noqa: F401
    backward_cf,
    backward_cl,
    forward_cf,
    forward_cl,
)

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
