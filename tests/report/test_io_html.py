import json
import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pytest

from normlab.report import Page, atomic_write_text, write_json


def test_write_json_handles_nonfinite_and_tensors(tmp_path):
    import torch

    p = write_json(
        tmp_path / "r.json", {"a": math.nan, "b": math.inf, "t": torch.tensor([1.0, 2.0])}
    )
    assert json.loads(p.read_text()) == {"a": None, "b": 1e308, "t": [1.0, 2.0]}


def test_failed_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "results.json"
    target.write_text("old")
    with pytest.raises(TypeError):
        write_json(target, {"x": object()})
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # no temp left behind
    atomic_write_text(target, "new")
    assert target.read_text() == "new"


def test_page_escapes_every_string_and_embeds_png():
    page = Page("<script>alert(1)</script>")
    page.heading('a "quoted" & <b>')
    page.table(["<th>"], [["<td>"]])
    page.definitions([("<dt>", "<dd>")])
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    page.figure(fig, alt="<alt>")
    html = page.render()
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert "&lt;th&gt;" in html and "&lt;td&gt;" in html and "&lt;alt&gt;" in html
    assert "<dt>&lt;dt&gt;</dt><dd>&lt;dd&gt;</dd>" in html
    assert 'src="data:image/png;base64,' in html
