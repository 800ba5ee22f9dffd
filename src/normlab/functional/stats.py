"""Numerically stable moments: the statistics every normalization layer starts from.

Float32 sums lose the variance of data that sits far from zero: the textbook
E[x²] − E[x]² cancels catastrophically, and even a two-pass scheme loses digits when the
mean itself is rounded to float32 and then subtracted. normlab uses a *shifted two-pass*
scheme, all in the working dtype (float32 for float32/float16/bfloat16 input, float64 for
float64):

    shift = mean(x)                 # first pass: the mean, rounded to the working dtype
    d     = x − shift               # exact (Sterbenz) wherever x is within 2x of shift
    delta = mean(d)                 # the part of the mean that `shift` could not hold
    e     = d − delta               # centred data
    var   = mean(e²)                # biased variance

The mean is carried as the unevaluated pair (shift, delta), so normalising with
((x − shift) − delta)·invstd never subtracts a rounded mean from x. On float32 input with
channel offsets up to 1e6 and standard deviations down to 1e-2 the normalised output is
within 1e-4 of a float64 two-pass reference (PyTorch's CPU kernel errs by ~0.1-0.2 at
offset 1e4; see tests/functional/test_stats.py). If e² overflows (|x| ≳ 1e19 in float32),
the mean square is recomputed in float64, so 1/sqrt(var + eps) and the normalised output
stay exact even when the variance itself (e.g. 1e60 for |x| ~ 1e30) exceeds float32's
range and is reported as inf (docs/reliability.md case 14; torch#162489).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from normlab.kernels import traced

_HALF_TYPES = (torch.float16, torch.bfloat16)


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics are computed in: float32 for half types, else the input's."""
    return torch.float32 if dtype in _HALF_TYPES else dtype


def reduce_count(shape: Sequence[int], dims: Sequence[int]) -> int:
    """Number of elements each statistic is computed over."""
    n = 1
    for d in dims:
        n *= shape[d]
    return n


class Moments(NamedTuple):
    """Keepdim statistics of a reduction: mean = shift + delta (an unevaluated sum)."""

    shift: torch.Tensor
    delta: torch.Tensor
    var: torch.Tensor  # biased (divides by the count)

    @property
    def mean(self) -> torch.Tensor:
        return self.shift + self.delta


def _mean_square(
    e: torch.Tensor, dims: tuple[int, ...], dtype: torch.dtype | None = None
) -> torch.Tensor:
    if dtype is None and e.dtype != torch.float64 and traced(e):
        dtype = torch.float64  # no branch on the data under tracers and transforms
    if dtype is not None:  # branch-free: the float64 sum from the start
        return e.to(dtype).pow(2).mean(dims, keepdim=True)
    ms = (e * e).mean(dims, keepdim=True)
    if e.numel() and e.dtype != torch.float64 and not bool(torch.isfinite(ms).all()):
        # e² overflowed the working dtype (|x| ≳ 1e19 in float32), or e holds NaN/Inf
        # (which float64 leaves as it is). Redo the sum of squares in float64: the caller
        # takes 1/sqrt(var + eps) from this, which float32 can hold even when var cannot.
        ms = e.double().pow(2).mean(dims, keepdim=True)
    return ms


def centered_moments(
    x: torch.Tensor,
    dims: Sequence[int],
    *,
    center: bool = True,
    mean_square_dtype: torch.dtype | None = None,
) -> tuple[Moments, torch.Tensor]:
    """Shifted two-pass moments over ``dims`` and the centred data they were computed from.

    Returns ``(Moments(shift, delta, var), e)`` where ``e = (x − shift) − delta`` is a fresh
    tensor in the working dtype (callers may overwrite it). With ``center=False`` (RMSNorm)
    shift = delta = 0 and ``var`` is the mean square. ``mean_square_dtype``: compute the
    mean square in this dtype (float64) instead of retrying in float64 only when the
    working dtype overflows, a branch on the data that traced code cannot take.
    """
    dims = tuple(dims)
    xw = x.to(work_dtype(x.dtype))
    if center:
        shift = xw.mean(dims, keepdim=True)
        e = xw - shift
        delta = e.mean(dims, keepdim=True)
        e.sub_(delta)
    else:
        shape = [1 if d in dims else s for d, s in enumerate(x.shape)]
        shift = xw.new_zeros(shape)
        delta = shift
        e = xw.clone() if xw is x else xw
    return Moments(shift, delta, _mean_square(e, dims, mean_square_dtype)), e


def moments(
    x: torch.Tensor, dims: int | Sequence[int], *, keepdim: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and biased variance of ``x`` over ``dims``, computed stably.

    Args:
        x: floating-point tensor of any shape.
        dims: the dimension(s) to reduce.
        keepdim: keep reduced dimensions with size 1.

    Returns:
        ``(mean, var)`` in the working dtype (float32 for float16/bfloat16 input). The
        variance is the biased one, sum((x − mean)²) / n.

    Numerics: shifted two-pass (module docstring); within 1e-4 normalised units of a
    float64 reference for offsets up to 1e6 on float32 input.
    """
    from normlab.functional._checks import check_floating

    check_floating(x, "x", "moments")
    dims = (dims,) if isinstance(dims, int) else tuple(dims)
    dims = tuple(d % x.dim() for d in dims)
    m, _ = centered_moments(x, dims)
    mean, var = m.mean, m.var.to(m.shift.dtype)
    if not keepdim:
        mean, var = mean.squeeze(dims), var.squeeze(dims)
    return mean, var
