"""Folding an eval-mode BatchNorm into a neighbouring linear layer: pure tensor math.

Eval-mode BN is the per-channel affine map BN(x) = s·x + t with

    s = γ / sqrt(σ² + ε),     t = β − μ·s            (μ, σ² the running statistics)

so it merges with a Conv/ConvTranspose/Linear layer L(x) = W ∗ x + b next to it:

- BN after L (L → BN), s and t indexed by L's output channel o:
      W'[o] = s[o] · W[o],          b'[o] = s[o] · (b[o] − μ[o]) + β[o]
- BN before L (BN → L), s and t indexed by L's input channel i:
      W'[o, i] = W[o, i] · s[i],    b'[o] = b[o] + Σ_{i,k} W[o, i, k] · t[i]
  The second identity holds only where every kernel tap reads a real input value: a
  zero-padded convolution pads the BN *output* with zeros, which the folded layer would
  see as x = 0, i.e. BN output t. :func:`normlab.tools.fold` therefore folds a preceding
  BN into a convolution only when it has no zero padding (none, or reflect/replicate/
  circular, which pad with copies of values and commute with a per-channel affine map) or
  when t = 0; into a ConvTranspose only when t = 0 (its output positions see different
  numbers of taps).

Weights use torch's layouts: Linear (out, in); Conv (out, in/groups, *k);
ConvTranspose (in, out/groups, *k). Computed in float64, returned in the layer's dtypes.
Compare ``torch.nn.utils.fusion.fuse_conv_bn_weights`` (BN after, groups = 1 for
transposed convolutions only).
"""

from __future__ import annotations

import torch


def bn_scale_shift(
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    eps: float,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, t) in float64 with eval-mode BN(x) = s·x + t per channel."""
    s = torch.rsqrt(running_var.double() + eps)
    if weight is not None:
        s = s * weight.double()
    t = -running_mean.double() * s
    if bias is not None:
        t = t + bias.double()
    return s, t


def shift_is_zero(
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    eps: float,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> bool:
    """True when every BN shift t = β − μ·s is zero up to the rounding of computing it
    (|t| ≤ 8 ulp of |β| + |μ·s| in the statistics' dtype), e.g. β = 0 and μ = 0."""
    s, t = bn_scale_shift(running_mean, running_var, eps, weight, bias)
    size = running_mean.double().abs() * s.abs()
    if bias is not None:
        size = size + bias.double().abs()
    return bool((t.abs() <= 8 * torch.finfo(running_mean.dtype).eps * size).all())


def fold_weights(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    eps: float,
    bn_weight: torch.Tensor | None = None,
    bn_bias: torch.Tensor | None = None,
    *,
    bn_first: bool = False,
    transpose: bool = False,
    groups: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The (weight, bias) of one layer equal to BN composed with a Conv/ConvTranspose/Linear.

    Args:
        weight, bias: the layer's parameters (bias may be None); layouts in the module doc.
        running_mean, running_var, eps, bn_weight, bn_bias: the BN's eval-mode statistics
            and affine (γ, β may be None).
        bn_first: False for L → BN (fold into the outputs), True for BN → L (fold into the
            inputs; the caller guarantees no zero padding, see the module doc).
        transpose: the layer is a ConvTranspose (weight (in, out/groups, *k)).
        groups: the layer's ``groups``.

    Returns:
        ``(weight, bias)`` tensors (not Parameters) in the dtypes of ``weight`` and of
        ``bias`` (``weight``'s if None).

    Raises:
        ValueError: channel counts that do not match; a BN before a ConvTranspose whose
            shift t is not zero (not expressible as a bias).
    """
    s, t = bn_scale_shift(running_mean, running_var, eps, bn_weight, bn_bias)
    c = s.numel()
    w = weight.double()
    k = weight.dim() - 2  # spatial dims (0 for Linear)
    if transpose:
        cin, cout = w.shape[0], w.shape[1] * groups
    else:
        cout, cin = w.shape[0], w.shape[1] * groups
    b = torch.zeros(cout, dtype=torch.float64, device=w.device) if bias is None else bias.double()
    target = cin if bn_first else cout
    if c != target:
        side = "input" if bn_first else "output"
        raise ValueError(
            f"fold_weights: the BN has {c} channels but the layer has {target} {side} "
            f"channels; bn_first={bn_first} folds into the layer's {side}s."
        )
    ones = [1] * k
    if not bn_first and not transpose:  # scale output rows
        w_new = w * s.view(-1, 1, *ones)
        b_new = b * s + t  # = s·(b − μ) + β
    elif not bn_first:  # transposed: output channel o = g·(out/g) + j lives in dim 1
        wg = w.view(groups, cin // groups, cout // groups, *w.shape[2:])
        w_new = (wg * s.view(groups, 1, cout // groups, *ones)).reshape(w.shape)
        b_new = b * s + t  # = s·(b − μ) + β
    elif not transpose:  # BN → Conv/Linear: scale input columns, push t through W
        wg = w.view(groups, cout // groups, cin // groups, *w.shape[2:])
        w_new = (wg * s.view(groups, 1, cin // groups, *ones)).reshape(w.shape)
        taps = wg.sum(dim=tuple(range(3, wg.dim()))) if k else wg  # (g, out/g, in/g)
        b_new = b + torch.einsum("goi,gi->go", taps, t.view(groups, cin // groups)).reshape(-1)
    else:  # BN → ConvTranspose: input channels are dim 0
        if not shift_is_zero(running_mean, running_var, eps, bn_weight, bn_bias):
            raise ValueError(
                "fold_weights: a BN before a ConvTranspose can be folded only when its shift "
                "β − μ·γ/sqrt(σ² + ε) is zero: the transposed convolution spreads a constant "
                "input unevenly over its output positions, so no bias reproduces it."
            )
        w_new = w * s.view(-1, 1, *ones)
        b_new = b  # t is rounding noise: dropping it is the exact map
    bias_dtype = weight.dtype if bias is None else bias.dtype
    return w_new.to(weight.dtype), b_new.to(bias_dtype)
