"""The by-address entries say what runs: ``forward_at`` … call the serial twins,
``forward_at_threaded`` … the parallel kernels (issue 13), each set under its own name
(its own on-disk cache); and every kernel name the package reaches is re-exported."""

import pytest

from normlab.kernels import _entries, _numba

KERNELS = [
    f"{direction}_{layout}"
    for direction in ("forward", "backward", "affine", "forward_res", "backward_res")
    for layout in ("cf", "cl")
]
ENTRIES = ["forward_at", "backward_at", "affine_at", "forward_res_at", "backward_res_at"]


@pytest.mark.parametrize("entry", ENTRIES)
def test_serial_entries_call_the_serial_twins_and_threaded_ones_the_parallel_kernels(entry):
    serial = getattr(_numba, entry).py_func.__globals__
    threaded = getattr(_numba, entry + "_threaded").py_func.__globals__
    for name in KERNELS:
        assert serial["_" + name] is getattr(_numba, name + "_serial")
        assert threaded["_" + name] is getattr(_numba, name)
        assert not getattr(_numba, name + "_serial").targetoptions.get("parallel")
        assert getattr(_numba, name).targetoptions.get("parallel")
    assert getattr(_numba, entry).py_func.__qualname__ == entry
    assert getattr(_numba, entry + "_threaded").py_func.__qualname__ == entry + "_threaded"


def test_every_kernel_name_is_reexported():
    """``_numba.KERNELS`` (what ``normlab bench`` reports the JIT time of) are dispatchers
    reachable from ``_numba``, the entries the same objects as in ``_entries``."""
    for name in _numba.KERNELS:
        assert hasattr(getattr(_numba, name), "py_func"), name
    for name in ENTRIES:
        assert getattr(_numba, name) is getattr(_entries, name)
        assert getattr(_numba, name + "_threaded") is getattr(_entries, name + "_threaded")
