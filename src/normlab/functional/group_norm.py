"""Group normalization on the engine: statistics per sample over groups of channels."""

from __future__ import annotations

import torch

from normlab.functional import _checks
from normlab.functional.engine import normalize_batch


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def check_groups(num_groups: int, num_channels: int, where: str) -> None:
    for name, v in (("num_groups", num_groups), ("num_channels", num_channels)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"{where}: {name} must be a positive int, got {v!r}")
    if num_channels % num_groups:
        raise ValueError(
            f"{where}: num_channels={num_channels} is not divisible by num_groups={num_groups}; "
            f"each group must hold the same number of channels. Choose num_groups from "
            f"{divisors(num_channels)} (1 is LayerNorm over (C, *), {num_channels} is "
            f"InstanceNorm)."
        )


def group_norm(
    input: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    *,
    activation: str | None = None,
    negative_slope: float = 0.01,
) -> torch.Tensor:
    """Group normalization: the C channels of each sample split into ``num_groups`` groups
    of C/G; each group normalised with its own mean and biased variance over its C/G·S
    values; then a per-channel affine ``γ_c·x̂ + β_c`` and optional activation.

    Drop-in for :func:`torch.nn.functional.group_norm` (same positional arguments).

    Shapes: input ``(N, C, *S)``; weight, bias ``(C,)``. The input is viewed as
    ``(N, G, C/G, *S)`` (splitting one dim is a view for any strides, so channels-last
    input is not copied) and reduced over every dim after G. The output keeps the input's
    memory format. G = 1 is LayerNorm over ``(C, *S)`` with per-channel affine; G = C is
    InstanceNorm.

    Reference: Wu & He, "Group Normalization", ECCV 2018, eq. (1)-(2), §3.1.
    """
    where = "group_norm"
    _checks.check_floating(input, "input", where)
    _checks.check_eps(eps, where)
    if input.dim() < 2:
        raise ValueError(
            f"{where}: expected an input of shape (N, C, *), got shape {list(input.shape)}; "
            f"for one sample use input.unsqueeze(0)."
        )
    n, c = input.shape[0], input.shape[1]
    check_groups(num_groups, c, where)
    for name, p in (("weight", weight), ("bias", bias)):
        _checks.check_param(p, name, c, where, " (one per channel)")
    spatial = tuple(input.shape[2:])
    grouped = input.view(n, num_groups, c // num_groups, *spatial)  # splitting a dim: a view
    pshape = (1, num_groups, c // num_groups) + (1,) * len(spatial)
    w = None if weight is None else weight.view(pshape)
    b = None if bias is None else bias.view(pshape)
    dims = tuple(range(2, grouped.dim()))
    y, _, _ = normalize_batch(
        grouped, dims, w, b, eps=eps, activation=activation, negative_slope=negative_slope
    )
    return y.reshape(input.shape)
