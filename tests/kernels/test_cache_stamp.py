"""The kernels' on-disk cache is stamped with every kernel module's source (kernels/_jit.py):
a kernel that inlines a helper from another module must not load stale code after that
module changes (Numba alone keys a cache by the function's own file)."""

import importlib
import pkgutil
import subprocess
import sys
import textwrap
from pathlib import Path

from numba.core.registry import CPUDispatcher

import normlab.kernels as kernels
from normlab.kernels import _jit


def _cached_dispatchers():
    for info in pkgutil.iter_modules(kernels.__path__):
        module = importlib.import_module(f"normlab.kernels.{info.name}")
        for name, value in vars(module).items():
            if isinstance(value, CPUDispatcher) and value._cache.__class__.__name__ != "NullCache":
                if value.py_func.__module__ == module.__name__:
                    yield f"{module.__name__}.{name}", value


def test_every_cached_kernel_is_stamped_with_all_kernel_sources():
    found = dict(_cached_dispatchers())
    assert len(found) > 20  # the kernels, helpers and entries of every module
    for name, dispatcher in found.items():
        locator = dispatcher._cache._impl.locator
        assert type(locator).__name__.startswith("Stamped"), name
        assert locator.get_source_stamp() == _jit.SOURCES_STAMP, name


def test_the_stamp_changes_with_any_kernel_module(tmp_path):
    src = Path(_jit.__file__).parent
    for path in src.glob("*.py"):
        (tmp_path / path.name).write_bytes(path.read_bytes())
    before = _jit._sources_stamp(tmp_path)
    assert before == _jit.SOURCES_STAMP
    helper = tmp_path / "_elementwise.py"
    helper.write_text(helper.read_text() + "\n# a helper edited\n")
    assert _jit._sources_stamp(tmp_path) != before


def test_functions_elsewhere_keep_numbas_own_stamp(tmp_path):
    # Only normlab's kernels directory is claimed: a user's cached function elsewhere is
    # located and stamped by Numba's standard locators.
    module = tmp_path / "user_mod.py"
    module.write_text(
        textwrap.dedent(
            """
            from numba import njit

            @njit(cache=True)
            def f(x):
                return x + 1
            """
        )
    )
    code = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(tmp_path)!r})
        import normlab.kernels
        import user_mod
        print(type(user_mod.f._cache._impl.locator).__name__, user_mod.f(1))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    name, value = out.stdout.split()
    assert not name.startswith("Stamped") and value == "2"
