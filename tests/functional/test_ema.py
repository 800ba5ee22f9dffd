import pytest
import torch

import normlab.functional as NF


@pytest.mark.parametrize("initial", [0.0, 1.0])
def test_debias_removes_the_initial_value_exactly(initial):
    # Brute force: an EMA of a constant signal m, started at `initial`, de-biased, equals m.
    m, momentum = torch.tensor([3.0, -2.0], dtype=torch.float64), 0.1
    running = torch.full((2,), initial, dtype=torch.float64)
    for t in range(1, 30):
        NF.ema_update_(running, m, momentum)
        expected_biased = m * (1 - (1 - momentum) ** t) + initial * (1 - momentum) ** t
        torch.testing.assert_close(running, expected_biased)
        torch.testing.assert_close(NF.ema_debias(running, initial, momentum, t), m)


def test_debias_no_op_cases():
    r = torch.tensor([1.0])
    assert NF.ema_debias(r, 0.0, None, 5) is r
    assert NF.ema_debias(r, 0.0, 0.1, 0) is r
    assert NF.cumulative_factor(4) == 0.25
