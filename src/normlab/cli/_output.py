"""One output sink for every command: rich for people, JSON for machines."""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console

console = Console()
err_console = Console(stderr=True)


def error(message: str) -> None:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None if math.isnan(obj) else (1e308 if obj > 0 else -1e308)
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def emit_json(payload: Any) -> None:
    sys.stdout.write(json.dumps(_jsonable(payload), indent=2) + "\n")


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
