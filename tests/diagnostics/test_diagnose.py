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


def test_deep_plain_sigmoid_vanishes(batch):
    model = sigmoid_mlp(8, bn=False, std=0.1)  # about torch's default scale
    before = state_snapshot(model)
    d = D.diagnose(model, batch)
    assert state_snapshot(model) == before
    assert [v.verdict for v in d.layers[:5]] == ["vanishing"] * 5
    assert all(v.verdict == "healthy" for v in d.layers[5:])
    assert not d.healthy and d.reference_layer == "16"  # the output Linear
    assert d.layers[-1].relative_grad == 1.0
    # the rule's number is the back-propagated gradient's decay, from the raw probe
    flow = d.flow.layers
    assert d.layers[0].relative_grad == pytest.approx(
        flow[0].input_grad_rms / flow[-1].input_grad_rms
    )
    assert any(r.startswith("Gradients vanish in layers 1–5") for r in d.recommendations)
    assert d.to_dict()["layers"][0]["verdict"] == "vanishing"


def test_deep_plain_sigmoid_saturates(batch):
    d = D.diagnose(sigmoid_mlp(8, bn=False, std=1.5), batch)
    assert all("saturated" in v.problems for v in d.layers[:8])
    sat = [r.preact.saturated_fraction for r in d.flow.layers[:8]]
    assert min(sat) > 0.25
    assert d.recommendations[0].startswith("Insert BatchNorm before the sigmoid in layers 1–8")
    # a stricter bound turns the verdicts off: the rule is the stated one
    d = D.diagnose(sigmoid_mlp(8, bn=False, std=1.5), batch, saturated_threshold=max(sat))
    assert not any("saturated" in v.problems for v in d.layers)


@pytest.mark.parametrize("std", [0.1, 1.0, 3.0])
def test_same_net_with_bn_is_healthy_at_any_weight_scale(batch, std):
    model = sigmoid_mlp(8, bn=True, std=std)
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
    # a deep linear stack with gain 3 per layer: the signal grows 3^7 on its way down
    torch.manual_seed(0)
    deep = nn.Sequential(*[nn.Linear(16, 16, bias=False) for _ in range(8)])
    with torch.no_grad():
        for lin in deep:
            nn.init.orthogonal_(lin.weight, gain=3.0)
    d = D.diagnose(deep, (batch[0], torch.randn(64, 16)))
    assert [v.verdict for v in d.layers[:2]] == ["exploding", "healthy"]  # 2187x, 729x
    assert d.layers[0].relative_grad == pytest.approx(3.0**7, rel=1e-3)
    assert d.layers[1].relative_grad == pytest.approx(3.0**6, rel=1e-3)
    assert d.recommendations[0].startswith("Gradients explode in layer 1:")
