"""Numbers as words, shared by the reports and the summaries experiments write; and how a
verdict looks in the terminal."""

from __future__ import annotations

import math


def describe_ratio(ratio: float) -> str:
    """'1,693x smaller' / '14,000x larger' / '0.96x' for a ratio a/b."""
    if not math.isfinite(ratio) or ratio <= 0:
        return f"{ratio:g}x"
    if ratio < 0.5:
        return f"{_times(1 / ratio)} smaller"
    if ratio > 2:
        return f"{_times(ratio)} larger"
    return f"{ratio:.2f}x"


def _times(x: float) -> str:
    if not math.isfinite(x):
        return "infinitely"
    return f"{x:,.0f}x" if x >= 10 else f"{x:.2g}x"


#: A verdict's colour in the terminal (rich); the HTML report's are in its stylesheet.
VERDICT_COLOURS = {"holds": "green", "fails": "red", "inconclusive": "yellow"}


def verdict_style(verdict: str, *, bold: bool = False) -> str:
    """The rich style of ``verdict``: green holds, red fails, yellow anything else."""
    colour = VERDICT_COLOURS.get(verdict, VERDICT_COLOURS["inconclusive"])
    return f"bold {colour}" if bold else colour
