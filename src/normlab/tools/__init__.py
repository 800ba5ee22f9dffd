"""Model surgery for normalization layers: convert, freeze, fold, recalibrate, adapt,
gradient-accumulation-aware statistics, and running statistics synchronised across ranks.
Each works on torch's and normlab's layers alike.

Which tools mutate: ``freeze``/``unfreeze``, ``recalibrate``, ``adapt`` (hooks until
removed), ``accumulate_stats`` (statistics on exit) and ``sync_running_stats`` change the
model you pass; ``convert`` (unless ``inplace=True``) and ``fold`` return a new model.
"""

from normlab.tools.accumulate import accumulate_stats
from normlab.tools.adapt import Adaptation, adapt
from normlab.tools.convert import convert
from normlab.tools.fold import FoldResult, Unfolded, fold
from normlab.tools.freeze import freeze, unfreeze
from normlab.tools.recalibrate import recalibrate
from normlab.tools.sync_stats import SyncReport, sync_running_stats

__all__ = [
    "Adaptation",
    "FoldResult",
    "SyncReport",
    "Unfolded",
    "accumulate_stats",
    "adapt",
    "convert",
    "fold",
    "freeze",
    "recalibrate",
    "sync_running_stats",
    "unfreeze",
]
