"""base.AllChecks: the verdict of a rule whose parts must all pass."""

from dataclasses import dataclass

import pytest

from normlab.experiments.base import AllChecks


@dataclass(frozen=True)
class _Config:
    seed: int = 0
    tolerance: float = 0.1


class _Exact(AllChecks):
    """Two checks over a measurement {'a': error, 'b': error}."""

    def checks(self, config, m):
        return {"a small": m["a"] <= config.tolerance, "b small": m["b"] <= config.tolerance}


@pytest.mark.parametrize(
    ("m", "verdict", "failures"),
    [
        ({"a": 0.0, "b": 0.1}, "holds", ""),
        ({"a": 0.2, "b": 0.0}, "fails", "Measured, the rule fails on: a small."),
        ({"a": 0.2, "b": 0.3}, "fails", "Measured, the rule fails on: a small; b small."),
    ],
)
def test_all_checks_must_pass(m, verdict, failures):
    exp = _Exact()
    assert exp.judge(_Config(), m) == verdict
    assert exp.failures(_Config(), m) == failures


def test_checks_are_required():
    with pytest.raises(NotImplementedError):
        AllChecks().judge(_Config(), {})
