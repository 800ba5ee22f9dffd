"""Fast fused CPU kernels for batch normalization, and the rule for when to use them.

Only :mod:`normlab.functional.engine` calls this package: it asks for a *plan*
(:func:`plan_batch`, :func:`plan_affine`) and, if it gets one, runs the kernels instead of
its torch-op path, which stays the reference. A plan exists only for the BatchNorm case:

* statistics per channel over every other dim (training), or per-channel constants
  (eval), with weight/bias per channel;
* a plain CPU float32/float64/bfloat16/float16 ``torch.Tensor`` (no subclass, not meta,
  not traced by ``torch.compile``) with at least :data:`MIN_NUMEL` elements; half
  precision is read and written as such, computed in float32 with float64 statistics,
  with per-channel tensors taken as float32 and parameter gradients returned in each
  parameter's dtype (torch's rule under autocast: bf16 input, float32 parameters);
* channels-first contiguous (viewed as ``(N, C, S)``) or channels-last contiguous
  (``(M, C)``); other strides are copied to contiguous first, which is still far faster
  than the torch-op path;
* training statistics from the batch itself (no ``StatsSource``), and no double backward
  (the engine's differentiable path handles ``create_graph=True``);
* eval only when nothing asks for gradients (inference).

``NORMLAB_KERNELS`` selects the path: ``auto`` (default) as above, ``torch`` never uses
the kernels, ``numba`` uses them whenever they apply, whatever the size (tests, bench).

Numerics and the formulas are in :mod:`normlab.kernels._numba`; the kernels run on
``torch.get_num_threads()`` threads.

Two ways in, same kernels. Below :data:`PARALLEL_MIN_NUMEL` elements (or on one thread)
the serial kernels are called *by address* (``forward_at``, ``backward_at``, ``affine_at``): each tensor goes
in as its data pointer (~0.1 µs) rather than as a numpy view (~0.6 µs), which at
(64, 100) — a ~4 µs forward kernel — is most of the difference. Larger inputs go to the
threaded kernels as numpy arrays. The training forward also folds the batch into the
running statistics (``engine.RunningUpdate``) in the same kernel call when the buffers
are plain contiguous CPU tensors; otherwise the engine does it with torch ops.

BN → add(residual) → activation (``functional.residual._NormalizeBatchResidual``, ``nl.fuse``) has its
own pair, :func:`batch_forward_residual` / :func:`batch_backward_residual`: r is read in
the forward's write pass, and one backward call returns dx and dr = dy·act'(z) together.

Activation-sized outputs (4 MiB and more) come from a reuse pool that spares the page
faults of fresh memory at every step (:mod:`normlab.kernels._memory`; ``NORMLAB_POOL_MB``,
:func:`empty_cache`, :func:`pool_info`, :func:`set_pool_limit`).
"""

from __future__ import annotations

from normlab.kernels._launch import _threads  # noqa: F401
from normlab.kernels._memory import empty_cache, empty_like, pool_info, set_pool_limit  # noqa: F401
from normlab.kernels._plan import (  # noqa: F401
    KERNELS_ENV,
    MIN_NUMEL,
    MODES,
    Plan,
    _per_channel,
    mode,
    plan_affine,
    plan_batch,
    traced,
)
from normlab.kernels._run import (  # noqa: F401
    affine_channels,
    affine_forward,
    batch_backward,
    batch_backward_residual,
    batch_forward,
    batch_forward_residual,
    stats_tensors,
)

__all__ = [
    "KERNELS_ENV",
    "MIN_NUMEL",
    "MODES",
    "PARALLEL_MIN_NUMEL",
    "affine_channels",
    "empty_cache",
    "mode",
    "plan_affine",
    "plan_batch",
    "pool_info",
    "set_pool_limit",
    "traced",
]

# Below this many elements the kernels run on the calling thread only. A threaded launch
# costs ~10 µs on an idle machine and milliseconds on a busy one (the whole team must be
# scheduled). 2^16: at (256, 512) (2^17) with 2 threads on an idle machine, `normlab
# bench --case mlp` measured 0.75x torch serial and 0.82-0.85x threaded (torch itself
# threads from 2^15 elements per op); on a busy machine torch's own threaded ops stall
# far longer than these two launches.
PARALLEL_MIN_NUMEL = 1 << 16
