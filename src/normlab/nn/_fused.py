"""The keyword-only fused-activation option shared by normlab's layers."""

from __future__ import annotations

from normlab.functional.activations import get_activation


class FusedActivation:
    """Mixin: stores ``activation``/``negative_slope`` and describes them in ``repr``."""

    activation: str | None = None
    negative_slope: float = 0.01

    def _init_activation(self, activation: str | None, negative_slope: float) -> None:
        get_activation(activation, type(self).__name__)  # validates the name
        self.activation = None if activation in (None, "identity") else str(activation).lower()
        self.negative_slope = float(negative_slope)

    def _activation_repr(self) -> str:
        if self.activation is None:
            return ""
        s = f", activation={self.activation!r}"
        if self.activation == "leaky_relu":
            s += f", negative_slope={self.negative_slope}"
        return s
