import pytest

from normlab.cli import _output


@pytest.fixture(autouse=True)
def _wide_console(monkeypatch):
    """Rich wraps at the terminal's width (80 under pytest, less in a narrow terminal);
    assertions on printed text should not depend on where a line broke."""
    for console in (_output.console, _output.err_console):
        monkeypatch.setattr(console, "width", 200)
