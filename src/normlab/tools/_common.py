"""Pieces every model tool shares: finding BN layers, per-layer moments accumulated over
many batches (and ranks), and hook bookkeeping that survives ``copy.deepcopy``."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from normlab.distributed import all_gather_rows, is_distributed, merge_moments
from normlab.functional.stats import centered_moments, reduce_count


def is_batch_norm(module: nn.Module) -> bool:
    """True for layers that keep BN running statistics and switch on ``training``: every
    ``torch.nn`` BatchNorm (SyncBatchNorm included) and every normlab layer built on it."""
    return isinstance(module, _BatchNorm)


def batch_norm_layers(model: nn.Module) -> list[tuple[str, _BatchNorm]]:
    """``(qualified name, layer)`` for each BN layer, once each, in registration order."""
    return [(name or "<model>", m) for name, m in model.named_modules() if is_batch_norm(m)]


def is_frozen_batch_norm(module: nn.Module) -> bool:
    """normlab's FrozenBatchNorm1d/2d/3d: BN's eval map with buffers only (not a
    ``_BatchNorm``: it has no training behaviour for the other tools to manage)."""
    from normlab.nn import FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d

    return isinstance(module, (FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d))


def renormalizes(module: nn.Module) -> bool:
    """Batch renorm compares the batch's statistics with the running ones in training, so it
    cannot run its training forward without them (``track_running_stats=False``)."""
    from normlab.nn import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d

    return isinstance(module, (BatchRenorm1d, BatchRenorm2d, BatchRenorm3d))


def channel_dim(module: nn.Module) -> int:
    """The channel dimension a BN layer normalises over (1 for torch; normlab's any-rank
    ``BatchNorm`` may use another)."""
    return int(getattr(module, "_channel_dim", 1))


def tracks_stats(module: nn.Module) -> bool:
    return bool(module.track_running_stats) and module.running_mean is not None


def set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at dotted ``name`` (``root.set_submodule`` without its checks
    on older torch)."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def replace_modules(
    root: nn.Module, replacement: Callable[[str, nn.Module], nn.Module | None]
) -> nn.Module:
    """Put ``replacement(name, module)`` in place of every submodule for which it returns a
    module (None keeps the module); return ``root``, or the replacement of ``root`` itself
    (``name == ''``) when the model is one such layer.

    Every replacement is decided on the model as it was (``named_modules`` with duplicates)
    before any is installed. A module registered under several names is asked about once
    and its one replacement goes under each name, so sharing survives.
    """
    memo: dict[int, nn.Module] = {}
    plan = []
    for name, module in root.named_modules(remove_duplicate=False):
        if id(module) in memo:
            plan.append((name, memo[id(module)]))
            continue
        new = replacement(name, module)
        if new is None:
            continue
        memo[id(module)] = new
        plan.append((name, new))
    for name, new in plan:
        if not name:
            return new  # the model itself was replaced
        set_submodule(root, name, new)
    return root


class Moments64:
    """Per-channel count, mean and sum of squared deviations (M2) of many tensors, in
    float64, merged with Chan, Golub & LeVeque's parallel formula (1979;
    :func:`normlab.distributed.merge_moments`):

        N = Σ n_i,   mean = Σ n_i mean_i / N,   M2 = Σ M2_i + Σ n_i (mean_i − mean)²

    Each tensor's own moments come from normlab's stable shifted two-pass statistics, so
    neither a large channel offset nor many batches cost precision; every value gets the
    same weight (count-weighted, not batch-weighted).
    """

    def __init__(self, num_features: int, device: torch.device | None = None) -> None:
        self.count = 0
        self.mean = torch.zeros(num_features, dtype=torch.float64, device=device)
        self.m2 = torch.zeros(num_features, dtype=torch.float64, device=device)

    def add(self, x: torch.Tensor, channel_dim: int = 1) -> None:
        """Fold in every value of ``x`` (channels at ``channel_dim``)."""
        x = x.detach()
        c = channel_dim % x.dim()
        dims = tuple(d for d in range(x.dim()) if d != c)
        n = reduce_count(x.shape, dims)
        if n == 0:
            return
        stats, _ = centered_moments(x, dims)
        mean = stats.mean.reshape(-1).double()
        m2 = stats.var.reshape(-1).double() * n
        self.merge(n, mean.to(self.mean.device), m2.to(self.m2.device))

    def merge(self, n: int, mean: torch.Tensor, m2: torch.Tensor) -> None:
        if n == 0:
            return
        counts = torch.tensor([self.count, n], dtype=torch.float64, device=mean.device)
        _, self.mean, self.m2 = merge_moments(
            counts, torch.stack([self.mean, mean]), torch.stack([self.m2, m2])
        )
        self.count += n

    @property
    def biased_var(self) -> torch.Tensor:
        return self.m2 / self.count

    @property
    def unbiased_var(self) -> torch.Tensor:
        """M2 / (n − 1): the convention of BN's ``running_var``."""
        return self.m2 / (self.count - 1)


_SAVED_BUFFERS = "_normlab_saved_buffers"


def _save_buffers_hook(module: nn.Module, args) -> None:
    saved = [(n, t.clone()) for n, t in module.named_buffers(recurse=False) if t is not None]
    module.__dict__.setdefault(_SAVED_BUFFERS, []).append(saved)


def _restore_buffers_hook(module: nn.Module, args, output) -> None:
    stack = module.__dict__.get(_SAVED_BUFFERS)
    if stack:
        with torch.no_grad():
            for name, value in stack.pop():
                getattr(module, name).copy_(value)


@contextmanager
def running_stats_untouched(layers: Iterable[nn.Module]) -> Iterator[None]:
    """Let BN layers run training-mode forwards (batch statistics) while their running
    statistics and ``num_batches_tracked`` stay as they are.

    Plain BN: ``track_running_stats=False`` for the duration (torch's own switch: batch
    statistics, no buffer update). Batch renorm needs its running statistics in training,
    so it keeps them, and a hook pair copies its buffers back after every forward (also
    when the forward raises). Everything is undone on exit.
    """
    flags, handles = [], []
    try:
        for m in layers:
            if renormalizes(m):
                handles.append(m.register_forward_pre_hook(_save_buffers_hook))
                handles.append(
                    m.register_forward_hook(_restore_buffers_hook, always_call=True, prepend=True)
                )
            else:
                flags.append((m, m.track_running_stats))
                m.track_running_stats = False
        yield
    finally:
        for h in handles:
            h.remove()
        for m, flag in flags:
            m.track_running_stats = flag


def all_reduce_moments(accumulators: list[Moments64], group=None) -> None:
    """Turn each rank's moments into the moments of all ranks' data, in place.

    ONE collective for the whole list (not per layer): every rank's ``(count, mean, M2)``
    of every accumulator in one all_gather, then Chan's merge in float64
    (:func:`normlab.distributed.merge_moments`, the one place it is written), which never
    forms a raw sum of squares. A no-op on one process.
    """
    if not accumulators or not is_distributed(group):
        return
    device = accumulators[0].mean.device
    row = torch.cat(
        [torch.cat([a.mean.new_tensor([float(a.count)]), a.mean, a.m2]) for a in accumulators]
    ).to(device)
    rows = all_gather_rows(row, group)  # (k, Σ (1 + 2C)), rank order
    offset = 0
    for a in accumulators:
        c = a.mean.numel()
        means = rows[:, offset + 1 : offset + 1 + c]
        m2s = rows[:, offset + 1 + c : offset + 1 + 2 * c]
        total, a.mean, a.m2 = merge_moments(rows[:, offset], means, m2s)
        a.count = round(float(total))
        offset += 1 + 2 * c


def iter_limited(batches: Iterable, num_batches: int | None) -> Iterator:
    """At most ``num_batches`` items of ``batches`` (all if None)."""
    for i, batch in enumerate(batches):
        if num_batches is not None and i >= num_batches:
            return
        yield batch


def check_num_batches(num_batches: int | None, where: str) -> None:
    if num_batches is None:
        return
    if isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches <= 0:
        raise ValueError(
            f"{where}: num_batches must be a positive int or None (use every batch), got "
            f"{num_batches!r}"
        )


def default_input(batch, where: str):
    """The model input inside a batch: a tensor itself, the first element of a tuple or
    list (``(inputs, targets)``), as ``torch.optim.swa_utils.update_bn`` does. Dicts and
    anything else need an explicit ``input_fn``."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch:
        return batch[0]
    if isinstance(batch, dict):
        keys = ", ".join(repr(k) for k in list(batch)[:5])
        raise TypeError(
            f"{where}: got a dict batch (keys {keys}); say which entry is the model input, "
            f"e.g. input_fn=lambda b: b['image']"
        )
    raise TypeError(
        f"{where}: cannot find the model input in a batch of type {type(batch).__name__}; "
        f"pass input_fn=... returning what model(...) takes"
    )


def remove_hooks_by_id(module: nn.Module, pre_id: int | None, post_id: int | None) -> None:
    """Remove hooks by the ids their handles had. Ids are keys in the module's own hook
    dicts, which ``copy.deepcopy`` copies, so this works on a copied model too (a stored
    ``RemovableHandle`` would still point at the original's dicts)."""
    if pre_id is not None:
        module._forward_pre_hooks.pop(pre_id, None)
    if post_id is not None:
        module._forward_hooks.pop(post_id, None)
        module._forward_hooks_always_called.pop(post_id, None)
