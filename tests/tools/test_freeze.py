import copy
import io

import pytest
import torch
from torch import nn

import normlab as nl
from tests.tools.helpers import assert_identical, bn_layers, images, small_resnet, snapshot

KINDS = ["torch", "normlab"]


def _stats(model):
    return {
        k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k
    }


@pytest.mark.parametrize("kind", KINDS)
def test_frozen_statistics_survive_train_and_normalise_like_eval(kind):
    model = small_resnet(kind)
    reference = copy.deepcopy(model).eval()
    before = _stats(model)
    nl.freeze(model, affine=False)
    model.train()  # what every training loop does; bn.eval() would be undone here
    x = images(8, seed=1)
    y = model(x)
    assert_identical(_stats(model), before)  # nothing updated, num_batches_tracked included
    torch.testing.assert_close(y, reference(x), rtol=0, atol=0)
    # the flags stay what model.train() set: behaviour is frozen, not the mode
    assert all(m.training for m in bn_layers(model))


@pytest.mark.parametrize("kind", KINDS)
def test_frozen_model_survives_an_optimizer_step(kind):
    model = small_resnet(kind)
    before = snapshot(model)
    nl.freeze(model)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    for seed in range(2):
        opt.zero_grad()
        model(images(8, seed=seed)).square().mean().backward()
        opt.step()
    after = snapshot(model)
    bn_keys = [k for k in before if ".bn" in k or k.startswith("stem.1.")]
    assert bn_keys
    for k in bn_keys:  # γ, β, running statistics: bit-identical
        assert torch.equal(before[k], after[k]), k
    assert not torch.equal(before["stem.0.weight"], after["stem.0.weight"])  # the rest trains


@pytest.mark.parametrize("kind", KINDS)
def test_stats_only_keeps_affine_trainable_with_eval_mode_gradients(kind):
    model = small_resnet(kind)
    reference = copy.deepcopy(model).eval()
    nl.freeze(model, stats=True, affine=False)
    model.train()
    x = images(8, seed=2)
    model(x).sum().backward()
    reference(x).sum().backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert p.requires_grad
        torch.testing.assert_close(p.grad, q.grad, msg=name)


@pytest.mark.parametrize("kind", KINDS)
def test_affine_only_lets_statistics_move(kind):
    model = small_resnet(kind)
    before = _stats(model)
    nl.freeze(model, stats=False, affine=True)
    model.train()
    model(images(8, seed=3))
    bn = model.stem[1]
    assert not bn.weight.requires_grad and not bn.bias.requires_grad
    assert not torch.equal(bn.running_mean, before["stem.1.running_mean"])


@pytest.mark.parametrize("kind", KINDS)
def test_unfreeze_restores_previous_flags_and_training_behaviour(kind):
    model = small_resnet(kind)
    model.blocks[0].bn1.bias.requires_grad_(False)  # the user's own choice, kept
    nl.freeze(model)
    nl.unfreeze(model)
    bn = model.blocks[0].bn1
    assert bn.weight.requires_grad and not bn.bias.requires_grad
    assert not bn._forward_pre_hooks and not bn._forward_hooks
    model.train()
    before = bn.num_batches_tracked.clone()
    model(images(8))
    assert bn.num_batches_tracked == before + 1


def test_separate_control_freeze_then_unfreeze_one_part():
    model = small_resnet("torch")
    nl.freeze(model)
    nl.unfreeze(model, stats=False, affine=True)  # statistics stay frozen
    bn = model.stem[1]
    assert bn.weight.requires_grad
    model.train()
    before = bn.running_mean.clone()
    model(images(8))
    assert torch.equal(bn.running_mean, before)


def test_freeze_survives_deepcopy_and_pickle_independently():
    model = nl.freeze(small_resnet("normlab"))
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    for clone in (copy.deepcopy(model), torch.load(buf, weights_only=False)):
        clone.train()
        before = _stats(clone)
        clone(images(8))
        assert_identical(_stats(clone), before)
    nl.unfreeze(clone)  # unfreezing the copy leaves the original frozen
    model.train()
    before = _stats(model)
    model(images(8))
    assert_identical(_stats(model), before)


def test_training_flag_restored_when_the_forward_raises():
    bn = nl.freeze(nn.BatchNorm2d(3)).train()
    with pytest.raises(RuntimeError):
        bn(torch.randn(2, 4, 3, 3))  # wrong channel count
    assert bn.training


def test_layer_without_running_statistics_cannot_have_them_frozen():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, track_running_stats=False))
    with pytest.raises(ValueError, match="track_running_stats=False"):
        nl.freeze(model)
    nl.freeze(model, stats=False)  # the affine part still works
    assert not model[1].weight.requires_grad
