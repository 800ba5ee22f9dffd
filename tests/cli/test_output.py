"""normlab.cli._output: the JSON every command prints, and the counted progress bar."""

import json
import math

import torch

from normlab.cli import _output


def test_emit_json_cleans_like_every_report_file(capsys):
    class Record:
        def to_dict(self):
            return {"x": math.inf}

    _output.emit_json(
        {"nan": math.nan, "neg": -math.inf, 1: (1, 2), "t": torch.tensor([0.5]), "r": Record()}
    )
    got = json.loads(capsys.readouterr().out)
    assert got == {"nan": None, "neg": -1e308, "1": [1, 2], "t": [0.5], "r": {"x": 1e308}}


def test_counted_progress_counts_on_stderr_and_is_silent_when_quiet(capsys, monkeypatch):
    # rich draws bars only on an interactive terminal; stderr under pytest is neither
    monkeypatch.setattr(_output.err_console, "_force_terminal", True)
    monkeypatch.setattr(_output.err_console, "is_interactive", True)
    with _output.counted_progress("bench", 2, quiet=True) as (describe, advance):
        describe("case a")
        advance()
    assert capsys.readouterr() == ("", "")
    with _output.counted_progress("bench", 2) as (describe, advance):
        describe("case a")
        advance()
        advance()
    out, err = capsys.readouterr()
    assert out == "" and "case a" in err and "2/2" in err
