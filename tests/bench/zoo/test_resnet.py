"""ResNet-18/50: torchvision's keys, the leaky variant, zero-init residual, the builders."""

import torch
from torch import nn

from normlab.bench import zoo
from tests.bench.test_zoo import TORCHVISION_PARAMS, _count


def test_leaky_resnet18_has_resnet18s_parameters_and_only_leaky_activations():
    model = zoo.build("resnet18_leaky")
    assert _count(model) == TORCHVISION_PARAMS["resnet18"]
    acts = [m for m in model.modules() if isinstance(m, (nn.ReLU, nn.LeakyReLU))]
    assert acts and all(isinstance(m, nn.LeakyReLU) for m in acts)
    assert {m.negative_slope for m in acts} == {0.01}  # torch's and normlab's default


def _resnet_keys(blocks, convs_per_block, fc_in):
    """torchvision's ResNet state_dict keys, written out from its module structure."""
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    keys = {"conv1.weight", *(f"bn1.{k}" for k in bn), "fc.weight", "fc.bias"}
    for stage, n in enumerate(blocks, start=1):
        for b in range(n):
            prefix = f"layer{stage}.{b}"
            for i in range(1, convs_per_block + 1):
                keys.add(f"{prefix}.conv{i}.weight")
                keys.update(f"{prefix}.bn{i}.{k}" for k in bn)
            # downsample where stride or width changes: every stage's first block except
            # ResNet-18's first stage (64 -> 64, stride 1)
            if b == 0 and (stage > 1 or convs_per_block == 3):
                keys.add(f"{prefix}.downsample.0.weight")
                keys.update(f"{prefix}.downsample.1.{k}" for k in bn)
    return keys


def test_resnet_state_dict_keys_are_torchvisions():
    assert set(zoo.resnet18().state_dict()) == _resnet_keys((2, 2, 2, 2), 2, 512)
    assert set(zoo.resnet50().state_dict()) == _resnet_keys((3, 4, 6, 3), 3, 2048)


def test_zero_init_residual_zeroes_each_blocks_last_norm():
    with torch.no_grad():
        model = zoo.resnet50(zero_init_residual=True)
        assert all(torch.count_nonzero(b.bn3.weight) == 0 for b in model.layer1)
        assert torch.equal(model.bn1.weight, torch.ones(64))  # other norms keep weight 1
        basic = zoo.resnet18(zero_init_residual=True)
        assert all(torch.count_nonzero(b.bn2.weight) == 0 for b in basic.layer2)
        assert all(torch.count_nonzero(b.bn2.weight) == 64 for b in zoo.resnet18().layer1)


def test_builders_keep_their_names_signatures_and_docs():
    import inspect

    for builder in (zoo.resnet18, zoo.resnet50):
        assert builder.__name__ in builder.__qualname__ and builder.__doc__
        params = inspect.signature(builder).parameters
        assert list(params) == [
            "num_classes",
            "norm_layer",
            "activation",
            "inplace",
            "zero_init_residual",
        ]
        assert all(p.kind is p.KEYWORD_ONLY for p in params.values())
    assert isinstance(zoo.resnet50().layer1[0], zoo.Bottleneck)
    assert isinstance(zoo.resnet18().layer1[0], zoo.BasicBlock)
