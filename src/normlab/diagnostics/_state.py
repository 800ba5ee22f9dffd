"""Leave the caller's model as it was found: modes, buffers, parameters.

Every probe runs its forward/backward passes inside :func:`preserved`, so a BatchNorm
layer in training mode is probed with its *batch* statistics (the function the optimiser
actually sees) while its ``running_mean``, ``running_var`` and ``num_batches_tracked`` are
put back bit for bit afterwards, even if the probe raises. PyHessian instead calls
``model.eval()`` on the caller's model, which changes the function being probed.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch


@contextmanager
def preserved(
    model: torch.nn.Module, params: Sequence[torch.Tensor] | None = None
) -> Iterator[None]:
    """Snapshot every module's ``training`` flag and every buffer (and, if given, the
    values of ``params``); restore them in ``finally``.

    Buffers are copied back in place (``copy_``), so tensors the caller holds stay valid.
    Cost: one copy of the buffers (and of ``params``), negligible next to a forward pass.
    """
    modes = [(m, m.training) for m in model.modules()]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    saved = [] if params is None else [(p, p.detach().clone()) for p in params]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, value in buffers:
                b.copy_(value)
            for p, value in saved:
                p.copy_(value)
        for m, training in modes:
            m.training = training
