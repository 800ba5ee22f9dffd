"""The package's rooms: the library never imports the command line.

``normlab.cli`` is an application over the library (typer, rich, printing). Anything else
importing it would pull the CLI's dependencies into library code and make cycles
(cli → recipe → cli). The check reads every module's import statements with ``ast``;
what runs only when a file is executed as a program (``__main__.py``, the body of
``if __name__ == "__main__":``) is an entry point, not a library import.
"""

from __future__ import annotations

import ast
from pathlib import Path

import normlab

PACKAGE = Path(normlab.__file__).resolve().parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_main_guard(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return (
        isinstance(node, ast.If)
        and isinstance(test, ast.Compare)
        and isinstance(test.left, ast.Name)
        and test.left.id == "__name__"
        and any(isinstance(c, ast.Constant) and c.value == "__main__" for c in test.comparators)
    )


def imported_modules(source: str, module: str, is_package: bool = False) -> list[tuple[int, str]]:
    """``(line, dotted name)`` of everything ``source`` imports outside ``__main__`` guards:
    ``import a.b``, ``from a import b`` (as ``a`` and ``a.b``), relative imports resolved
    against ``module``, and ``importlib.import_module("a.b")`` with a literal name."""
    package = module if is_package else module.rpartition(".")[0]
    found: list[tuple[int, str]] = []

    def visit(node: ast.AST) -> None:
        if _is_main_guard(node):
            for child in node.orelse:  # the else branch runs on import
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.extend((node.lineno, a.name) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            found.append((node.lineno, base))
            found.extend((node.lineno, f"{base}.{a.name}") for a in node.names)
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.append((node.lineno, node.args[0].value))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(source))
    return found


def _imports_cli(name: str) -> bool:
    return name == "normlab.cli" or name.startswith("normlab.cli.")


def test_the_walker_sees_every_form_of_import():
    src = (
        "import normlab.cli\n"
        "from normlab import cli\n"
        "def f():\n    from ..cli import _output\n"
        "import importlib\nimportlib.import_module('normlab.cli.train')\n"
        "if __name__ == '__main__':\n    from normlab.cli import main\n"
    )
    hits = sorted(
        {line for line, n in imported_modules(src, "normlab.recipes.x") if _imports_cli(n)}
    )
    assert hits == [1, 2, 4, 6]  # not line 8: an entry point, run only as a program


def test_no_module_outside_cli_imports_the_cli():
    files = [
        p
        for p in sorted(PACKAGE.rglob("*.py"))
        if "cli" not in p.relative_to(PACKAGE).parts[:1] and p.name != "__main__.py"
    ]
    assert len(files) > 50 and PACKAGE / "recipes" / "ddp.py" in files
    offenders = [
        f"{p.relative_to(PACKAGE.parent)}:{line} imports {name}"
        for p in files
        for line, name in imported_modules(
            p.read_text(encoding="utf-8"), _module_name(p), p.name == "__init__.py"
        )
        if _imports_cli(name)
    ]
    assert not offenders, "the library imports the CLI:\n" + "\n".join(offenders)
