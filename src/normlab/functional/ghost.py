"""Ghost batch normalization (Hoffer, Hubara & Soudry 2017) on the engine, vectorised.

The batch (dim 0) is split into consecutive *ghost* (virtual) batches of
``virtual_batch_size`` rows — ``torch.split`` semantics: full chunks, then one remainder
chunk of N mod vbs rows — and each is batch-normalised with its own statistics. The full
chunks are one view ``(G, vbs, *rest)`` reduced over every dim but (ghost, channel), so
all ghost batches are one engine call; the remainder is a second call. No Python loop.

Choices (the paper leaves them open or differs):
- A remainder chunk with one value per channel (1 row, no spatial extent) has no batch
  statistics. It is *merged with the preceding chunk* (which then has vbs + 1 rows)
  rather than raising, so a dataset size ≡ 1 (mod vbs) does not crash the last step. A
  ghost size that always gives one value per channel (vbs = 1 without spatial dims), or
  a whole batch of one value, raises.
- Running statistics are updated *once per call*, with the layer's momentum, from the
  ghost statistics: the mean is the count-weighted mean of the ghost means (= the batch
  mean) and the variance is the pooled *within-ghost* variance
  Σ_g Σ_i (x_i − μ_g)² / (m − G) (m values per channel, G ghost batches). That is the
  variance the training-time normalisation actually divided by (what eval should
  reproduce, as the paper's test mode averages the ghost σ's), and it is unbiased for
  i.i.d. data (each ghost loses one degree of freedom to its own mean); with G = 1 it is
  BatchNorm's n/(n−1) variance. The whole-batch variance would add the spread *between*
  ghost means, which the network never saw in training. Hoffer et al.'s Algorithm 1
  instead folds the G ghost statistics in as G successive EMA steps, (1 − η)^G; one step
  per call keeps ``momentum`` meaning the same per optimizer step whatever vbs is.
- Ghost statistics are used whenever batch statistics are (training, or a layer without
  running statistics); eval with running statistics is plain BatchNorm.
"""

from __future__ import annotations

import torch

from normlab.functional._bn_checks import warn_if_skipped
from normlab.functional.batch_norm import _batch_norm, _check_batch_norm, update_running_stats_
from normlab.functional.engine import normalize_batch, view_params
from normlab.functional.options import BNOptions


def check_virtual_batch_size(virtual_batch_size: int, where: str) -> int:
    if (
        isinstance(virtual_batch_size, bool)
        or not isinstance(virtual_batch_size, int)
        or virtual_batch_size < 1
    ):
        raise ValueError(
            f"{where}: virtual_batch_size must be a positive int (rows per ghost batch), got "
            f"{virtual_batch_size!r}; Hoffer et al. (2017) use 128."
        )
    return virtual_batch_size


def ghost_chunks(batch: int, virtual_batch_size: int, values_per_row: int) -> tuple[int, int]:
    """``(num_full, tail_rows)``: how a batch of ``batch`` rows is split — ``num_full``
    chunks of ``virtual_batch_size`` rows, then one chunk of ``tail_rows`` rows (0: none).
    A remainder of one value per channel (1 row × ``values_per_row`` = 1) is merged into
    the preceding full chunk."""
    num_full, tail = divmod(batch, virtual_batch_size)
    if tail and tail * values_per_row == 1 and num_full:
        num_full, tail = num_full - 1, tail + virtual_batch_size
    return num_full, tail


def _ghost_batch_norm(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    training: bool,
    options: BNOptions,
    *,
    virtual_batch_size: int,
    num_batches_tracked: torch.Tensor | None = None,
) -> tuple[torch.Tensor, bool]:
    """:func:`ghost_batch_norm`, also returning whether a non-finite batch was skipped;
    ``options``: as :func:`normlab.functional.batch_norm._batch_norm` (``degenerate`` and
    ``save`` do not apply: one value per channel raises)."""
    where = options.where
    vbs = check_virtual_batch_size(virtual_batch_size, where)
    layout = _check_batch_norm(
        input, running_mean, running_var, weight, bias, training, options, num_batches_tracked,
        True,
    )  # fmt: skip
    dims, shape = layout.dims, layout.shape
    if layout.channel == 0:
        raise ValueError(
            f"{where}: channel_dim={options.channel_dim} is the batch dim; ghost batches split "
            f"dim 0, so the channels must be elsewhere (usually channel_dim=1)."
        )
    if not training:  # BatchNorm's eval: ghost batches only change training statistics
        return _batch_norm(
            input, running_mean, running_var, weight, bias, False, options, layout=layout
        )
    w, b = view_params(weight, shape), view_params(bias, shape)
    kw = {
        "eps": options.eps,
        "activation": options.activation,
        "negative_slope": options.negative_slope,
    }

    rows = input.shape[0]
    per_row = layout.n // rows if rows else 0  # values per row and channel
    if vbs * per_row == 1:
        raise ValueError(
            f"{where}: virtual_batch_size=1 gives every ghost batch one value per channel "
            f"(input of size {list(input.shape)} has no spatial extent), so their statistics "
            f"are undefined. Use virtual_batch_size >= 2."
        )
    if rows * per_row == 0:  # empty batch or empty spatial dims: statistics untouched
        y, _, _ = normalize_batch(input, dims, w, b, **kw)
        return y, False
    num_full, tail = ghost_chunks(rows, vbs, per_row)
    outputs, means, sq_sums = [], [], []
    if num_full:
        # (G·vbs, *rest) → (G, vbs, *rest): splitting dim 0 is a view for any strides.
        main = input[: num_full * vbs].view(num_full, vbs, *input.shape[1:])
        main_dims = (1, *(d + 1 for d in dims if d != 0))
        wg = None if w is None else w.unsqueeze(0)
        bg = None if b is None else b.unsqueeze(0)
        y, mean, var = normalize_batch(main, main_dims, wg, bg, **kw)
        outputs.append(y.reshape(num_full * vbs, *input.shape[1:]))
        m = vbs * per_row
        means.append(mean.reshape(num_full, -1).sum(0) * m)
        sq_sums.append(var.reshape(num_full, -1).sum(0) * m)
    if tail:
        y, mean, var = normalize_batch(input[num_full * vbs :], dims, w, b, **kw)
        outputs.append(y)
        m = tail * per_row
        means.append(mean.reshape(-1) * m)
        sq_sums.append(var.reshape(-1) * m)
    y = outputs[0] if len(outputs) == 1 else torch.cat(outputs, 0)
    if running_mean is None:
        return y, False
    total = rows * per_row
    ghosts = num_full + (1 if tail else 0)
    mean = sum(means) / total
    within = sum(sq_sums) / (total - ghosts)  # pooled within-ghost variance (unbiased)
    skipped = update_running_stats_(
        running_mean, running_var, mean, within, options.momentum,
        num_batches_tracked=num_batches_tracked, nonfinite=options.nonfinite, where=where,
    )  # fmt: skip
    return y, skipped


def ghost_batch_norm(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    *,
    virtual_batch_size: int,
    channel_dim: int = 1,
    activation: str | None = None,
    negative_slope: float = 0.01,
    nonfinite: str = "propagate",
    num_batches_tracked: torch.Tensor | None = None,
) -> torch.Tensor:
    """Ghost batch normalization: BatchNorm applied to each consecutive group of
    ``virtual_batch_size`` rows with that group's statistics (module docstring for the
    remainder, merging and running-statistics rules).

    Args:
        input: ``(N, C, *)`` (channel at ``channel_dim`` ≠ 0), floating point.
        running_mean, running_var: ``(C,)`` buffers or None; updated once per call from
            the ghost statistics (batch mean, pooled within-ghost unbiased variance).
        weight, bias: ``(C,)`` γ, β shared by all ghost batches, or None.
        training: ghost statistics if True, running statistics if False.
        momentum, eps, channel_dim, activation, negative_slope, nonfinite,
        num_batches_tracked: as :func:`normlab.functional.batch_norm`.
        virtual_batch_size: rows per ghost batch; ≥ N is plain BatchNorm.

    Reference: Hoffer, Hubara & Soudry, "Train longer, generalize better: closing the
    generalization gap in large batch training of neural networks", NeurIPS 2017,
    §4 and Algorithm 1.
    """
    options = BNOptions(
        momentum, eps, channel_dim, activation, negative_slope, nonfinite,
        where="ghost_batch_norm",
    )  # fmt: skip
    result = _ghost_batch_norm(
        input, running_mean, running_var, weight, bias, training, options,
        virtual_batch_size=virtual_batch_size, num_batches_tracked=num_batches_tracked,
    )  # fmt: skip
    return warn_if_skipped(result, "ghost_batch_norm")
