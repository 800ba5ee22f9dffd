"""The keyword-only fused-activation option shared by normlab's layers."""

from __future__ import annotations

from normlab.functional.activations import get_activation


class FusedActivation:
    """Mixin: stores ``activation``/``negative_slope``, passes them to the layer's
    functional form (:meth:`_fused`) and describes them in ``repr`` (after the torch
    layer's own ``extra_repr``, which comes next in the MRO)."""

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

    def _fused(self, fn, input, *args, **kwargs):
        """``fn(input, *args, activation=…, negative_slope=…, **kwargs)``: the layer's
        functional form with its fused activation."""
        return fn(
            input, *args, activation=self.activation, negative_slope=self.negative_slope, **kwargs
        )

    def extra_repr(self) -> str:
        return super().extra_repr() + self._activation_repr()
