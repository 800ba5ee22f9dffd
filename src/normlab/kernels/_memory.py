"""Activation-sized output buffers from a small reuse pool.

A fresh large tensor is ``mmap``-ed memory (glibc maps every allocation above its mmap
threshold, at most 32 MiB, straight from the kernel and unmaps it on free): the first
write to each 4 KiB page faults and the kernel zeroes it. For a 51 MB activation that is
~12 500 faults, ~10 ms on the development machine, five times the plain copy (~2 ms)
that a fused kernel aims at, and it is paid again at every training step because the
previous step's buffer went back to the kernel. torch's CPU allocator has no cache.
(Advising the range into transparent huge pages instead helps only while the kernel has
free 2 MiB pages at hand; on a machine whose memory is fragmented, ``defrag=madvise``
makes every fault compact memory first, 8x slower than the 4 KiB faults.)

So the kernels' activation-sized outputs (y, dx; 4 MiB and more) come from a pool of
buffers that stay mapped and faulted in. A buffer is a NumPy byte array. Each tensor
handed out is a new tensor *set* onto a new storage over the array's memory (the storage
``torch.from_numpy`` makes, which holds a reference to the array until it is freed):
``Tensor.set_``, not a view op, so for autograd and for users the output is a fresh
tensor (``_is_view()`` False, ``_base`` None) and in-place ops on it (``relu_``,
``ReLU(inplace=True)``, ``y += residual``) are as legal as on torch's own outputs. (A
``view``/``as_strided`` of the ``from_numpy`` tensor would be a view in autograd's eyes,
and autograd forbids in-place ops on views returned by a custom Function.) A buffer is
free again exactly when no storage over it is alive, which the pool reads from the
array's reference count (nothing has to be returned by hand, and a buffer still used —
by a view, by autograd's saved tensors, by ``.grad``, by a tensor modified in place — is
never handed out twice; ``share_memory_`` moves a tensor to a new storage and frees it).

The pool holds at most ``NORMLAB_POOL_MB`` MiB (default 1024) in all, in use or free;
past that, outputs are ordinary ``torch.empty_like`` tensors. A request that does not
fit first drops free buffers of other sizes (least recently used first).
``NORMLAB_POOL_MB=0`` turns the pool off. :func:`empty_cache` drops every free buffer;
:func:`pool_info` reports the pool's size. One difference from ``torch.empty_like``:
the storage is not resizable (``resize_`` to a larger size raises), as for any
``torch.from_numpy`` tensor.
"""

from __future__ import annotations

import os
import sys
import threading
from collections import OrderedDict

import numpy as np
import torch

_MIN_BYTES = 4 << 20  # below it glibc's heap reuses freed memory by itself


def _free_refs() -> int:
    """The reference count of an unused buffer as the pool's loops see it: its list's,
    the loop variable's and getrefcount's own (measured, not assumed: interpreters
    differ in what they count)."""
    same = [np.empty(1)]
    for arr in same:
        return sys.getrefcount(arr)
    raise AssertionError  # pragma: no cover


_FREE_REFS = _free_refs()


def _limit_from_env() -> int:
    raw = os.environ.get("NORMLAB_POOL_MB", "1024")
    try:
        mb = float(raw)
    except ValueError:
        raise ValueError(
            f"NORMLAB_POOL_MB={raw!r} is not a number; set it to the pool's size in MiB "
            "(0 turns the pool off)"
        ) from None
    return max(0, int(mb * (1 << 20)))


class _Pool:
    def __init__(self, limit: int):
        self.limit = limit
        self.lock = threading.Lock()
        self.buffers: OrderedDict[int, list[np.ndarray]] = OrderedDict()  # by byte size
        self.total = 0
        self.hits = 0
        self.misses = 0

    def take(self, nbytes: int) -> np.ndarray | None:
        """A buffer of ``nbytes`` that no tensor uses, or None (the pool is full)."""
        with self.lock:
            same = self.buffers.get(nbytes)
            if same is not None:
                for arr in same:
                    if sys.getrefcount(arr) == _FREE_REFS:
                        self.buffers.move_to_end(nbytes)
                        self.hits += 1
                        return arr
            if self.total + nbytes > self.limit:
                self._drop_free(self.total + nbytes - self.limit)
                if self.total + nbytes > self.limit:
                    return None
            arr = torch.empty(nbytes, dtype=torch.uint8).numpy()
            self.buffers.setdefault(nbytes, []).append(arr)
            self.buffers.move_to_end(nbytes)
            self.total += nbytes
            self.misses += 1
            return arr

    def _drop_free(self, needed: int) -> None:
        freed = 0
        for size in list(self.buffers):  # least recently used sizes first
            kept = []
            for arr in self.buffers[size]:
                if freed < needed and sys.getrefcount(arr) == _FREE_REFS:
                    freed += size
                    self.total -= size
                else:
                    kept.append(arr)
            if kept:
                self.buffers[size] = kept
            else:
                del self.buffers[size]
            if freed >= needed:
                return


_POOL = _Pool(_limit_from_env())


# fork(): the pool's lock may be held by another thread (``take`` allocates with the GIL
# released), and that thread does not exist in the child: the fork waits for the lock,
# and the child starts with a free one. The child's pool is a copy: a buffer its tensors
# (copies of the parent's) still use stays in use there.
_held_at_fork: list[threading.Lock] = []


def _before_fork() -> None:
    lock = _POOL.lock
    lock.acquire()
    _held_at_fork.append(lock)


def _after_fork_in_parent() -> None:
    _held_at_fork.pop().release()


def _after_fork_in_child() -> None:
    _held_at_fork.clear()
    _POOL.lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(
        before=_before_fork,
        after_in_parent=_after_fork_in_parent,
        after_in_child=_after_fork_in_child,
    )


def empty_cache() -> None:
    """Release every pooled buffer that no tensor uses (the memory goes back to the
    system); buffers in use stay and are reused once free."""
    with _POOL.lock:
        _POOL._drop_free(_POOL.total + 1)


def pool_info() -> dict:
    """``{'limit', 'bytes', 'buffers', 'free', 'hits', 'misses'}`` of the output pool."""
    with _POOL.lock:
        count = free = 0
        for same in _POOL.buffers.values():
            for arr in same:
                count += 1
                free += sys.getrefcount(arr) == _FREE_REFS
        return {
            "limit": _POOL.limit,
            "bytes": _POOL.total,
            "buffers": count,
            "free": free,
            "hits": _POOL.hits,
            "misses": _POOL.misses,
        }


def set_pool_limit(megabytes: float) -> None:
    """Set the pool's size in MiB (0: off); free buffers beyond it are released."""
    if not megabytes >= 0:
        raise ValueError(f"megabytes must be >= 0 (0 turns the pool off), got {megabytes!r}")
    with _POOL.lock:
        _POOL.limit = int(megabytes * (1 << 20))
        if _POOL.total > _POOL.limit:
            _POOL._drop_free(_POOL.total - _POOL.limit)


def empty_like(
    x: torch.Tensor, memory_format: torch.memory_format = torch.preserve_format
) -> torch.Tensor:
    """``torch.empty_like(x, memory_format=...)`` for a dense CPU ``x``; from the pool
    when the tensor is activation-sized."""
    nbytes = x.nbytes
    if nbytes < _MIN_BYTES or _POOL.limit == 0:
        if memory_format is torch.preserve_format:
            return torch.empty_like(x)
        return torch.empty_like(x, memory_format=memory_format)
    arr = _POOL.take(nbytes)
    if arr is None:
        return torch.empty_like(x, memory_format=memory_format)
    stride = torch.empty_like(x, memory_format=memory_format, device="meta").stride()
    # set_ rather than view/as_strided: the result must not be an autograd view (see the
    # module docstring); the storage's reference to ``arr`` marks the buffer as in use.
    storage = torch.from_numpy(arr).untyped_storage()
    return torch.empty(0, dtype=x.dtype).set_(storage, 0, x.shape, stride)
