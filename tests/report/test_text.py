"""normlab.report.text: numbers as words, and a verdict's terminal style."""

import math

import pytest

from normlab.report.text import VERDICT_COLOURS, describe_ratio, verdict_style


@pytest.mark.parametrize(
    "ratio, words",
    [
        (1 / 1693, "1,693x smaller"),
        (14000.0, "14,000x larger"),
        (0.96, "0.96x"),
        (4.0, "4x larger"),
    ],
)
def test_describe_ratio(ratio, words):
    assert describe_ratio(ratio) == words


def test_describe_ratio_of_nothing_or_infinity_is_plain():
    assert describe_ratio(0.0) == "0x" and describe_ratio(math.inf) == "infx"


def test_verdict_style_is_one_colour_per_verdict():
    assert [verdict_style(v) for v in ("holds", "fails", "inconclusive")] == [
        "green",
        "red",
        "yellow",
    ]
    assert verdict_style("holds", bold=True) == "bold green"
    assert verdict_style("not a verdict") == VERDICT_COLOURS["inconclusive"]
