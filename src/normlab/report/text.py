"""Numbers as words, shared by the reports and the summaries experiments write."""

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
