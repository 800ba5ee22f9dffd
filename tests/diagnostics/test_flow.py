"""GradientFlow against values computed by hand (numpy, chain rule written out) on a
2-layer net; hooks removed and modes restored; running statistics untouched."""

import numpy as np
import pytest
import torch
from torch import nn

import normlab as nl
from normlab import diagnostics as D
from tests.reference import state_snapshot


def two_layer():
    model = nn.Sequential(nn.Linear(2, 3), nn.Sigmoid(), nn.Linear(3, 1)).double()
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[4.0, -1.0], [0.5, 2.0], [-3.0, -3.0]]))
        model[0].bias.copy_(torch.tensor([0.5, -1.0, 0.0]))
        model[2].weight.copy_(torch.tensor([[1.0, -2.0, 0.5]]))
        model[2].bias.copy_(torch.tensor([0.25]))
    return model


X = np.array([[1.0, 0.0], [2.0, -1.0], [0.0, 3.0], [-1.0, 1.0]])
T = np.array([[1.0], [0.0], [-1.0], [2.0]])


def by_hand(model):
    w1 = model[0].weight.detach().numpy()
    b1 = model[0].bias.detach().numpy()
    w2 = model[2].weight.detach().numpy()
    b2 = model[2].bias.detach().numpy()
    z = X @ w1.T + b1  # (4, 3) pre-activation
    a = 1 / (1 + np.exp(-z))
    out = a @ w2.T + b2
    dout = 2 * (out - T) / out.size  # d mean((out-T)^2)
    dw2 = dout.T @ a
    da = dout @ w2  # gradient at layer 2's input
    dz = da * a * (1 - a)
    dw1 = dz.T @ X
    return z, dw1, dw2, da, np.linalg.norm(w1), np.linalg.norm(w2)


def test_two_layer_numbers_match_hand_computation():
    model = two_layer()
    x, t = torch.tensor(X), torch.tensor(T)
    z, dw1, dw2, da, n1, n2 = by_hand(model)
    with D.GradientFlow(model, saturation_threshold=3.0) as flow:
        nn.functional.mse_loss(model(x), t).backward()
    r = flow.result()
    assert [(lf.name, lf.kind, lf.index, lf.depth) for lf in r.layers] == [
        ("0", "Linear", 1, 1),
        ("2", "Linear", 2, 2),
    ]
    first, second = r.layers
    assert first.weight_grad_norm == pytest.approx(np.linalg.norm(dw1), rel=1e-12)
    assert second.weight_grad_norm == pytest.approx(np.linalg.norm(dw2), rel=1e-12)
    assert first.weight_norm == pytest.approx(n1) and second.weight_norm == pytest.approx(n2)
    assert first.grad_weight_ratio == pytest.approx(np.linalg.norm(dw1) / n1, rel=1e-12)
    assert first.input_grad_norm is None  # the network input does not require grad
    assert second.input_grad_norm == pytest.approx(np.linalg.norm(da), rel=1e-12)
    assert second.input_grad_rms == pytest.approx(np.linalg.norm(da) / np.sqrt(da.size))
    p = first.preact
    assert p.activation == "sigmoid" and p.count == 12 and p.num_units == 3
    assert p.mean == pytest.approx(z.mean()) and p.std == pytest.approx(z.std())
    assert (p.min, p.max) == pytest.approx((z.min(), z.max()))
    assert [p.p15, p.p50, p.p85] == pytest.approx(list(np.percentile(z, [15, 50, 85])))
    assert p.saturation_threshold == 3.0
    assert p.saturated_fraction == pytest.approx((np.abs(z) > 3).mean())
    assert 0 < p.saturated_fraction < 1  # the example exercises both sides
    assert p.active_fraction == pytest.approx((z > 0).mean())
    assert p.dead_fraction is None  # sigmoid units cannot die
    assert second.preact is None and r.forward_passes == 1 and r.backward_passes == 1
    d = r.to_dict()
    assert d["layers"][0]["preact"]["p50"] == p.p50


def test_several_passes_accumulate_rms_of_norms():
    model = two_layer()
    x, t = torch.tensor(X), torch.tensor(T)
    norms = []
    with D.GradientFlow(model) as flow:
        for scale in (1.0, 3.0):
            model.zero_grad()
            nn.functional.mse_loss(model(x * scale), t).backward()
            norms.append(float(model[0].weight.grad.norm()))
    r = flow.result()
    assert r.forward_passes == 2 and r.backward_passes == 2
    assert r.layers[0].weight_grad_norm == pytest.approx(np.sqrt(np.mean(np.square(norms))))
    assert r.layers[0].preact.count == 24


def test_relu_dead_fraction_and_tanh_threshold():
    model = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 3), nn.Tanh()).double()
    with torch.no_grad():
        model[0].bias.copy_(torch.tensor([-100.0, -100.0, -100.0, 100.0]))  # 3 of 4 dead
        model[2].weight.fill_(0.0)
        model[2].bias.copy_(torch.tensor([2.0, 3.0, -4.0]))  # |z| > 2.5 for 2 of 3
    r = D.gradient_flow(model, torch.tensor(X), lambda out: out.sum())
    relu, tanh = r.layers[0].preact, r.layers[1].preact
    assert relu.dead_fraction == 0.75 and relu.active_fraction == 0.25
    assert relu.saturated_fraction is None
    assert tanh.saturation_threshold == 2.5 and tanh.saturated_fraction == pytest.approx(2 / 3)


def test_hooks_removed_and_modes_restored_even_on_error():
    model = nn.Sequential(nn.Linear(2, 3), nl.nn.BatchNorm1d(3), nn.ReLU(), nn.Linear(3, 1))
    model.train()
    with pytest.raises(RuntimeError, match="boom"):
        with D.GradientFlow(model):
            model(torch.randn(4, 2)).sum().backward()
            model.eval()
            raise RuntimeError("boom")
    assert all(m.training for m in model.modules())
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks
    for p in model.parameters():
        assert not p._backward_hooks
    model.eval()
    with D.GradientFlow(model):
        model.train()
    assert not any(m.training for m in model.modules())


def test_gradient_flow_leaves_state_and_grad_untouched():
    model = nn.Sequential(nn.Linear(5, 6), nl.nn.BatchNorm1d(6), nn.Sigmoid(), nn.Linear(6, 3))
    x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
    model(x)  # non-trivial running statistics
    before = state_snapshot(model)
    r = D.gradient_flow(model, (x, y))
    assert state_snapshot(model) == before
    assert [lf.kind for lf in r.layers] == ["Linear", "BatchNorm1d", "Linear"]
    assert [lf.depth for lf in r.layers] == [1, 1, 2]
    assert all(lf.input_grad_norm > 0 for lf in r.layers)  # the network input included
    assert not x.requires_grad
    # BN in training mode: its output (the sigmoid input) has batch mean 0, variance ~1
    bn = model[1]
    p = r.layers[1].preact
    assert p is not None and r.layers[0].preact is None
    expected = bn.bias.mean().item()  # mean over units of beta (gamma=1 at init)
    assert p.mean == pytest.approx(expected, abs=1e-5)
    assert p.std == pytest.approx(1.0, abs=1e-3)
    r_eval = D.gradient_flow(model, (x, y), training=False)
    assert state_snapshot(model) == before
    assert r_eval.layers[1].preact.mean != pytest.approx(p.mean, abs=1e-3)


def test_fused_activation_preactivation_and_running_stats_updated_once():
    torch.manual_seed(0)
    fused = nn.Sequential(nn.Linear(4, 5), nl.nn.BatchNorm1d(5, activation="sigmoid"))
    plain = nn.Sequential(nn.Linear(4, 5), nl.nn.BatchNorm1d(5))
    plain.load_state_dict(fused.state_dict())
    x = torch.randn(32, 4) * 3 + 1
    with D.GradientFlow(fused) as flow:
        fused(x).sum().backward()
    z = plain(x).detach()
    p = flow.result().layers[1].preact
    assert p.activation == "sigmoid"
    assert p.mean == pytest.approx(float(z.double().mean()), abs=1e-6)
    assert [p.p15, p.p50, p.p85] == pytest.approx(
        torch.quantile(z.double().flatten(), torch.tensor([0.15, 0.5, 0.85]).double()).tolist()
    )
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(fused[1], name), getattr(plain[1], name)), name


def test_preactivations_and_unit_percentiles():
    model = two_layer()
    x = torch.tensor(X)
    pre = D.preactivations(model, x)
    z, *_ = by_hand(model)
    assert list(pre) == ["0"]
    np.testing.assert_allclose(pre["0"].numpy(), z)
    q = D.unit_percentiles(model, x, "0", 2)
    assert q == pytest.approx(list(np.percentile(z[:, 2], [15, 50, 85])))
    with pytest.raises(KeyError, match="layers feeding an activation"):
        D.unit_percentiles(model, x, "2", 0)
    with pytest.raises(IndexError, match="unit must be in"):
        D.unit_percentiles(model, x, "0", 3)


def test_bad_arguments():
    with pytest.raises(TypeError, match=r"torch\.nn\.Module"):
        D.GradientFlow("not a model")
    with pytest.raises(ValueError, match="saturation_threshold"):
        D.GradientFlow(nn.Linear(1, 1), saturation_threshold=0)


def test_conv_units_are_channels_and_preactivations_leave_state_alone():
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nl.nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 1, 1)
    )
    with torch.no_grad():
        model[1].bias.copy_(torch.tensor([-50.0, -50.0, 0.0, 0.0]))  # channels 0, 1 dead
    x = torch.randn(8, 2, 5, 5)
    before = state_snapshot(model)
    pre = D.preactivations(model, x, training=True)
    assert state_snapshot(model) == before and list(pre) == ["1"]
    assert pre["1"].shape == (8, 4, 5, 5)
    r = D.gradient_flow(model, x, lambda out: out.pow(2).mean())
    assert state_snapshot(model) == before
    p = r.layer("1").preact
    assert p.num_units == 4 and p.dead_fraction == 0.5
    assert p.active_fraction == pytest.approx(float((pre["1"] > 0).double().mean()))
    q = D.unit_percentiles(model, x, "1", 2, training=True)
    expected = torch.quantile(
        pre["1"][:, 2].double().flatten(), torch.tensor([0.15, 0.5, 0.85]).double()
    )
    assert q == pytest.approx(expected.tolist())


def test_flow_still_exports_the_names_of_its_parts():
    # records and hooks live in _flow_records / _flow_hooks; `flow` keeps every public name
    from normlab.diagnostics import _flow_hooks, _flow_records, flow

    for name in flow.__all__:
        assert hasattr(flow, name), name
    for module in (_flow_hooks, _flow_records):
        public = [n for n in vars(module) if not n.startswith("_") and n.isupper()]
        assert public and all(getattr(flow, n) is getattr(module, n) for n in public)
    assert flow.quantiles is _flow_records.quantiles and flow.FlowResult is D.FlowResult
