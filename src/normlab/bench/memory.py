"""Memory the benchmarks measure: what autograd keeps for backward, and resident set size.

* :func:`saved_for_backward` runs a function under
  ``torch.autograd.graph.saved_tensors_hooks`` and adds up the *distinct storages* the
  saved tensors live in, so a tensor saved by two nodes, or two views of one buffer (an
  in-place ReLU's output is its input's storage), count once.
* :func:`rss_bytes`, :func:`reset_peak_rss` and :func:`peak_rss_bytes` read Linux's
  ``VmRSS`` / ``VmHWM`` (``/proc/self/status``). Writing ``5`` to ``/proc/self/clear_refs``
  (Linux ≥ 4.0) resets the high-water mark, so a peak can be taken over a chosen stretch
  of a process (the training steps) rather than its whole life (imports, JIT).
"""

from __future__ import annotations

import resource
from collections.abc import Callable, Iterable

import torch


def saved_for_backward(
    fn: Callable[[], object],
    *,
    exclude: Iterable[torch.Tensor] = (),
    activation_numel: int | None = None,
) -> dict:
    """What autograd saves for backward while ``fn()`` runs (its result is dropped).

    Returns ``bytes`` (sum of ``nbytes`` over distinct storages, keyed by data pointer),
    ``storages`` (their number), ``tensors`` (saved tensors, counted per save),
    ``excluded_bytes`` (the part of ``bytes`` in storages of ``exclude``, e.g. a model's
    parameters, which exist whether or not anything is saved), and with
    ``activation_numel``, ``activation_sized``: saved tensors with at least that many
    elements.
    """
    excluded_ptrs = {t.untyped_storage().data_ptr() for t in exclude}
    storages: dict[int, int] = {}
    count = {"tensors": 0, "big": 0}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        count["tensors"] += 1
        if activation_numel is not None and t.numel() >= activation_numel:
            count["big"] += 1
        return t

    # The hooks keep every saved tensor alive until `out` is dropped, so no storage can be
    # freed and its address reused by another during fn(): data pointers are unique keys.
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    result = {
        "bytes": sum(storages.values()),
        "storages": len(storages),
        "tensors": count["tensors"],
        "excluded_bytes": sum(n for p, n in storages.items() if p in excluded_ptrs),
    }
    if activation_numel is not None:
        result["activation_sized"] = count["big"]
    return result


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_bytes() -> int | None:
    """This process's resident set size now (``VmRSS``), or None off Linux."""
    kb = _status_kb("VmRSS")
    return None if kb is None else kb * 1024


def reset_peak_rss() -> bool:
    """Reset the peak RSS (``VmHWM``) to the current RSS; False if the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """Peak RSS since the last :func:`reset_peak_rss` (``VmHWM``), else over the process's
    life (``getrusage(...).ru_maxrss``, kilobytes on Linux)."""
    kb = _status_kb("VmHWM")
    if kb is None:
        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb * 1024
