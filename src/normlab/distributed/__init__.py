"""Across ranks: the one place the library talks to ``torch.distributed``.

- :mod:`normlab.distributed.stats`: the statistics protocol — checked headers, ONE
  all_gather of (count, mean, M2) per exchange, Chan's merge in float64, the checked
  backward all_reduce; what SyncBatchNorm and ``sync_running_stats`` are built on.
- :mod:`normlab.distributed.processes`: processes and groups normlab owns —
  :func:`process_group` (join, then free) and :func:`launch` (k local gloo workers).

Every public name of both is importable from here (``from normlab.distributed import
launch, merge_moments``), as when this was one module.
"""

from normlab.distributed.processes import WorkerError, launch, process_group, report
from normlab.distributed.stats import (
    HEADER_LEN,
    STATUS_FAILED,
    STATUS_OK,
    HeaderRows,
    SyncMismatchError,
    all_gather_moments,
    all_gather_rows,
    all_reduce_checked,
    all_reduce_sum,
    global_masked_moments,
    global_stats_source,
    handshake,
    is_distributed,
    merge_moments,
)

__all__ = [
    "HEADER_LEN",
    "STATUS_FAILED",
    "STATUS_OK",
    "HeaderRows",
    "SyncMismatchError",
    "WorkerError",
    "all_gather_moments",
    "all_gather_rows",
    "all_reduce_checked",
    "all_reduce_sum",
    "global_masked_moments",
    "global_stats_source",
    "handshake",
    "is_distributed",
    "launch",
    "merge_moments",
    "process_group",
    "report",
]
