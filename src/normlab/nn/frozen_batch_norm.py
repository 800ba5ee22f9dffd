"""Frozen batch normalization: ``FrozenBatchNorm1d/2d/3d``.

Statistics and affine are buffers, so neither ``model.train()`` nor an optimizer changes
them (torch's ``bn.eval()`` is undone by the next ``model.train()``). Like torchvision's
``FrozenBatchNorm2d`` (eps default 1e-5, BatchNorm's, so a frozen layer computes what
the BatchNorm it replaces computed in eval; early copies of torchvision's took rsqrt of
``running_var`` with no eps, which gives inf for a dead channel), with any of the three
ranks, a fused activation, and the full BatchNorm state_dict: ``weight``, ``bias``, ``running_mean``,
``running_var`` and ``num_batches_tracked``. A BatchNorm checkpoint loads unchanged, a
FrozenBatchNorm checkpoint loads back into BatchNorm (the counter travels with it, so
un-freezing with ``momentum=None`` resumes the cumulative average correctly), and
checkpoints without ``num_batches_tracked`` (torchvision's FrozenBatchNorm2d, torch BN
before version 2) load with the counter left as it is.
"""

from __future__ import annotations

import torch

from normlab.functional import _checks
from normlab.functional.batch_norm import _batch_norm
from normlab.functional.options import BNOptions
from normlab.nn._fused import FusedActivation
from normlab.nn._fx import Proxy, call_as_leaf
from normlab.nn.batchnorm import _Rank1d, _Rank2d, _Rank3d


class _FrozenBatchNorm(FusedActivation, torch.nn.Module):
    """Batch normalization with fixed statistics and affine, in every mode:
    ``y = act(weight · (x − running_mean) / sqrt(running_var + eps) + bias)`` per channel.

    Args:
        num_features: C.
        eps: added to ``running_var``. Default 1e-5 (torch's BatchNorm default).
        device, dtype: of the buffers.
        activation, negative_slope: keyword-only fused activation.

    Buffers (all persistent, BatchNorm's names): ``weight`` (ones), ``bias`` (zeros),
    ``running_mean`` (zeros), ``running_var`` (ones), ``num_batches_tracked`` (0, never
    changed here). Gradients flow to the input only.

    Use :meth:`from_batch_norm` to freeze an existing BatchNorm layer (affine=False
    layers become weight 1, bias 0).
    """

    _version = 2  # BatchNorm's state_dict version: the keys are the same

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        device=None,
        dtype=None,
        *,
        activation: str | None = None,
        negative_slope: float = 0.01,
    ) -> None:
        super().__init__()
        where = type(self).__name__
        _checks.check_num_features(num_features, where)
        _checks.check_eps(eps, where)
        self._init_activation(activation, negative_slope)
        self.num_features = num_features
        self.eps = float(eps)
        kw = {"device": device, "dtype": dtype}
        self.register_buffer("weight", torch.ones(num_features, **kw))
        self.register_buffer("bias", torch.zeros(num_features, **kw))
        self.register_buffer("running_mean", torch.zeros(num_features, **kw))
        self.register_buffer("running_var", torch.ones(num_features, **kw))
        self.register_buffer(
            "num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device)
        )

    def reset_parameters(self) -> None:
        """The constructor's state (γ = 1, β = 0, mean 0, var 1, counter 0), as torch's
        ``BatchNorm.reset_parameters``: what ``module.to_empty(device=...)`` after meta-device
        construction needs to make the layer usable."""
        with torch.no_grad():
            self.weight.fill_(1.0)
            self.bias.zero_()
            self.running_mean.zero_()
            self.running_var.fill_(1.0)
            self.num_batches_tracked.zero_()

    @classmethod
    def from_batch_norm(cls, bn: torch.nn.Module, **kwargs) -> _FrozenBatchNorm:
        """A frozen copy of a BatchNorm layer (torch's or normlab's): same eps, statistics,
        affine (1 and 0 where the layer has none), counter, device and dtype; ``kwargs``
        (e.g. ``activation=``) override. The layer must track running statistics."""
        if getattr(bn, "running_mean", None) is None:
            raise ValueError(
                f"{cls.__name__}.from_batch_norm: {type(bn).__name__} has no running statistics "
                f"(track_running_stats=False), so there is nothing to freeze. Recalibrate it "
                f"first (normlab.recalibrate) or build it with track_running_stats=True."
            )
        kwargs.setdefault("eps", bn.eps)
        for name in ("activation", "negative_slope"):
            if hasattr(bn, name):
                kwargs.setdefault(name, getattr(bn, name))
        rm = bn.running_mean
        frozen = cls(bn.num_features, device=rm.device, dtype=rm.dtype, **kwargs)
        with torch.no_grad():
            frozen.running_mean.copy_(rm)
            frozen.running_var.copy_(bn.running_var)
            if bn.weight is not None:
                frozen.weight.copy_(bn.weight)
            if bn.bias is not None:
                frozen.bias.copy_(bn.bias)
            if getattr(bn, "num_batches_tracked", None) is not None:
                frozen.num_batches_tracked.copy_(bn.num_batches_tracked)
        return frozen

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        # The counter is informational here: checkpoints without it (torchvision's
        # FrozenBatchNorm2d, BatchNorm before version 2) keep the current value.
        key = prefix + "num_batches_tracked"
        if key not in state_dict:
            state_dict[key] = self.num_batches_tracked
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def _check_rank(self, input: torch.Tensor) -> None:  # overridden by the rank mixins
        pass

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if isinstance(input, Proxy):  # torch.fx tracing: one call_module node (see nn/_fx.py)
            return call_as_leaf(self, input)
        _checks.check_floating(input, "input", type(self).__name__)
        self._check_rank(input)
        if input.shape[1] != self.num_features:
            raise ValueError(
                f"{type(self).__name__}(num_features={self.num_features}) got an input with "
                f"{input.shape[1]} channels (shape {tuple(input.shape)}); construct it with "
                f"num_features={input.shape[1]}."
            )
        options = BNOptions(  # eval only: no momentum, nonfinite or degenerate policy
            eps=self.eps,
            activation=self.activation,
            negative_slope=self.negative_slope,
            where=type(self).__name__,
        )
        y, _ = _batch_norm(
            input, self.running_mean, self.running_var, self.weight, self.bias, False, options
        )
        return y

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}{self._activation_repr()}"


class FrozenBatchNorm1d(_Rank1d, _FrozenBatchNorm):
    __doc__ = _FrozenBatchNorm.__doc__


class FrozenBatchNorm2d(_Rank2d, _FrozenBatchNorm):
    __doc__ = _FrozenBatchNorm.__doc__


class FrozenBatchNorm3d(_Rank3d, _FrozenBatchNorm):
    __doc__ = _FrozenBatchNorm.__doc__
