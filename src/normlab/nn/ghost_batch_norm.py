"""Ghost batch normalization layers (Hoffer et al. 2017): ``GhostBatchNorm1d/2d/3d``.

Split rules, remainder merging and how the running statistics are pooled:
:mod:`normlab.functional.ghost`.
"""

from __future__ import annotations

import torch

from normlab.functional.ghost import _ghost_batch_norm, check_virtual_batch_size
from normlab.nn.batchnorm import _NormlabBatchNorm, _Rank1d, _Rank2d, _Rank3d


class _GhostBatchNorm(_NormlabBatchNorm):
    """Ghost batch normalization: in training each consecutive group of
    ``virtual_batch_size`` samples is batch-normalised with its own statistics (one
    vectorised engine call, plus one for a remainder chunk); in eval the running
    statistics are used, as BatchNorm.

    Args:
        num_features, eps, momentum, affine, track_running_stats, device, dtype: as
            :class:`torch.nn.BatchNorm2d` (same defaults, buffers and state_dict keys).
        virtual_batch_size: keyword-only, required; samples per ghost batch (Hoffer et
            al. use 128). A batch of at most this size is plain BatchNorm.
        bias, activation, negative_slope, nonfinite, ema_debias, degenerate: keyword-only; as
            :class:`normlab.nn.BatchNorm2d`.

    Running statistics are updated once per forward call (``num_batches_tracked`` + 1)
    with the batch mean and the pooled within-ghost unbiased variance. Without running
    statistics (``track_running_stats=False``) eval uses ghost statistics too, so train
    and eval agree.

    Reference: Hoffer, Hubara & Soudry, "Train longer, generalize better", NeurIPS 2017,
    §4, Algorithm 1.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
        *,
        virtual_batch_size: int,
        **extras,
    ) -> None:
        check_virtual_batch_size(virtual_batch_size, type(self).__name__)
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype, **extras
        )
        self.virtual_batch_size = virtual_batch_size

    def _normalize(self, input, mean, var, use_batch_stats, tracking):
        return self._call_variant(
            _ghost_batch_norm,
            input,
            mean,
            var,
            use_batch_stats,
            tracking,
            virtual_batch_size=self.virtual_batch_size,
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, virtual_batch_size={self.virtual_batch_size}"


class GhostBatchNorm1d(_Rank1d, _GhostBatchNorm, torch.nn.BatchNorm1d):
    __doc__ = _GhostBatchNorm.__doc__


class GhostBatchNorm2d(_Rank2d, _GhostBatchNorm, torch.nn.BatchNorm2d):
    __doc__ = _GhostBatchNorm.__doc__


class GhostBatchNorm3d(_Rank3d, _GhostBatchNorm, torch.nn.BatchNorm3d):
    __doc__ = _GhostBatchNorm.__doc__
