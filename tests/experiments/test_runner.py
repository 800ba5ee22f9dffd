"""The runner, results.json and its schema, the report and its re-rendering, the CLI."""

import json
from dataclasses import dataclass
from typing import ClassVar

import jsonschema
import pytest

from normlab.cli import main
from normlab.experiments import registry, runner
from normlab.experiments.base import Experiment, Line, Plot, Result


@dataclass(frozen=True)
class _Cfg:
    seed: int = 0
    boom: bool = False


class _Toy(Experiment):
    """Not registered: injected into the registry by the fixture below."""

    id = "toy-claim"
    claim = "a <b>claim</b> with markup"
    source = "tests"
    reference = "42"
    seed_says = "the seed says <script>alert(1)</script>"
    Config = _Cfg
    quick_overrides: ClassVar[dict] = {"boom": False}

    def run(self, config, progress=None):
        if config.boom:
            raise RuntimeError("kaboom")
        nan = float("nan")
        return self.result(
            config,
            verdict="holds",
            rule="holds if 42",
            measured="42 [brackets]",
            plots=[Plot("t", "x", "y", [Line("a", [1, 2, 3], [1.0, nan, 3.0])], logy=True)],
            tables={"tab": {"header": ["a", "b"], "rows": [[1.5, None], ["x", True]]}},
            metrics={"inf": float("inf"), "nan": nan},
        )


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setitem(registry._REGISTRY, "toy-claim", _Toy())
    return "toy-claim"


@pytest.fixture
def boom(monkeypatch):
    class _Boom(_Toy):
        id = "boom-claim"

        def default_config(self, seed=0):
            return _Cfg(seed=seed, boom=True)

    monkeypatch.setitem(registry._REGISTRY, "boom-claim", _Boom())
    return "boom-claim"


def test_resolve_ids(toy):
    assert runner.resolve_ids(["all"]) == registry.all_ids()
    assert toy in registry.all_ids()
    assert runner.resolve_ids([toy, "worked-example", toy]) == [toy, "worked-example"]
    with pytest.raises(ValueError, match=r"unknown experiment 'nope'.*known: "):
        runner.resolve_ids(["nope"])
    with pytest.raises(ValueError, match="at least one"):
        runner.resolve_ids([])


def test_payload_validates_against_the_shipped_schema(toy, tmp_path):
    payload = runner.run_experiments([toy, "worked-example"], quick=True, seed=1)
    jsonschema.validate(payload, runner.schema())
    runner.save_report(tmp_path, payload)
    on_disk = json.loads((tmp_path / "results.json").read_text())
    jsonschema.validate(on_disk, runner.schema())
    assert on_disk == payload
    assert on_disk["results"][0]["metrics"] == {"inf": 1e308, "nan": None}
    assert on_disk["summary"] == {"holds": 1, "fails": 1, "inconclusive": 0}


def test_schema_rejects_a_bad_verdict(toy):
    payload = runner.run_experiments([toy], quick=True)
    payload["results"][0]["verdict"] = "maybe"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(payload, runner.schema())


def test_raising_experiment_is_inconclusive_and_others_still_run(toy, boom):
    payload = runner.run_experiments([boom, toy], quick=False)
    bad, good = payload["results"]
    assert bad["verdict"] == "inconclusive" and bad["error"].startswith("RuntimeError: kaboom")
    assert bad["config"] == {"seed": 0, "boom": True}
    assert good["verdict"] == "holds" and good["error"] == ""
    jsonschema.validate(payload, runner.schema())


def test_report_rerenders_byte_identical_html(toy, tmp_path, capsys):
    main(["run", toy, "worked-example", "--quick", "--seed", "2", "--out", str(tmp_path)])
    written = (tmp_path / "report.html").read_bytes()
    (tmp_path / "report.html").unlink()
    main(["report", str(tmp_path)])
    assert (tmp_path / "report.html").read_bytes() == written
    out = capsys.readouterr().out
    assert "toy-claim" in out and "worked-example" in out and "fails" in out


def test_report_escapes_and_shows_every_part(toy, tmp_path):
    payload = runner.run_experiments([toy], quick=True)
    _, html_path = runner.save_report(tmp_path, payload)
    html = html_path.read_text()
    assert "<script>alert" not in html and "&lt;script&gt;" in html
    assert "&lt;b&gt;claim&lt;/b&gt;" in html
    assert html.count('src="data:image/png;base64,') == 1
    for part in ("What the seed says", "Verdict rule", "holds if 42", "42 [brackets]", "tab"):
        assert part in html
    assert '<td class="holds">holds</td>' in html


def test_failed_run_keeps_the_previous_report(toy, tmp_path, monkeypatch):
    runner.save_report(tmp_path, runner.run_experiments([toy], quick=True))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def broken(payload):
        raise RuntimeError("renderer broke")

    monkeypatch.setattr("normlab.report.claims.render_html", broken)
    with pytest.raises(RuntimeError, match="renderer broke"):
        runner.save_report(tmp_path, runner.run_experiments(["worked-example"], quick=True))
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_cli_json_and_exit_code_on_error(toy, boom, tmp_path, capsys):
    main(["run", toy, "--json", "--quick", "--out", str(tmp_path)])
    out = json.loads(capsys.readouterr().out)
    assert [r["id"] for r in out["results"]] == [toy]
    with pytest.raises(SystemExit) as e:
        main(["run", boom, toy, "--out", str(tmp_path)])
    assert e.value.code == 1
    assert "kaboom" in capsys.readouterr().err
    # the report of the partly failed run is written, with both claims
    assert [r["id"] for r in runner.load_results(tmp_path)["results"]] == [boom, toy]


def test_cli_unknown_id_and_missing_results(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["run", "nope", "--out", str(tmp_path)])
    assert e.value.code != 0 and "unknown experiment 'nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["report", str(tmp_path / "nowhere")])
    assert e.value.code == 1 and "normlab run" in capsys.readouterr().err
    (tmp_path / "results.json").write_text('{"schema": "other"}')
    with pytest.raises(ValueError, match="not a normlab results file"):
        runner.load_results(tmp_path)


def test_result_round_trips_through_dict():
    r = Result(
        id="x",
        claim="c",
        verdict="fails",
        rule="r",
        measured="m",
        reference="ref",
        source="s",
        plots=[Plot("t", "x", "y", [Line("l", [1], [2])])],
        error="E",
    )
    assert Result.from_dict(r.to_dict()) == r
    with pytest.raises(ValueError, match="verdict"):
        Result(
            id="x", claim="c", verdict="maybe", rule="r", measured="m", reference="r", source="s"
        )


def test_needs_gives_an_honest_inconclusive_result():
    exp = _Toy()
    r = exp.needs(_Cfg(), "normlab.nn.Widget", rule="holds if widgets work")
    assert r.verdict == "inconclusive" and r.measured == "needs normlab.nn.Widget"
    assert "does not have yet" in r.notes and r.seed_says == exp.seed_says
    assert r.config == {"seed": 0, "boom": False}


def test_quick_config_from_overrides():
    assert _Toy().quick_config(4) == _Cfg(seed=4, boom=False)

    class _AlreadyQuick(_Toy):
        quick_overrides: ClassVar[dict] = {}

    class _NoQuick(_Toy):
        quick_overrides = None

    assert _AlreadyQuick().quick_config(2) == _AlreadyQuick().default_config(2)
    with pytest.raises(NotImplementedError, match="_NoQuick"):
        _NoQuick().quick_config()
