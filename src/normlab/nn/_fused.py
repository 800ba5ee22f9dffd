"""The keyword-only fused-activation option shared by normlab's layers."""

from __future__ import annotations

from normlab.functional.activations import get_activation


def activation_repr(activation: str | None, negative_slope: float) -> str:
    """The ``extra_repr`` part of a fused activation: none for None, the slope only for
    'leaky_relu'."""
    if activation is None:
        return ""
    s = f", activation={activation!r}"
    if activation == "leaky_relu":
        s += f", negative_slope={negative_slope}"
    return s


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
        return activation_repr(self.activation, self.negative_slope)

    def _fused(self, fn, input, *args, **kwargs):
        """``fn(input, *args, activation=…, negative_slope=…, **kwargs)``: the layer's
        functional form with its fused activation."""
        return fn(
            input, *args, activation=self.activation, negative_slope=self.negative_slope, **kwargs
        )

    def extra_repr(self) -> str:
        return super().extra_repr() + self._activation_repr()
