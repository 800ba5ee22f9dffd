"""The worked example of docs/sources.md#seed-003: the claim as stated fails (the seed's
x̂ ends are wrong); the layer gives the correct values, identical in three implementations."""

import pytest

from normlab.experiments.worked_example import SEED_Y, formula


def test_verdict_is_fails_with_the_corrected_values(quick_result):
    r = quick_result("worked-example")
    assert r.verdict == "fails"
    m = r.metrics
    assert m["mean"] == 2.5 and m["var"] == 1.25
    expected = [-1.683, 0.106, 1.894, 3.683]
    for key in ("y_formula", "y_normlab", "y_torch"):
        assert m[key] == pytest.approx(expected, abs=5e-4), key
    assert m["y_normlab"] == pytest.approx(m["y_formula"], abs=1e-12)
    assert m["y_torch"] == pytest.approx(m["y_formula"], abs=1e-12)
    assert m["y_normlab_float32"] == pytest.approx(m["y_formula"], abs=1e-6)
    # the middle values and μ, σ² of the seed hold; only the ends are wrong, by 0.447
    assert m["wrong_in_seed"] == ["x̂_1", "x̂_4", "y_1", "y_4"]
    assert m["max_abs_diff_seed"] == pytest.approx(2 * (1.5 / 1.25**0.5 - 1.25**0.5), abs=1e-3)
    assert "y = [-1.683, 0.106, 1.894, 3.683]" == r.measured
    assert "1.342" in r.notes


def test_the_seed_is_consistent_with_its_own_wrong_x_hat():
    # the slip is x̂ = ±σ at the ends; y = 2·x̂ + 1 is then computed correctly
    _, var, x_hat, _ = formula((1.0, 2.0, 3.0, 4.0), 2.0, 1.0, 0.0)
    assert x_hat[0] == pytest.approx(-1.3416407865, abs=1e-10)
    assert [2 * v + 1 for v in (-(var**0.5), -0.447, 0.447, var**0.5)] == pytest.approx(
        list(SEED_Y), abs=5e-4
    )


def _measurement(y_normlab=None, y_torch=None, x=(1.0, 2.0, 3.0, 4.0)):
    """The true float64 values for ``x`` (γ = 2, β = 1, ε = 0), with normlab's and torch's
    outputs replaced where given."""
    from normlab.experiments.worked_example import Measurement

    mean, var, x_hat, y = formula(x, 2.0, 1.0, 0.0)
    return Measurement(
        mean, var, x_hat, y, list(y_normlab or y), list(y), list(y_torch or y), list(y)
    )


def _judge(m, **config):
    from normlab.experiments import get

    exp = get("worked-example")
    cfg = exp.Config(**config)
    return exp.judge(cfg, m), exp.notes(cfg, m, exp.judge(cfg, m))


def test_verdict_holds_when_the_layers_give_the_seeds_values():
    # a synthetic world where the seed's y were right: formula, normlab and torch give them
    m = _measurement(y_normlab=SEED_Y, y_torch=SEED_Y)
    m.y_formula = list(SEED_Y)
    assert _judge(m) == ("holds", "")


def test_verdict_fails_on_the_seeds_slip_and_says_why():
    verdict, notes = _judge(_measurement())
    assert verdict == "fails"
    assert "−1.342 and (4 − 2.5)/√1.25 = +1.342" in notes
    assert "y = [-1.683, 0.106, 1.894, 3.683]" in notes


def test_verdict_fails_when_implementations_disagree_and_notes_do_not_claim_agreement():
    y = formula((1.0, 2.0, 3.0, 4.0), 2.0, 1.0, 0.0)[3]
    verdict, notes = _judge(_measurement(y_torch=[v + 1e-9 for v in y]))
    assert verdict == "fails"
    assert "agree on it" not in notes
    assert "normlab and torch = float64 arithmetic to 1e-12" in notes
    # even with the seed's values reproduced, disagreement alone fails the rule
    verdict, _ = _judge(_measurement(y_normlab=SEED_Y, y_torch=SEED_Y))
    assert verdict == "fails"


def test_another_input_is_judged_against_the_formula():
    x = (0.0, 1.0, 5.0)
    assert _judge(_measurement(x=x), x=x) == ("holds", "")
    verdict, notes = _judge(_measurement(x=x, y_normlab=[0.0, 0.0, 0.0]), x=x)
    assert verdict == "fails" and "normlab's y = the seed's to 0.0005" in notes
