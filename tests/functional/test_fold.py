import pytest
import torch
import torch.nn.functional as F
from torch import nn

from normlab.functional import fold_weights
from tests import reference as ref

LAYERS = {
    "linear": lambda g: nn.Linear(6, 4),
    "conv1d": lambda g: nn.Conv1d(6, 4, 3, stride=2, groups=g),
    "conv2d": lambda g: nn.Conv2d(6, 4, (3, 2), dilation=(1, 2), groups=g),
    "conv3d": lambda g: nn.Conv3d(6, 4, 2, groups=g, bias=False),
    "convT1d": lambda g: nn.ConvTranspose1d(6, 4, 3, stride=2, groups=g),
    "convT2d": lambda g: nn.ConvTranspose2d(6, 4, 3, stride=2, padding=1, groups=g),
    "convT3d": lambda g: nn.ConvTranspose3d(6, 4, 2, groups=g, bias=False),
}
SPATIAL = {"linear": (), "conv1d": (9,), "conv2d": (7, 8), "conv3d": (4, 3, 5)}
SPATIAL |= {"convT1d": (5,), "convT2d": (4, 5), "convT3d": (3, 2, 3)}


def _bn_params(c, g, zero_shift=False):
    mean, var = (
        torch.randn(c, generator=g, dtype=torch.float64),
        torch.rand(c, generator=g).double() + 0.2,
    )
    gamma = torch.randn(c, generator=g, dtype=torch.float64)
    beta = torch.randn(c, generator=g, dtype=torch.float64)
    if zero_shift:
        beta = mean * gamma / torch.sqrt(var + 1e-5)
    return mean, var, gamma, beta


CASES = [
    (n, g, f) for n in LAYERS for g in (1, 2) for f in (False, True) if n != "linear" or g == 1
]


@pytest.mark.parametrize(("name", "groups", "bn_first"), CASES)
def test_folded_layer_equals_the_composition_in_float64(name, groups, bn_first):
    g = torch.Generator().manual_seed(hash((name, groups, bn_first)) % 2**31)
    layer = LAYERS[name](groups).double()
    transpose = name.startswith("convT")
    c = 6 if bn_first else 4
    zero_shift = bn_first and transpose  # otherwise not expressible (see the next test)
    mean, var, gamma, beta = _bn_params(c, g, zero_shift)
    x = torch.randn(3, 6, *SPATIAL[name], generator=g, dtype=torch.float64)

    def bn(t):
        return ref.batch_norm_eval(t, mean, var, gamma, beta)

    expected = layer(bn(x)) if bn_first else bn(layer(x))
    w, b = fold_weights(
        layer.weight,
        layer.bias,
        mean,
        var,
        1e-5,
        gamma,
        beta,
        bn_first=bn_first,
        transpose=transpose,
        groups=groups,
    )
    with torch.no_grad():
        layer.weight.copy_(w)
        if layer.bias is None:
            layer.bias = nn.Parameter(b)
        else:
            layer.bias.copy_(b)
    torch.testing.assert_close(layer(x), expected, rtol=1e-10, atol=1e-10)


def test_matches_torch_fusion_for_conv_then_bn_in_float32():
    conv, bn = nn.Conv2d(3, 5, 3), nn.BatchNorm2d(5)
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2)
        bn.weight.normal_()
    fused = torch.nn.utils.fusion.fuse_conv_bn_eval(conv.eval(), bn.eval())
    w, b = fold_weights(
        conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias
    )
    assert w.dtype == b.dtype == torch.float32
    torch.testing.assert_close(w, fused.weight)
    torch.testing.assert_close(b, fused.bias)
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(F.conv2d(x, w, b), bn(conv(x)))


def test_errors():
    w = torch.randn(4, 6, 3)
    stats = (torch.zeros(5), torch.ones(5), 1e-5)
    with pytest.raises(ValueError, match="5 channels but the layer has 4 output"):
        fold_weights(w, None, *stats)
    wt = torch.randn(6, 4, 3)
    with pytest.raises(ValueError, match="ConvTranspose"):
        fold_weights(wt, None, torch.ones(6), torch.ones(6), 1e-5, bn_first=True, transpose=True)
