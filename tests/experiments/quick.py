"""Quick runs of the training experiments, shared by their tests.

Each experiment's quick configuration runs once per test session. When the suite's
``quick_result`` fixture exists (the parametrised run over every registered experiment),
its cached Result is reused instead of running the experiment a second time.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math

import pytest

from normlab.experiments import get
from normlab.experiments.base import VERDICTS, Result


@functools.cache
def _run(claim_id: str) -> Result:
    exp = get(claim_id)
    return exp.run(exp.quick_config(0))


def quick_result(request: pytest.FixtureRequest, claim_id: str) -> Result:
    try:
        shared = request.getfixturevalue("quick_result")
    except pytest.FixtureLookupError:
        return _run(claim_id)
    return shared(claim_id)


def check_well_formed(result: Result, claim_id: str) -> None:
    """The parts of a Result the report relies on, and JSON without NaN/Inf."""
    exp = get(claim_id)
    assert result.id == claim_id and result.verdict in VERDICTS
    assert result.rule.strip() and result.measured.strip() and result.setup.strip()
    assert result.config == dataclasses.asdict(exp.quick_config(0))
    for plot in result.plots:
        assert plot.lines
        for line in plot.lines:
            assert len(line.x) == len(line.y)
            assert all(math.isfinite(v) for v in line.y), f"{plot.title}: {line.label}"
    for table in result.tables.values():
        assert all(len(row) == len(table["header"]) for row in table["rows"])
    json.dumps(result.to_dict(), allow_nan=False)  # every metric finite
