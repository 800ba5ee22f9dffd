"""``normlab --help`` and every command's ``--help`` read well in a narrow terminal.

Typer's rich help rewraps a command's first paragraph but keeps the hard line breaks of the
others (and of every paragraph in the command list), so a docstring wrapped at the source's
width breaks sentences mid-line at 80 columns. Hence: help paragraphs are single lines in
the source, and the rendered help wraps a line only where its next word would not fit.
"""

from __future__ import annotations

import inspect
import itertools
import re

import pytest
import typer
from typer.testing import CliRunner

from normlab.cli import app

GROUP = typer.main.get_command(app)
NAMES = list(GROUP.commands)
WIDTHS = (80, 100, 120)


def _paragraphs(help_text: str | None) -> list[str]:
    return inspect.cleandoc(help_text or "").split("\n\n")


def _render(args: list[str], width: int) -> list[str]:
    result = CliRunner().invoke(app, [*args, "--help"], env={"COLUMNS": str(width)})
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert max(map(len, lines)) == width, "the help did not render at the asked width"
    return lines


def _description(lines: list[str]) -> list[list[str]]:
    """The paragraphs between the usage line and the first panel, as lists of lines."""
    start = next(i for i, line in enumerate(lines) if line.strip().startswith("Usage:")) + 1
    end = next(i for i, line in enumerate(lines) if line.startswith("╭"))
    paragraphs: list[list[str]] = [[]]
    for line in lines[start:end]:
        if line.strip():
            paragraphs[-1].append(line.strip())
        elif paragraphs[-1]:
            paragraphs.append([])
    return [p for p in paragraphs if p]


def _assert_wrapped_only_when_full(paragraph: list[str], room: int, where: str) -> None:
    # a soft wrap moves a word down only if it would not fit; anything else is a hard break
    for line, following in itertools.pairwise(paragraph):
        next_word = following.split()[0]
        assert len(line) + 1 + len(next_word) > room, (
            f"{where}: the line {line!r} ends early ({next_word!r} would fit): a hard line "
            f"break in the help text"
        )


@pytest.mark.parametrize("name", [None, *NAMES])
def test_help_paragraphs_are_single_lines_in_the_source(name):
    command = GROUP if name is None else GROUP.commands[name]
    for paragraph in _paragraphs(command.help):
        assert "\n" not in paragraph, f"{name or 'normlab'}: {paragraph!r}"
    for param in command.params:
        text = getattr(param, "help", None) or ""
        assert "\n" not in text, f"{name or 'normlab'} {param.name}: {text!r}"


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("name", NAMES)
def test_command_help_wraps_only_where_a_line_is_full(name, width):
    rendered = _description(_render([name], width))
    expected = _paragraphs(GROUP.commands[name].help)
    assert [" ".join(p) for p in rendered] == expected  # every paragraph intact, in order
    first_sentence = re.split(r"(?<=[.;:])\s", expected[0])[0]
    assert rendered[0][0].startswith(first_sentence) or len(first_sentence) > width - 2
    for paragraph in rendered:
        _assert_wrapped_only_when_full(paragraph, width - 2, f"normlab {name} --help")


_MARKERS = re.compile(r"\s*\[(?:default: [^\]]*|required)\]\s*$")


def _parameter_help(lines: list[str], text: str) -> tuple[list[str], int]:
    """The rendered lines of one parameter's help in its panel, and the room its column has.

    The row is found by the help's first words; its continuation lines are those blank up to
    the help column. Typer's own ``[default: …]`` / ``[required]`` markers are dropped."""
    start = " ".join(text.split()[:3])
    row = next(i for i, line in enumerate(lines) if start in line and line.startswith("│"))
    column = lines[row].index(start)
    room = lines[row].rindex("│") - 1 - column
    pieces = []
    for line in lines[row:]:
        if not line.startswith("│") or (line is not lines[row] and line[1:column].strip()):
            break
        piece = _MARKERS.sub("", line[column : line.rindex("│")]).rstrip()
        if piece:
            pieces.append(piece)
    return pieces, room


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("name", [None, *NAMES])
def test_parameter_help_wraps_only_where_a_line_is_full(name, width):
    command = GROUP if name is None else GROUP.commands[name]
    lines = _render([] if name is None else [name], width)
    where = f"normlab {name or ''} --help at {width} columns"
    checked = 0
    for param in command.params:
        text = getattr(param, "help", None)
        if not text:
            continue
        pieces, room = _parameter_help(lines, text)
        assert " ".join(pieces) == " ".join(text.split()), f"{where}: {param.name}: {pieces}"
        _assert_wrapped_only_when_full(pieces, room, f"{where}, {param.name}")
        checked += 1
    assert checked, f"{where}: no parameter help found"


@pytest.mark.parametrize("width", WIDTHS)
def test_command_list_shows_each_first_paragraph_wrapped_cleanly(width):
    lines = _render([], width)
    start = next(i for i, line in enumerate(lines) if "Commands" in line and "╭" in line)
    rows: dict[str, list[str]] = {}
    for line in lines[start + 1 :]:
        if line.startswith("╰"):
            break
        m = re.match(r"│ (\S*)(\s+)(.*?)\s*│$", line)
        assert m, line
        if m.group(1):
            name, column = m.group(1), m.start(3)
            rows[name] = []
        room = line.rindex("│") - 1 - column  # the description column, less its padding
        rows[name].append(m.group(3))
    assert list(rows) == NAMES
    for name, row in rows.items():
        assert " ".join(row) == _paragraphs(GROUP.commands[name].help)[0]
        _assert_wrapped_only_when_full(row, room, f"normlab --help, {name}")
