"""base.Experiment.verdict_result and base.AllChecks: how a rule becomes a verdict."""

from dataclasses import dataclass

import pytest

from normlab.experiments.base import AllChecks, Experiment


@dataclass(frozen=True)
class _Config:
    seed: int = 0
    tolerance: float = 0.5


class _Stated(Experiment):
    id = "stated"
    claim = "a claim"
    source = "a source"
    reference = "a reference"
    Config = _Config

    def rule(self, config):
        return f"holds if within {config.tolerance:g}"


def test_verdict_result_fills_in_the_verdict_and_the_stated_rule():
    exp = _Stated()
    r = exp.verdict_result(_Config(), "fails", measured="0.7")
    assert (r.verdict, r.rule, r.measured) == ("fails", "holds if within 0.5", "0.7")
    assert (r.id, r.claim, r.config) == ("stated", "a claim", {"seed": 0, "tolerance": 0.5})
    # a rule that needs the measurement is passed in
    assert exp.verdict_result(_Config(), "holds", rule="r", measured="").rule == "r"
    with pytest.raises(ValueError, match="verdict"):
        exp.verdict_result(_Config(), "maybe", measured="")


class _Exact(AllChecks):
    """Two checks over a measurement {'a': error, 'b': error}."""

    def checks(self, config, m):
        return {"a small": m["a"] <= config.tolerance, "b small": m["b"] <= config.tolerance}


@pytest.mark.parametrize(
    ("m", "verdict", "failures"),
    [
        ({"a": 0.0, "b": 0.5}, "holds", ""),
        ({"a": 0.6, "b": 0.0}, "fails", "Measured, the rule fails on: a small."),
        ({"a": 0.6, "b": 0.7}, "fails", "Measured, the rule fails on: a small; b small."),
    ],
)
def test_all_checks_must_pass(m, verdict, failures):
    exp = _Exact()
    assert exp.judge(_Config(), m) == verdict
    assert exp.failures(_Config(), m) == failures


def test_checks_are_required():
    with pytest.raises(NotImplementedError):
        AllChecks().judge(_Config(), {})
