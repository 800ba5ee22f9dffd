"""The batch / loss convention shared by every probe.

A *batch* is either ``(inputs, target)`` — the loss is ``loss_fn(model(inputs), target)`` —
or a bare ``inputs`` tensor, and then ``loss_fn(model(inputs))``. Without a ``loss_fn``,
integer targets get cross-entropy and floating targets mean squared error.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

LossFn = Callable[..., torch.Tensor]


def split_batch(batch: Any, where: str) -> tuple[Any, Any]:
    """``(inputs, target)`` from a batch; target is None for a bare tensor."""
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    raise TypeError(
        f"{where}: batch must be an (inputs, target) pair or an inputs tensor, got "
        f"{type(batch).__name__}"
        + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
        + ". For a model taking several inputs, wrap it so that it takes one."
    )


def default_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy for integer class targets, mean squared error otherwise."""
    if not target.is_floating_point():
        return F.cross_entropy(output, target)
    return F.mse_loss(output, target)


def batch_loss(model: torch.nn.Module, batch: Any, loss_fn: LossFn | None, where: str):
    """The scalar loss of ``model`` on ``batch`` (see the module docstring)."""
    inputs, target = split_batch(batch, where)
    output = model(inputs)
    if target is None:
        if loss_fn is None:
            raise ValueError(
                f"{where}: the batch has no target, so pass loss_fn(output) -> scalar tensor, "
                f"or pass the batch as (inputs, target)."
            )
        loss = loss_fn(output)
    else:
        loss = (loss_fn or default_loss)(output, target)
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise ValueError(
            f"{where}: loss_fn must return a scalar tensor, got "
            f"{type(loss).__name__}{tuple(loss.shape) if isinstance(loss, torch.Tensor) else ''}"
        )
    return loss.reshape(())


def trainable_params(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no parameters with requires_grad=True to probe")
    return params
