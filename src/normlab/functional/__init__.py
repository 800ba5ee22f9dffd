"""Pure tensor math of normalization: statistics, normalise, affine + activation, EMA,
the dense Jacobian. No modules, no state beyond the buffers passed in."""

# the torch.library custom ops (normlab::batch_norm_train…) exist once normlab is
# imported, so compiled and exported graphs that hold them can run and load
from normlab.functional import traced
from normlab.functional.activations import ACTIVATIONS, get_activation
from normlab.functional.batch_norm import (
    NonFiniteStatisticsWarning,
    batch_norm,
    update_running_stats_,
)
from normlab.functional.ema import cumulative_factor, ema_debias, ema_update_
from normlab.functional.engine import (
    RunningUpdate,
    StatsSource,
    normalize_batch,
    normalize_with_stats,
)
from normlab.functional.fold import fold_weights
from normlab.functional.ghost import ghost_batch_norm
from normlab.functional.jacobian import batch_norm_jacobian
from normlab.functional.renorm import batch_renorm, renorm_clip_limits
from normlab.functional.sample_norms import group_norm, instance_norm, layer_norm, rms_norm
from normlab.functional.stats import moments

__all__ = [
    "ACTIVATIONS",
    "NonFiniteStatisticsWarning",
    "RunningUpdate",
    "StatsSource",
    "batch_norm",
    "batch_norm_jacobian",
    "batch_renorm",
    "cumulative_factor",
    "ema_debias",
    "ema_update_",
    "fold_weights",
    "get_activation",
    "ghost_batch_norm",
    "group_norm",
    "instance_norm",
    "layer_norm",
    "moments",
    "normalize_batch",
    "normalize_with_stats",
    "renorm_clip_limits",
    "rms_norm",
    "traced",
    "update_running_stats_",
]
