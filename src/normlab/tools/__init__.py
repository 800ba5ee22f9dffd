"""Model surgery for normalization layers: convert, freeze, fold, recalibrate, adapt,
gradient-accumulation-aware statistics, and running statistics synchronised across ranks.
Each works on torch's and normlab's layers alike.

Which tools mutate: ``freeze``/``unfreeze``, ``recalibrate``, ``adapt`` (hooks until
removed), ``accumulate_stats`` (statistics on exit) and ``sync_running_stats`` change the
model you pass; ``convert`` (unless ``inplace=True``), ``fold`` and
``to_torch_for_quantization`` (unless ``inplace=True``) return a new model.

Importing normlab registers fuser methods for its BN layers in torch.ao quantization's
default mapping, so ``torch.ao.quantization.fuse_modules``/``fuse_modules_qat`` accept them
(see :mod:`normlab.tools.quantization`).
"""

from normlab.tools.accumulate import accumulate_stats
from normlab.tools.adapt import Adaptation, adapt
from normlab.tools.convert import convert
from normlab.tools.fold import FoldResult, Unfolded, fold
from normlab.tools.freeze import freeze, unfreeze
from normlab.tools.fuse import FuseReport, fuse
from normlab.tools.quantization import (
    QuantizationFusionWarning,
    to_torch_for_quantization,
    torch_batch_norm,
)
from normlab.tools.recalibrate import recalibrate
from normlab.tools.sync_stats import SyncReport, sync_running_stats

__all__ = [
    "Adaptation",
    "FoldResult",
    "FuseReport",
    "QuantizationFusionWarning",
    "SyncReport",
    "Unfolded",
    "accumulate_stats",
    "adapt",
    "convert",
    "fold",
    "freeze",
    "fuse",
    "recalibrate",
    "sync_running_stats",
    "to_torch_for_quantization",
    "torch_batch_norm",
    "unfreeze",
]
