"""``normlab run ID [ID...] | all``: reproduce the claims of docs/claims.md, with a report."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from normlab.cli import _output


def run(
    ids: Annotated[
        list[str],
        typer.Argument(
            metavar="ID... | all", help="Experiment ids (sections of docs/claims.md) or 'all'."
        ),
    ],
    quick: Annotated[
        bool, typer.Option("--quick", help="Seconds-long configurations (as the tests run them).")
    ] = False,
    seed: Annotated[int, typer.Option("--seed", help="Seed of every experiment.")] = 0,
    out: Annotated[
        Path, typer.Option("--out", help="Report directory (report.html, results.json).")
    ] = Path("normlab-run"),
    json_out: Annotated[
        bool, typer.Option("--json", help="Print results.json to stdout instead of the table.")
    ] = False,
    threads: Annotated[
        int,
        typer.Option(
            "--threads",
            min=1,
            help="torch threads during the run; the experiments' small tensors run fastest on "
            "one, and extra threads mostly contend on a busy machine.",
        ),
    ] = 1,
) -> None:
    """Run experiments and write report.html and results.json to --out."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from normlab.experiments import runner
    from normlab.report.claims import claims_table
    from normlab.report.text import verdict_style

    try:
        resolved = runner.resolve_ids(ids)  # fail on a typo before any work
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="ID") from None
    console = _output.err_console if json_out else _output.console
    columns = (
        TextColumn("{task.fields[claim]:<22}"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        TimeElapsedColumn(),
        TextColumn("{task.fields[verdict]}"),
    )
    with Progress(*columns, console=console, transient=False) as bars:
        tasks = {c: bars.add_task(c, total=1.0, claim=c, verdict="") for c in resolved}

        def progress_for(claim_id: str):
            task = tasks[claim_id]
            return lambda fraction, message="": bars.update(task, completed=fraction)

        def on_result(result) -> None:
            style = verdict_style(result.verdict)
            bars.update(tasks[result.id], completed=1.0, verdict=f"[{style}]{result.verdict}[/]")

        payload = runner.run_experiments(
            resolved,
            quick=quick,
            seed=seed,
            threads=threads,
            progress_for=progress_for,
            on_result=on_result,
        )
    json_path, html_path = runner.save_report(out, payload)
    if json_out:
        _output.emit_json(payload)
    else:
        c = _output.console
        c.print(claims_table(payload))
        s = payload["summary"]
        c.print(
            f"{s['holds']} holds, {s['fails']} fails, {s['inconclusive']} inconclusive "
            f"in {payload['total_seconds']:.1f} s. Report: {html_path} (data: {json_path})",
            highlight=False,
        )
    errors = [r for r in payload["results"] if r["error"]]
    for r in errors:
        _output.error(f"{r['id']}: {r['error']}")
    if errors:
        raise typer.Exit(1)
