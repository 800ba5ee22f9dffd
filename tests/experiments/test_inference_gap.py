import pytest
import torch

from normlab.experiments.inference_gap import output_mean_check, shift_inputs


def test_shift_inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.ones(3, 2)
    assert torch.equal(shift_inputs(x, "offset", 2.0, g), x + 2)
    assert torch.equal(shift_inputs(x, "scale", 0.5, g), x * 0.5)
    assert not torch.equal(shift_inputs(x, "noise", 1.0, g), x)
    with pytest.raises(ValueError, match="offset"):
        shift_inputs(x, "blur", 1.0, g)


def test_output_mean_formula_by_hand():
    # one BN layer with known statistics: output mean = γ(m_test − μ)/sqrt(σ² + ε) + β
    import normlab as nl

    bn = nl.nn.BatchNorm1d(2)
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor([1.0, -1.0]))
        bn.running_var.copy_(torch.tensor([4.0, 0.25]))
        bn.weight.copy_(torch.tensor([2.0, 3.0]))
        bn.bias.copy_(torch.tensor([0.5, -0.5]))
    x = torch.tensor([[3.0, 0.0], [5.0, 1.0]])  # m_test = [4, 0.5]
    check = output_mean_check(torch.nn.Sequential(bn), x)
    assert check["max_rel_diff"] < 1e-6
    expected_gap = [abs(2 * 3 / (4 + 1e-5) ** 0.5), abs(3 * 1.5 / (0.25 + 1e-5) ** 0.5)]
    assert check["gap_per_layer"][0] == pytest.approx(sum(expected_gap) / 2, rel=1e-5)


def test_holds_in_quick_mode(quick_result):
    r = quick_result("inference-gap")
    assert r.verdict == "holds", r.measured
    acc = r.metrics["accuracy"]
    i = acc["shift"].index("offset 2")
    assert acc["none"][i] < r.metrics["clean_accuracy"] - 0.1  # the shift hurts
    assert acc["recalibrate"][i] == pytest.approx(r.metrics["clean_accuracy"], abs=0.02)
