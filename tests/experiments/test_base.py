from dataclasses import dataclass

import pytest

from normlab.experiments.base import Experiment


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
