import copy

import pytest
import torch
from torch import nn

import normlab as nl
from tests import reference as ref
from tests.tools.helpers import assert_identical, images, small_resnet, snapshot

KINDS = ["torch", "normlab"]


def _layer(kind):
    cls = {"torch": nn.BatchNorm2d, "normlab": nl.nn.BatchNorm2d}[kind]
    bn = cls(4)
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor([0.5, -1.0, 2.0, 0.0]))
        bn.running_var.copy_(torch.tensor([1.5, 0.3, 4.0, 1.0]))
        bn.weight.copy_(torch.tensor([1.0, 2.0, 0.5, -1.0]))
        bn.bias.copy_(torch.tensor([0.1, 0.0, -0.3, 0.2]))
    return bn.eval()


@pytest.mark.parametrize("kind", KINDS)
def test_batch_mode_uses_batch_statistics_and_keeps_stored_ones(kind):
    bn = _layer(kind)
    before = snapshot(bn)
    x = torch.randn(6, 4, 3, 3) * 2 + 3
    with nl.adapt(bn, mode="batch"):
        y = bn(x)
        bn(x + 1)
    assert_identical(snapshot(bn), before)
    torch.testing.assert_close(y, ref.batch_norm_train(x, bn.weight, bn.bias).float())
    assert not bn.training and bn.track_running_stats  # flags back as they were


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", [1, 5])
def test_mix_mode_blends_with_sample_count_weights(kind, n):
    bn = _layer(kind)
    before = snapshot(bn)
    prior = 16
    x = torch.randn(n, 4, 3, 3) * 2 + 3
    with nl.adapt(bn, mode="mix", prior=prior):
        y = bn(x)
    assert_identical(snapshot(bn), before)
    w = prior / (prior + n)  # Schneider et al. 2020: N/(N+n), n = samples in the batch
    xd = x.double()
    mean = w * bn.running_mean.double() + (1 - w) * xd.mean((0, 2, 3))
    var = w * bn.running_var.double() + (1 - w) * xd.var((0, 2, 3), correction=0)
    torch.testing.assert_close(
        y.double(), ref.batch_norm_eval(x, mean, var, bn.weight, bn.bias), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("kind", KINDS)
def test_mix_limits_are_batch_and_eval(kind):
    bn = _layer(kind)
    x = torch.randn(6, 4, 3, 3) * 2 + 3
    with nl.adapt(bn, mode="batch"):
        batch = bn(x)
    with nl.adapt(bn, mode="mix", prior=0):
        torch.testing.assert_close(bn(x), batch)
    with nl.adapt(bn, mode="mix", prior=1e12):
        torch.testing.assert_close(bn(x), bn.__class__.forward(bn, x))  # plain eval


@pytest.mark.parametrize("kind", KINDS)
def test_adapted_model_keeps_stored_statistics_bit_identical(kind):
    model = small_resnet(kind)
    before = snapshot(model)
    plain = model(images(8, seed=5, shift=2.0))
    handle = nl.adapt(model, mode="batch")  # function form
    adapted = model(images(8, seed=5, shift=2.0))
    model(images(3, seed=6))
    handle.remove()
    with nl.adapt(model, mode="mix"):
        model(images(8, seed=7))
    assert_identical(snapshot(model), before)
    assert not torch.allclose(plain, adapted)
    torch.testing.assert_close(model(images(8, seed=5, shift=2.0)), plain)  # removed
    for m in model.modules():
        assert not m._forward_pre_hooks and not m._forward_hooks


def test_adabn_closes_the_inference_gap_under_covariate_shift():
    # docs/sources.md#seed-002: under a shift, eval BN's output mean is γ(m_test − μ)/σ + β,
    # not β.
    model = small_resnet("normlab")
    seen = []
    model.stem[1].register_forward_hook(lambda m, a, y: seen.append(y.mean((0, 2, 3))))
    x = images(32, seed=8, shift=3.0)
    model(x)
    with nl.adapt(model, mode="batch"):
        model(x)
    beta = model.stem[1].bias.detach()
    assert (seen[0] - beta).abs().max() > 1.0
    torch.testing.assert_close(seen[1], beta, rtol=0, atol=1e-5)


def test_batch_mode_backpropagates_through_batch_statistics():
    model = small_resnet("torch")
    reference = copy.deepcopy(model)
    for m in reference.modules():  # TENT's setup: BN in train mode without buffers
        if isinstance(m, nn.BatchNorm2d):
            m.train()
            m.track_running_stats = False
    x = images(8, seed=9)
    with nl.adapt(model):
        model(x).logsumexp(1).mean().backward()
    reference(x).logsumexp(1).mean().backward()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad)


def test_adapt_composes_with_freeze_in_either_order():
    model = small_resnet("torch").train()
    nl.freeze(model)
    with nl.adapt(model, mode="batch"):
        before = snapshot(model)
        model(images(8))
        assert_identical(snapshot(model), before)
    assert all(m.training for m in model.modules())
    handle = nl.adapt(model, mode="mix")
    nl.unfreeze(model)
    handle.remove()
    assert all(m.training for m in model.modules())
    assert not model.stem[1]._forward_pre_hooks


def test_bad_arguments():
    model = small_resnet("torch")
    with pytest.raises(ValueError, match="mode must be one of"):
        nl.adapt(model, mode="tent")
    with pytest.raises(ValueError, match="prior must be"):
        nl.adapt(model, mode="mix", prior=-1)
    with pytest.raises(ValueError, match="track_running_stats=False"):
        nl.adapt(nn.BatchNorm2d(3, track_running_stats=False), mode="mix")


@pytest.mark.parametrize(
    ("to", "kw"),
    [("renorm", {"warmup_steps": 0}), ("ghost", {"virtual_batch_size": 2}), ("sync", {})],
)
def test_batch_mode_on_variants_normalises_with_the_whole_batch(to, kw):
    plain = small_resnet("normlab")
    variant = nl.convert(plain, to=to, **kw)
    before = snapshot(variant)
    x = images(8, seed=11, shift=1.0)
    with nl.adapt(plain), nl.adapt(variant):
        expected, actual = plain(x), variant(x)
    torch.testing.assert_close(actual, expected)
    assert_identical(snapshot(variant), before)
