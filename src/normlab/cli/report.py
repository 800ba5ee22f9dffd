"""``normlab report DIR``: redraw report.html from DIR/results.json without rerunning."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from normlab.cli import _output


def report(
    out: Annotated[Path, typer.Argument(help="A directory written by `normlab run`.")] = Path(
        "normlab-run"
    ),
    json_out: Annotated[bool, typer.Option("--json", help="Print the results as JSON.")] = False,
) -> None:
    """Re-render report.html from results.json (byte-identical to what `run` wrote)."""
    from normlab.experiments import runner
    from normlab.report.claims import claims_table

    payload, html_path = runner.rerender(out)
    if json_out:
        _output.emit_json(payload)
        return
    _output.console.print(claims_table(payload))
    _output.console.print(f"Report: {html_path}", highlight=False)
