"""One output sink for every command: rich for people, JSON for machines."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console

from normlab.report.io import jsonable

console = Console()
err_console = Console(stderr=True)


def error(message: str) -> None:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False)


def emit_json(payload: Any) -> None:
    """``payload`` as indented JSON on stdout, cleaned as every report file is
    (:func:`normlab.report.io.jsonable`: NaN → null, ±inf → ±1e308, tensors → lists)."""
    sys.stdout.write(json.dumps(jsonable(payload), indent=2) + "\n")


@contextmanager
def progress_bar(description: str) -> Iterator[Callable[[float, str], None]]:
    """A transient progress bar on stderr (so ``--json`` stdout stays clean); yields
    ``update(fraction_done, message)``."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        TimeElapsedColumn(),
        TextColumn("{task.fields[message]}"),
    )
    with Progress(*columns, console=err_console, transient=True) as bars:
        task = bars.add_task(description, total=1.0, message="")

        def update(fraction: float, message: str) -> None:
            bars.update(task, completed=min(max(fraction, 0.0), 1.0), message=message)

        yield update


@contextmanager
def counted_progress(
    description: str, total: int, *, quiet: bool = False
) -> Iterator[tuple[Callable[[str], None], Callable[[], None]]]:
    """A transient "description, bar, done/total, elapsed" bar on stderr for ``total``
    steps; yields ``(describe(text), advance())``: ``describe`` replaces the description.
    ``quiet`` (``--json``) shows nothing."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=err_console, transient=True, disable=quiet) as bars:
        task = bars.add_task(description, total=total)
        yield (
            lambda text: bars.update(task, description=text),
            lambda: bars.advance(task),
        )
