"""The layer table: every normlab layer × constructor arguments × input shape, with an
independent expectation for each (torch's counterpart, or a float64 reference from
``tests/reference.py``). ``test_descriptors.py`` runs the generic tests over it, as
dm-haiku's ``descriptors.py`` drives its integration tests.

A case's ``expected(layer, x)`` receives a *copy* of the layer taken before the call and
returns ``(y, owner)``: the expected output, and a module whose parameters received the
expected gradients (after ``y.backward``) and whose buffers hold the expected state
after the call. It must work for float32 and float64 layers and inputs.

``fused`` lists the modes ('train', 'eval') in which the layer reaches normlab's fused
kernels (``normlab.kernels``) under ``NORMLAB_KERNELS=numba``, in a call with gradients or
in inference (no grad): the generic tests run such a case in such a mode on both paths,
``numba`` and ``torch``, and check that the kernels ran on the one and not on the other.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

import normlab as nl
from tests import reference as ref


@dataclass(frozen=True)
class Case:
    id: str
    make: Callable[[], torch.nn.Module]  # float32 layer with randomised state
    shape: tuple[int, ...]
    expected: Callable[[torch.nn.Module, torch.Tensor], tuple[torch.Tensor, torch.nn.Module]]
    batch_stats: bool = False  # training mode uses batch statistics (train ≠ eval)
    channels_last: bool = False  # 4-D per-channel layer: the output keeps channels-last
    gradgrad: bool = True
    fused: tuple[str, ...] = ()  # modes reaching the kernels (test_fused_matches_dispatch)
    errors: tuple[tuple[tuple[int, ...], type, str], ...] = field(default=())


def _randomise(m: torch.nn.Module, *, mean_offset: float = 0.0, var_scale: float = 1.0):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, t in list(m.named_parameters()) + list(m.named_buffers()):
            if not t.is_floating_point():
                continue
            if name.endswith("running_var"):
                t.copy_((torch.rand(t.shape, generator=g) + 0.5) * var_scale)
            elif name.endswith("running_mean"):
                t.copy_(torch.randn(t.shape, generator=g) * 0.3 + mean_offset)
            elif name.endswith("weight"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            else:
                t.copy_(torch.randn(t.shape, generator=g) * 0.5)
    return m


def _made(factory, **randomise):
    return lambda: _randomise(factory(), **randomise)


def via_torch(factory):
    """Expectation: torch's own layer, loaded with our state_dict, in the same mode."""

    def expected(layer, x):
        t = factory().to(x.dtype)
        t.load_state_dict(layer.state_dict())
        t.train(layer.training)
        return t(x), t

    return expected


def _ema_(layer, mean, var):
    with torch.no_grad():
        m = layer.momentum
        layer.num_batches_tracked.add_(1)
        f = m if m is not None else 1.0 / int(layer.num_batches_tracked)
        layer.running_mean.mul_(1 - f).add_(f * mean.to(layer.running_mean.dtype))
        layer.running_var.mul_(1 - f).add_(f * var.to(layer.running_var.dtype))


def bn_reference(channel_dim=1):
    def expected(layer, x):
        if not layer.training:
            y = ref.batch_norm_eval(
                x,
                layer.running_mean,
                layer.running_var,
                layer.weight,
                layer.bias,
                layer.eps,
                channel_dim,
            )
            return y, layer
        y = ref.batch_norm_train(x, layer.weight, layer.bias, layer.eps, channel_dim)
        mean, _, unbiased, _ = ref.batch_stats(x.detach(), channel_dim)
        _ema_(layer, mean, unbiased)
        return y, layer

    return expected


def renorm_reference(layer, x):
    if not layer.training:
        return bn_reference()(layer, x)
    step = int(layer.num_batches_tracked)
    r_max, d_max = ref.renorm_limits(
        step, layer.r_max, layer.d_max, layer.warmup_steps, layer.r_max_steps, layer.d_max_steps
    )
    y = ref.batch_renorm_train(
        x,
        layer.running_mean,
        layer.running_var,
        layer.weight,
        layer.bias,
        layer.eps,
        r_max,
        d_max,
    )
    mean, _, unbiased, _ = ref.batch_stats(x.detach())
    _ema_(layer, mean, unbiased)
    return y, layer


def ghost_reference(layer, x):
    if not layer.training:
        return bn_reference()(layer, x)
    y, mean, within = ref.ghost_batch_norm_loop(
        x, layer.virtual_batch_size, layer.weight, layer.bias, layer.eps
    )
    _ema_(layer, mean, within)
    return y, layer


def frozen_reference(layer, x):
    y = ref.batch_norm_eval(
        x, layer.running_mean, layer.running_var, layer.weight, layer.bias, layer.eps
    )
    return y, layer


# Renorm cases run with the final limits from step 0 and running statistics far from the
# data's (mean 5, var ≈ 25), so r and d sit on their clip bounds: there they are locally
# constant in x, the paper's gradient is the true one, and gradcheck applies. The
# unclipped region is checked against the NumPy reference in test_batch_renorm.py.
_RENORM = {"r_max": 1.5, "d_max": 0.5, "warmup_steps": 0, "r_max_steps": 0, "d_max_steps": 0}
_BN_ERRORS_1D = (
    ((2, 3, 4, 4), ValueError, r"expected 2-D"),
    ((4, 5), ValueError, r"num_features=3.*5 channels"),
    ((1, 3), ValueError, r"more than 1 value per channel"),
)


CASES: list[Case] = [
    # -- BatchNorm (existing layers, in the table so they get the same generic tests) ---
    Case(
        "BatchNorm1d",
        _made(lambda: nl.nn.BatchNorm1d(3)),
        (5, 3),
        via_torch(lambda: torch.nn.BatchNorm1d(3)),
        batch_stats=True,
        errors=_BN_ERRORS_1D,
        fused=("train", "eval"),
    ),
    Case(
        "BatchNorm1d-noaffine-cumulative",
        _made(lambda: nl.nn.BatchNorm1d(3, affine=False, momentum=None)),
        (4, 3, 5),
        via_torch(lambda: torch.nn.BatchNorm1d(3, affine=False, momentum=None)),
        batch_stats=True,
        fused=("train", "eval"),
    ),
    Case(
        "BatchNorm2d",
        _made(lambda: nl.nn.BatchNorm2d(3)),
        (4, 3, 3, 2),
        via_torch(lambda: torch.nn.BatchNorm2d(3)),
        batch_stats=True,
        channels_last=True,
        errors=(((4, 3, 3), ValueError, r"expected 4-D"),),
        fused=("train", "eval"),
    ),
    Case(
        # no process group: SyncBatchNorm is plain BatchNorm (the multi-rank cases live in
        # tests/nn/test_syncbatchnorm.py)
        "SyncBatchNorm-single-process",
        _made(lambda: nl.nn.SyncBatchNorm(3)),
        (4, 3, 3, 2),
        via_torch(lambda: torch.nn.BatchNorm2d(3)),
        batch_stats=True,
        channels_last=True,
        fused=("train", "eval"),
    ),
    Case(
        "BatchNorm3d",
        _made(lambda: nl.nn.BatchNorm3d(2)),
        (3, 2, 2, 2, 2),
        via_torch(lambda: torch.nn.BatchNorm3d(2)),
        batch_stats=True,
        fused=("train", "eval"),
    ),
    Case(
        "BatchNorm-channel-last",
        _made(lambda: nl.nn.BatchNorm(3, channel_dim=-1)),
        (4, 5, 3),
        bn_reference(channel_dim=-1),
        batch_stats=True,
        fused=("train", "eval"),
    ),
    # -- BatchRenorm -------------------------------------------------------------------
    Case(
        "BatchRenorm1d",
        _made(lambda: nl.nn.BatchRenorm1d(3, **_RENORM), mean_offset=5.0, var_scale=25.0),
        (6, 3),
        renorm_reference,
        batch_stats=True,
        gradgrad=False,  # external statistics (StatsSource): no double backward
        errors=_BN_ERRORS_1D,
        fused=("eval",),
    ),
    Case(
        "BatchRenorm2d-warmup",  # default schedule at step 0: plain BatchNorm
        _made(lambda: nl.nn.BatchRenorm2d(3, momentum=0.3)),
        (4, 3, 2, 3),
        renorm_reference,
        batch_stats=True,
        channels_last=True,
        gradgrad=False,
        errors=(((4, 3, 3), ValueError, r"BatchRenorm2d: expected 4-D.*BatchRenorm1d"),),
        fused=("eval",),
    ),
    Case(
        "BatchRenorm3d",
        _made(lambda: nl.nn.BatchRenorm3d(2, **_RENORM), mean_offset=5.0, var_scale=25.0),
        (3, 2, 2, 2, 2),
        renorm_reference,
        batch_stats=True,
        gradgrad=False,
        fused=("eval",),
    ),
    # -- GhostBatchNorm ------------------------------------------------------------------
    Case(
        "GhostBatchNorm1d-merged-remainder",  # 5 = 2 + 3: a 1-row remainder is merged
        _made(lambda: nl.nn.GhostBatchNorm1d(3, virtual_batch_size=2)),
        (5, 3),
        ghost_reference,
        batch_stats=True,
        errors=_BN_ERRORS_1D,
        fused=("train", "eval"),
    ),
    Case(
        "GhostBatchNorm2d-remainder",  # 5 = 2 + 2 + 1 row of 4 values
        _made(lambda: nl.nn.GhostBatchNorm2d(3, virtual_batch_size=2)),
        (5, 3, 2, 2),
        ghost_reference,
        batch_stats=True,
        channels_last=True,
        fused=("train", "eval"),
    ),
    Case(
        "GhostBatchNorm3d",
        _made(lambda: nl.nn.GhostBatchNorm3d(2, virtual_batch_size=2, momentum=None)),
        (4, 2, 2, 2, 2),
        ghost_reference,
        batch_stats=True,
        fused=("eval",),
    ),
    # -- FrozenBatchNorm -----------------------------------------------------------------
    Case(
        "FrozenBatchNorm1d",
        _made(lambda: nl.nn.FrozenBatchNorm1d(3)),
        (5, 3),
        frozen_reference,
        errors=(((2, 3, 4, 4), ValueError, r"FrozenBatchNorm1d: expected 2-D"),),
        fused=("train", "eval"),
    ),
    Case(
        "FrozenBatchNorm2d",
        _made(lambda: nl.nn.FrozenBatchNorm2d(3)),
        (1, 3, 1, 1),  # one value per channel is fine: no batch statistics
        frozen_reference,
        channels_last=True,
        errors=(((2, 4, 1, 1), ValueError, r"num_features=3.*4 channels"),),
        fused=("train", "eval"),
    ),
    Case(
        "FrozenBatchNorm3d",
        _made(lambda: nl.nn.FrozenBatchNorm3d(2, eps=0.1)),
        (2, 2, 2, 1, 3),
        frozen_reference,
        fused=("train", "eval"),
    ),
    # -- LayerNorm, GroupNorm, InstanceNorm, RMSNorm: torch's counterparts ---------------
    Case(
        "LayerNorm",
        _made(lambda: nl.nn.LayerNorm((3, 4))),
        (2, 5, 3, 4),
        via_torch(lambda: torch.nn.LayerNorm((3, 4))),
        errors=(((2, 5, 4, 3), ValueError, r"normalized_shape=\[3, 4\].*last 2 dim"),),
    ),
    Case(
        "LayerNorm-nobias",
        _made(lambda: nl.nn.LayerNorm(4, bias=False)),
        (3, 4),
        via_torch(lambda: torch.nn.LayerNorm(4, bias=False)),
    ),
    Case(
        "LayerNorm-noaffine",
        _made(lambda: nl.nn.LayerNorm((2, 3, 2), elementwise_affine=False)),
        (2, 2, 3, 2),
        via_torch(lambda: torch.nn.LayerNorm((2, 3, 2), elementwise_affine=False)),
        fused=("train", "eval"),
    ),
    Case(
        "GroupNorm",
        _made(lambda: nl.nn.GroupNorm(2, 4)),
        (3, 4, 5),
        via_torch(lambda: torch.nn.GroupNorm(2, 4)),
        errors=(((3, 6, 5), ValueError, r"num_channels=4\) got an input with 6 channels"),),
    ),
    Case(
        "GroupNorm-2d-noaffine",
        _made(lambda: nl.nn.GroupNorm(3, 6, affine=False)),
        (2, 6, 2, 2),
        via_torch(lambda: torch.nn.GroupNorm(3, 6, affine=False)),
        channels_last=True,
    ),
    Case(
        "GroupNorm-3d-nobias",
        _made(lambda: nl.nn.GroupNorm(2, 4, bias=False)),
        (2, 4, 2, 1, 2),
        via_torch(lambda: torch.nn.GroupNorm(2, 4, bias=False)),
    ),
    Case(
        "InstanceNorm1d",
        _made(lambda: nl.nn.InstanceNorm1d(3)),
        (2, 3, 5),
        via_torch(lambda: torch.nn.InstanceNorm1d(3)),
        errors=(((2, 3, 1), ValueError, r"more than 1 spatial element"),),
    ),
    Case(
        "InstanceNorm2d-affine-tracked",
        _made(lambda: nl.nn.InstanceNorm2d(3, affine=True, track_running_stats=True)),
        (2, 3, 3, 2),
        via_torch(lambda: torch.nn.InstanceNorm2d(3, affine=True, track_running_stats=True)),
        batch_stats=True,
        channels_last=True,
        errors=(
            ((2, 3, 1, 1), ValueError, r"more than 1 spatial element"),
            ((2, 4, 3, 3), ValueError, r"num_features=3\) got an input with 4 channels"),
        ),
        fused=("eval",),  # the running statistics go through the affine kernel
    ),
    Case(
        "InstanceNorm3d-affine",
        _made(lambda: nl.nn.InstanceNorm3d(2, affine=True, momentum=0.3)),
        (2, 2, 2, 1, 3),
        via_torch(lambda: torch.nn.InstanceNorm3d(2, affine=True, momentum=0.3)),
    ),
    Case(
        "RMSNorm",
        _made(lambda: nl.nn.RMSNorm(4)),
        (3, 5, 4),
        via_torch(lambda: torch.nn.RMSNorm(4)),
        errors=(((3, 4, 5), ValueError, r"normalized_shape=\[4\]"),),
    ),
    Case(
        "RMSNorm-2d-eps-noaffine",
        _made(lambda: nl.nn.RMSNorm((2, 3), eps=1e-3, elementwise_affine=False)),
        (2, 2, 3),
        via_torch(lambda: torch.nn.RMSNorm((2, 3), eps=1e-3, elementwise_affine=False)),
    ),
]

# Every class exported by normlab.nn appears at least once (checked by a test).
