import warnings

import pytest
import torch

import normlab.functional as NF
from tests import reference as ref


def test_matches_torch_functional_train_and_eval():
    x = torch.randn(10, 4, 3)
    w, b = torch.rand(4) + 0.5, torch.randn(4)
    rm, rv = torch.zeros(4), torch.ones(4)
    trm, trv = rm.clone(), rv.clone()
    y = NF.batch_norm(x, rm, rv, w, b, True, 0.3, 1e-4)
    ty = torch.nn.functional.batch_norm(x, trm, trv, w, b, True, 0.3, 1e-4)
    torch.testing.assert_close(y, ty)
    torch.testing.assert_close(rm, trm)
    torch.testing.assert_close(rv, trv)
    torch.testing.assert_close(
        NF.batch_norm(x, rm, rv, w, b, False, 0.3, 1e-4),
        torch.nn.functional.batch_norm(x, trm, trv, w, b, False, 0.3, 1e-4),
    )


def test_running_statistics_follow_the_recurrence():
    # docs/reliability.md case 7: biased variance to normalise, unbiased in running_var;
    # momentum 1 copies
    x = torch.randn(7, 3, 2, dtype=torch.float64)
    mean, _, unbiased, _ = ref.batch_stats(x)
    rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    NF.batch_norm(x, rm, rv, training=True, momentum=1.0)
    torch.testing.assert_close(rm, mean)
    torch.testing.assert_close(rv, unbiased)
    rm2, rv2 = (
        torch.full((3,), 2.0, dtype=torch.float64),
        torch.full((3,), 3.0, dtype=torch.float64),
    )
    NF.batch_norm(x, rm2, rv2, training=True, momentum=0.25)
    torch.testing.assert_close(rm2, 0.75 * 2.0 + 0.25 * mean)
    torch.testing.assert_close(rv2, 0.75 * 3.0 + 0.25 * unbiased)


def test_cumulative_average_with_momentum_none():
    # docs/reliability.md case 8: every batch weighs the same
    batches = [torch.randn(5, 2, dtype=torch.float64) * (i + 1) for i in range(6)]
    rm, rv = torch.zeros(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64)
    nbt = torch.tensor(0)
    for x in batches:
        NF.batch_norm(x, rm, rv, training=True, momentum=None, num_batches_tracked=nbt)
    assert int(nbt) == 6
    torch.testing.assert_close(rm, torch.stack([ref.batch_stats(x)[0] for x in batches]).mean(0))
    torch.testing.assert_close(rv, torch.stack([ref.batch_stats(x)[2] for x in batches]).mean(0))


def test_channel_dim_last_equals_moving_the_channel():
    x = torch.randn(6, 5, 3)  # (N, L, C)
    w, b = torch.rand(3), torch.randn(3)
    rm, rv = torch.zeros(3), torch.ones(3)
    trm, trv = rm.clone(), rv.clone()
    y = NF.batch_norm(x, rm, rv, w, b, training=True, channel_dim=-1)
    ty = torch.nn.functional.batch_norm(x.transpose(1, 2), trm, trv, w, b, training=True)
    torch.testing.assert_close(y, ty.transpose(1, 2))
    torch.testing.assert_close(rm, trm)
    torch.testing.assert_close(rv, trv)


def test_zero_batch_and_empty_spatial_leave_statistics_untouched():
    # docs/reliability.md case 5
    for shape in [(0, 3, 4, 4), (2, 3, 0, 4)]:
        x = torch.randn(shape, requires_grad=True)
        w = torch.ones(3, requires_grad=True)
        b = torch.zeros(3, requires_grad=True)
        rm, rv, nbt = torch.zeros(3), torch.ones(3), torch.tensor(0)
        y = NF.batch_norm(x, rm, rv, w, b, training=True, num_batches_tracked=nbt)
        assert y.shape == shape
        y.sum().backward()
        assert torch.equal(w.grad, torch.zeros(3)) and torch.equal(b.grad, torch.zeros(3))
        assert x.grad.shape == shape
        assert torch.equal(rm, torch.zeros(3)) and torch.equal(rv, torch.ones(3)) and int(nbt) == 0


@pytest.mark.parametrize("policy", ["skip", "raise", "propagate"])
def test_nonfinite_policies(policy):
    clean = [torch.randn(8, 3) + 2, torch.randn(8, 3) - 1]
    bad = clean[0].clone()
    bad[3, 1] = float("nan")
    rm, rv, nbt = torch.zeros(3), torch.ones(3), torch.tensor(0)
    NF.batch_norm(clean[0], rm, rv, training=True, num_batches_tracked=nbt, nonfinite=policy)
    before = (rm.clone(), rv.clone(), nbt.clone())
    if policy == "raise":
        with pytest.raises(FloatingPointError, match="nonfinite='skip'"):
            NF.batch_norm(bad, rm, rv, training=True, num_batches_tracked=nbt, nonfinite=policy)
    elif policy == "skip":
        with pytest.warns(NF.NonFiniteStatisticsWarning):
            NF.batch_norm(bad, rm, rv, training=True, num_batches_tracked=nbt, nonfinite=policy)
    else:
        NF.batch_norm(bad, rm, rv, training=True, num_batches_tracked=nbt, nonfinite=policy)
        assert torch.isnan(rm[1]) and int(nbt) == 2
        return
    assert all(torch.equal(a, b_) for a, b_ in zip((rm, rv, nbt), before))


@pytest.mark.parametrize(
    "call, exc, pattern",
    [
        (
            lambda: NF.batch_norm(torch.randn(1, 3), None, None, training=True),
            ValueError,
            r"more than 1 value per channel.*eval mode.*GroupNorm.*SyncBatchNorm",
        ),
        (
            lambda: NF.batch_norm(torch.randn(4, 3), None, None, training=False),
            ValueError,
            r"running_mean/running_var are None.*training=True",
        ),
        (
            lambda: NF.batch_norm(torch.randn(4, 3), torch.zeros(2), torch.ones(2), training=False),
            ValueError,
            r"running_mean must have shape \(3,\)",
        ),
        (
            lambda: NF.batch_norm(torch.randn(4, 3), None, None, torch.ones(4), training=True),
            ValueError,
            r"weight must have shape \(3,\)",
        ),
        (
            lambda: NF.batch_norm(
                torch.randn(4, 3), None, None, None, torch.ones(2), training=True
            ),
            ValueError,
            r"bias must have shape \(3,\)",
        ),
        (
            lambda: NF.batch_norm(torch.ones(4, 3, dtype=torch.int64), None, None, training=True),
            TypeError,
            r"input must be floating point.*\.float\(\)",
        ),
        (
            lambda: NF.batch_norm(
                torch.randn(4, 3, dtype=torch.complex64), None, None, training=True
            ),
            TypeError,
            r"complex",
        ),
        (
            lambda: NF.batch_norm(torch.randn(4, 3), None, None, training=True, eps=-1e-5),
            ValueError,
            r"eps must be a finite number >= 0",
        ),
        (
            lambda: NF.batch_norm(
                torch.randn(4, 3), torch.zeros(3), torch.ones(3), training=True, momentum=1.5
            ),
            ValueError,
            r"momentum must be in \[0, 1\].*Keras",
        ),
        (
            lambda: NF.batch_norm(
                torch.randn(4, 3), torch.zeros(3), torch.ones(3), training=True, momentum=None
            ),
            ValueError,
            r"num_batches_tracked",
        ),
        (
            lambda: NF.batch_norm(torch.randn(4, 3), None, None, training=True, nonfinite="ignore"),
            ValueError,
            r"nonfinite must be one of",
        ),
        (
            lambda: NF.batch_norm(torch.randn(4, 3), None, None, training=True, activation="gelu"),
            ValueError,
            r"activation must be one of",
        ),
        (
            lambda: NF.batch_norm(torch.randn(4), None, None, training=True),
            ValueError,
            r"unsqueeze\(0\)",
        ),
        (
            lambda: NF.batch_norm(torch.randn(4, 3), None, None, training=True, channel_dim=2),
            ValueError,
            r"channel_dim=2 is out of range",
        ),
    ],
)
def test_bad_input_errors_name_the_argument_and_the_fix(call, exc, pattern):
    with pytest.raises(exc, match=pattern):
        call()


def test_one_value_per_channel_is_fine_in_eval():
    y = NF.batch_norm(torch.randn(1, 3), torch.zeros(3), torch.ones(3), training=False)
    assert y.shape == (1, 3)


def test_warning_filter_is_the_public_class():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        x = torch.randn(4, 2)
        x[0, 0] = float("inf")
        NF.batch_norm(x, torch.zeros(2), torch.ones(2), training=True, nonfinite="skip")
    assert any(issubclass(w.category, NF.NonFiniteStatisticsWarning) for w in caught)


@pytest.mark.parametrize("mode", ["torch", "numba"])
@pytest.mark.parametrize("channel_dim", [1, 2, -1])
def test_per_channel_parameters_reach_the_engine_unviewed_on_both_paths(
    mode, channel_dim, monkeypatch
):
    # batch_norm hands (C,) weight/bias to the engine with the keepdim shape
    # (config's param_shape): the kernels take them flat, the torch ops view them inside
    # the Function; gradients come back as (C,), first and second order.
    monkeypatch.setenv("NORMLAB_KERNELS", mode)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 5, dtype=torch.float64, generator=g).requires_grad_()
    c = x.shape[channel_dim]
    w = (torch.rand(c, dtype=torch.float64, generator=g) + 0.5).requires_grad_()
    b = torch.randn(c, dtype=torch.float64, generator=g).requires_grad_()

    def f(x, w, b):
        return NF.batch_norm(
            x, None, None, w, b, training=True, activation="silu", channel_dim=channel_dim
        )

    gw, gb = torch.autograd.grad(f(x, w, b).sum(), (w, b))
    assert gw.shape == gb.shape == (c,)
    assert torch.autograd.gradcheck(f, (x, w, b), fast_mode=True)
    assert torch.autograd.gradgradcheck(f, (x, w, b), fast_mode=True)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("arg", ["running_mean", "running_var", "weight", "bias"])
def test_each_per_channel_tensor_of_wrong_length_is_named(arg, training):
    # docs/reliability.md case 2: each of the four, alone, of the wrong length, in either mode
    args = {"running_mean": torch.zeros(3), "running_var": torch.ones(3),
            "weight": torch.ones(3), "bias": torch.zeros(3)}  # fmt: skip
    args[arg] = torch.ones(4)
    rm0, rv0 = args["running_mean"].clone(), args["running_var"].clone()
    with pytest.raises(ValueError, match=rf"{arg} must have shape \(3,\) to match the input's 3"):
        NF.batch_norm(torch.randn(4, 3), training=training, **args)
    assert torch.equal(args["running_mean"], rm0) and torch.equal(args["running_var"], rv0)
