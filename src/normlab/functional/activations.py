"""Activations that normlab fuses into its normalization layers.

Each activation is applied to z = gamma * x_hat + beta. The backward pass recomputes z
from the saved input, so only its derivative *as a function of z* is needed here; that
is what lets a fused norm+activation layer save a single activation-sized tensor.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Activation:
    name: str
    forward: Callable[[torch.Tensor, float], torch.Tensor]
    derivative: Callable[[torch.Tensor, float], torch.Tensor]  # d act / d z, at z


def _sigmoid_derivative(z: torch.Tensor, _: float) -> torch.Tensor:
    s = torch.sigmoid(z)
    return s * (1 - s)


def _tanh_derivative(z: torch.Tensor, _: float) -> torch.Tensor:
    t = torch.tanh(z)
    return 1 - t * t


def _silu_derivative(z: torch.Tensor, _: float) -> torch.Tensor:
    s = torch.sigmoid(z)
    return s * (1 + z * (1 - s))


ACTIVATIONS: dict[str, Activation] = {
    "identity": Activation("identity", lambda z, _: z, lambda z, _: torch.ones_like(z)),
    "relu": Activation("relu", lambda z, _: F.relu(z), lambda z, _: (z > 0).to(z.dtype)),
    "leaky_relu": Activation(
        "leaky_relu",
        lambda z, a: F.leaky_relu(z, a),
        lambda z, a: torch.where(z > 0, torch.ones_like(z), torch.full_like(z, a)),
    ),
    "sigmoid": Activation("sigmoid", lambda z, _: torch.sigmoid(z), _sigmoid_derivative),
    "tanh": Activation("tanh", lambda z, _: torch.tanh(z), _tanh_derivative),
    "silu": Activation("silu", lambda z, _: F.silu(z), _silu_derivative),
}


def get_activation(name: str | None, where: str = "normalization") -> Activation:
    """Look up a fusable activation by name (None means identity)."""
    key = "identity" if name is None else str(name).lower()
    if key not in ACTIVATIONS:
        raise ValueError(
            f"{where}: activation must be one of {sorted(ACTIVATIONS)} or None, got {name!r}. "
            f"For another activation, apply it after the layer."
        )
    return ACTIVATIONS[key]
