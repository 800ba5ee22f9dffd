"""Statistics across ranks: the protocol (headers, one all_gather, Chan's merge in float64).

The statistics helpers are no-ops on a single process (no initialised process group, or a
group of size 1), so callers can use them unconditionally. They only use torch's
collectives (``all_gather_single``/``all_gather_into_tensor``, ``all_reduce``), so they
run on every backend: gloo on CPU, NCCL on GPU, and any other registered backend.

Global moments (SyncBatchNorm, recalibration): each rank computes its local count, mean
and sum of squared deviations M2 with the stable shifted two-pass scheme
(:mod:`normlab.functional.stats`), the ranks exchange them in ONE ``all_gather``, and every
rank merges the k triples with Chan, Golub & LeVeque's parallel formula, in float64:

    N  = Σ n_i
    μ  = Σ n_i μ_i / N
    M2 = Σ M2_i + Σ n_i (μ_i − μ)²

Every term of M2 is a non-negative sum of squares about a mean, so nothing cancels: ranks
with very different sizes, offsets and scales merge to the statistics one process would
compute on the concatenated batch (the naive Σx² − Nμ² loses all digits for data far from
zero). Empty ranks contribute (0, 0, 0) and still take part in the collective.

Faults. The exchanged rows start with a small header (a magic number, a status flag, the
channel count, a dtype code, the count) so ranks that disagree on the channel count or
dtype, or a rank whose input was rejected, produce the same :class:`SyncMismatchError` on
every rank instead of wrong numbers; a layer tag in the header (SyncBatchNorm numbers its
layers in order of first use) catches a rank that skipped a layer. Collectives of
*different sizes* must never meet: gloo aborts the receiving process (``op.preamble.length <= op.nbytes``) and hands the other one
garbage. So the first synchronised call of a layer exchanges only the fixed-size header
(a handshake, once per layer and process group); afterwards each direction is one
collective. A rank that never arrives makes the others fail after the process group's
timeout: ``init_process_group(..., timeout=datetime.timedelta(seconds=60))`` or
``new_group(..., timeout=...)``. Gloo applies it to every blocked send/receive
("Timed out waiting 60000ms for recv operation to complete") and raises on the waiting
rank. torch's default is 30 min (10 min for NCCL, where the timeout aborts the process
asynchronously unless TORCH_NCCL_BLOCKING_WAIT is set).

Reference: T. F. Chan, G. H. Golub, R. J. LeVeque, "Updating Formulae and a Pairwise
Algorithm for Computing Sample Variances", Stanford CS tech. report STAN-CS-79-773, 1979.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.distributed as dist

from normlab.functional.engine import StatsSource
from normlab.functional.stats import Moments, centered_moments, reduce_count, work_dtype

# Header of every exchanged row: [MAGIC, status, channels, dtype code, count, tag].
_MAGIC = 20150211.0  # Ioffe & Szegedy's arXiv date; a value no foreign row starts with
HEADER_LEN = 6
STATUS_OK, STATUS_FAILED = 0.0, 1.0
_DTYPE_CODES = {torch.float16: 1.0, torch.bfloat16: 2.0, torch.float32: 3.0, torch.float64: 4.0}
_DTYPE_NAMES = {v: str(k).removeprefix("torch.") for k, v in _DTYPE_CODES.items()}


class SyncMismatchError(RuntimeError):
    """Ranks met in a SyncBatchNorm collective with incompatible inputs (channel count,
    dtype), or another rank could not run the layer. Raised on every rank of the group."""


def is_distributed(group=None) -> bool:
    """True when an initialised process group with more than one rank is in use."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def all_reduce_sum(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """Sum ``tensor`` over the ranks of ``group`` (in place) and return it; a no-op on one
    process. One collective per call: stack what you need to reduce into one tensor."""
    if is_distributed(group):
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


def merge_moments(
    counts: torch.Tensor, means: torch.Tensor, m2s: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Merge per-part moments with Chan et al.'s parallel formula (module docstring).

    Args:
        counts: ``(k,)`` elements behind each part's statistics (0 for an empty part).
        means: ``(k, C)`` per-part means (any value for an empty part; it gets weight 0).
        m2s: ``(k, C)`` per-part sums of squared deviations from the part's mean.

    Returns:
        ``(N, mean, M2)`` in float64: the total count (0-d), and ``(C,)`` mean and sum of
        squared deviations of the union; ``mean = 0``, ``M2 = 0`` when ``N = 0``.
    """
    counts = counts.double().unsqueeze(-1)  # (k, 1)
    means, m2s = means.double(), m2s.double()
    total = counts.sum(0)  # (1,)
    # An empty part may carry NaN statistics (the mean of nothing): zero them, not 0 · NaN.
    present = counts > 0
    means = torch.where(present, means, 0.0)
    m2s = torch.where(present, m2s, 0.0)
    mean = (counts * means).sum(0) / total.clamp_min(1.0)
    m2 = m2s.sum(0) + (counts * (means - mean).square()).sum(0)
    return total.squeeze(0), mean, m2


def _header(status: float, channels: int, dtype: torch.dtype, count: int, tag: int) -> list[float]:
    code = _DTYPE_CODES.get(dtype, 0.0)
    return [_MAGIC, status, float(channels), code, float(count), float(tag)]


class HeaderRows:
    """Every rank's header row after an all_gather, and the checks made on them.

    The rows are identical on every rank, so each check reaches the same verdict on every
    rank: either all ranks go on or all raise the same :class:`SyncMismatchError`
    (``"{where}: rank(s) [..] {why}"`` or a message naming each rank's value). Each header
    protocol (SyncBatchNorm's here, ``sync_running_stats``'s) makes its own checks in its
    own order with these two.
    """

    def __init__(self, rows: torch.Tensor, where: str) -> None:
        self.rows = rows.tolist()
        self.where = where

    def expect(self, column: int, value: float, why: str) -> None:
        """Raise unless every rank has ``value`` in ``column``; the message lists the
        ranks that do not."""
        bad = [r for r, h in enumerate(self.rows) if h[column] != value]
        if bad:
            raise SyncMismatchError(f"{self.where}: rank(s) {bad} {why}")

    def agree(self, values: list, message, show=str, sep: str = ", ") -> None:
        """Raise unless ``values`` (one per rank, read from :attr:`rows`) are all equal;
        ``message(per_rank)`` is the error, ``per_rank`` reading ``"rank 0: <show(value)>,
        rank 1: …"``."""
        if len(set(values)) > 1:
            per_rank = sep.join(f"rank {r}: {show(v)}" for r, v in enumerate(values))
            raise SyncMismatchError(message(per_rank))


def _check_headers(rows: torch.Tensor, where: str) -> None:
    """Raise the same error on every rank if the gathered header rows disagree (``rows``
    is ``(k, ≥ HEADER_LEN)``)."""
    heads = HeaderRows(rows[:, :HEADER_LEN], where)
    heads.expect(
        0,
        _MAGIC,
        "answered this layer's statistics exchange with a different collective. Every rank "
        "must run the same SyncBatchNorm layers in the same order in each forward (a rank "
        "skipped this layer, or runs different code).",
    )
    heads.agree(
        [int(h[5]) for h in heads.rows],
        lambda per_rank: (
            f"{where}: the ranks are at different SyncBatchNorm layers ({per_rank}, numbered "
            f"in order of first use). Every rank must run the same layers in the same order "
            f"in each forward: a rank skipped a layer (data-dependent control flow?) or the "
            f"models differ."
        ),
        show=lambda tag: f"#{tag}",
    )
    heads.expect(
        1,
        STATUS_OK,
        "rejected their input to this layer (see the error printed by that rank); the other "
        "ranks stop here too instead of waiting for a collective that will never come.",
    )
    heads.agree(
        [int(h[2]) for h in heads.rows],
        lambda per_rank: (
            f"{where}: ranks disagree on the number of channels ({per_rank}). Every rank must "
            f"build the same model: check num_features / out_channels on each rank."
        ),
    )
    heads.agree(
        [h[3] for h in heads.rows],
        lambda per_rank: (
            f"{where}: ranks disagree on the input dtype ({per_rank}). Feed every rank the same "
            f"dtype (the same autocast setting and .to(dtype) on every rank)."
        ),
        show=lambda code: _DTYPE_NAMES.get(code, "unknown"),
    )


def _all_gather_rows(row: torch.Tensor, group) -> torch.Tensor:
    world = dist.get_world_size(group)
    out = row.new_empty(world * row.numel())
    # torch 2.13 renamed all_gather_into_tensor (now deprecated) to all_gather_single.
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, row, group=group)
    return out.view(world, row.numel())


def all_gather_rows(row: torch.Tensor, group=None) -> torch.Tensor:
    """Every rank's 1-d ``row`` stacked in rank order, ``(k, len(row))``: ONE all_gather.

    ``row`` must have the same length and dtype on every rank (collectives of different
    sizes crash gloo: exchange a fixed-size header first when the ranks may disagree).
    """
    return _all_gather_rows(row, group)


def handshake(
    channels: int,
    dtype: torch.dtype,
    group=None,
    *,
    where: str = "handshake",
    ok: bool = True,
    device: torch.device | str | None = None,
    tag: int = 0,
) -> None:
    """Agree on the channel count and dtype before the first statistics exchange.

    One all_gather of a fixed-size header, so it is safe even when the ranks disagree on
    the size of what they are about to exchange. ``ok=False`` announces that this rank's
    input was rejected (the caller raises its own error afterwards); ``tag`` identifies
    the layer (the same on every rank). Raises :class:`SyncMismatchError` on every rank
    when the headers disagree.
    """
    status = STATUS_OK if ok else STATUS_FAILED
    header = _header(status, channels, dtype, 0, tag)
    row = torch.tensor(header, dtype=torch.float64, device=device)
    _check_headers(_all_gather_rows(row, group), where)


def all_gather_moments(
    count: int,
    mean: torch.Tensor,
    m2: torch.Tensor,
    group=None,
    *,
    dtype: torch.dtype | None = None,
    where: str = "all_gather_moments",
    ok: bool = True,
    tag: int = 0,
) -> tuple[int, torch.Tensor, torch.Tensor]:
    """Global ``(N, mean, M2)`` from every rank's ``(count, mean, M2)``: ONE all_gather.

    Args:
        count: elements behind this rank's statistics (0 for an empty rank, which must
            still call this).
        mean, m2: ``(C,)`` local mean and sum of squared deviations (any float dtype; the
            exchange and merge are float64).
        group: the process group (None: the default group).
        dtype: the input dtype, checked to agree across ranks (None: ``mean.dtype``).
        where: name used in error messages.
        ok: False announces that this rank's input was rejected: the other ranks raise
            :class:`SyncMismatchError` instead of waiting.
        tag: a small int naming the caller (a layer), equal on every rank; ranks that pass
            different tags raise :class:`SyncMismatchError`.

    Returns:
        ``(N, mean, M2)``: the global count (int) and float64 ``(C,)`` tensors. On one
        process, the local values (in float64).

    All ranks must pass the same C; call :func:`handshake` once first if they might not
    (collectives of different sizes crash gloo).
    """
    mean, m2 = mean.detach().reshape(-1), m2.detach().reshape(-1)
    if not is_distributed(group):
        return count, mean.double(), m2.double()
    status = STATUS_OK if ok else STATUS_FAILED
    head = _header(status, mean.numel(), dtype or mean.dtype, count, tag)
    head = torch.tensor(head, dtype=torch.float64, device=mean.device)
    row = torch.cat([head, mean.double(), m2.double()])  # on the input's device (NCCL: GPU)
    rows = _all_gather_rows(row, group)  # (k, HEADER_LEN + 2C)
    _check_headers(rows, where)
    c = mean.numel()
    total, gmean, gm2 = merge_moments(
        rows[:, 4], rows[:, HEADER_LEN : HEADER_LEN + c], rows[:, HEADER_LEN + c :]
    )
    return int(total), gmean, gm2


def all_reduce_checked(
    sums: torch.Tensor, group=None, *, where: str = "all_reduce", tag: int = 0
) -> torch.Tensor:
    """Sum ``sums`` over the ranks in float64 (ONE all_reduce) with a check; returns a new
    tensor of ``sums``' shape and dtype. A no-op on one process.

    Three numbers ride along: a magic number, ``tag`` and ``tag²``. The sum of k magic
    numbers is k · magic only if every rank contributed one (no rank is in a different
    collective); Σ tag = k · tag and Σ tag² = k · tag² on a rank hold only if every rank
    passed the same tag (the tags' variance is 0), so all ranks agree on the verdict.
    """
    if not is_distributed(group):
        return sums
    head = sums.new_tensor([_MAGIC, tag, tag * tag], dtype=torch.float64)
    flat = torch.cat([head, sums.double().reshape(-1)])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    world = dist.get_world_size(group)
    magic, tag_sum, tag_sq = flat[:3].tolist()
    if tag_sum != world * tag or tag_sq != world * tag * tag:
        raise SyncMismatchError(
            f"{where}: the ranks are in the backward of different SyncBatchNorm layers. Every "
            f"rank must backpropagate through the same layers (a rank whose loss does not "
            f"depend on a layer must still backpropagate through it, e.g. add "
            f"0 * output.sum() to its loss)."
        )
    if magic != world * _MAGIC:
        raise SyncMismatchError(
            f"{where}: the backward all-reduce was matched with a different collective on "
            f"some rank. Every rank must backpropagate through the same SyncBatchNorm layers "
            f"(a rank whose loss does not depend on this layer still has to call backward "
            f"through it, e.g. with a loss of 0 · output.sum())."
        )
    return flat[3:].view(sums.shape).to(sums.dtype)


def global_stats_source(
    x: torch.Tensor,
    dims: tuple[int, ...],
    group=None,
    *,
    where: str = "SyncBatchNorm",
    handshake_first: bool = False,
    tag: int = 0,
) -> tuple[StatsSource, int]:
    """Statistics of the global batch (the union of every rank's ``x``) for the engine.

    Forward: local shifted two-pass moments, ONE all_gather of (header, count, mean, M2),
    Chan's merge in float64 (:func:`all_gather_moments`). Backward: the engine hands the
    stacked sums ``[Σ dy·γ, Σ dy·γ·x̂]`` to ONE all_reduce (:func:`all_reduce_checked`)
    before dividing by the global count.

    Args:
        x: this rank's input; may be empty (it still takes part in the collectives).
        dims: the reduction dims (every dim but the channel dim, for BatchNorm).
        group: the process group; it must have more than one rank.
        where: name for error messages.
        handshake_first: exchange the fixed-size header alone first (the layer's first
            synchronised call), so ranks disagreeing on the channel count fail cleanly.
        tag: names the layer, equal on every rank (see :func:`all_gather_moments`).

    Returns:
        ``(source, N)``: a :class:`StatsSource` whose ``stats`` broadcast against ``x``
        (keepdim, mean as the pair shift + delta in the working dtype, biased variance in
        float64) and whose ``count`` is ``max(N, 1)``; and the global count ``N``
        (0 when every rank is empty: then mean 0 and variance 0, which normalise nothing).
    """
    wd = work_dtype(x.dtype)
    shape = [1 if d in dims else s for d, s in enumerate(x.shape)]
    channels = reduce_count(x.shape, [d for d in range(x.dim()) if d not in dims])
    if handshake_first:
        handshake(channels, x.dtype, group, where=where, device=x.device, tag=tag)
    n_local = reduce_count(x.shape, dims)
    if n_local > 0:
        local, _ = centered_moments(x, dims)
        mean = local.shift.double() + local.delta.double()
        m2 = local.var.double() * n_local
    else:
        mean = m2 = torch.zeros(shape, dtype=torch.float64, device=x.device)
    n, gmean, gm2 = all_gather_moments(
        n_local, mean, m2, group, dtype=x.dtype, where=where, tag=tag
    )
    gmean = gmean.view(shape)
    shift = gmean.to(wd)
    delta = (gmean - shift.double()).to(wd)  # what float32 could not hold of the mean
    var = (gm2 / max(n, 1)).view(shape)  # float64: the engine takes 1/sqrt in float64
    reduce_sums = partial(all_reduce_checked, group=group, where=where, tag=tag)
    return StatsSource(Moments(shift, delta, var), max(n, 1), reduce_sums), n


class _GlobalMaskedMoments(torch.autograd.Function):
    """Masked moments of the global batch, differentiable: forward ONE all_gather (as
    :func:`all_gather_moments`), backward ONE all_reduce of ``[∂L/∂mean, ∂L/∂var]``
    (every rank's loss uses the same global statistics, so their gradients add), then

        ∂mean/∂x_i = m_i / N,   ∂var/∂x_i = 2·m_i·(x_i − mean) / N

    (the mean's own term in ∂var vanishes: Σ m·(x − mean) = 0 over the global batch)."""

    @staticmethod
    def forward(ctx, x, m, dims, group, where, tag, dtype):
        from normlab.functional.masked import masked_moments

        count, mean, var = masked_moments(x, m, dims)
        n_local = int(count.reshape(-1)[0]) if count.numel() else 0
        n, gmean, gm2 = all_gather_moments(
            n_local, mean, var * n_local, group, dtype=dtype, where=where, tag=tag
        )
        shape = mean.shape
        gmean = gmean.view(shape).to(x.dtype)
        gvar = (gm2 / max(n, 1)).view(shape).to(x.dtype)
        ctx.save_for_backward(x, m, gmean)
        ctx.config = (n, group, where, tag)
        return x.new_tensor(float(n)), gmean, gvar

    @staticmethod
    def backward(ctx, _dcount, dmean, dvar):
        x, m, gmean = ctx.saved_tensors
        n, group, where, tag = ctx.config
        sums = all_reduce_checked(torch.stack([dmean, dvar]), group, where=where, tag=tag)
        n = max(n, 1)
        dx = sums[0] / n + sums[1] * (2.0 / n) * (x - gmean)
        dx = torch.where(m, dx, dx.new_zeros(()))
        return dx, None, None, None, None, None, None


def global_masked_moments(
    x: torch.Tensor,
    m: torch.Tensor,
    dims: tuple[int, ...],
    group=None,
    *,
    where: str = "SyncBatchNorm",
    tag: int = 0,
    dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(N, mean, var)`` of the counted positions (``m`` True) of every rank's ``x``
    together: N the global count (0-d, x's dtype), keepdim ``mean`` and biased ``var``,
    differentiable with respect to ``x`` (see :class:`_GlobalMaskedMoments`). Each rank
    gathers its own count, so padding never enters the merged statistics. Every rank must
    call it (and backpropagate through it when the statistics are used)."""
    return _GlobalMaskedMoments.apply(x, m, dims, group, where, tag, dtype or x.dtype)
