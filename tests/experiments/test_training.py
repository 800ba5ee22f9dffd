"""The shared training helpers of the experiments (normlab.experiments._training)."""

import pytest
import torch
from torch import nn

import normlab.nn as nlnn
from normlab.data import load_digits
from normlab.experiments import _training as T


def test_iid_batches_are_permutations_per_epoch():
    gen = torch.Generator().manual_seed(0)
    stream = T.iid_batches(10, 3, gen)
    epoch = torch.cat([next(stream) for _ in range(3)])  # 3 full batches, 1 index dropped
    assert len(set(epoch.tolist())) == 9
    again = T.iid_batches(10, 3, torch.Generator().manual_seed(0))
    assert torch.equal(torch.cat([next(again) for _ in range(3)]), epoch)
    with pytest.raises(ValueError, match="batch_size"):
        next(T.iid_batches(10, 11, gen))


def test_class_grouped_batches():
    y = torch.arange(10).repeat_interleave(7)  # 10 classes × 7 examples
    stream = T.class_grouped_batches(y, 2, 3, torch.Generator().manual_seed(0))
    seen = []
    for _ in range(50):
        idx = next(stream)
        labels = y[idx]
        assert len(idx) == 6
        assert len(set(labels.tolist())) == 2
        assert all(int((labels == c).sum()) == 3 for c in labels.unique())
        seen.append(idx)
    # within a batch no index repeats; over many batches every class appears
    assert all(len(set(i.tolist())) == 6 for i in seen)
    assert set(y[torch.cat(seen)].tolist()) == set(range(10))
    with pytest.raises(ValueError, match="classes_per_batch"):
        next(T.class_grouped_batches(y, 11, 1, torch.Generator()))


def test_mlp_shape_norm_placement_and_init():
    torch.manual_seed(0)
    m = T.mlp(64, [20, 20], 10, norm="bn", activation="sigmoid", init_std=2.0)
    kinds = [type(layer).__name__ for layer in m]
    assert kinds == [
        "Linear", "BatchNorm1d", "Sigmoid", "Linear", "BatchNorm1d", "Sigmoid", "Linear"
    ]  # fmt: skip
    assert isinstance(m[1], nlnn.BatchNorm1d)
    # N(0, 2²/64): the sample std of 1280 weights is within 10% of 0.25
    assert abs(float(m[0].weight.detach().std()) - 0.25) < 0.025
    assert torch.count_nonzero(m[0].bias) == 0


def test_mlp_without_hidden_bias():
    torch.manual_seed(0)
    m = T.mlp(64, [20, 20], 10, norm="bn", activation="relu", bias=False, init_std=1.0)
    linears = T.modules_of(m, nn.Linear)
    assert [lin.bias is None for lin in linears] == [True, True, False]  # classifier keeps it
    assert isinstance(m[2], nn.ReLU)


def test_seeded_is_deterministic_and_restores_the_callers_rng():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    with T.seeded(0):
        a = T.mlp(8, [4], 2)
    with T.seeded(0):
        b = T.mlp(8, [4], 2)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert torch.equal(torch.rand(3), expected)  # the caller's stream went on untouched


@pytest.mark.parametrize("norm", ["none", "bn", "brn", "gn", "ln", "in"])
def test_small_cnn_runs_with_every_norm(norm):
    torch.manual_seed(0)
    kwargs = {"num_groups": 4} if norm == "gn" else {}
    m = T.small_cnn(norm=norm, norm_kwargs=kwargs)
    out = m(torch.randn(3, 1, 8, 8))
    assert out.shape == (3, 10)
    if norm == "ln":  # LayerNorm over (C, H, W) of the 8×8 then 4×4 maps
        shapes = [tuple(x.normalized_shape) for x in m if isinstance(x, nlnn.LayerNorm)]
        assert shapes == [(16, 8, 8), (32, 4, 4), (32, 4, 4)]


def test_copy_weights_makes_plain_and_bn_nets_agree():
    torch.manual_seed(0)
    plain = T.mlp(8, [6, 6], 3, norm="none")
    torch.manual_seed(1)
    bn = T.mlp(8, [6, 6], 3, norm="bn")
    T.copy_weights(plain, bn)
    for a, b in zip(T.modules_of(plain, nn.Linear), T.modules_of(bn, nn.Linear), strict=True):
        assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)


def test_train_is_deterministic_and_leaves_eval_accuracy():
    data = load_digits(seed=0)

    def run():
        torch.manual_seed(0)
        m = T.mlp(64, [32], 10, norm="bn", activation="relu")
        return T.train(m, data, steps=30, lr=0.1, batch_size=32, seed=3, eval_every=10), m

    (h1, m1), (h2, _) = run(), run()
    assert h1.loss == h2.loss and h1.test_accuracy == h2.test_accuracy
    assert h1.eval_steps == [0, 10, 20, 30] and len(h1.loss) == 30
    assert h1.final_test_accuracy == T.accuracy(m1, data.x_test, data.y_test)
    assert h1.final_test_accuracy > 0.5 and not h1.diverged


def test_train_hooks_and_weight_decay_on_weights_only():
    """Plain SGD, one step by hand: on_gradient sees the weights before the update and the
    gradient, on_step the weights after it; with weight_decay_on='weights' the update is
    W − lr·(∇W + wd·W) for weight matrices and p − lr·∇p for biases and BN's γ, β."""
    data = load_digits(seed=0)
    torch.manual_seed(0)
    m = T.mlp(64, [16], 10, norm="bn", activation="relu", bias=False)
    lr, wd = 0.1, 0.5
    seen = {}

    def before(step, model):
        seen["before"] = [(p.detach().clone(), p.grad.clone()) for p in model.parameters()]

    def after(step, model):
        seen["after"] = [p.detach().clone() for p in model.parameters()]

    T.train(m, data, steps=1, lr=lr, momentum=0.0, weight_decay=wd, weight_decay_on="weights",
            on_gradient=before, on_step=after)  # fmt: skip
    for (w, g), new in zip(seen["before"], seen["after"], strict=True):
        decay = wd * w if w.dim() >= 2 else 0.0
        torch.testing.assert_close(new, w - lr * (g + decay))
    with pytest.raises(ValueError, match="weight_decay_on"):
        T.train(m, data, steps=1, lr=lr, weight_decay_on="biases")


def test_train_stops_on_divergence():
    data = load_digits(seed=0)
    torch.manual_seed(0)
    m = T.mlp(64, [32], 10, activation="relu")
    hist = T.train(m, data, steps=50, lr=1e6, batch_size=32)
    assert hist.diverged and len(hist.loss) < 50
    assert hist.eval_steps[-1] == len(hist.loss)


def test_probe_layers_leaves_model_untouched():
    torch.manual_seed(0)
    m = T.mlp(64, [16, 16, 16], 10, norm="bn")
    m.eval()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    x, y = torch.randn(32, 64), torch.randint(0, 10, (32,))
    probe = T.probe_layers(m, x, y)
    assert len(probe.grad_norm) == len(probe.saturated_fraction) == 3
    assert not m.training and all(p.grad is None for p in m.parameters())
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_unit_percentiles_against_quantile_of_the_captured_input():
    torch.manual_seed(0)
    m = T.mlp(64, [16, 12], 10, norm="none")
    x = torch.randn(50, 64)
    per_unit = T.unit_percentiles(m, x)
    z = m[2](m[1](m[0](x)))  # the input of the last sigmoid
    z = z.detach().double()
    assert len(per_unit) == 12
    ref = torch.quantile(z[:, 5], torch.tensor([0.15, 0.5, 0.85], dtype=torch.float64))
    torch.testing.assert_close(torch.tensor(per_unit[5], dtype=torch.float64), ref)


@pytest.mark.parametrize("norm", ["bn", "gn", "ln", "in"])
def test_small_cnn_with_flattened_map_and_hidden_layer(norm):
    torch.manual_seed(0)
    kwargs = {"num_groups": 4} if norm == "gn" else {}
    m = T.small_cnn(
        channels=(8, 16),
        strides=(2, 2),
        norm=norm,
        norm_kwargs=kwargs,
        pool="flatten",
        hidden=(12,),
    )
    assert m(torch.randn(3, 1, 8, 8)).shape == (3, 10)
    fc, _ = T.modules_of(m, nn.Linear)
    assert fc.in_features == 16 * 2 * 2  # the 2×2 map flattened, not pooled
    after_fc = list(m)[list(m).index(fc) + 1]
    if norm == "in":  # undefined on one value per feature: no norm, and a bias instead
        assert isinstance(after_fc, nn.ReLU) and fc.bias is not None
    else:
        expected = {"bn": nlnn.BatchNorm1d, "gn": nlnn.GroupNorm, "ln": nlnn.LayerNorm}[norm]
        assert isinstance(after_fc, expected) and fc.bias is None


def test_small_cnn_defaults_unchanged_and_bad_pool_named():
    m = T.small_cnn(norm="bn")
    assert [type(x).__name__ for x in m][-3:] == ["AdaptiveAvgPool2d", "Flatten", "Linear"]
    with pytest.raises(ValueError, match="pool must be 'avg' or 'flatten'"):
        T.small_cnn(pool="max")


def test_train_as_reads_the_sgd_settings_the_call_does_not_give():
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class Config:  # an experiment config naming its batch size differently
        steps: int = 12
        lr: float = 0.1
        batch: int = 32
        momentum: float = 0.5
        seed: int = 3

    data = load_digits(seed=0)

    def run(train, *config, **kwargs):
        with T.seeded(0):
            m = T.mlp(64, [16], 10, activation="relu")
        return train(*config, m, data, **kwargs).loss

    explicit = run(T.train, steps=12, lr=0.1, batch_size=32, momentum=0.5, seed=3)
    assert run(T.train_as, Config(), batch_size=32) == explicit
    # an explicit setting wins over the config's
    assert run(T.train_as, Config(), batch_size=32, steps=5) == explicit[:5]
    with pytest.raises(AttributeError, match="batch_size"):  # not in the config, not given
        run(T.train_as, Config())


def test_mlp_widths():
    assert T.mlp_widths(64, (128, 128), 10) == "64-128-128-10"
    assert T.mlp_widths(3, (), 2) == "3-2"


def test_history_accuracy_line_is_the_test_accuracy_curve():
    hist = T.History(eval_steps=[0, 10, 20], test_accuracy=[0.1, 0.5, 0.9])
    line = hist.accuracy_line("BN", "s-")
    assert (line.label, line.x, line.y, line.style) == ("BN", [0, 10, 20], [0.1, 0.5, 0.9], "s-")
    assert hist.accuracy_line("plain").style == "-"
