"""The ``normlab`` command line: thin commands over the library.

One file per command; this module holds the app, the shared output sink and error
handling. Set ``NORMLAB_DEBUG=1`` to see tracebacks instead of one-line errors.
"""

from __future__ import annotations

import os
import sys

import typer

from normlab.cli import _output
from normlab.cli.bench import bench
from normlab.cli.demo import demo
from normlab.cli.diagnose import diagnose
from normlab.cli.report import report
from normlab.cli.run import run
from normlab.cli.train import train

app = typer.Typer(
    name="normlab",
    help="Batch normalization done right, fast, and measured.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        from normlab import __version__

        typer.echo(f"normlab {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Batch normalization done right, fast, and measured."""


app.command("demo")(demo)
app.command("run")(run)
app.command("report")(report)
app.command("train")(train)
app.command("diagnose")(diagnose)
app.command("bench")(bench)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the console script and ``python -m normlab``."""
    try:
        # Without standalone mode click returns (not raises) a typer.Exit's code.
        code = app(args=argv, standalone_mode=False)
        if type(code) is int and code != 0:  # not a bool or other value a command returned
            sys.exit(code)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        _output.error("aborted")
        sys.exit(130)
    except Exception as e:  # one clean line unless debugging
        if hasattr(e, "show") and hasattr(e, "exit_code"):  # click's usage errors
            e.show()
            sys.exit(e.exit_code)
        if os.environ.get("NORMLAB_DEBUG"):
            raise
        _output.error(f"{type(e).__name__}: {e}")
        _output.error("(set NORMLAB_DEBUG=1 for the traceback)")
        sys.exit(1)
