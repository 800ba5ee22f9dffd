"""How the kernels are compiled: Numba's threading layer (chosen before any parallel
kernel compiles or loads) and the ``njit`` options every kernel module uses (on-disk
cache, fastmath flags, helpers inlined).

Numba keys a function's on-disk cache by a hash of its own source file, not of the
modules it calls; the kernels inline helpers from ``_elementwise.py`` and ``_rows.py``
and the entries call kernels in other modules, so each kernel's cache is stamped instead
with a hash of *every* module in this directory (:data:`SOURCES_STAMP`): editing any of
them (or installing another normlab version) recompiles all the kernels, never loads
stale code.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from normlab._private import stamp_numba_cache


def _sources_stamp(directory: Path) -> str:
    """sha256 over the names and contents of the ``.py`` files in ``directory``."""
    h = hashlib.sha256()
    for path in sorted(directory.glob("*.py")):
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


SOURCES_STAMP = _sources_stamp(Path(__file__).resolve().parent)
stamp_numba_cache(str(Path(__file__).resolve().parent), SOURCES_STAMP)

# -- the threading layer --------------------------------------------------------------------
THREADING_LAYER_PRIORITY = ["omp", "workqueue", "tbb"]


def _choose_threading_layer() -> list[str] | None:
    """Run the threaded kernels on Numba's ``omp`` threading layer (falling back to
    ``workqueue`` where no OpenMP runtime loads) unless the user chose one
    (``NUMBA_THREADING_LAYER``, ``NUMBA_THREADING_LAYER_PRIORITY`` or
    ``numba.config.THREADING_LAYER``) or Numba's threads are already running; returns the
    priority set, or None when left alone.

    Why ``omp``: with torch imported first, the OpenMP calls of Numba's ``omp`` extension
    bind to the libgomp torch bundles (``LD_DEBUG=bindings`` shows ``GOMP_parallel``
    resolved there), so a kernel's parallel regions run on torch's own thread team,
    already awake after torch's ops: a launch costs ~1-3 µs and no second team competes
    for the cores (``benchmarks/side_effects.py --part spin``: the CPU a normlab step
    leaves spinning equals a torch BN step's). ``workqueue`` costs ~75 µs of
    condition-variable hand-offs per parallel region on the development VM: resnet-stem
    training 2.9-3.6x torch against 5.1-5.5x on ``omp`` (``benchmarks/README.md``,
    "Threads, fork and torch's ops"). ``tbb`` (Numba's own first choice when the ``tbb``
    package is installed) would bring a second thread pool next to torch's.

    GNU OpenMP is not fork-safe: a child forked after a threaded kernel ran has no thread
    team (Numba kills a direct child that launches one; a grandchild would hang), so a
    forked child runs the serial kernels (``normlab.kernels._launch``). On ``workqueue``
    (``NUMBA_THREADING_LAYER=workqueue``), which is fork-safe, children run threaded.
    Numba docs, "The Threading Layers".
    """
    from numba.core import config
    from numba.np.ufunc import parallel

    if (
        parallel._is_initialized
        or "NUMBA_THREADING_LAYER" in os.environ
        or "NUMBA_THREADING_LAYER_PRIORITY" in os.environ
        or str(config.THREADING_LAYER).lower() != "default"
    ):
        return None
    config.THREADING_LAYER_PRIORITY = list(THREADING_LAYER_PRIORITY)
    return config.THREADING_LAYER_PRIORITY


# Before any parallel kernel below is compiled or loaded: that starts Numba's threads.
_choose_threading_layer()

# Reassociation lets LLVM vectorise the float64 sums; no 'nnan'/'ninf', so NaN and Inf
# propagate as in torch's ops (the running-statistics policy depends on it).
_FASTMATH = {"reassoc", "contract", "nsz", "arcp"}
_JIT = {"cache": True, "fastmath": _FASTMATH, "error_model": "numpy", "nogil": True}
_HELPER = {"cache": True, "fastmath": _FASTMATH, "error_model": "numpy", "inline": "always"}
