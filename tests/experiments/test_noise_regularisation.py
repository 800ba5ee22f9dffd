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
