"""Every registered experiment runs in quick mode and returns a well-formed Result.

Parametrised over the registry, so experiments added later are picked up automatically.
"""

import dataclasses
import json
import math

import jsonschema
import pytest

from normlab.experiments import registry, runner
from normlab.experiments.base import VERDICTS, Result
from tests.experiments.conftest import quick_ids


@pytest.mark.parametrize("claim_id", quick_ids())
def test_quick_run_is_well_formed(claim_id, quick_result):
    exp = registry.get(claim_id)
    r = quick_result(claim_id)
    assert isinstance(r, Result) and r.id == claim_id
    assert r.error == "", f"{claim_id} raised in quick mode: {r.error}"
    assert r.verdict in VERDICTS
    assert r.rule.strip() and r.measured.strip() and r.reference.strip() and r.source.strip()
    assert r.claim == exp.claim and r.seed_says == exp.seed_says
    assert r.config == dataclasses.asdict(exp.quick_config(0))
    if r.verdict != "inconclusive" or not r.measured.startswith("needs "):
        assert r.setup.strip(), "say what was run and what was scaled down"
    for plot in r.plots:
        assert plot.lines, f"{plot.title}: a plot without lines"
        for line in plot.lines:
            assert len(line.x) == len(line.y), f"{plot.title}/{line.label}: x and y lengths differ"
            assert all(math.isfinite(v) for v in line.y), f"{plot.title}/{line.label}: not finite"
    for name, table in r.tables.items():
        width = len(table["header"])
        assert all(len(row) == width for row in table["rows"]), f"table {name!r} is ragged"
    json.dumps(r.to_dict(), allow_nan=False)  # every metric finite (None where undefined)
    assert math.isfinite(r.seconds) and r.seconds >= 0
    payload = runner.build_payload([r], quick=True, seed=0, total_seconds=r.seconds)
    jsonschema.validate(payload, runner.schema())


@pytest.mark.parametrize("claim_id", quick_ids())
def test_run_never_prints(claim_id, quick_run):
    assert quick_run(claim_id).printed == "", "experiments report through Result, never print"


@pytest.mark.parametrize("claim_id", quick_ids())
def test_run_leaves_the_global_rng_alone(claim_id, quick_run):
    # seed inside _training.seeded (or use a torch.Generator): a caller's random stream
    # must not depend on which experiments ran before
    assert quick_run(claim_id).rng_untouched
