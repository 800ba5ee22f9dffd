"""What every experiment is: a claim, a config, a run that returns a Result, a verdict rule.

An experiment module defines one :class:`Experiment` subclass and registers it with
:func:`normlab.experiments.registry.register`. ``run`` never prints or writes files; it may
report progress through the optional callback. Plots are described as data
(:class:`Plot`), so ``normlab report DIR`` can redraw them from ``results.json`` alone.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

Verdict = Literal["holds", "fails", "inconclusive"]
VERDICTS: tuple[str, ...] = ("holds", "fails", "inconclusive")

Progress = Callable[[float, str], None]  # (fraction done in [0, 1], message)


def load_schema(name: str) -> dict[str, Any]:
    """A JSON Schema shipped with this package (``results.schema.json`` for ``normlab run``,
    ``demo.schema.json`` for ``normlab demo``): the one place each schema is defined."""
    from importlib import resources

    return json.loads(resources.files("normlab.experiments").joinpath(name).read_text())


def digits_setup(n_train: int, n_test: int) -> str:
    """How the reports name the digits split: '8×8, 1348 train / 449 test' (counted)."""
    return f"8×8, {n_train} train / {n_test} test"


def notify(progress: Progress | None, fraction: float, message: str = "") -> None:
    """Call ``progress`` if there is one (experiments call this instead of checking None)."""
    if progress is not None:
        progress(min(max(float(fraction), 0.0), 1.0), message)


@dataclass
class Line:
    """One curve: x and y values of equal length; ``style`` is a matplotlib format string."""

    label: str
    x: list[float]
    y: list[float]
    style: str = "-"


@dataclass
class Plot:
    """A plot as data: the report turns it into a PNG."""

    title: str
    xlabel: str
    ylabel: str
    lines: list[Line]
    logx: bool = False
    logy: bool = False
    kind: Literal["line", "bar"] = "line"


@dataclass
class Result:
    """What an experiment measured, and its verdict.

    Attributes:
        id: the experiment id (a section of docs/claims.md).
        claim: the claim, in one sentence.
        verdict: 'holds', 'fails' or 'inconclusive'.
        rule: the verdict rule, as printed in the report.
        measured: our headline figure, human-readable.
        reference: the paper's or seed's figure, human-readable.
        source: where the claim and the reference figure come from.
        setup: what was run, and how it was scaled down from the paper.
        metrics: the numbers behind ``measured`` (JSON-able).
        plots: plots as data.
        tables: named tables, each ``{"header": [...], "rows": [[...], ...]}``.
        notes: anything the reader should know (e.g. why inconclusive).
        config: the config the run used (``dataclasses.asdict``).
        seconds: wall time of the run.
        seed_says: what the seed document says (from :attr:`Experiment.seed_says`), so the
            report can be redrawn from ``results.json`` alone.
        error: if ``run`` raised, the exception (type and message); the verdict is then
            'inconclusive'.
    """

    id: str
    claim: str
    verdict: Verdict
    rule: str
    measured: str
    reference: str
    source: str
    setup: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    plots: list[Plot] = field(default_factory=list)
    tables: dict[str, dict[str, list]] = field(default_factory=dict)
    notes: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    seed_says: str = ""
    error: str = ""

    def __post_init__(self) -> None:
        if self.verdict not in VERDICTS:
            raise ValueError(f"Result.verdict must be one of {VERDICTS}, got {self.verdict!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Result:
        data = dict(data)
        data["plots"] = [
            Plot(**{**p, "lines": [Line(**ln) for ln in p["lines"]]}) for p in data.get("plots", [])
        ]
        return cls(**data)


class Experiment:
    """Base class: subclasses set the class attributes and implement :meth:`run`.

    ``Config`` is a frozen dataclass whose defaults are the default configuration (≤ 2 min
    on 2 CPU cores); :meth:`quick_config` returns the seconds-long one for the test suite.
    """

    id: ClassVar[str]
    claim: ClassVar[str]
    source: ClassVar[str]
    reference: ClassVar[str]
    seed_says: ClassVar[str] = ""  # what the seed document says, for the report
    Config: ClassVar[type]
    # Field overrides that turn the default Config into the quick one (seconds, for tests);
    # {} when the default run is already quick. Subclasses set this or override
    # :meth:`quick_config`.
    quick_overrides: ClassVar[dict[str, Any] | None] = None

    def default_config(self, seed: int = 0):
        return self.Config(seed=seed)

    def quick_config(self, seed: int = 0):
        if self.quick_overrides is None:
            raise NotImplementedError(f"{type(self).__name__} defines no quick configuration")
        return dataclasses.replace(self.default_config(seed), **self.quick_overrides)

    def run(self, config, progress: Progress | None = None) -> Result:
        """Measure → judge → present. An experiment implements the three steps (or, not
        yet split, overrides ``run``)."""
        measurement = self.measure(config, progress)
        return self.present(config, measurement, self.judge(config, measurement))

    def measure(self, config, progress: Progress | None = None) -> Any:
        """Run the experiment; return a dataclass of numbers only (no display strings)."""
        raise NotImplementedError

    def judge(self, config, measurement) -> Verdict:
        """The stated rule (:meth:`rule`) over the measurement."""
        raise NotImplementedError

    def present(self, config, measurement, verdict: Verdict) -> Result:
        """The Result: tables, plots and text built from the measurement and the verdict."""
        raise NotImplementedError

    def result(self, config, **fields) -> Result:
        """A Result with this experiment's constant fields filled in."""
        return Result(
            id=self.id,
            claim=self.claim,
            source=self.source,
            reference=fields.pop("reference", self.reference),
            seed_says=fields.pop("seed_says", self.seed_says),
            config=dataclasses.asdict(config),
            **fields,
        )

    def verdict_result(self, config, verdict: Verdict, **fields) -> Result:
        """:meth:`result` as :meth:`present` makes it: the verdict and the stated rule, which
        is ``fields['rule']`` if given, else the experiment's ``rule(config)``."""
        if "rule" not in fields:
            fields["rule"] = self.rule(config)  # type: ignore[attr-defined]
        return self.result(config, verdict=verdict, **fields)

    def needs(self, config, what: str, *, rule: str, setup: str = "", **fields) -> Result:
        """The honest result when a feature this experiment needs does not exist yet:
        'inconclusive', measured 'needs <what>' — never a made-up number."""
        notes = fields.pop("notes", "")
        return self.result(
            config,
            verdict="inconclusive",
            rule=rule,
            measured=f"needs {what}",
            setup=setup,
            notes=(
                f"Not measured: this experiment needs {what}, which this build of normlab "
                f"does not have yet. " + notes
            ).strip(),
            **fields,
        )


class AllChecks(Experiment):
    """An experiment whose rule is a list of checks that must all pass (exact identities,
    formulas): it holds if every check passes and fails otherwise, with no inconclusive
    case. Subclasses implement :meth:`checks` instead of :meth:`judge`."""

    def checks(self, config, measurement) -> dict[str, bool]:
        """Each part of the rule, named as the report says it, and whether it passed."""
        raise NotImplementedError

    def judge(self, config, measurement) -> Verdict:
        return "holds" if all(self.checks(config, measurement).values()) else "fails"

    def failures(self, config, measurement) -> str:
        """The report's sentence naming the checks that did not pass ('' if none did)."""
        failed = [name for name, ok in self.checks(config, measurement).items() if not ok]
        return f"Measured, the rule fails on: {'; '.join(failed)}." if failed else ""
