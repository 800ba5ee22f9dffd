"""The shared pieces: channel rounding and the weight-init loop."""

import torch
from torch import nn

from normlab.bench import zoo


def test_make_divisible_rounds_to_nearest_and_never_loses_ten_percent():
    assert zoo.make_divisible(32) == 32
    assert zoo.make_divisible(12) == 16  # 12 + 4 = 16 -> 16
    assert zoo.make_divisible(3) == 8  # at least the divisor
    assert zoo.make_divisible(17.6) == 16  # 16 >= 0.9 * 17.6
    assert zoo.make_divisible(10) == 16  # 8 < 0.9 * 10: one step up
    assert zoo.make_divisible(5, 4, min_value=1) == 8  # int(5 + 2) // 4 * 4 = 4 < 4.5


def test_init_weights_draws_what_the_reference_loop_draws():
    from normlab.bench.zoo._blocks import init_weights

    def model():
        return nn.Sequential(
            nn.Conv2d(3, 4, 3, bias=True), nn.BatchNorm2d(4), nn.GroupNorm(2, 4), nn.Linear(4, 2)
        )

    def conv(m):
        nn.init.kaiming_normal_(m.weight, mode="fan_out")
        nn.init.zeros_(m.bias)

    torch.manual_seed(0)
    got = model()
    init_weights(got, conv, norms=(nn.BatchNorm2d,), linear_std=0.01)
    torch.manual_seed(0)
    want = model()  # torchvision's loop, written out
    nn.init.kaiming_normal_(want[0].weight, mode="fan_out")
    nn.init.zeros_(want[0].bias)
    nn.init.ones_(want[1].weight)
    nn.init.zeros_(want[1].bias)
    # want[2], a GroupNorm, is not in norms: both keep it as built
    nn.init.normal_(want[3].weight, 0, 0.01)
    nn.init.zeros_(want[3].bias)
    for (k, a), b in zip(got.state_dict().items(), want.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)
    assert torch.count_nonzero(got[0].bias) == 0 and torch.all(got[1].weight == 1)
    without_linear = model()
    before = without_linear[3].weight.clone()
    init_weights(without_linear, conv)
    assert torch.equal(without_linear[3].weight, before)  # linear_std=None: Linear untouched
