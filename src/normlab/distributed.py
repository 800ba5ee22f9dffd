"""Statistics across ranks: the one place normlab talks to ``torch.distributed``.

Everything here is a no-op on a single process (no initialised process group, or a group
of size 1), so callers can use it unconditionally.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed(group=None) -> bool:
    """True when an initialised process group with more than one rank is in use."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def all_reduce_sum(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """Sum ``tensor`` over the ranks of ``group`` (in place) and return it; a no-op on one
    process. One collective per call: stack what you need to reduce into one tensor."""
    if is_distributed(group):
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor
