"""Argument validation shared by every normalization entry point.

Every message names the argument, what was wrong, and what to do instead
(docs/reliability.md cases 1-4).
"""

from __future__ import annotations

import math

import torch

NONFINITE_POLICIES = ("skip", "raise", "propagate")


def check_floating(x: torch.Tensor, name: str = "input", where: str = "normalization") -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{where}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if x.is_complex():
        raise TypeError(
            f"{where}: {name} is complex ({x.dtype}); normalization statistics are defined for "
            f"real tensors. Normalise the real and imaginary parts separately "
            f"(torch.view_as_real) or use the magnitude."
        )
    if not x.is_floating_point():
        raise TypeError(
            f"{where}: {name} must be floating point, got {x.dtype}; convert it first, "
            f"e.g. {name}.float()."
        )


def is_finite_nonnegative(value) -> bool:
    """Whether ``value`` is a real Python/NumPy number (not a bool), finite and >= 0."""
    return (
        not isinstance(value, bool)
        and isinstance(value, (int, float))
        and math.isfinite(value)
        and value >= 0
    )


def check_eps(eps: float, where: str) -> float:
    if not is_finite_nonnegative(eps):
        raise ValueError(
            f"{where}: eps must be a finite number >= 0, got {eps!r}; it is added to the "
            f"variance before the square root, so a negative value can take the root of a "
            f"negative number. The usual value is 1e-5."
        )
    return float(eps)


def check_momentum(momentum: float | None, where: str, allow_none: bool = True) -> float | None:
    if momentum is None:
        if allow_none:
            return None
        raise ValueError(f"{where}: momentum=None needs num_batches_tracked (cumulative average)")
    if (
        isinstance(momentum, bool)
        or not isinstance(momentum, (int, float))
        or not math.isfinite(momentum)
        or not 0.0 <= momentum <= 1.0
    ):
        raise ValueError(
            f"{where}: momentum must be in [0, 1] or None, got {momentum!r}. It is the weight of "
            f"the new batch in running = (1 - momentum) * running + momentum * batch (torch's "
            f"convention; Keras' momentum=0.99 corresponds to momentum=0.01 here). Values outside "
            f"[0, 1] make the running statistics diverge; torch accepts them silently, normlab "
            f"does not. Use momentum=None for a cumulative average."
        )
    return float(momentum)


def _check_choice(value: str, name: str, choices: tuple[str, ...], where: str, why: str) -> str:
    if value not in choices:
        raise ValueError(f"{where}: {name} must be one of {choices}, got {value!r}. {why}")
    return value


def check_nonfinite(policy: str, where: str) -> str:
    return _check_choice(
        policy, "nonfinite", NONFINITE_POLICIES, where,
        "'skip' keeps the last good running statistics when a batch has NaN/Inf, 'raise' "
        "raises before any state changes, 'propagate' updates them anyway (torch's behaviour).",
    )  # fmt: skip


def check_num_features(num_features: int, where: str) -> int:
    if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features <= 0:
        raise ValueError(
            f"{where}: num_features must be a positive int (the number of channels C), "
            f"got {num_features!r}"
        )
    return num_features


def canonical_dim(dim: int, ndim: int, name: str, where: str) -> int:
    if not -ndim <= dim < ndim:
        raise ValueError(
            f"{where}: {name}={dim} is out of range for a {ndim}-D input (valid: {-ndim}..{ndim - 1})"
        )
    return dim % ndim


def check_param(
    p: torch.Tensor | None, name: str, num_channels: int, where: str, hint: str = ""
) -> None:
    if p is None:
        return
    if p.dim() != 1 or p.shape[0] != num_channels:
        raise ValueError(
            f"{where}: {name} must have shape ({num_channels},) to match the input's "
            f"{num_channels} channels, got {tuple(p.shape)}{hint}"
        )


def one_value_per_channel_error(shape: tuple[int, ...], where: str) -> ValueError:
    return ValueError(
        f"{where}: expected more than 1 value per channel when training, got input of size "
        f"{list(shape)}. Batch statistics of a single value are undefined (variance 0, output "
        f"all beta). Use eval mode (model.eval()) to normalise with the running statistics, a "
        f"larger batch, a per-sample norm (normlab.nn.GroupNorm / LayerNorm), or "
        f"normlab.nn.SyncBatchNorm to pool statistics across ranks."
    )


DEGENERATE_POLICIES = ("error", "eval", "skip")


def check_degenerate(policy: str, where: str) -> str:
    return _check_choice(
        policy, "degenerate", DEGENERATE_POLICIES, where,
        "It says what training does with <= 1 value per channel: 'error' raises, 'eval' "
        "normalises with the running statistics and leaves them untouched, 'skip' returns "
        "the input unchanged.",
    )  # fmt: skip
