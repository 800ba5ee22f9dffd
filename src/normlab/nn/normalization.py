"""Per-sample normalization layers: ``LayerNorm``, ``GroupNorm``, ``RMSNorm``.

Each subclasses its torch counterpart (same positional arguments, defaults, parameters,
``state_dict`` keys and ``repr``; ``isinstance`` checks keep working) and replaces
``forward`` by one call into normlab's functional form, on the shared engine. The only
extra is the keyword-only fused ``activation=`` / ``negative_slope=``.
"""

from __future__ import annotations

import torch

from normlab.functional import _checks
from normlab.functional.sample_norms import check_groups, group_norm, layer_norm, rms_norm
from normlab.nn._fused import FusedActivation
from normlab.nn._fx import Proxy, call_as_leaf


class LayerNorm(FusedActivation, torch.nn.LayerNorm):
    """Layer normalization over the trailing ``normalized_shape`` dims of each sample:
    ``y = act(γ ⊙ (x − E[x]) / sqrt(Var[x] + ε) + β)`` (biased variance).

    Args:
        normalized_shape: trailing shape to normalise over (int for the last dim).
        eps: added to the variance. Default 1e-5.
        elementwise_affine: learn γ (ones) and β (zeros) of shape ``normalized_shape``.
        bias: learn β too (with ``elementwise_affine``). Default True.
        device, dtype: of the parameters.
        activation, negative_slope: keyword-only fused activation.

    LayerNorm over (C, H, W) equals GroupNorm with one group when γ, β are constant over
    (H, W) (GroupNorm's affine is per channel). Drop-in for :class:`torch.nn.LayerNorm`.

    Reference: Ba, Kiros & Hinton, "Layer Normalization", 2016.
    """

    def __init__(
        self,
        normalized_shape,
        eps: float = 1e-5,
        elementwise_affine: bool = True,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        activation: str | None = None,
        negative_slope: float = 0.01,
    ) -> None:
        _checks.check_eps(eps, type(self).__name__)
        super().__init__(normalized_shape, eps, elementwise_affine, bias, device, dtype)
        self._init_activation(activation, negative_slope)

    def forward(self, input: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``mask``: optional bool, True where an element counts (see
        :func:`normlab.functional.layer_norm`)."""
        if isinstance(input, Proxy):  # torch.fx tracing: one call_module node (see nn/_fx.py)
            return call_as_leaf(self, input)
        return self._fused(
            layer_norm, input, self.normalized_shape, self.weight, self.bias, self.eps, mask=mask
        )


class GroupNorm(FusedActivation, torch.nn.GroupNorm):
    """Group normalization: each sample's C channels in ``num_groups`` groups, each group
    normalised over its C/G channels and all spatial positions; per-channel γ, β.

    Args:
        num_groups: G; must divide ``num_channels`` (1: LayerNorm over (C, *), C:
            InstanceNorm).
        num_channels: C.
        eps: added to the variance. Default 1e-5.
        affine: learn per-channel γ (ones) and β (zeros). Default True.
        device, dtype: of the parameters.
        bias: keyword-only; learn β too (torch ≥ 2.13). Default True.
        activation, negative_slope: keyword-only fused activation.

    Input ``(N, C, *)``; output has its shape and memory format. Drop-in for
    :class:`torch.nn.GroupNorm`.

    Reference: Wu & He, "Group Normalization", ECCV 2018.
    """

    def __init__(
        self,
        num_groups: int,
        num_channels: int,
        eps: float = 1e-5,
        affine: bool = True,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
        activation: str | None = None,
        negative_slope: float = 0.01,
    ) -> None:
        where = type(self).__name__
        check_groups(num_groups, num_channels, where)
        _checks.check_eps(eps, where)
        super().__init__(num_groups, num_channels, eps, affine, device, dtype, bias=bias)
        self._init_activation(activation, negative_slope)

    def forward(self, input: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``mask``: optional bool, broadcastable to ``(N, *S)``, True where a position
        counts (see :func:`normlab.functional.group_norm`)."""
        if isinstance(input, Proxy):  # torch.fx tracing: one call_module node (see nn/_fx.py)
            return call_as_leaf(self, input)
        if input.dim() >= 2 and input.shape[1] != self.num_channels:
            raise ValueError(
                f"{type(self).__name__}(num_groups={self.num_groups}, num_channels="
                f"{self.num_channels}) got an input with {input.shape[1]} channels at dim 1 "
                f"(shape {tuple(input.shape)}); construct it with num_channels="
                f"{input.shape[1]}, or check the layer before it."
            )
        return self._fused(
            group_norm, input, self.num_groups, self.weight, self.bias, self.eps, mask=mask
        )


class RMSNorm(FusedActivation, torch.nn.RMSNorm):
    """Root-mean-square normalization over the trailing ``normalized_shape`` dims:
    ``y = act(γ ⊙ x / sqrt(mean(x²) + ε))``; no centring and no bias.

    Args:
        normalized_shape: trailing shape to normalise over.
        eps: added to the mean square; None (default) is the machine epsilon of the
            computation dtype, ``torch.finfo(float32).eps`` for float16/bfloat16/float32
            input and ``torch.finfo(float64).eps`` for float64, as torch.
        elementwise_affine: learn γ (ones) of shape ``normalized_shape``. Default True.
        device, dtype: of the parameters.
        activation, negative_slope: keyword-only fused activation.

    Drop-in for :class:`torch.nn.RMSNorm`.

    Reference: Zhang & Sennrich, "Root Mean Square Layer Normalization", NeurIPS 2019.
    """

    def __init__(
        self,
        normalized_shape,
        eps: float | None = None,
        elementwise_affine: bool = True,
        device=None,
        dtype=None,
        *,
        activation: str | None = None,
        negative_slope: float = 0.01,
    ) -> None:
        if eps is not None:
            _checks.check_eps(eps, type(self).__name__)
        super().__init__(normalized_shape, eps, elementwise_affine, device, dtype)
        self._init_activation(activation, negative_slope)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if isinstance(input, Proxy):  # torch.fx tracing: one call_module node (see nn/_fx.py)
            return call_as_leaf(self, input)
        return self._fused(rms_norm, input, self.normalized_shape, self.weight, self.eps)
