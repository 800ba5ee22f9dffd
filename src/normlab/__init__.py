"""normlab: batch normalization done right, fast, and measured.

import normlab as nl
bn = nl.nn.BatchNorm2d(64, activation="relu")      # drop-in for torch.nn.BatchNorm2d
y = nl.functional.batch_norm(x, rm, rv, training=True)
"""

from normlab import diagnostics, functional, nn, tools
from normlab.tools import (
    accumulate_stats,
    adapt,
    convert,
    fold,
    freeze,
    fuse,
    recalibrate,
    sync_running_stats,
    to_torch_for_quantization,
    unfreeze,
)

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "accumulate_stats",
    "adapt",
    "convert",
    "diagnostics",
    "fold",
    "freeze",
    "functional",
    "fuse",
    "nn",
    "recalibrate",
    "sync_running_stats",
    "to_torch_for_quantization",
    "tools",
    "unfreeze",
]
