"""diagnose: verdicts and recommendations on nets built to have each problem."""

import pytest
import torch
from torch import nn

import normlab as nl
from normlab import diagnostics as D
from tests.reference import state_snapshot


def sigmoid_mlp(depth: int, bn: bool, std: float) -> nn.Sequential:
    torch.manual_seed(0)
    layers, width = [], 32
    for i in range(depth):
        lin = nn.Linear(16 if i == 0 else width, width)
        nn.init.normal_(lin.weight, 0.0, std)
        nn.init.zeros_(lin.bias)
        layers += [lin, *([nl.nn.BatchNorm1d(width)] if bn else []), nn.Sigmoid()]
    layers.append(nn.Linear(width, 10))
    return nn.Sequential(*layers)


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(64, 16, generator=g), torch.randint(0, 10, (64,), generator=g)


def test_deep_plain_sigmoid_is_saturated_and_vanishing(batch):
    model = sigmoid_mlp(8, bn=False, std=1.0)
    before = state_snapshot(model)
    d = D.diagnose(model, batch)
    assert state_snapshot(model) == before
    verdicts = {v.depth: v.verdict for v in d.layers}
    assert verdicts[1] == "vanishing"
    saturated = [v.depth for v in d.layers if "saturated" in v.problems]
    assert saturated and min(saturated) >= 2
    assert not d.healthy and d.reference_layer == "24"
    text = " ".join(d.recommendations)
    assert f"Insert BatchNorm before the sigmoid in layers {D.layer_ranges(saturated)}" in text
    assert "vanish" in text
    assert d.to_dict()["layers"][0]["verdict"] == "vanishing"


def test_same_net_with_bn_is_healthy(batch):
    model = sigmoid_mlp(8, bn=True, std=1.0)
    before = state_snapshot(model)
    d = D.diagnose(model, batch)
    assert state_snapshot(model) == before
    assert d.healthy, [(v.name, v.verdict, v.reasons) for v in d.layers]
    assert d.recommendations[0].startswith("No problem found")


def test_dead_relu_and_exploding(batch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 10))
    with torch.no_grad():
        model[0].bias.fill_(-100.0)
        model[0].bias[0] = 100.0
    d = D.diagnose(model, batch)
    assert d.layers[0].verdict == "dead" and "88% of relu units never active" in d.layers[0].reasons
    assert any("Dead ReLU units in layer 1" in r for r in d.recommendations)
    with torch.no_grad():  # a tiny first layer: its relative gradient dwarfs the output's
        model[0].bias.fill_(0.0)
        model[0].weight.mul_(1e-6)
    d = D.diagnose(model, batch)
    assert (
        d.layers[0].verdict == "exploding"
        and "Gradients explode in layer 1" in d.recommendations[0]
    )


def test_layer_ranges_and_bad_thresholds(batch):
    assert D.layer_ranges([3, 4, 5, 1, 7, 8]) == "1, 3–5, 7–8"
    assert D.layer_ranges([2]) == "2"
    with pytest.raises(ValueError, match="saturated_threshold"):
        D.diagnose(nn.Linear(16, 10), batch, saturated_threshold=2)
