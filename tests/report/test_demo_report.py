"""The demo report is drawn from results.json alone and escapes what it prints."""

import json

import pytest

from normlab.report.demo import render_html, write_report


@pytest.mark.slow  # the demo_run fixture: a 20-layer demo (17 s on the loaded box)
def test_report_redraws_from_json_and_escapes(demo_run, tmp_path):
    _, out, _ = demo_run
    results = json.loads((out / "results.json").read_text())
    results["init"]["why"] = "<img src=x onerror=alert(1)>"
    html = render_html(results)
    assert "<img src=x" not in html and "&lt;img src=x onerror=alert(1)&gt;" in html
    paths = write_report(results, tmp_path / "again")
    assert json.loads(paths["results"].read_text())["init"]["why"] == results["init"]["why"]
    assert paths["report"].read_text().count("<img ") == 4


@pytest.mark.slow  # the demo_run fixture: a 20-layer demo (17 s on the loaded box)
def test_failed_render_leaves_no_partial_report(demo_run, tmp_path):
    _, out, _ = demo_run
    results = json.loads((out / "results.json").read_text())
    del results["plain"]["trace"]
    target = tmp_path / "r"
    try:
        write_report(results, target)
    except KeyError:
        pass
    assert not target.exists() or not any(target.iterdir())
