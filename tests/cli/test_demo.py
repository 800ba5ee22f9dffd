import base64
import json
import re
import subprocess
import sys

import jsonschema
import pytest

from normlab.cli import main
from normlab.experiments.demo import RESULTS_SCHEMA

SMALL = ["--depth", "4", "--width", "16", "--steps", "10"]


@pytest.mark.slow  # the demo_run fixture: a 20-layer demo (17 s on the loaded box)
def test_demo_30_steps_writes_a_valid_report(demo_run):
    code, out, payload = demo_run
    assert code == 0
    assert (out / "report.html").is_file() and (out / "results.json").is_file()
    stored = json.loads((out / "results.json").read_text())
    assert stored == payload  # --json prints exactly what results.json holds
    jsonschema.validate(stored, RESULTS_SCHEMA)
    h = stored["headline"]
    # the claim of docs/sources.md#seed-000 at initialisation: BN's first layer gets >= 100x
    # the gradient
    assert h["bn_first_grad"] >= 100 * h["plain_first_grad"]
    assert h["bn_over_plain_first_grad"] == pytest.approx(
        h["bn_first_grad"] / h["plain_first_grad"]
    )
    assert h["plain_first_over_last"] < 1e-2 and 0.1 < h["bn_first_over_last"] < 10
    assert stored["config"]["steps"] == 30 and len(stored["plain"]["loss"]) == 30
    assert len(stored["plain"]["init_layers"]) == 21  # 20 hidden layers + the output layer
    assert h["plain_saturated_fraction"] > 0.05 and h["bn_saturated_fraction"] < 0.001


@pytest.mark.slow  # the demo_run fixture: a 20-layer demo (17 s on the loaded box)
def test_report_is_self_contained(demo_run):
    _, out, payload = demo_run
    html = (out / "report.html").read_text()
    assert "<script" not in html and "http://" not in html.replace("http://www.w3", "")
    images = re.findall(r'<img src="([^"]+)"', html)
    assert len(images) == 4
    for src in images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"N(0, ({payload['init']['gain']:g}/sqrt(fan_in))^2)" in html  # init named
    assert payload["verdict"] in html and "Fig. 1" in html


@pytest.mark.slow  # two demos (8 s); test_demo_other_activation_and_bad_option stays fast
def test_demo_table_and_determinism(tmp_path, capsys):
    main(["demo", *SMALL, "--out", str(tmp_path / "a")])
    text = capsys.readouterr().out
    assert "first-layer gradient norm at init" in text and "test accuracy after 10 steps" in text
    assert re.search(r"(holds|fails|inconclusive): At initialisation", text)
    assert f"report: {tmp_path / 'a' / 'report.html'}" in text.splitlines()
    main(["demo", *SMALL, "--out", str(tmp_path / "b")])
    capsys.readouterr()
    a, b = (json.loads((tmp_path / d / "results.json").read_text()) for d in "ab")
    for d in (a, b):
        d.pop("seconds")
        for run in ("plain", "bn"):
            d[run].pop("seconds")
    assert a == b  # deterministic for a seed


def test_demo_other_activation_and_bad_option(tmp_path, capsys):
    main(["demo", *SMALL, "--activation", "relu", "--json", "--out", str(tmp_path)])
    out = json.loads(capsys.readouterr().out)
    jsonschema.validate(out, RESULTS_SCHEMA)
    assert out["headline"]["plain_saturated_fraction"] is None  # not a saturating activation
    with pytest.raises(SystemExit) as e:
        main(["demo", "--activation", "softsign", "--out", str(tmp_path)])
    assert e.value.code == 1
    assert "activation must be one of ['relu', 'sigmoid', 'tanh']" in capsys.readouterr().err


def test_python_dash_m_and_version():
    r = subprocess.run(
        [sys.executable, "-m", "normlab", "--version"], capture_output=True, text=True
    )
    assert r.returncode == 0 and r.stdout.startswith("normlab ")


def test_unknown_command_says_what_to_type(capsys):
    try:
        main(["dmeo"])
    except SystemExit as e:
        assert e.code != 0
    err = capsys.readouterr().err
    assert "No such command" in err
