"""Normalization layers: modules that hold state and call one functional each.

Like torch's own layers, each is a leaf of ``torch.fx`` tracing (one ``call_module``
node; see :mod:`normlab.nn._fx`), and the BatchNorm layers fuse with a Conv/Linear in
``torch.ao.quantization.fuse_modules``/``fuse_modules_qat`` (see
:mod:`normlab.tools.quantization`).
"""

from normlab.nn.batch_renorm import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d
from normlab.nn.batchnorm import BatchNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d
from normlab.nn.frozen_batch_norm import FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d
from normlab.nn.ghost_batch_norm import GhostBatchNorm1d, GhostBatchNorm2d, GhostBatchNorm3d
from normlab.nn.instancenorm import InstanceNorm1d, InstanceNorm2d, InstanceNorm3d
from normlab.nn.normalization import GroupNorm, LayerNorm, RMSNorm
from normlab.nn.syncbatchnorm import SyncBatchNorm

__all__ = [
    "BatchNorm",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchRenorm3d",
    "FrozenBatchNorm1d",
    "FrozenBatchNorm2d",
    "FrozenBatchNorm3d",
    "GhostBatchNorm1d",
    "GhostBatchNorm2d",
    "GhostBatchNorm3d",
    "GroupNorm",
    "InstanceNorm1d",
    "InstanceNorm2d",
    "InstanceNorm3d",
    "LayerNorm",
    "RMSNorm",
    "SyncBatchNorm",
]
