"""Every private torch or CPython internal normlab uses, in one place.

Each name below replaces a public API (or is the only way to ask something) on a path
that runs once per layer call, where the public route costs a measurable share of a small
layer's ~10 µs. ``benchmarks/private_api.py`` times each against its public equivalent
(µs per call, and per layer call at (64, 100)); a shortcut stays only where it pays
(≥ 0.3 µs a layer call) or where no public API exists. When a torch or Python upgrade
removes one, this module is the only file to change; the public fallbacks are given.
Replaced after measuring: ``torch._C._get_tracing_state`` (saved 0.08 µs a layer call
against ``torch.jit.is_tracing``, which ``normlab.kernels.traced`` now calls).

| name | private API | public equivalent | why kept |
|---|---|---|---|
| :func:`env_raw` | ``os.environ._data`` | ``os.environ.get`` | only the mode switch reads it; see below |
| :data:`functorch_active` | ``torch._C._are_functorch_transforms_active`` | none | only way |
| :data:`dispatch_modes` | ``torch._C._len_torch_dispatch_stack`` | none | only way |
| :data:`unwrap_if_dead` | ``torch._C._functorch.unwrap_if_dead`` | ``Function.apply`` | see below |
| :data:`DisableFuncTorch` | ``torch._C._DisableFuncTorch`` | none | only way |
| :func:`functorch_value` | ``torch._C._functorch`` unwrapping | none | only way |
| :func:`stamp_numba_cache` | ``numba.core.caching.CacheImpl._locator_classes`` | none | only way (correctness, not speed) |
"""

from __future__ import annotations

import os

import torch

__all__ = [
    "DisableFuncTorch",
    "dispatch_modes",
    "env_raw",
    "functorch_active",
    "functorch_value",
    "stamp_numba_cache",
    "unwrap_if_dead",
]


def env_raw(name: str):
    """A reader of environment variable ``name``: a no-argument callable returning its
    raw value (``bytes`` on POSIX via the shortcut, ``str`` via the public route) or None.

    Replaces ``os.environ.get(name)`` (key encoding and value decoding on every call) by
    a lookup in CPython's raw mapping ``os.environ._data``, which ``os.environ`` keeps in
    sync (``putenv`` and the mapping are updated together, so ``monkeypatch.setenv`` and
    ``os.environ[...] = ...`` are seen). ``normlab.kernels.mode`` reads the path switch
    ``NORMLAB_KERNELS`` on every layer call."""
    try:
        data, key = os.environ._data, os.environ.encodekey(name)  # type: ignore[attr-defined]
    except AttributeError:  # pragma: no cover - other Pythons: the public route
        return lambda: os.environ.get(name)
    return lambda: data.get(key)


# Whether a torch.func transform (vmap, grad, jvp…) is active. No public API asks this;
# the engine reads it on every traced() check to route transformed calls away from the
# kernels, which would read the wrappers' memory.
functorch_active = torch._C._are_functorch_transforms_active

# How many Python dispatch modes (FakeTensorMode, make_fx, FlopCounterMode…) are active.
# torch.utils._python_dispatch._get_current_dispatch_mode is private too and slower.
dispatch_modes = torch._C._len_torch_dispatch_stack

# Function.apply is a Python wrapper that, outside functorch transforms, unwraps dead
# functorch wrappers from its arguments and calls the C++ apply (~2 µs a call). The
# engine does these two steps itself on its hot path, with this unwrap.
unwrap_if_dead = torch._C._functorch.unwrap_if_dead

# A context manager that switches torch.func's transforms off, for running-statistics
# updates made under vmap/grad on the plain tensors underneath. No public equivalent.
DisableFuncTorch = torch._C._DisableFuncTorch


def functorch_value(t: torch.Tensor) -> torch.Tensor | None:
    """The plain tensor under torch.func's grad/jvp wrappers of ``t`` (None if vmap
    batched it). No public API unwraps a functorch wrapper."""
    from torch._C._functorch import get_unwrapped, is_batchedtensor, is_gradtrackingtensor

    t = t.detach()
    while True:
        if is_batchedtensor(t):
            return None
        if not is_gradtrackingtensor(t):
            return t
        t = get_unwrapped(t)


def stamp_numba_cache(directory: str, stamp: object) -> None:
    """Make Numba's on-disk cache of every function defined in ``directory`` valid only
    for ``stamp`` (e.g. a hash of all the sources there).

    Numba keys a function's cache by its own source file alone, so a kernel in one module
    that inlines helpers from another would load stale machine code after the helpers
    change. Numba has no public hook for this (``NUMBA_CACHE_LOCATOR_CLASSES`` replaces
    the locators process-wide, the user's choice): this puts, ahead of each standard
    locator that keys by source file, a subclass that claims only ``directory``'s
    functions, caches where the standard one would, and returns ``stamp`` as their
    freshness. Installing it twice replaces the first."""
    from numba.core import caching

    directory = os.path.abspath(directory)
    impl = caching.CacheImpl
    standard = [c for c in impl._locator_classes if not getattr(c, "_normlab_stamped", False)]

    def stamped(base):
        class Stamped(base):
            _normlab_stamped = True

            @classmethod
            def from_function(cls, py_func, py_file):
                if os.path.dirname(os.path.abspath(py_file)) != directory:
                    return None
                return super().from_function(py_func, py_file)

            def get_source_stamp(self):
                return stamp

        Stamped.__name__ = Stamped.__qualname__ = f"Stamped{base.__name__}"
        return Stamped

    by_file = [c for c in standard if issubclass(c, caching._SourceFileBackedLocatorMixin)]
    impl._locator_classes = [stamped(c) for c in by_file] + standard
