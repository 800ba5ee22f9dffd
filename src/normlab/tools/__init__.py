"""Model surgery for normalization layers: convert, freeze, fold, recalibrate, adapt, and
gradient-accumulation-aware statistics. Each works on torch's and normlab's layers alike.

Which tools mutate: ``freeze``/``unfreeze``, ``recalibrate``, ``adapt`` (hooks until
removed) and ``accumulate_stats`` (statistics on exit) change the model you pass;
``convert`` (unless ``inplace=True``) and ``fold`` return a new model.
"""

from normlab.tools.accumulate import accumulate_stats
from normlab.tools.adapt import Adaptation, adapt
from normlab.tools.convert import convert
from normlab.tools.fold import FoldResult, Unfolded, fold
from normlab.tools.freeze import freeze, unfreeze
from normlab.tools.fuse import FuseReport, fuse
from normlab.tools.recalibrate import recalibrate

__all__ = [
    "Adaptation",
    "FoldResult",
    "FuseReport",
    "Unfolded",
    "accumulate_stats",
    "adapt",
    "convert",
    "fold",
    "freeze",
    "fuse",
    "recalibrate",
    "unfreeze",
]
