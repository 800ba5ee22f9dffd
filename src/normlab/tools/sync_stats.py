"""Running statistics made equal across ranks, before evaluation or a checkpoint.

Data-parallel training with per-rank (not synchronised) BatchNorm leaves every rank with
its own ``running_mean`` and ``running_var``: the EMA of its own batches. Evaluating on, or
saving, rank 0's alone throws away what the other ranks saw, and ranks that evaluate with
their own disagree. :func:`sync_running_stats` replaces every rank's buffers with one
common value that every rank computes identically from all of them.

Per layer and channel, rank k holds ``m_k = running_mean``, ``v_k = running_var`` and a
weight ``w_k``; the modes are

- ``'pooled'`` (default): the ranks' data as one population (the law of total variance),

      W = Σ w_k,   m = Σ w_k m_k / W,   var = Σ w_k (v_k + (m_k − m)²) / W

  the within-rank variance plus the between-rank variance of the means: the variance of
  the union of the ranks' data, which SyncBatchNorm on the global batch and
  :func:`normlab.recalibrate` across ranks also estimate. Merged in float64 with Chan,
  Golub & LeVeque's parallel formula (:func:`normlab.distributed.merge_moments`), so
  there is no Σx² − Wm² cancellation.
- ``'mean'``: ``m = mean_k m_k``, ``var = mean_k v_k``, what timm's
  ``distribute_bn(..., reduce=True)`` does. Offered for compatibility; it drops the
  between-rank term, so when the ranks' means differ (non-iid shards) the variance is
  too small by ``Σ_k (m_k − m)² / k``: data of the union is normalised to more than unit
  variance at evaluation.
- ``'broadcast'``: rank ``src``'s buffers, bit for bit, on every rank.

``num_batches_tracked`` becomes its maximum over the ranks (``'pooled'``, ``'mean'``:
each rank's own value when they trained in lockstep; it is the renorm clip schedule's step
and the length of a ``momentum=None`` average) or ``src``'s (``'broadcast'``). A layer
whose buffers already agree bit for bit on every rank is left untouched (SyncBatchNorm's,
which are global already; layers frozen with :func:`normlab.freeze` from one checkpoint).

Weights (``'pooled'``). ``counts=`` is this rank's amount of data behind its statistics
(e.g. its number of samples; only the ratios matter) and weighs every layer. Without it,
a BatchNorm layer with ``momentum=None`` (a cumulative average of ``num_batches_tracked``
batches) is weighted by ``num_batches_tracked``, and every other layer equally: an EMA
with momentum α summarises about its last 1/α batches however many a rank has run. A
rank with weight 0 contributes nothing and receives the result.

Bessel's correction. BN's ``running_var`` averages *unbiased* batch variances
(M2 / (n − 1) of n values per channel); ``'pooled'`` takes each ``v_k`` as its rank's
variance and does not apply the correction again to the union. Against one process that
stored the unbiased variance ``var_u`` of the union of one batch per rank (n_k values per
channel, ``w_k = n_k``, ``N = Σ n_k``), the result is exactly
``var_u + (Σ_k v_k − var_u) / N``. Since ``(N − 1) var_u ≥ Σ_k (n_k − 1) v_k``, that is
between −1/N and +1/(min n_k − 1) relative to ``var_u`` (within 2e-3 for batches of
8 × 8 × 8 values per channel), and it vanishes as batches grow.

Non-iid shards. Per-rank BN trains each rank on its own batch statistics, so no single
pair of statistics reproduces training when the ranks' data differ; ``'pooled'`` gives
the population statistics of all the data (Wu & Johnson's precise BN), ``'mean'`` the
average within-rank ones. With iid shards the between-rank term is only the noise of the
EMA means (relative ≈ α / ((2 − α) · n) per channel), and the modes nearly agree.

InstanceNorm layers with ``track_running_stats=True`` are synchronised too; their
``running_var`` averages per-instance variances, which exclude the spread of the instance
means, so ``'pooled'`` merges it without the between-rank term (``Σ w_k v_k / W``).

Collectives. Two per call, however many layers: one all_gather of a fixed-size header
(mode, ``src``, layer count, element count and a hash of every layer's kind, width and
dtypes), so ranks with different models or arguments raise
:class:`~normlab.distributed.SyncMismatchError` on every rank instead of meeting in
collectives of different sizes (which crash gloo); then the payload: every layer's
buffers flattened into one float64 row (exact for float16/bfloat16/float32 buffers and
counts below 2^53), one all_gather (``'pooled'``, ``'mean'``: O(k × elements) float64
per rank, so that every rank merges the same k rows with the stable formula) or one
broadcast (``'broadcast'``). A rank that never calls makes the others fail after the
process group's timeout (``init_process_group(..., timeout=...)`` or ``new_group``).

Reference: T. F. Chan, G. H. Golub, R. J. LeVeque, "Updating Formulae and a Pairwise
Algorithm for Computing Sample Variances", STAN-CS-79-773, 1979. Y. Wu, J. Johnson,
"Rethinking 'Batch' in BatchNorm", arXiv:2105.07576, 2021, §3.
"""

from __future__ import annotations

import hashlib
import numbers
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.modules.instancenorm import _InstanceNorm
from torch.nn.parameter import UninitializedBuffer

from normlab.distributed import (
    HeaderRows,
    all_gather_rows,
    is_distributed,
    merge_moments,
)

_WHERE = "sync_running_stats"
MODES = ("pooled", "mean", "broadcast")
_MODE_CODES = {mode: float(i + 1) for i, mode in enumerate(MODES)}
_MODE_NAMES = {code: mode for mode, code in _MODE_CODES.items()}
# Header row: [MAGIC, status, mode code, src, layers, elements, signature hash].
_MAGIC = 20210517.0  # Wu & Johnson's arXiv date; differs from SyncBatchNorm's header
_OK, _FAILED = 0.0, 1.0


@dataclass(frozen=True)
class SyncReport:
    """What :func:`sync_running_stats` did on this rank.

    Attributes:
        mode: ``'pooled'``, ``'mean'`` or ``'broadcast'``.
        world_size: ranks in the group; 1 when nothing was exchanged (no process group).
        layers: qualified names of the synchronised layers, in registration order (empty
            on one process and for a model without running statistics).
        elements: buffer elements synchronised on each rank (means, variances and
            ``num_batches_tracked`` counters).
    """

    mode: str
    world_size: int
    layers: tuple[str, ...]
    elements: int


@dataclass(frozen=True)
class _Layer:
    """A layer's place in the flattened row: ``[mean (C), var (C), nbt (0 or 1)]``."""

    name: str
    module: nn.Module
    instance: bool  # InstanceNorm: no between-rank term
    cumulative: bool  # BatchNorm with momentum=None: weighted by num_batches_tracked
    tracked: bool  # has a num_batches_tracked buffer
    channels: int
    offset: int  # in the payload row, after its weight slot

    @property
    def size(self) -> int:
        return 2 * self.channels + int(self.tracked)

    def signature(self) -> str:
        m = self.module
        kind = "instance" if self.instance else "batch"
        return (
            f"{kind}:{self.channels}:{m.running_mean.dtype}:{m.running_var.dtype}:"
            f"{self.tracked}:{self.cumulative}"
        )


def sync_running_stats(
    model: nn.Module,
    mode: str = "pooled",
    *,
    group=None,
    src: int = 0,
    counts: float | None = None,
) -> SyncReport:
    """Make the running statistics of every BN layer of ``model`` equal on all ranks of
    ``group``, **in place** (module docstring: formulas, weights, numerics).

    Every rank must call this at the same point with the same model structure, mode and
    ``src``. Layers: every ``torch.nn`` BatchNorm and InstanceNorm with running
    statistics (``_NormBase`` with ``running_mean``/``running_var``) and every normlab
    layer built on them — BatchNorm, SyncBatchNorm, batch renorm, ghost BN; layers with
    ``track_running_stats=False`` and no buffers, and FrozenBatchNorm (fixed statistics,
    not a ``_NormBase``), are left alone.

    Args:
        model: any module; one without running statistics is a no-op (0 layers).
        mode: ``'pooled'`` (count-weighted mean and pooled within- plus between-rank
            variance), ``'mean'`` (plain average of means and of variances, timm's) or
            ``'broadcast'`` (rank ``src``'s buffers).
        group: the process group (None: the default group).
        src: ``'broadcast'`` only: the global rank to copy from (torch.distributed's
            convention); it must belong to ``group``.
        counts: ``'pooled'`` only: this rank's weight, e.g. the number of samples behind
            its statistics (≥ 0; only ratios matter). None: ``num_batches_tracked`` for
            ``momentum=None`` BatchNorm layers, equal weights otherwise.

    Returns:
        A :class:`SyncReport`. Without an initialised process group, or with a group of
        one rank, nothing happens (``world_size=1``, no layers) — but bad arguments still
        raise.

    Raises:
        ValueError / TypeError: a bad ``mode``, ``src`` or ``counts``, or an uninitialised
            lazy layer. Raised by the rank at fault; the others raise
            :class:`~normlab.distributed.SyncMismatchError` instead of waiting.
        SyncMismatchError: on every rank, when the ranks' models (BN layers, widths,
            dtypes) or their ``mode``/``src`` differ.
        ValueError: on every rank, when a rank that contributes holds non-finite
            statistics or a negative variance (no buffer is changed).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"{_WHERE}: model must be an nn.Module, got {type(model).__name__}")
    error = _argument_error(mode, src, counts)
    if not is_distributed(group):
        if error is not None:
            raise error
        return SyncReport(mode, 1, (), 0)

    layers: list[_Layer] = []
    if error is None:
        try:
            layers = _find_layers(model)
            if mode == "broadcast":
                _check_src(src, group)
        except (TypeError, ValueError) as e:
            error = e
    device = _device(layers, group)
    elements = sum(layer.size for layer in layers)
    header = [
        _MAGIC,
        _FAILED if error is not None else _OK,
        _MODE_CODES.get(mode, 0.0),
        float(src) if mode == "broadcast" and error is None else 0.0,
        float(len(layers)),
        float(elements),
        float(_signature(layers)),
    ]
    heads = all_gather_rows(torch.tensor(header, dtype=torch.float64, device=device), group)
    if error is not None:
        raise error
    _check_headers(heads)
    world = dist.get_world_size(group)
    report = SyncReport(mode, world, tuple(layer.name for layer in layers), elements)
    if not layers:
        return report

    weight = 1.0 if counts is None else float(counts)
    row = _flatten(layers, weight, device)
    if mode == "broadcast":
        dist.broadcast(row, src=src, group=group)
        values = _broadcast_values(layers, row, src)
    else:
        values = _merged_values(layers, all_gather_rows(row, group), mode, counts is not None)
    _write(layers, values)
    return report


def _argument_error(mode, src, counts) -> Exception | None:
    """The error for bad arguments, or None (returned, not raised: a distributed caller
    first tells the other ranks, so they do not wait for it)."""
    if not isinstance(mode, str) or mode not in MODES:
        return ValueError(
            f"{_WHERE}: mode must be 'pooled' (count-weighted pooled variance, the default), "
            f"'mean' (plain average, timm's distribute_bn) or 'broadcast' (rank src's "
            f"buffers), got {mode!r}"
        )
    if isinstance(src, bool) or not isinstance(src, int) or src < 0:
        return ValueError(f"{_WHERE}: src must be a rank (an int ≥ 0), got {src!r}")
    if counts is None:
        return None
    if mode != "pooled":
        return ValueError(
            f"{_WHERE}: counts= weighs the ranks in mode='pooled' only ('mean' is the plain "
            f"average, 'broadcast' copies rank src); drop counts= or use mode='pooled'"
        )
    if isinstance(counts, torch.Tensor) and counts.numel() == 1:
        counts = counts.item()
    if isinstance(counts, bool) or not isinstance(counts, numbers.Real):
        return TypeError(
            f"{_WHERE}: counts must be a number (this rank's samples behind its statistics), "
            f"got {type(counts).__name__}"
        )
    if not (float(counts) >= 0 and float(counts) < float("inf")):
        return ValueError(
            f"{_WHERE}: counts must be finite and ≥ 0 (this rank's samples behind its "
            f"statistics; 0 for a rank that saw no data), got {counts!r}"
        )
    return None


def _find_layers(model: nn.Module) -> list[_Layer]:
    layers, offset = [], 0
    for name, m in model.named_modules():
        if not isinstance(m, _NormBase):
            continue
        mean, var = m.running_mean, m.running_var
        if mean is None or var is None:
            continue  # track_running_stats=False: nothing stored
        name = name or "<model>"
        if isinstance(mean, UninitializedBuffer) or isinstance(var, UninitializedBuffer):
            raise ValueError(
                f"{_WHERE}: layer {name!r} ({type(m).__name__}) has not been initialised yet; "
                f"run one forward pass (it infers num_features) before synchronising"
            )
        if mean.numel() != var.numel():
            raise ValueError(
                f"{_WHERE}: layer {name!r} has running_mean of {mean.numel()} elements but "
                f"running_var of {var.numel()}; load a consistent state_dict first"
            )
        instance = isinstance(m, _InstanceNorm)
        nbt = getattr(m, "num_batches_tracked", None)
        layer = _Layer(
            name=name,
            module=m,
            instance=instance,
            cumulative=not instance and m.momentum is None,
            tracked=isinstance(nbt, torch.Tensor),
            channels=mean.numel(),
            offset=offset,
        )
        layers.append(layer)
        offset += layer.size
    return layers


def _check_src(src: int, group) -> None:
    ranks = dist.get_process_group_ranks(group if group is not None else dist.group.WORLD)
    if src not in ranks:
        raise ValueError(
            f"{_WHERE}: src={src} is not a rank of the process group (global ranks "
            f"{ranks[:8]}{'…' if len(ranks) > 8 else ''}); pass one of them"
        )


def _device(layers: list[_Layer], group) -> torch.device:
    """Where the exchanged tensors live: the buffers' device; without buffers, the one the
    backend needs (NCCL exchanges CUDA tensors only)."""
    if layers:
        return layers[0].module.running_mean.device
    if "nccl" in str(dist.get_backend(group)).lower():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _signature(layers: list[_Layer]) -> int:
    """A 48-bit hash of every layer's kind, width and dtypes (exact in float64). hashlib,
    not ``hash()``: Python salts string hashes per process."""
    text = "|".join(layer.signature() for layer in layers)
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=6).digest(), "big")


def _check_headers(heads: torch.Tensor) -> None:
    """Raise the same error on every rank if the gathered headers disagree (``heads`` is
    identical on every rank after the all_gather, so every rank reaches the same verdict)."""
    rows = HeaderRows(heads, _WHERE)
    rows.expect(
        0,
        _MAGIC,
        "answered with a different collective; every rank must call sync_running_stats at "
        "the same point of the program",
    )
    rows.expect(
        1, _OK, "rejected the call (see the error raised there); nothing was changed on any rank"
    )
    rows.agree(
        [(_MODE_NAMES[h[2]], int(h[3])) for h in rows.rows],
        lambda per_rank: (
            f"{_WHERE}: the ranks passed different arguments ({per_rank}); pass the same "
            f"mode (and src) on every rank"
        ),
        show=lambda ms: f"{ms[0]!r}" + (f" src={ms[1]}" if ms[0] == "broadcast" else ""),
    )
    shapes = [(int(h[4]), int(h[5]), int(h[6])) for h in rows.rows]
    detail = ""
    if len({(n, e) for n, e, _ in shapes}) == 1:
        detail = " (same sizes, but different layer kinds, momentum=None or dtypes)"
    rows.agree(
        shapes,
        lambda per_rank: (
            f"{_WHERE}: the ranks' models differ ({per_rank}){detail}. Every rank must build "
            f"the same model: the same BN layers with the same num_features, "
            f"track_running_stats and dtype, in the same order"
        ),
        show=lambda shape: f"{shape[0]} layers, {shape[1]} elements",
        sep="; ",
    )


def _flatten(layers: list[_Layer], weight: float, device: torch.device) -> torch.Tensor:
    """``[weight, layer 0's mean, var, nbt, layer 1's ...]`` in float64."""
    parts = [torch.tensor([weight], dtype=torch.float64, device=device)]
    for layer in layers:
        m = layer.module
        parts.append(m.running_mean.detach().reshape(-1).to(device, torch.float64))
        parts.append(m.running_var.detach().reshape(-1).to(device, torch.float64))
        if layer.tracked:
            parts.append(m.num_batches_tracked.detach().reshape(1).to(device, torch.float64))
    return torch.cat(parts)


def _usable(means: torch.Tensor, variances: torch.Tensor) -> torch.Tensor:
    """``(k,)``: which ranks' rows hold finite means and finite, non-negative variances."""
    return (means.isfinite() & variances.isfinite() & (variances >= 0)).all(-1)


def _bad_statistics_error(bad: list[tuple[str, list[int]]]) -> ValueError:
    shown = "; ".join(f"{name!r} on rank(s) {ranks}" for name, ranks in bad[:5])
    more = f" and {len(bad) - 5} more layers" if len(bad) > 5 else ""
    return ValueError(
        f"{_WHERE}: non-finite running statistics or a negative running_var in {shown}{more}; "
        f"nothing was changed on any rank. Recalibrate those layers (nl.recalibrate), or "
        f"copy a healthy rank's with mode='broadcast', src=<that rank>"
    )


def _merged_values(
    layers: list[_Layer], rows: torch.Tensor, mode: str, counts_given: bool
) -> list[torch.Tensor]:
    """Each layer's new ``[mean, var, nbt]`` from the gathered ``(k, 1 + elements)`` rows."""
    k = rows.shape[0]
    given = rows[:, 0]
    if counts_given and not bool((given > 0).any()):
        raise ValueError(
            f"{_WHERE}: counts= is 0 on every rank, so no rank has statistics to contribute; "
            f"pass each rank's number of samples"
        )
    ones = torch.ones(k, dtype=torch.float64, device=rows.device)
    values, bad = [], []
    for layer in layers:
        start, c = 1 + layer.offset, layer.channels
        block = rows[:, start : start + layer.size]  # (k, 2C [+ 1])
        if bool((block == block[0]).all()):
            values.append(None)  # already equal on every rank: leave it bit for bit
            continue
        means, variances = block[:, :c], block[:, c : 2 * c]
        nbt = block[:, 2 * c] if layer.tracked else None
        if mode == "mean":
            weights = ones
        elif counts_given:
            weights = given
        elif layer.cumulative and nbt is not None and bool(nbt.sum() > 0):
            weights = nbt
        else:
            weights = ones
        present = weights > 0
        broken = present & ~_usable(means, variances)
        if bool(broken.any()):
            bad.append((layer.name, broken.nonzero().flatten().tolist()))
            continue
        if mode == "mean":
            mean, var = means.mean(0), variances.mean(0)
        else:
            # An absent rank may hold NaN: zero it rather than multiply 0 · NaN.
            scaled = torch.where(present.unsqueeze(-1), weights.unsqueeze(-1) * variances, 0.0)
            total, mean, m2 = merge_moments(weights, means, scaled)
            var = (scaled.sum(0) if layer.instance else m2) / total
        tail = [nbt.max().reshape(1)] if nbt is not None else []
        values.append(torch.cat([mean, var, *tail]))
    if bad:
        raise _bad_statistics_error(bad)
    return values


def _broadcast_values(layers: list[_Layer], row: torch.Tensor, src: int) -> list[torch.Tensor]:
    values, bad = [], []
    for layer in layers:
        start, c = 1 + layer.offset, layer.channels
        block = row[start : start + layer.size]
        if not bool(_usable(block[:c], block[c : 2 * c])):
            bad.append((layer.name, [src]))
        values.append(block)
    if bad:
        raise _bad_statistics_error(bad)
    return values


def _write(layers: list[_Layer], values: list[torch.Tensor | None]) -> None:
    """Store every layer's new buffers (all checks passed before: nothing is half-written)."""
    with torch.no_grad():
        for layer, value in zip(layers, values):
            if value is None:
                continue
            m, c = layer.module, layer.channels
            m.running_mean.copy_(value[:c].view(m.running_mean.shape))
            m.running_var.copy_(value[c : 2 * c].view(m.running_var.shape))
            if layer.tracked:
                m.num_batches_tracked.copy_(value[2 * c])
