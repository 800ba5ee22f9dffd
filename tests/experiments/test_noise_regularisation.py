import pytest
import torch

import normlab.nn as nlnn


def test_three_nets_per_batch_size(quick_result):
    rows = quick_result("noise-regularisation").tables["mean over seeds"]["rows"]
    assert {r[1] for r in rows} == {"no norm", "BatchNorm", "BN, running stats"}


def test_running_stats_control_against_torch():
    """The control layer: running statistics updated as torch's BN in training, output and
    input gradient those of eval-mode BN with the updated statistics (constants)."""
    from normlab.experiments._training import RunningStatsNorm

    g = torch.Generator().manual_seed(0)
    x = (3 + 2 * torch.randn(16, 5, generator=g, dtype=torch.float64)).requires_grad_()
    ours = RunningStatsNorm(nlnn.BatchNorm1d(5, dtype=torch.float64)).train()
    ref = torch.nn.BatchNorm1d(5, dtype=torch.float64).train()
    with torch.no_grad():
        for m in (ours.bn, ref):
            m.weight.copy_(torch.linspace(0.5, 2.0, 5))
            m.bias.copy_(torch.linspace(-1.0, 1.0, 5))
    y = ours(x)
    ref(x.detach())  # torch's training-mode update of the running statistics
    torch.testing.assert_close(ours.bn.running_mean, ref.running_mean)
    torch.testing.assert_close(ours.bn.running_var, ref.running_var)
    assert ours.training and ours.bn.training  # modes restored
    scale = ref.weight / torch.sqrt(ref.running_var + ref.eps)
    expected = (x.detach() - ref.running_mean) * scale + ref.bias
    torch.testing.assert_close(y, expected)
    (grad,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(grad, scale.expand_as(x))  # statistics are constants


def _synthetic(gap_small, gap_large, acc_small=0.0):
    """BN − control gap differences per seed at batch 16 and 64 (the quick config's);
    BN's accuracy minus the control's at batch 16 is ``acc_small`` on every seed."""
    from normlab.experiments.noise_regularisation import Measurement

    def net(values):
        return {"none": [0.5] * len(values), "bn": list(values), "bn-running": [0.0] * len(values)}

    gaps = {16: net(gap_small), 64: net(gap_large)}
    acc = {16: net([0.9 + acc_small] * len(gap_small)), 64: net([0.9] * len(gap_large))}
    acc[16]["bn-running"] = [0.9] * len(gap_small)
    return Measurement(n_test=5, gap=gaps, test_accuracy=acc, train_accuracy=acc)


@pytest.mark.parametrize(
    ("args", "verdict"),
    [
        (([-0.30, -0.32], [-0.10, -0.12]), "holds"),  # clearly smaller gap, larger at 16
        (([-0.30, -0.32], [-0.10, -0.12], -0.01), "inconclusive"),  # but lower accuracy
        (([-0.10, -0.12], [-0.30, -0.32]), "inconclusive"),  # advantage grows with batch
        (([-0.5, 0.3], [-0.1, -0.1]), "inconclusive"),  # within the noise
        (([0.30, 0.32], [0.0, 0.0]), "fails"),  # BN's gap clearly larger
    ],
)
def test_verdict_rule(args, verdict):
    from normlab.experiments.registry import get

    exp = get("noise-regularisation")
    assert exp.judge(exp.quick_config(), _synthetic(*args)) == verdict
