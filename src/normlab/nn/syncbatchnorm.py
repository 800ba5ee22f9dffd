"""Synchronised batch normalization over ``torch.distributed``, on any backend.

torch's ``SyncBatchNorm`` refuses CPU tensors ("SyncBatchNorm expected input tensor to be
on GPU…") and DDP refuses CPU modules that contain it, so gloo, CPU clusters and CI
cannot use it. normlab's uses only torch's collectives and the one normalization engine,
so it runs wherever ``torch.distributed`` runs.
"""

from __future__ import annotations

from functools import partial

import torch
from torch.nn.modules.batchnorm import _BatchNorm

from normlab import distributed
from normlab.nn._fx import Proxy, call_as_leaf
from normlab.nn.batchnorm import BatchNorm, _NormlabBatchNorm

# Layers are numbered per process group in the order of their first synchronised call;
# the number rides in every exchange, so a rank that skips a layer (data-dependent control
# flow) meets a different number and every rank raises, instead of merging statistics of
# two different layers. Keyed by _group_key(); values: the next number to hand out.
_NEXT_TAG: dict[tuple, int] = {}


class SyncBatchNorm(_NormlabBatchNorm):
    """Batch normalization with the statistics of the global batch across ranks.

    In training, with an initialised process group of more than one rank, every rank
    normalises with the mean and biased variance of the union of all ranks' batches

        y = γ · (x − μ_global) / sqrt(σ²_global + ε) + β

    and the running statistics are updated from μ_global and the unbiased
    σ²_global · N/(N − 1), N the global count, so they are identical on every rank. The
    backward is the exact gradient of that global computation. Communication per layer
    and step: ONE all_gather in forward (per rank: a 6-number header, then the mean and
    the sum of squared deviations M2, merged with Chan et al.'s parallel formula
    in float64 — stable for ranks of very different sizes and scales) and ONE all_reduce in
    backward (Σ dy·γ and Σ dy·γ·x̂, float64). The first synchronised forward of a layer
    also exchanges the fixed-size header alone (a handshake) so that ranks that disagree
    on the channel count fail with a clear error on every rank rather than crash gloo.

    Edge cases: uneven per-rank batches; one sample per rank (valid while N > 1); empty
    ranks take part in the collectives; if every rank is empty the output is empty, the
    gradients of γ and β are zero and the running statistics are unchanged. N = 1 raises
    on every rank. No process group, a group of one rank, or eval mode: plain local batch
    norm, no collective. Every rank must run (and backpropagate through) the same
    SyncBatchNorm layers in the same order, as with torch's.

    Faults: ranks that disagree on the channel count or the input dtype, a rank whose
    input is rejected (wrong shape), and — after the first step — a rank that skips a
    layer (layers are numbered in order of first use and the number is exchanged) raise
    :class:`normlab.distributed.SyncMismatchError` on every rank. A rank that never
    arrives makes the others fail after the process group's timeout — set it with
    ``init_process_group(..., timeout=timedelta(...))`` or ``new_group(..., timeout=...)``
    (torch's default is 30 minutes). Not caught: a rank that skips a layer on its very
    first call while the next layer has the same channel count (the numbering is then
    shifted consistently), and a skip between layers of different widths, where the
    exchanged sizes differ and gloo itself aborts ("Received data size doesn't match
    expected size"); both still end in an error or the timeout, never a silent hang.

    Args: those of :class:`torch.nn.SyncBatchNorm` (``num_features, eps=1e-5,
    momentum=0.1, affine=True, track_running_stats=True, process_group=None, device=None,
    dtype=None, *, bias=True``; ``process_group=None`` is the default group) plus
    normlab's keyword-only ``channel_dim`` (any input rank ≥ 2, channel at
    ``channel_dim``), ``activation``, ``negative_slope``, ``nonfinite`` and
    ``ema_debias`` and ``degenerate`` (see :class:`normlab.nn.BatchNorm`). The
    ``nonfinite`` policy acts on the global statistics, so every rank skips or raises
    together; ``degenerate`` on the global count (all ranks together <= 1 value per
    channel), identical on every rank.

    ``forward(input, mask=None)``: with a mask (see :class:`normlab.nn.BatchNorm`) each
    rank's count is that of its counted positions, so the statistics are those of the
    concatenated valid positions of all ranks; forward gathers (count, mean, M2) as above,
    backward all-reduces the gradients of the global mean and variance (torch ops, not the
    kernels). Every rank must pass a mask or none.

    Buffers and ``state_dict`` keys are those of ``torch.nn.SyncBatchNorm`` and
    ``BatchNorm*d``. It deliberately does *not* subclass ``torch.nn.SyncBatchNorm``: DDP
    rejects every module of that class on CPU ("SyncBatchNorm layers only work with GPU
    modules").

    References: Ioffe & Szegedy, ICML 2015 (batch normalization); Peng et al., "MegDet",
    CVPR 2018 (cross-GPU batch normalization); Chan, Golub & LeVeque 1979 (merge).
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group=None,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
        channel_dim: int = 1,
        activation: str | None = None,
        negative_slope: float = 0.01,
        nonfinite: str = "skip",
        ema_debias: bool = False,
        degenerate: str = "error",
    ) -> None:
        if isinstance(channel_dim, bool) or not isinstance(channel_dim, int):
            raise TypeError(f"SyncBatchNorm: channel_dim must be an int, got {channel_dim!r}")
        super().__init__(
            num_features,
            eps,
            momentum,
            affine,
            track_running_stats,
            device,
            dtype,
            bias=bias,
            activation=activation,
            negative_slope=negative_slope,
            nonfinite=nonfinite,
            ema_debias=ema_debias,
            degenerate=degenerate,
        )
        self._channel_dim = channel_dim
        self.process_group = process_group
        self._handshaken: tuple | None = None  # the group this layer has agreed shapes with
        self._tag = 0  # this layer's number in that group (see _NEXT_TAG)

    @property
    def channel_dim(self) -> int:
        return self._channel_dim

    def _sync_active(self) -> bool:
        # torch's rule: synchronise batch statistics in training only; eval with
        # track_running_stats=False uses local batch statistics.
        return self.training and distributed.is_distributed(self.process_group)

    def _group_key(self) -> tuple:
        # The default group resolved to its object: a re-initialised default group is a new
        # group and gets a new handshake.
        group = self.process_group or torch.distributed.GroupMember.WORLD
        return (id(group), torch.distributed.get_world_size(self.process_group))

    def forward(self, input: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if isinstance(input, Proxy):  # torch.fx tracing: one call_module node (see nn/_fx.py)
            return call_as_leaf(self, input)
        if not self._sync_active():
            return super().forward(input, mask=mask)
        where = type(self).__name__
        key = self._group_key()
        first = self._handshaken != key
        tag = _NEXT_TAG.get(key, 0) if first else self._tag
        try:
            self._check_input_dim(input)
        except (TypeError, ValueError):
            # Tell the other ranks before raising, so they fail now instead of waiting for
            # this rank until the process group times out.
            self._announce_failure(first, tag, input, where)
            raise
        if first:
            distributed.handshake(
                self.num_features,
                input.dtype,
                self.process_group,
                where=where,
                device=input.device,
                tag=tag,
            )
            # Only after it succeeded on every rank: a failed handshake is retried next call
            # by every rank alike, so the ranks never disagree on whether one is due.
            self._handshaken, self._tag = key, tag
            _NEXT_TAG[key] = tag + 1
        if mask is not None:  # every rank gathers its own count of counted positions
            source_fn = partial(
                distributed.global_masked_moments, group=self.process_group, where=where,
                tag=tag, dtype=input.dtype,
            )  # fmt: skip
            return self._forward_with(input, source_fn, mask=mask)
        source_fn = partial(
            distributed.global_stats_source, group=self.process_group, where=where, tag=tag
        )
        return self._forward_with(input, source_fn)

    def _announce_failure(self, first: bool, tag: int, input: torch.Tensor, where: str) -> None:
        dtype = input.dtype if isinstance(input, torch.Tensor) else torch.float32
        device = input.device if isinstance(input, torch.Tensor) else None
        c = self.num_features
        try:
            if first:
                distributed.handshake(
                    c, dtype, self.process_group, where=where, ok=False, device=device, tag=tag
                )
            else:
                zeros = torch.zeros(c, dtype=torch.float64, device=device)
                distributed.all_gather_moments(
                    0,
                    zeros,
                    zeros,
                    self.process_group,
                    dtype=dtype,
                    where=where,
                    ok=False,
                    tag=tag,
                )
        except distributed.SyncMismatchError:
            pass  # expected: our own failure flag; the caller raises the real error

    @classmethod
    def convert_sync_batchnorm(cls, module: torch.nn.Module, process_group=None) -> torch.nn.Module:
        """Replace every batch-norm layer of ``module`` (torch's ``BatchNorm*d`` and
        ``SyncBatchNorm``, normlab's) by a normlab :class:`SyncBatchNorm`, as torch's
        classmethod of the same name does.

        Mutates ``module`` in place (children are replaced) and returns it, or the new layer
        if ``module`` itself is a batch-norm layer. The new layers share the old ones'
        parameters and buffers (torch's behaviour), keep ``training`` and normlab's extras
        (``activation``, ``nonfinite``, ``ema_debias``, ``channel_dim``).
        """
        out = module
        if isinstance(module, _BatchNorm) and not isinstance(module, cls):
            out = cls(
                module.num_features,
                module.eps,
                module.momentum,
                module.affine,
                module.track_running_stats,
                process_group,
                bias=module.bias is not None,
                **_extras(module),
            )
            _share_state(module, out)
        for name, child in module.named_children():
            out.add_module(name, cls.convert_sync_batchnorm(child, process_group))
        return out

    @classmethod
    def revert_sync_batchnorm(cls, module: torch.nn.Module) -> torch.nn.Module:
        """The inverse of :meth:`convert_sync_batchnorm`: every :class:`SyncBatchNorm` in
        ``module`` becomes a local :class:`normlab.nn.BatchNorm` (any rank, same
        ``channel_dim``), sharing parameters and buffers. Mutates and returns like
        :meth:`convert_sync_batchnorm`. For inference or single-process fine-tuning."""
        out = module
        if isinstance(module, cls):
            out = BatchNorm(
                module.num_features,
                module.eps,
                module.momentum,
                module.affine,
                module.track_running_stats,
                bias=module.bias is not None,
                **_extras(module),
            )
            _share_state(module, out)
        for name, child in module.named_children():
            out.add_module(name, cls.revert_sync_batchnorm(child))
        return out


def _extras(module: _BatchNorm) -> dict:
    if not isinstance(module, _NormlabBatchNorm):
        return {}
    return {
        "channel_dim": module._channel_dim,
        "activation": module.activation,
        "negative_slope": module.negative_slope,
        "nonfinite": module.nonfinite,
        "ema_debias": module.ema_debias,
        "degenerate": module.degenerate,
    }


def _share_state(src: _BatchNorm, dst: _BatchNorm) -> None:
    if src.affine:
        dst.weight = src.weight
        dst.bias = src.bias
    dst.running_mean = src.running_mean
    dst.running_var = src.running_var
    dst.num_batches_tracked = src.num_batches_tracked
    dst.training = src.training
    if hasattr(src, "qconfig"):
        dst.qconfig = src.qconfig
