"""Instance normalization layers: ``InstanceNorm1d/2d/3d``, drop-in for torch's.

Same arguments, defaults (``affine=False``, ``track_running_stats=False``), buffers,
``state_dict`` (incl. torch's version-1 loading rules, inherited) and behaviour: unbatched
input ``(C, *S)``, a warning (not an error) when the channel count differs from
``num_features`` and ``affine=False``, instance statistics in eval unless
``track_running_stats``; ``momentum=None`` means no running-statistics update, as torch
(which passes momentum 0 then). Extras are keyword-only: fused ``activation=``,
``negative_slope=`` and ``nonfinite=`` (default 'skip', as normlab's BatchNorm).
"""

from __future__ import annotations

import warnings

import torch

from normlab.functional import _checks
from normlab.functional.batch_norm import NonFiniteStatisticsWarning
from normlab.functional.options import BNOptions, check_options
from normlab.functional.sample_norms import _instance_norm
from normlab.nn._fused import FusedActivation
from normlab.nn._fx import Proxy, call_as_leaf


class _InstanceNorm(FusedActivation):
    """Instance normalization: each sample's channel normalised over its spatial
    positions, ``y = act(γ·(x − E[x]) / sqrt(Var[x] + ε) + β)`` (biased variance);
    per-channel γ, β if ``affine``.

    Args:
        num_features: C.
        eps: added to the variance. Default 1e-5.
        momentum: EMA weight of the running statistics (None: never updated, as torch).
            Default 0.1.
        affine: learn γ, β. Default False.
        track_running_stats: keep running statistics (updated in training with the batch
            average of the instance mean and unbiased variance) and use them in eval.
            Default False: instance statistics in both modes.
        device, dtype: of the parameters and buffers.
        bias: keyword-only; learn β too (with ``affine``). Default True.
        activation, negative_slope: keyword-only fused activation.
        nonfinite: keyword-only; running statistics and NaN/Inf batches ('skip', 'raise',
            'propagate'; see :class:`normlab.nn.BatchNorm2d`).

    Training with one spatial element raises (no instance statistics), as torch.
    InstanceNorm equals GroupNorm with one channel per group (``num_groups = C``).

    Reference: Ulyanov, Vedaldi & Lempitsky, "Instance Normalization: The Missing
    Ingredient for Fast Stylization", 2016.
    """

    _spatial_dims: int = 1

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = False,
        track_running_stats: bool = False,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
        activation: str | None = None,
        negative_slope: float = 0.01,
        nonfinite: str = "skip",
    ) -> None:
        where = type(self).__name__
        _checks.check_num_features(num_features, where)
        check_options(BNOptions(momentum, eps, nonfinite=nonfinite, where=where))
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias
        )
        self._init_activation(activation, negative_slope)
        self.nonfinite = nonfinite
        self._warned_nonfinite = False

    def _check_input_dim(self, input: torch.Tensor) -> None:
        k = self._spatial_dims
        if input.dim() not in (k + 1, k + 2):
            name = type(self).__name__
            raise ValueError(
                f"{name}: expected {k + 2}-D (N, C, *S) or unbatched {k + 1}-D (C, *S) input "
                f"with {k} spatial dim(s), got {input.dim()}-D input of shape "
                f"{tuple(input.shape)}. Use {name[:-2]}{{1,2,3}}d for other ranks."
            )

    def forward(self, input: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``mask``: optional bool, broadcastable to ``(N, *S)`` (``(*S)`` for unbatched
        input), True where a position counts (see
        :func:`normlab.functional.instance_norm`)."""
        if isinstance(input, Proxy):  # torch.fx tracing: one call_module node (see nn/_fx.py)
            return call_as_leaf(self, input)
        name = type(self).__name__
        _checks.check_floating(input, "input", name)
        self._check_input_dim(input)
        feature_dim = input.dim() - self._get_no_batch_dim()
        if input.size(feature_dim) != self.num_features:
            if self.affine or self.track_running_stats:
                raise ValueError(
                    f"{name}(num_features={self.num_features}) got an input with "
                    f"{input.size(feature_dim)} channels at dim {feature_dim} (shape "
                    f"{tuple(input.shape)}); construct it with num_features="
                    f"{input.size(feature_dim)}."
                )
            # torch warns (with this text) and carries on: num_features is unused then.
            warnings.warn(
                f"input's size at dim={feature_dim} does not match num_features. "
                "You can silence this warning by not passing in num_features, "
                "which is not used because affine=False",
                stacklevel=2,
            )
        unbatched = input.dim() == self._get_no_batch_dim()
        x = input.unsqueeze(0) if unbatched else input
        if unbatched and isinstance(mask, torch.Tensor):
            mask = mask.unsqueeze(0)
        # torch passes momentum 0 for None: the running statistics never move
        momentum = self.momentum if self.momentum is not None else 0.0
        options = BNOptions(
            momentum, self.eps, activation=self.activation, negative_slope=self.negative_slope,
            nonfinite=self.nonfinite, where=name,
        )  # fmt: skip
        y, skipped = _instance_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias,
            self.training or not self.track_running_stats, options, mask=mask,
        )  # fmt: skip
        if skipped and not self._warned_nonfinite:
            self._warned_nonfinite = True
            warnings.warn(
                f"{name}: a training batch had non-finite statistics; running statistics were "
                f"left unchanged (nonfinite='skip'). Further skips by this layer are silent.",
                NonFiniteStatisticsWarning,
                stacklevel=2,
            )
        return y.squeeze(0) if unbatched else y

    def extra_repr(self) -> str:
        s = super().extra_repr()  # with the activation (FusedActivation)
        if self.nonfinite != "skip":
            s += f", nonfinite={self.nonfinite!r}"
        return s


class InstanceNorm1d(_InstanceNorm, torch.nn.InstanceNorm1d):
    __doc__ = _InstanceNorm.__doc__
    _spatial_dims = 1


class InstanceNorm2d(_InstanceNorm, torch.nn.InstanceNorm2d):
    __doc__ = _InstanceNorm.__doc__
    _spatial_dims = 2


class InstanceNorm3d(_InstanceNorm, torch.nn.InstanceNorm3d):
    __doc__ = _InstanceNorm.__doc__
    _spatial_dims = 3
