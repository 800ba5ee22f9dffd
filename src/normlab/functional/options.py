"""The options of a batch-norm call, in one type: what every variant (plain, masked,
residual, save-output, ghost, renorm, instance) and every layer passes along besides its
tensors.

Adding a BN option means a field here (and its check in :func:`check_options`), the
keyword of the public function that takes it, and the layer attribute the nn modules read
in :meth:`normlab.nn.batchnorm._NormlabBatchNorm._options`.

A ``NamedTuple`` of plain Python constants: cheap to build on every call, and dynamo,
export and vmap see constants, not an object to trace.
"""

from __future__ import annotations

from typing import NamedTuple

from normlab.functional import _checks


class BNOptions(NamedTuple):
    """The non-tensor arguments of a batch-norm call; defaults are
    :func:`normlab.functional.batch_norm`'s.

    Attributes:
        momentum: weight of the batch in the running statistics; None: cumulative average.
        eps: added to the variance.
        channel_dim: the channel dimension of the input.
        activation, negative_slope: the fused activation and the slope of 'leaky_relu'.
        nonfinite: what a batch with NaN/Inf statistics does ('propagate', 'skip', 'raise').
        degenerate: what training does with <= 1 value per channel ('error', 'eval', 'skip').
        save: what training keeps for backward ('input' or 'output').
        where: the name errors and warnings start with (the function or the layer class).
    """

    momentum: float | None = 0.1
    eps: float = 1e-5
    channel_dim: int = 1
    activation: str | None = None
    negative_slope: float = 0.01
    nonfinite: str = "propagate"
    degenerate: str = "error"
    save: str = "input"
    where: str = "batch_norm"


def check_options(options: BNOptions) -> None:
    """The value checks of the options that every call and every layer constructor runs
    (raising the documented ValueErrors, each naming the argument). The activation and
    ``save`` are checked where they are used (:func:`normlab.functional.activations`)."""
    where = options.where
    _checks.check_eps(options.eps, where)
    _checks.check_degenerate(options.degenerate, where)
    _checks.check_momentum(options.momentum, where)
    _checks.check_nonfinite(options.nonfinite, where)
