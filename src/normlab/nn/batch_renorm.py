"""Batch renormalization layers (Ioffe 2017): ``BatchRenorm1d/2d/3d``.

Formula, backward and the differences from the paper:
:mod:`normlab.functional.renorm`. These are BatchNorm layers in eval mode
(``isinstance(m, torch.nn.BatchNorm2d)`` holds; the state_dict keys are BatchNorm's), and
``num_batches_tracked`` is the step count that drives the clip schedule, so a BatchNorm
checkpoint loads into BatchRenorm (and back) and a loaded layer resumes the schedule
where its counter stands.
"""

from __future__ import annotations

import torch

from normlab.functional.renorm import _batch_renorm, check_clip_limits, renorm_clip_limits
from normlab.kernels import traced
from normlab.nn.batchnorm import _NormlabBatchNorm, _Rank1d, _Rank2d, _Rank3d


def _check_steps(where: str, **steps: int) -> None:
    for name, v in steps.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{where}: {name} must be an int >= 0 (a step count), got {v!r}")


class _BatchRenorm(_NormlabBatchNorm):
    """Batch renormalization: in training
    ``y = act(γ·((x − μ_B)/σ_B · r + d) + β)`` with r = clip(σ_B/σ, 1/r_max_t, r_max_t),
    d = clip((μ_B − μ)/σ, −d_max_t, d_max_t) held constant in backward, σ = sqrt(running_var
    + ε); in eval ``y = act(γ·(x − μ)/σ + β)``. Running statistics as BatchNorm.

    Args:
        num_features: C.
        eps: added to the variances. Default 1e-5.
        momentum: running-statistics EMA weight (None: cumulative average). Default 0.1.
        affine: learn γ and β. Default True.
        r_max, d_max: keyword-only; the final clip limits (paper: 3 and 5).
        warmup_steps: keyword-only; steps of plain BatchNorm (r_max_t = 1, d_max_t = 0)
            before the limits start to relax. Default 5000.
        r_max_steps, d_max_steps: keyword-only; the steps at which r_max_t and d_max_t
            reach ``r_max`` and ``d_max`` (linear ramps from ``warmup_steps``). Defaults
            40000 and 25000 (the paper's §5.1). All three 0: final limits from step 0.
        device, dtype, bias, activation, negative_slope, nonfinite, degenerate:
            keyword-only; as :class:`normlab.nn.BatchNorm2d`.

    The step is ``num_batches_tracked`` (a buffer, so it is saved in the state_dict); a
    batch skipped by ``nonfinite='skip'`` does not advance it. Running statistics are
    required (there is no ``track_running_stats`` argument).

    Reference: Ioffe, "Batch Renormalization", NeurIPS 2017, Algorithm 1 and §5.1.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        *,
        r_max: float = 3.0,
        d_max: float = 5.0,
        warmup_steps: int = 5000,
        r_max_steps: int = 40000,
        d_max_steps: int = 25000,
        device=None,
        dtype=None,
        bias: bool = True,
        activation: str | None = None,
        negative_slope: float = 0.01,
        nonfinite: str = "skip",
        degenerate: str = "error",
    ) -> None:
        where = type(self).__name__
        check_clip_limits(r_max, d_max, where)
        _check_steps(
            where, warmup_steps=warmup_steps, r_max_steps=r_max_steps, d_max_steps=d_max_steps
        )
        super().__init__(
            num_features,
            eps,
            momentum,
            affine,
            True,
            device,
            dtype,
            bias=bias,
            activation=activation,
            negative_slope=negative_slope,
            nonfinite=nonfinite,
            degenerate=degenerate,
        )
        self.r_max = float(r_max)
        self.d_max = float(d_max)
        self.warmup_steps = warmup_steps
        self.r_max_steps = r_max_steps
        self.d_max_steps = d_max_steps

    def clip_limits(self, step: int | None = None) -> tuple[float, float]:
        """``(r_max_t, d_max_t)`` at ``step`` (default: the current step,
        ``num_batches_tracked``); see :func:`normlab.functional.renorm_clip_limits`."""
        if step is None:
            step = self.num_batches_tracked
            if step is None:
                step = 0
            elif not traced(step):  # traced code keeps the counter a tensor
                step = int(step)
        return renorm_clip_limits(
            step,
            r_max=self.r_max,
            d_max=self.d_max,
            warmup_steps=self.warmup_steps,
            r_max_steps=self.r_max_steps,
            d_max_steps=self.d_max_steps,
        )

    def _normalize(self, input, mean, var, use_batch_stats, tracking):
        r_max, d_max = self.clip_limits() if use_batch_stats else (1.0, 0.0)
        return self._call_variant(
            _batch_renorm, input, mean, var, use_batch_stats, tracking, r_max=r_max, d_max=d_max
        )

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, r_max={self.r_max:g}, d_max={self.d_max:g}, "
            f"warmup_steps={self.warmup_steps}, r_max_steps={self.r_max_steps}, "
            f"d_max_steps={self.d_max_steps}"
        )


class BatchRenorm1d(_Rank1d, _BatchRenorm, torch.nn.BatchNorm1d):
    __doc__ = _BatchRenorm.__doc__.replace(
        "Batch renormalization:", "Batch renormalization of (N, C) or (N, C, L) input:", 1
    )


class BatchRenorm2d(_Rank2d, _BatchRenorm, torch.nn.BatchNorm2d):
    __doc__ = _BatchRenorm.__doc__.replace(
        "Batch renormalization:", "Batch renormalization of (N, C, H, W) input:", 1
    )


class BatchRenorm3d(_Rank3d, _BatchRenorm, torch.nn.BatchNorm3d):
    __doc__ = _BatchRenorm.__doc__.replace(
        "Batch renormalization:", "Batch renormalization of (N, C, D, H, W) input:", 1
    )
