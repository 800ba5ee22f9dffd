"""BNOptions, the options every batch-norm variant takes, and check_options, their one
validation: defaults are the public functions', errors are the documented ones, and a
layer's options follow its attributes."""

from __future__ import annotations

import inspect

import pytest
import torch

import normlab as nl
import normlab.functional as NF
from normlab.functional.options import BNOptions, check_options


def test_defaults_are_batch_norms():
    params = inspect.signature(NF.batch_norm).parameters
    for name, default in BNOptions._field_defaults.items():
        if name == "where":
            assert default == "batch_norm"
            continue
        assert params[name].default == default, name


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("eps", -1.0, "eps must be a finite number >= 0"),
        ("eps", float("nan"), "eps must be a finite number >= 0"),
        ("momentum", 1.5, r"momentum must be in \[0, 1\] or None"),
        ("momentum", True, r"momentum must be in \[0, 1\] or None"),
        ("nonfinite", "ignore", r"nonfinite must be one of \('skip', 'raise', 'propagate'\)"),
        ("degenerate", "drop", r"degenerate must be one of \('error', 'eval', 'skip'\)"),
    ],
)
def test_check_options_names_the_argument(field, value, match):
    options = BNOptions(where="here")._replace(**{field: value})
    with pytest.raises(ValueError, match="^here: " + match):
        check_options(options)
    # the same check, with the same message, from the functional form and the layer
    kwargs = {field: value}
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="^batch_norm: " + match):
        NF.batch_norm(x, None, None, training=True, **kwargs)
    with pytest.raises(ValueError, match="^BatchNorm1d: " + match):
        nl.nn.BatchNorm1d(3, **kwargs)


def test_valid_options_pass():
    for momentum in (None, 0.0, 1.0, 0.1):
        check_options(BNOptions(momentum=momentum, eps=0.0))
    for nonfinite in ("skip", "raise", "propagate"):
        for degenerate in ("error", "eval", "skip"):
            check_options(BNOptions(nonfinite=nonfinite, degenerate=degenerate))


def test_layer_options_follow_its_attributes():
    m = nl.nn.BatchNorm(3, channel_dim=-1, activation="leaky_relu", negative_slope=0.2)
    assert m._options() == BNOptions(
        0.1, 1e-5, -1, "leaky_relu", 0.2, "skip", "error", "input", "BatchNorm"
    )
    m.momentum, m.eps, m.nonfinite = None, 1e-3, "raise"
    o = m._options()
    assert (o.momentum, o.eps, o.nonfinite) == (None, 1e-3, "raise")
    # and the layer computes with them: momentum=None is a cumulative average
    x = torch.randn(8, 3, dtype=torch.float64)
    m.double().train()
    m(x)
    m(2 * x + 1)
    mean = (x.mean(0) + (2 * x + 1).mean(0)) / 2  # the two batches' average, not an EMA
    torch.testing.assert_close(m.running_mean, mean)
    unbiased = (x.var(0) + (2 * x + 1).var(0)) / 2
    torch.testing.assert_close(m.running_var, unbiased)
