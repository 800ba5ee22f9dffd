"""``normlab demo``: docs/sources.md#seed-000 measured, a deep sigmoid net with and without BN."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from normlab.cli import _output


def demo(
    depth: Annotated[int, typer.Option("--depth", min=1, help="Hidden layers.")] = 20,
    width: Annotated[int, typer.Option("--width", min=2, help="Units per hidden layer.")] = 100,
    steps: Annotated[
        int, typer.Option("--steps", min=1, help="Training steps for each network.")
    ] = 600,
    activation: Annotated[
        str,
        typer.Option(
            "--activation",
            help="sigmoid (the story of docs/sources.md#seed-000; the initialisation is chosen "
            "for it), tanh or relu.",
        ),
    ] = "sigmoid",
    seed: Annotated[
        int, typer.Option("--seed", help="Seed of the data split, the weights and the batches.")
    ] = 0,
    json_out: Annotated[
        bool, typer.Option("--json", help="Print results.json to stdout instead of the table.")
    ] = False,
    out: Annotated[
        Path, typer.Option("--out", help="Report directory (report.html, results.json).")
    ] = Path("normlab-demo"),
) -> None:
    """Train two deep MLPs on the digits, plain and with BatchNorm before every activation.

    Same initial weights: the plain net's gradients vanish, its units saturate, its loss stalls.

    BatchNorm's net trains. The report goes to --out (report.html and results.json).
    """
    from normlab.experiments.demo import DemoConfig, run_demo
    from normlab.report.demo import headline_rows, write_report
    from normlab.report.text import verdict_style

    config = DemoConfig(depth=depth, width=width, steps=steps, activation=activation, seed=seed)
    with _output.progress_bar("normlab demo") as update:
        results = run_demo(config, progress=update)
        update(1.0, "writing the report")
        payload = results.to_dict()
        paths = write_report(payload, out)
    if json_out:
        _output.emit_json(payload)
        return
    c = _output.console
    c.print(
        f"[bold]{depth}-layer {activation} MLP, width {width}, on the digits[/]: plain vs "
        f"BatchNorm before every {activation}; {results.init['name']}, {results.init['optimizer']}"
    )
    table = Table(title=None)
    table.add_column("measurement")
    table.add_column("plain", justify="right")
    table.add_column("BN", justify="right")
    for row in headline_rows(payload):
        table.add_row(*row)
    c.print(table)
    style = verdict_style(results.verdict, bold=True)
    c.print(f"[{style}]{results.verdict}[/]: {results.summary}")
    # soft_wrap: paths stay on one line, so they can be copied
    c.print(f"report: {paths['report']}", soft_wrap=True, highlight=False)
    c.print(f"data:   {paths['results']}", soft_wrap=True, highlight=False)
    c.print(f"{results.seconds:.1f} s", highlight=False)
