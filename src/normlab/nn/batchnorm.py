"""Drop-in batch normalization layers: ``BatchNorm1d/2d/3d`` and any-rank ``BatchNorm``.

Each class subclasses its torch counterpart (so ``isinstance(m, torch.nn.BatchNorm2d)``
and tools that look for BN layers keep working), has the same positional arguments,
defaults, buffers and ``state_dict`` keys, and replaces ``forward`` by one call into
:func:`normlab.functional.batch_norm`. Extras are keyword-only and default to torch's
behaviour except ``nonfinite='skip'``.
"""

from __future__ import annotations

import inspect
import warnings

import torch
from torch.nn.modules.batchnorm import _BatchNorm

from normlab import kernels
from normlab.functional import _checks
from normlab.functional._bn_checks import running_update, skipped_outcome
from normlab.functional.activations import activation_name, check_save
from normlab.functional.batch_norm import (
    NonFiniteStatisticsWarning,
    _batch_norm,
    _check_batch_norm,
)
from normlab.functional.ema import ema_debias
from normlab.functional.engine import BatchConfig, _normalize_batch
from normlab.functional.options import BNOptions, check_options
from normlab.kernels import traced
from normlab.nn._fused import activation_repr
from normlab.nn._fx import Proxy, call_as_leaf

_TORCH_HAS_BIAS_FLAG = "bias" in inspect.signature(_BatchNorm.__init__).parameters

# keyword-only extras (after channel_dim and the activation) and their defaults, in the
# order extra_repr lists those that differ
_REPR_DEFAULTS = (
    ("nonfinite", "skip"),
    ("ema_debias", False),
    ("degenerate", "error"),
    ("save", "input"),
)


class _NormlabBatchNorm(_BatchNorm):
    """Shared state and forward of normlab's batch normalization layers.

    y = act(γ · (x − E[x]) / sqrt(Var[x] + ε) + β), statistics per channel over every other
    dimension: the batch's in training (biased variance to normalise, unbiased in
    ``running_var``), the running estimates in eval.

    Args:
        num_features: C, the number of channels.
        eps: added to the variance. Default 1e-5.
        momentum: weight of the new batch in the running statistics; None for a cumulative
            average. Default 0.1 (torch's convention, 1 − Keras' momentum).
        affine: learn γ (``weight``) and β (``bias``). Default True.
        track_running_stats: keep ``running_mean``, ``running_var`` and
            ``num_batches_tracked``; if False, eval mode uses batch statistics too.
        device, dtype: of the parameters and buffers.
        bias: keyword-only; with ``affine=True``, learn β too (torch ≥ 2.13's flag).
        activation: keyword-only; fuse 'relu', 'leaky_relu', 'relu6', 'hardtanh',
            'hardswish', 'elu', 'sigmoid', 'tanh', 'silu' or 'identity' (None) after the
            affine, saving memory in backward (see ``normlab.functional.activations``).
        negative_slope: keyword-only; slope of 'leaky_relu'. Default 0.01.
        min_val, max_val: keyword-only; the bounds of 'hardtanh' (torch's defaults −1, 1;
            the layer's ``activation`` then reads ``'hardtanh(min_val, max_val)'``).
        alpha: keyword-only; α of 'elu' (default 1; ``activation`` reads ``'elu(alpha)'``).
        nonfinite: keyword-only; what a training batch with NaN/Inf statistics does to the
            running statistics: 'skip' (default) keeps the last good ones and
            ``num_batches_tracked`` and warns once per layer; 'raise' raises
            ``FloatingPointError`` before any state changes; 'propagate' updates them
            anyway, as torch does (torch#88474: one bad batch poisons them forever).
        ema_debias: keyword-only; if True, eval mode uses the de-biased running statistics
            (r_t − (1−μ)^t·r_0) / (1 − (1−μ)^t) (docs/sources.md#seed-002; r_0 = 0 for the
            mean, 1 for the variance), which removes the pull toward the initial values early
            in training. Stored buffers stay torch's raw EMA, so checkpoints are unchanged.
            See :meth:`population_stats`.
        save: keyword-only; what training keeps for backward: 'input' (default: x) or
            'output' (only y, In-Place ABN: Rota Bulò, Porzi & Kontschieder, CVPR 2018 §3;
            x̂ = (act⁻¹(y) − β)/γ is rebuilt in backward, so the layer and the next share
            one activation-sized tensor). 'output' needs 'identity', 'leaky_relu' (slope
            > 0) or 'elu' (α > 0) and a weight without zeros; no double backward. With
            a residual it keeps y and r (not x); eval and traced calls are unaffected.
        channel_dim: keyword-only (``BatchNorm`` only); the channel dimension.
        degenerate: keyword-only; what training does with <= 1 value per channel (batch 1
            without spatial dims, or a mask leaving <= 1 position): 'error' (default,
            torch's error), 'eval' (normalise with the running statistics, leave them and
            ``num_batches_tracked`` untouched) or 'skip' (return the input unchanged). See
            :func:`normlab.functional.batch_norm`. SyncBatchNorm decides on the global count.

    ``forward(input, mask=None)``: ``mask`` (bool, broadcastable to the input without its
    channel dim, True where a position counts) leaves padded positions out of every
    statistic and gradient; their outputs are the normalised value. See
    :func:`normlab.functional.batch_norm` and :mod:`normlab.functional.masked`. Not for
    BatchRenorm and GhostBatchNorm, which raise.

    Reference: Ioffe & Szegedy, "Batch Normalization: Accelerating Deep Network Training
    by Reducing Internal Covariate Shift", ICML 2015.
    """

    _channel_dim: int = 1
    save: str = "input"  # class default: layers pickled before the keyword existed

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
        activation: str | None = None,
        negative_slope: float = 0.01,
        min_val: float = -1.0,
        max_val: float = 1.0,
        alpha: float = 1.0,
        nonfinite: str = "skip",
        ema_debias: bool = False,
        degenerate: str = "error",
        save: str = "input",
    ) -> None:
        where = type(self).__name__
        if degenerate == "eval" and not track_running_stats:
            raise ValueError(
                f"{where}: degenerate='eval' normalises a batch of <= 1 value per channel with "
                f"the running statistics, but track_running_stats=False keeps none. Use "
                f"degenerate='skip' or 'error', or track_running_stats=True."
            )
        _checks.check_num_features(num_features, where)
        check_options(
            BNOptions(momentum, eps, nonfinite=nonfinite, degenerate=degenerate, where=where)
        )
        activation = activation_name(
            activation, min_val=min_val, max_val=max_val, alpha=alpha, where=where
        )
        if _TORCH_HAS_BIAS_FLAG:
            super().__init__(
                num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias
            )
        else:  # torch < 2.13: no `bias` flag; emulate it
            super().__init__(
                num_features, eps, momentum, affine, track_running_stats, device, dtype
            )
            if not bias and self.affine:
                self.register_parameter("bias", None)
        self.activation = activation
        self.negative_slope = float(negative_slope)
        self.save = check_save(save, activation, self.negative_slope, where)
        self.nonfinite = nonfinite
        self.ema_debias = bool(ema_debias)
        self.degenerate = degenerate
        self._warned_nonfinite = False

    # -- input checks -------------------------------------------------------------------
    _rank_hint = ""

    def _check_rank(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(
                f"{type(self).__name__}: expected at least a 2-D input (batch, channels), got "
                f"shape {tuple(input.shape)}; for one sample use input.unsqueeze(0) in eval mode."
            )

    def _check_input_dim(self, input: torch.Tensor) -> None:
        _checks.check_floating(input, "input", type(self).__name__)
        self._check_rank(input)
        c = _checks.canonical_dim(
            self._channel_dim, input.dim(), "channel_dim", type(self).__name__
        )
        if input.shape[c] != self.num_features:
            raise ValueError(
                f"{type(self).__name__}(num_features={self.num_features}) got an input with "
                f"{input.shape[c]} channels at dim {self._channel_dim} (shape "
                f"{tuple(input.shape)}). Construct it with num_features={input.shape[c]}, or "
                f"check the out_channels/out_features of the layer before it."
            )

    # -- statistics ---------------------------------------------------------------------
    def population_stats(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The (mean, var) eval mode normalises with: the running buffers, de-biased if
        ``ema_debias`` is set (see :func:`normlab.functional.ema_debias`)."""
        mean, var = self.running_mean, self.running_var
        if not self.ema_debias or mean is None or self.num_batches_tracked is None:
            return mean, var
        steps = self.num_batches_tracked
        if not traced(steps):  # eager: a Python int; traced code keeps it a tensor
            steps = int(steps)
        return (
            ema_debias(mean, 0.0, self.momentum, steps),
            ema_debias(var, 1.0, self.momentum, steps),
        )

    # -- validation cache -------------------------------------------------------------
    # A training loop calls a layer with the same input shape and layer state thousands of
    # times, and at small sizes the checks cost more than the normalization. Every check
    # (_check_input_dim and functional.batch_norm._check_batch_norm) is a function of the
    # input's exact type, shape and dtype and of the layer's flags and tensor shapes only,
    # so the layer keeps the signature of its last validated call with the result and
    # skips the checks when the next call has the same signature. Any change (a new
    # shape or dtype, `bn.momentum = None`, `.eval()`, a replaced or resized parameter)
    # is a miss and runs every check again, with the same errors. Subclasses that override
    # _normalize or _check_input_dim validate on every call.
    _checked: tuple | None = None  # (signature, BatchNormLayout) of the last validated call
    _cache_checks = True  # set per class in __init_subclass__

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        cls._cache_checks = (
            cls._normalize is _NormlabBatchNorm._normalize
            and cls._check_input_dim is _NormlabBatchNorm._check_input_dim
        )

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state.pop("_checked", None)  # a cache of this process's checks, not layer state
        return state

    def _signature(self, input: torch.Tensor) -> tuple:
        p, b = self._parameters, self._buffers
        w, bias = p.get("weight"), p.get("bias")
        rm, rv = b.get("running_mean"), b.get("running_var")
        return (
            input.shape,
            input.dtype,
            self.training,
            self.track_running_stats,
            self.momentum,
            self.eps,
            self.nonfinite,
            self.degenerate,
            self.num_features,
            self._channel_dim,
            None if w is None else w.shape,
            None if bias is None else bias.shape,
            None if rm is None else rm.shape,
            None if rv is None else rv.shape,
            b.get("num_batches_tracked") is None,
        )

    def forward(
        self,
        input: torch.Tensor,
        residual: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``act(γ·x̂ + β)``, or with ``residual`` (a tensor like ``input``)
        ``act(γ·x̂ + β + residual)``: BN → add → activation as one layer (what
        :func:`normlab.fuse` makes of a ResNet block's tail). ``mask``: optional bool,
        broadcastable to the input without the channel dim, True where a position counts
        (see :func:`normlab.functional.batch_norm`); pass it by keyword."""
        if mask is not None or residual is not None:
            if isinstance(input, Proxy):  # torch.fx: one call_module node with its arguments
                return call_as_leaf(self, input, residual=residual, mask=mask)
        if mask is not None:
            if residual is not None:
                raise ValueError(
                    f"{type(self).__name__}: residual= and mask= together are not supported; "
                    f"add the residual after the layer."
                )
            self._check_input_dim(input)
            return self._forward_with(input, mask=mask)
        if residual is not None:
            return self._forward_residual(input, residual)
        if self._cache_checks and not traced(input):  # tracers record every call's checks
            signature = self._signature(input)
            checked = self._checked
            if checked is not None and checked[0] == signature:
                return self._forward_validated(input, checked[1])
            self._check_input_dim(input)
            return self._forward_with(input, signature=signature)
        if isinstance(input, Proxy):  # torch.fx tracing: one call_module node (see nn/_fx.py)
            return call_as_leaf(self, input)
        self._check_input_dim(input)
        return self._forward_with(input)

    def _forward_validated(self, input: torch.Tensor, layout) -> torch.Tensor:
        """Forward for an untraced input whose signature was validated (``layout``: the
        cached checks): the common cases call the kernels or the engine directly with one
        :class:`~normlab.functional.engine.BatchConfig`, every other case (no buffers,
        ema_debias, save='output', degenerate or empty batches, kernels that do not apply)
        takes :meth:`_forward_with`. At (64, 100) the layer's Python is a third of the call.
        """
        buffers, params = self._buffers, self._parameters
        running_mean = buffers.get("running_mean")
        if not self.training:
            if running_mean is not None and not self.ema_debias:
                y = kernels.affine_channels(
                    input, layout.channel, running_mean, buffers.get("running_var"),
                    params.get("weight"), params.get("bias"), self.eps, self.activation,
                    self.negative_slope, True,
                )  # fmt: skip
                if y is not None:
                    return y
        elif layout.n > 1 and self.save == "input" and input.numel():
            # functional.batch_norm's training branch for this batch's own statistics
            nonfinite, where = self.nonfinite, type(self).__name__
            running = None
            if self.track_running_stats:
                running = running_update(
                    running_mean, buffers.get("running_var"), self.momentum,
                    buffers.get("num_batches_tracked"), nonfinite, layout.n,
                )  # fmt: skip
            config = BatchConfig(
                layout.dims, self.eps, self.activation, self.negative_slope, running,
                layout.shape if layout.view else None,
            )  # fmt: skip
            y = _normalize_batch(input, params.get("weight"), params.get("bias"), config)
            if running is not None and running.skipped:
                self._skipped_batch(skipped_outcome(y, running, nonfinite, where)[1])
            return y
        return self._forward_with(input, layout=layout)

    def _skipped_batch(self, skipped: bool) -> None:
        """Warn, once per layer, that a non-finite batch left the running statistics."""
        if skipped and not self._warned_nonfinite:
            self._warned_nonfinite = True
            warnings.warn(
                f"{type(self).__name__}: a training batch had non-finite statistics (NaN/Inf "
                f"in its input); running statistics were left unchanged (nonfinite='skip'). "
                f"Further skips by this layer are silent.",
                NonFiniteStatisticsWarning,
                stacklevel=3,
            )

    def _forward_residual(self, input: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """forward(input, residual): the checks on every call (not on the cached hot path)."""
        if type(self)._normalize is not _NormlabBatchNorm._normalize:
            raise NotImplementedError(
                f"{type(self).__name__} computes its statistics its own way and does not take "
                f"residual=; add the residual and apply the activation after the layer."
            )
        self._check_input_dim(input)
        self.__dict__["_residual"] = residual
        try:
            return self._forward_with(input, signature=None)
        finally:
            self.__dict__["_residual"] = None

    _residual: torch.Tensor | None = None  # set only during forward(input, residual)

    def _forward_with(
        self, input: torch.Tensor, source_fn=None, layout=None, signature=None, mask=None
    ) -> torch.Tensor:
        """Forward after input checks; ``source_fn`` supplies training statistics computed
        elsewhere (see ``normlab.functional.batch_norm._batch_norm``), e.g. across ranks.
        ``layout``: the cached result of the functional checks (skips them);
        ``signature``: run them now and cache their result under this signature."""
        # Buffers straight from the dict: Module.__getattr__ costs as much as a small op's
        # dispatch, and this runs on every call.
        buffers = self._buffers
        running_mean, running_var = buffers.get("running_mean"), buffers.get("running_var")
        training, track = self.training, self.track_running_stats
        tracking = training and track
        # torch's rules (_BatchNorm.forward): batch statistics in training, or in eval when
        # there are no buffers; buffers updated only while tracking.
        use_batch_stats = training or (running_mean is None and running_var is None)
        if not training or track:
            mean, var = running_mean, running_var
        else:
            mean = var = None
        if signature is not None:
            params = self._parameters
            layout = _check_batch_norm(
                input, mean, var, params.get("weight"), params.get("bias"), use_batch_stats,
                self._options(), self._num_batches_tracked(tracking), True,
            )  # fmt: skip
            self.__dict__["_checked"] = (signature, layout)
        if not use_batch_stats and self.ema_debias:
            mean, var = self.population_stats()
        args = (input, mean, var, use_batch_stats, tracking)
        # Only SyncBatchNorm passes a source_fn; variants overriding _normalize take 5 args.
        if (mask is not None or self.degenerate != "error") and not self._plain_normalize():
            y = self._variant_extras(input, mask, mean, var, use_batch_stats)
            if y is not None:
                return y
        if mask is not None:
            y, skipped = self._normalize(*args, source_fn=source_fn, mask=mask)
        elif source_fn is not None:
            y, skipped = self._normalize(*args, source_fn=source_fn)
        elif layout is not None:
            y, skipped = self._normalize(*args, layout=layout)
        else:
            y, skipped = self._normalize(*args)
        self._skipped_batch(skipped)
        return y

    def _options(self) -> BNOptions:
        """The layer's batch-norm options, from its attributes (which may change between
        calls: ``bn.momentum = None``): what every functional call of a layer takes."""
        return BNOptions(
            self.momentum, self.eps, self._channel_dim, self.activation, self.negative_slope,
            self.nonfinite, self.degenerate, self.save, type(self).__name__,
        )  # fmt: skip

    def _num_batches_tracked(self, tracking: bool) -> torch.Tensor | None:
        return self._buffers.get("num_batches_tracked") if tracking else None

    def _call_variant(self, fn, input, mean, var, use_batch_stats, tracking, **extras):
        """``fn(input, mean, var, weight, bias, training, options, ...)``: a functional
        batch-norm variant (renorm, ghost) called with the layer's arguments, in one place;
        ``extras``: the variant's own keywords. Variants have no degenerate policy of
        their own (:meth:`_variant_extras` applied the layer's before the call)."""
        params = self._parameters
        return fn(
            input, mean, var, params.get("weight"), params.get("bias"), use_batch_stats,
            self._options()._replace(degenerate="error"),
            num_batches_tracked=self._num_batches_tracked(tracking), **extras,
        )  # fmt: skip

    def _plain_normalize(self) -> bool:
        return type(self)._normalize is _NormlabBatchNorm._normalize

    def _variant_extras(self, input, mask, mean, var, use_batch_stats):
        """``mask`` and ``degenerate`` for variants with their own ``_normalize`` (renorm,
        ghost): no mask; the degenerate policy on the static count, before their call.
        Returns the output, or None to proceed normally."""
        name = type(self).__name__
        if mask is not None:
            raise TypeError(
                f"{name}: mask= is not supported by this variant (its statistics are not "
                f"plain batch statistics); use normlab.nn.BatchNorm* or SyncBatchNorm for "
                f"masked batches."
            )
        c = self._channel_dim % input.dim()
        n = input.numel() // max(input.shape[c], 1)
        if not use_batch_stats or n != 1:
            return None
        from normlab.functional.batch_norm import BatchNormLayout, _degenerate_output

        shape = [1] * input.dim()
        shape[c] = input.shape[c]
        dims = tuple(d for d in range(input.dim()) if d != c)
        layout = BatchNormLayout(dims, shape, n, c != input.dim() - 1, c)
        params = self._parameters
        return _degenerate_output(
            input, mean, var, params.get("weight"), params.get("bias"), self._options(), layout
        )

    def _normalize(
        self,
        input: torch.Tensor,
        mean: torch.Tensor | None,
        var: torch.Tensor | None,
        use_batch_stats: bool,
        tracking: bool,
        source_fn=None,
        layout=None,
        mask=None,
    ) -> tuple[torch.Tensor, bool]:
        """The one functional call of this layer; variants (renorm, ghost) override it.
        ``layout``: the cached result of the checks, for a call with a validated signature."""
        params = self._parameters
        return _batch_norm(
            input, mean, var, params.get("weight"), params.get("bias"), use_batch_stats,
            self._options(), num_batches_tracked=self._num_batches_tracked(tracking),
            source_fn=source_fn if use_batch_stats else None, layout=layout,
            residual=self._residual, mask=mask,
            # a cached layout comes only from forward's path for untraced inputs
            eager=layout is not None,
        )  # fmt: skip

    def extra_repr(self) -> str:
        s = super().extra_repr()
        if self._channel_dim != 1:
            s += f", channel_dim={self._channel_dim}"
        s += activation_repr(self.activation, self.negative_slope)
        for name, default in _REPR_DEFAULTS:  # the extras that differ from the default
            value = getattr(self, name)
            if value != default:
                s += f", {name}={value!r}"
        return s


class _RankCheck:
    """Input rank check of the 1d/2d/3d layers of a family (``_ranks``: the accepted
    ranks; ``_expected``: what they look like; ``_instead``: where other ranks go, with
    ``{family}`` the class name without its '1d'/'2d'/'3d')."""

    _ranks: tuple[int, ...] = ()
    _expected = ""
    _instead = ""

    def _check_rank(self, input: torch.Tensor) -> None:
        if input.dim() not in self._ranks:
            name = type(self).__name__
            raise ValueError(
                f"{name}: expected {self._expected} input, got {input.dim()}-D input of shape "
                f"{tuple(input.shape)}. " + self._instead.format(family=name[:-2])
            )


class _Rank1d(_RankCheck):
    """(N, C) or (N, C, L)."""

    _ranks = (2, 3)
    _expected = "2-D (N, C) or 3-D (N, C, L)"
    _instead = (
        "Use {family}2d for (N, C, H, W), {family}3d for (N, C, D, H, W), or "
        "normlab.nn.BatchNorm(num_features, channel_dim=...) for any rank."
    )


class _Rank2d(_RankCheck):
    """(N, C, H, W)."""

    _ranks = (4,)
    _expected = "4-D (N, C, H, W)"
    _instead = (
        "Use {family}1d for (N, C) or (N, C, L), {family}3d for 5-D, or normlab.nn.BatchNorm "
        "for any rank; a single image (C, H, W) needs input.unsqueeze(0)."
    )


class _Rank3d(_RankCheck):
    """(N, C, D, H, W)."""

    _ranks = (5,)
    _expected = "5-D (N, C, D, H, W)"
    _instead = "Use {family}1d/2d for lower ranks or normlab.nn.BatchNorm for any rank."


class BatchNorm1d(_Rank1d, _NormlabBatchNorm, torch.nn.BatchNorm1d):
    """Batch normalization over a 2-D ``(N, C)`` or 3-D ``(N, C, L)`` input; statistics over
    N (and L). Drop-in for :class:`torch.nn.BatchNorm1d`; see :class:`BatchNorm` for the
    formula and the keyword-only extras."""


class BatchNorm2d(_Rank2d, _NormlabBatchNorm, torch.nn.BatchNorm2d):
    """Batch normalization over a 4-D ``(N, C, H, W)`` input; statistics over N·H·W values
    per channel. Drop-in for :class:`torch.nn.BatchNorm2d`; see :class:`BatchNorm`."""


class BatchNorm3d(_Rank3d, _NormlabBatchNorm, torch.nn.BatchNorm3d):
    """Batch normalization over a 5-D ``(N, C, D, H, W)`` input. Drop-in for
    :class:`torch.nn.BatchNorm3d`; see :class:`BatchNorm`."""


class BatchNorm(_NormlabBatchNorm):
    __doc__ = _NormlabBatchNorm.__doc__

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
        *,
        channel_dim: int = 1,
        **extras,
    ) -> None:
        if isinstance(channel_dim, bool) or not isinstance(channel_dim, int):
            raise TypeError(f"BatchNorm: channel_dim must be an int, got {channel_dim!r}")
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype, **extras
        )
        self._channel_dim = channel_dim

    @property
    def channel_dim(self) -> int:
        return self._channel_dim
