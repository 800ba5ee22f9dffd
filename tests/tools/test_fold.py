import pytest
import torch
from torch import nn

import normlab as nl
from tests.tools.helpers import assert_identical, bn_layers, images, small_resnet, snapshot


def _assert_rel(actual, expected, rtol=1e-5):
    err = (actual.double() - expected.double()).abs().max()
    assert err <= rtol * expected.abs().max(), f"max error {err:.3g}"


def _randomise(model):
    """Non-trivial eval statistics and affine parameters for every BN."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in bn_layers(model):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=g))
            m.running_var.copy_(torch.rand(c, generator=g) + 0.3)
            m.weight.copy_(torch.randn(c, generator=g))
            m.bias.copy_(torch.randn(c, generator=g))
    return model.eval()


@pytest.mark.parametrize("kind", ["torch", "normlab"])
def test_small_resnet_folds_completely_within_1e_5(kind):
    model = small_resnet(kind)
    before = snapshot(model)
    x = images(8, seed=3)
    folded, unfolded = nl.fold(model, x)  # with example input: verified inside too
    assert unfolded == []
    assert not bn_layers(folded)
    assert type(folded) is type(model)
    _assert_rel(folded(x), model(x))
    assert_identical(snapshot(model), before)  # the original is untouched


def test_training_mode_is_refused():
    model = small_resnet("torch").train()
    with pytest.raises(ValueError, match=r"eval mode.*model\.eval"):
        nl.fold(model)
    model.eval()
    model.blocks[1].bn2.train()
    with pytest.raises(ValueError, match=r"blocks\.1\.bn2"):
        nl.fold(model)


class Preceding(nn.Module):
    """BN before a Conv/Linear, with and without zero padding."""

    def __init__(self):
        super().__init__()
        self.bn_in = nn.BatchNorm2d(3)
        self.conv_valid = nn.Conv2d(3, 4, 3)
        self.bn_pad = nn.BatchNorm2d(4)
        self.conv_pad = nn.Conv2d(4, 4, 3, padding=1)
        self.bn_reflect = nn.BatchNorm2d(4)
        self.conv_reflect = nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect", groups=2)
        self.bn_t = nn.BatchNorm2d(4)
        self.conv_t = nn.ConvTranspose2d(4, 4, 3, stride=2)
        self.bn1d = nn.BatchNorm1d(4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        x = torch.relu(self.conv_valid(self.bn_in(x)))
        x = torch.relu(self.conv_pad(self.bn_pad(x)))
        x = torch.relu(self.conv_reflect(self.bn_reflect(x)))
        x = self.conv_t(self.bn_t(x)).mean((2, 3))
        return self.fc(self.bn1d(x))


def test_bn_before_a_layer_folds_only_where_exact():
    model = _randomise(Preceding())
    x = images(4, size=7)
    folded, unfolded = nl.fold(model, x)
    reasons = dict(unfolded)
    assert set(reasons) == {"bn_pad", "bn_t"}
    assert "zero-padded" in reasons["bn_pad"]
    assert "ConvTranspose" in reasons["bn_t"]
    assert isinstance(folded.bn_in, nn.Identity) and isinstance(folded.bn1d, nn.Identity)
    _assert_rel(folded(x), model(x))
    # the zero-padding case really is inexact: folding it anyway breaks the borders
    forced = nl.functional.fold_weights(
        model.conv_pad.weight,
        model.conv_pad.bias,
        model.bn_pad.running_mean,
        model.bn_pad.running_var,
        model.bn_pad.eps,
        model.bn_pad.weight,
        model.bn_pad.bias,
        bn_first=True,
    )
    y = torch.randn(2, 4, 5, 5)
    wrong = nn.functional.conv2d(y, *forced, padding=1)
    right = model.conv_pad(model.bn_pad(y))
    assert (wrong - right)[..., 1:-1, 1:-1].abs().max() < 1e-5
    assert (wrong - right).abs().max() > 1e-2


def test_bn_before_conv_transpose_folds_when_its_shift_is_zero():
    model = _randomise(nn.Sequential(nn.BatchNorm2d(3), nn.ConvTranspose2d(3, 2, 3, stride=2)))
    with torch.no_grad():
        model[0].running_mean.zero_()
        model[0].bias.zero_()
    folded, unfolded = nl.fold(model, images(2))
    assert unfolded == [] and isinstance(folded[0], nn.Identity)


class Tangled(nn.Module):
    """BNs with other consumers: called twice, feeding a residual add, after a conv whose
    output is used twice."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.bn_twice = nn.BatchNorm2d(4)
        self.bn_res = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 1)
        self.conv3 = nn.Conv2d(3, 4, 1)
        self.bn_after_shared = nn.BatchNorm2d(4)

    def forward(self, x):
        a = self.bn_twice(self.bn_twice(torch.relu(self.conv(x))))
        e = self.bn_res(torch.relu(a))
        f = self.conv3(x)
        return self.conv2(e) + e + self.bn_after_shared(f) + f


def test_bns_with_other_consumers_are_left_and_listed():
    model = _randomise(Tangled())
    x = images(4)
    folded, unfolded = nl.fold(model, x)
    reasons = dict(unfolded)
    assert set(reasons) == {"bn_twice", "bn_res", "bn_after_shared"}
    assert "called 2 times" in reasons["bn_twice"]
    assert "consumers" in reasons["bn_res"]
    assert "also used elsewhere" in reasons["bn_after_shared"]
    _assert_rel(folded(x), model(x))


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.seq = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
        self.loose = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.seq(x)
        if y.sum() > 0:  # data-dependent control flow: torch.fx cannot trace this
            y = self.loose(y)
        return y


def test_untraceable_model_falls_back_to_sequential_neighbours():
    model = _randomise(Untraceable())
    x = images(4)
    folded, unfolded = nl.fold(model, x)
    assert isinstance(folded.seq[1], nn.Identity)
    assert [u.name for u in unfolded] == ["loose"]
    assert "torch.fx" in unfolded[0].reason
    _assert_rel(folded(x), model(x))


def test_fused_activation_and_debiased_statistics():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nl.nn.BatchNorm2d(4, activation="leaky_relu", negative_slope=0.2, ema_debias=True),
        nl.nn.BatchNorm2d(4, activation="relu"),
        nn.Conv2d(4, 2, 1),
    )
    model.train()
    model(images(8))  # one EMA step: de-biasing matters
    model.eval()
    x = images(4, seed=2)
    folded, unfolded = nl.fold(model, x)
    assert isinstance(folded[1], nn.LeakyReLU) and folded[1].negative_slope == 0.2
    assert [u.name for u in unfolded] == ["2"]
    assert "activation" in unfolded[0].reason  # its ReLU sits between it and the conv
    _assert_rel(folded(x), model(x))


@pytest.mark.parametrize(
    "layer", [nn.Conv1d(3, 4, 3, groups=1), nn.ConvTranspose1d(3, 4, 3, stride=2), nn.Linear(3, 4)]
)
def test_other_layer_kinds_followed_by_bn1d(layer):
    model = _randomise(nn.Sequential(layer, nn.BatchNorm1d(4)))
    x = torch.randn(5, 3) if isinstance(layer, nn.Linear) else torch.randn(5, 3, 7)
    folded, unfolded = nl.fold(model, x)
    assert unfolded == []
    _assert_rel(folded(x), model(x))


def test_linear_with_3d_input_is_not_folded_when_the_example_shows_it():
    model = _randomise(nn.Sequential(nn.Linear(5, 5), nn.BatchNorm1d(5)))
    x = torch.randn(4, 5, 5)  # BN normalises dim 1, the Linear acts on dim 2
    folded, unfolded = nl.fold(model, x)
    assert "3-D" in unfolded[0].reason
    _assert_rel(folded(x), model(x))


@pytest.mark.parametrize(
    ("to", "kw"),
    [("renorm", {}), ("ghost", {"virtual_batch_size": 4}), ("frozen", {}), ("sync", {})],
)
def test_bn_variants_fold_like_bn(to, kw):
    model = nl.convert(small_resnet("torch"), to=to, **kw)
    x = images(8, seed=3)
    folded, unfolded = nl.fold(model, x)
    assert unfolded == []
    assert not [m for m in folded.modules() if "Norm" in type(m).__name__]
    _assert_rel(folded(x), model(x))
