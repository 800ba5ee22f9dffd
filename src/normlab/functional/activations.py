"""Activations that normlab fuses into its normalization layers.

Each activation is applied to z = gamma * x_hat + beta. The backward pass recomputes z
from the saved input, so only its derivative *as a function of z* is needed here; that
is what lets a fused norm+activation layer save a single activation-sized tensor.

An activation is named by a string: 'identity' (or None), 'relu', 'leaky_relu' (slope:
the ``negative_slope`` argument), 'sigmoid', 'tanh', 'silu', 'relu6', 'hardswish',
'hardtanh' (bounds −1, 1), 'elu' (α = 1). Parameters other than the slope travel in the
name, so that every layer, the engine and the traced custom ops carry one string and
one float as before: ``'hardtanh(min_val, max_val)'`` and ``'elu(alpha)'``
(:func:`activation_name` builds them; the layers take ``min_val``/``max_val``/``alpha``
keywords). Forward and derivative follow torch's ``F.relu6``, ``F.hardtanh``,
``F.hardswish``, ``F.elu`` (Hendrycks & Gimpel; Howard et al., "Searching for
MobileNetV3", ICCV 2019, for hardswish; Clevert, Unterthiner & Hochreiter, "Fast and
Accurate Deep Network Learning by Exponential Linear Units", ICLR 2016, for ELU),
including their choices at the kinks: hardtanh' = 0 at the bounds, hardswish' = z/3 + 1/2
on [−3, 3], elu' = α·e^z for z ≤ 0.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Activation:
    name: str
    forward: Callable[[torch.Tensor, float], torch.Tensor]
    derivative: Callable[[torch.Tensor, float], torch.Tensor]  # d act / d z, at z
    # hardtanh/relu6: (min_val, max_val); elu: (alpha,); others ()
    params: tuple[float, ...] = ()
    # the same, writing into z (for a z nothing else holds and autograd does not track)
    forward_: Callable[[torch.Tensor, float], torch.Tensor] | None = None

    def apply_(self, z: torch.Tensor, negative_slope: float) -> torch.Tensor:
        """act(z), in place where this activation has an in-place form."""
        return (self.forward if self.forward_ is None else self.forward_)(z, negative_slope)


def derivative_from_output(act: Activation, negative_slope: float):
    """``act'(z)`` as a function of the output ``y = act(z)``, or None where y does not
    determine it. Exact for the piecewise-linear ones (relu: y > 0; relu6/hardtanh:
    lo < y < hi, 0 at the bounds as torch's hardtanh_backward; leaky_relu with slope > 0:
    y > 0), elu (α > 0: y + α below 0) and, as torch's own backward computes them,
    sigmoid (y·(1 − y)) and tanh (1 − y²). hardswish and silu are not monotone: no."""
    name = act.name
    if name == "identity":
        return lambda y: torch.ones_like(y)
    if name == "relu" or (name == "leaky_relu" and negative_slope == 0.0):
        return lambda y: (y > 0).to(y.dtype)
    if name == "leaky_relu" and negative_slope > 0.0:
        return lambda y: torch.where(y > 0, torch.ones_like(y), torch.full_like(y, negative_slope))
    if name in ("relu6", "hardtanh"):
        lo, hi = act.params
        return lambda y: ((y > lo) & (y < hi)).to(y.dtype)
    if name == "elu" and act.params[0] > 0.0:
        alpha = act.params[0]
        return lambda y: torch.where(y > 0, torch.ones_like(y), y + alpha)
    if name == "sigmoid":
        return lambda y: y * (1 - y)
    if name == "tanh":
        return lambda y: 1 - y * y
    return None


SAVE_MODES = ("input", "output")


def inverse_of(act: Activation, negative_slope: float):
    """``act⁻¹`` (y ↦ z) for the activations that are invertible (identity; leaky_relu
    with slope > 0: y/slope below 0; elu with α > 0: log1p(y/α) below 0), or None.
    For elu, y is clamped just above −α, where the output has saturated (z ≲ −17 in
    float32): there z is recovered only to about log(ulp), but dz = dy·(y + α) ≈ 0."""
    name = act.name
    if name == "identity":
        return lambda y: y.clone()
    if name == "leaky_relu" and negative_slope > 0.0:
        return lambda y: torch.where(y > 0, y, y / negative_slope)
    if name == "elu" and act.params[0] > 0.0:
        alpha = act.params[0]

        def inv(y: torch.Tensor) -> torch.Tensor:
            lo = -1.0 + torch.finfo(y.dtype).eps
            return torch.where(y > 0, y, torch.log1p((y / alpha).clamp(min=lo)))

        return inv
    return None


def check_save(save: str, activation: str | None, negative_slope: float, where: str) -> str:
    """Validate a layer's ``save`` mode: 'input' (default) or 'output', which needs an
    invertible activation (:func:`inverse_of`)."""
    if save not in SAVE_MODES:
        raise ValueError(f"{where}: save must be 'input' or 'output', got {save!r}")
    act = get_activation(activation, where)
    if save == "output" and inverse_of(act, negative_slope) is None:
        raise ValueError(
            f"{where}: save='output' recomputes the normalised input from the output, so it "
            f"needs an invertible activation: 'identity', 'leaky_relu' with negative_slope > 0 "
            f"or 'elu' with alpha > 0; got activation={activation!r}, negative_slope="
            f"{negative_slope!r}. Use save='input' (the default) for this layer."
        )
    return save


def _sigmoid_derivative(z: torch.Tensor, _: float) -> torch.Tensor:
    s = torch.sigmoid(z)
    return s * (1 - s)


def _tanh_derivative(z: torch.Tensor, _: float) -> torch.Tensor:
    t = torch.tanh(z)
    return 1 - t * t


def _silu_derivative(z: torch.Tensor, _: float) -> torch.Tensor:
    s = torch.sigmoid(z)
    return s * (1 + z * (1 - s))


def _hardswish_derivative(z: torch.Tensor, _: float) -> torch.Tensor:
    # torch's hardswish_backward: 0 below −3, z/3 + 1/2 on [−3, 3], 1 above
    inner = z / 3 + 0.5
    return torch.where(z < -3, torch.zeros_like(z), torch.where(z <= 3, inner, torch.ones_like(z)))


def _hardtanh(lo: float, hi: float, name: str) -> Activation:
    def forward(z: torch.Tensor, _: float) -> torch.Tensor:
        return F.hardtanh(z, lo, hi)

    def derivative(z: torch.Tensor, _: float) -> torch.Tensor:
        return ((z > lo) & (z < hi)).to(z.dtype)  # 0 at the bounds, as hardtanh_backward

    def forward_(z: torch.Tensor, _: float) -> torch.Tensor:
        return F.hardtanh_(z, lo, hi)

    return Activation(name, forward, derivative, (lo, hi), forward_)


def _elu(alpha: float) -> Activation:
    def forward(z: torch.Tensor, _: float) -> torch.Tensor:
        return F.elu(z, alpha)

    def derivative(z: torch.Tensor, _: float) -> torch.Tensor:
        return torch.where(z > 0, torch.ones_like(z), alpha * torch.exp(z))

    def forward_(z: torch.Tensor, _: float) -> torch.Tensor:
        return F.elu_(z, alpha)

    return Activation("elu", forward, derivative, (alpha,), forward_)


ACTIVATIONS: dict[str, Activation] = {
    "identity": Activation(
        "identity", lambda z, _: z, lambda z, _: torch.ones_like(z), (), lambda z, _: z
    ),
    "relu": Activation(
        "relu",
        lambda z, _: F.relu(z),
        lambda z, _: (z > 0).to(z.dtype),
        (),
        lambda z, _: torch.relu_(z),
    ),
    "leaky_relu": Activation(
        "leaky_relu",
        lambda z, a: F.leaky_relu(z, a),
        lambda z, a: torch.where(z > 0, torch.ones_like(z), torch.full_like(z, a)),
        (),
        lambda z, a: F.leaky_relu_(z, a),
    ),
    "sigmoid": Activation(
        "sigmoid",
        lambda z, _: torch.sigmoid(z),
        _sigmoid_derivative,
        (),
        lambda z, _: torch.sigmoid_(z),
    ),
    "tanh": Activation(
        "tanh", lambda z, _: torch.tanh(z), _tanh_derivative, (), lambda z, _: torch.tanh_(z)
    ),
    "silu": Activation(
        "silu", lambda z, _: F.silu(z), _silu_derivative, (), lambda z, _: F.silu(z, True)
    ),
    "relu6": _hardtanh(0.0, 6.0, "relu6"),
    "hardtanh": _hardtanh(-1.0, 1.0, "hardtanh"),
    "hardswish": Activation(
        "hardswish",
        lambda z, _: F.hardswish(z),
        _hardswish_derivative,
        (),
        lambda z, _: F.hardswish(z, True),
    ),
    "elu": _elu(1.0),
}


def activation_name(
    activation: str | None,
    *,
    min_val: float = -1.0,
    max_val: float = 1.0,
    alpha: float = 1.0,
    where: str = "normalization",
) -> str | None:
    """The activation string for ``activation`` with its parameters (None for identity):
    ``'hardtanh(min_val, max_val)'`` and ``'elu(alpha)'`` when they differ from torch's
    defaults (−1, 1 and 1), else the plain name. Validates the name and parameters."""
    act = get_activation(activation, where)
    if act.name == "hardtanh":
        lo, hi = (float(min_val), float(max_val))
        if (lo, hi) == (-1.0, 1.0):
            lo, hi = act.params  # as named ('hardtanh(0.0, 2.0)' or the default)
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise ValueError(
                f"{where}: hardtanh needs finite min_val < max_val, got min_val={min_val!r}, "
                f"max_val={max_val!r}"
            )
        return "hardtanh" if (lo, hi) == (-1.0, 1.0) else f"hardtanh({lo!r}, {hi!r})"
    if act.name == "elu":
        a = float(alpha) if float(alpha) != 1.0 else act.params[0]
        if not math.isfinite(a):
            raise ValueError(f"{where}: elu's alpha must be finite, got {alpha!r}")
        return "elu" if a == 1.0 else f"elu({a!r})"
    return None if act.name == "identity" else act.name


@functools.lru_cache(maxsize=64)
def _parametrised(key: str) -> Activation | None:
    """'hardtanh(lo, hi)' or 'elu(alpha)' as an Activation; None if ``key`` is neither."""
    for name in ("hardtanh", "elu"):
        if key.startswith(name + "(") and key.endswith(")"):
            try:
                values = tuple(float(v) for v in key[len(name) + 1 : -1].split(","))
            except ValueError:
                return None
            if name == "hardtanh" and len(values) == 2 and values[0] < values[1]:
                return _hardtanh(values[0], values[1], "hardtanh")
            if name == "elu" and len(values) == 1 and math.isfinite(values[0]):
                return _elu(values[0])
    return None


def get_activation(name: str | None, where: str = "normalization") -> Activation:
    """Look up a fusable activation by name (None means identity); see the module notes
    for the parametrised names."""
    key = "identity" if name is None else str(name).lower().replace(" ", "")
    act = ACTIVATIONS.get(key)
    if act is None:
        act = _parametrised(key)
    if act is None:
        raise ValueError(
            f"{where}: activation must be one of {sorted(ACTIVATIONS)}, 'hardtanh(min_val, "
            f"max_val)', 'elu(alpha)' or None, got {name!r}. For another activation, apply it "
            f"after the layer."
        )
    return act
