"""Every claim of docs/claims.md is registered exactly once, under its id."""

import re
from pathlib import Path

import pytest

from normlab.experiments import registry
from normlab.experiments.base import Experiment

CLAIMS_MD = Path(__file__).resolve().parents[2] / "docs/claims.md"


def claims_md_ids() -> list[str]:
    """Ids from the claims table of docs/claims.md (first column, in backticks or plain)."""
    ids = []
    for line in CLAIMS_MD.read_text(encoding="utf-8").splitlines():
        m = re.match(r"^\|\s*`?([a-z0-9]+(?:-[a-z0-9]+)*)`?\s*\|", line)
        if m and m.group(1) != "id":
            ids.append(m.group(1))
    assert ids, f"no claims table found in {CLAIMS_MD}"
    return ids


def test_claim_ids_match_claims_md():
    assert list(registry.CLAIM_IDS) == claims_md_ids()


def test_registered_ids_are_unique_and_all_claims():
    ids = registry.all_ids()
    assert len(ids) == len(set(ids))
    assert set(ids) <= set(claims_md_ids()), "an experiment registered under no claim id"


@pytest.mark.parametrize("claim_id", claims_md_ids())
def test_claim_has_its_experiment(claim_id):
    module = claim_id.replace("-", "_")
    assert claim_id in registry.all_ids(), (
        f"claim {claim_id!r} has no experiment: add src/normlab/experiments/{module}.py "
        f"with a @register'ed Experiment whose id is {claim_id!r}"
    )
    assert type(registry.get(claim_id)).__module__ == f"normlab.experiments.{module}"


def test_registering_twice_is_refused():
    cls = type(registry.get("worked-example"))
    with pytest.raises(ValueError, match="registered twice"):
        registry.register(cls)


@pytest.mark.parametrize("claim_id", registry.all_ids())
def test_experiment_declares_what_the_report_needs(claim_id):
    exp = registry.get(claim_id)
    assert isinstance(exp, Experiment) and exp.id == claim_id
    assert exp.claim and exp.source and exp.reference
    # Config: a frozen dataclass with a seed; quick differs from default only in its values.
    default, quick = exp.default_config(3), exp.quick_config(3)
    assert type(default) is type(quick) and default.seed == quick.seed == 3
    assert type(default).__dataclass_params__.frozen
