"""Activation-sized output buffers backed by transparent huge pages.

A fresh large tensor is ``mmap``-ed memory: the first write to each 4 KiB page faults and
the kernel zeroes it. For a 51 MB activation that is ~12 500 faults, which on the
development machine costs ~10 ms, five times the plain copy (2 ms) that a fused kernel
aims at. Advising the still untouched range ``MADV_HUGEPAGE`` before the kernel writes
it makes the faults 2 MiB each (the kernel zeroes the same bytes, but 512x fewer
faults). NumPy does the same for every allocation of 4 MiB or more (its
``_set_madvise_hugepage`` switch); torch's CPU allocator does it only
under ``THP_MEM_ALLOC_ENABLE=1``. The advice is a hint: where it is unavailable
(non-Linux, THP disabled) this is a plain ``torch.empty_like``.
"""

from __future__ import annotations

import ctypes
import sys

import torch

_MADV_HUGEPAGE = 14
_PAGE = 4096
_MIN_BYTES = 4 << 20  # numpy's threshold: below it the heap reuses memory anyway

_madvise = None
if sys.platform.startswith("linux"):
    try:
        _libc = ctypes.CDLL(None, use_errno=True)
        _madvise = _libc.madvise
        _madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        _madvise.restype = ctypes.c_int
    except (OSError, AttributeError):  # pragma: no cover - exotic libc
        _madvise = None


def empty_like(
    x: torch.Tensor, memory_format: torch.memory_format = torch.preserve_format
) -> torch.Tensor:
    """``torch.empty_like(x, memory_format=...)``, advised into huge pages."""
    if x.nbytes < _MIN_BYTES:  # the common small case, without keyword parsing
        if memory_format is torch.preserve_format:
            return torch.empty_like(x)
        return torch.empty_like(x, memory_format=memory_format)
    out = torch.empty_like(x, memory_format=memory_format)
    if _madvise is not None:
        nbytes = out.untyped_storage().nbytes()
        start = out.data_ptr()
        lo = (start + _PAGE - 1) // _PAGE * _PAGE
        hi = (start + nbytes) // _PAGE * _PAGE
        if hi > lo:
            _madvise(lo, hi - lo, _MADV_HUGEPAGE)  # failure only means no huge pages
    return out
