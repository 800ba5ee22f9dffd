"""Each private-API shortcut of ``normlab._private`` against its public equivalent.

For every shortcut that has a public equivalent: µs per call of each (interleaved,
median of repeats, ``time.thread_time``), how many times one layer call makes it
(counted, ``BatchNorm1d(100, activation="relu")`` at (64, 100): a training forward +
backward and an eval forward), and so the µs a layer call saves. The rule
(``normlab._private``): keep a shortcut that saves ≥ 0.3 µs a layer call or is the only
way. ``Function.apply`` runs once per training layer call. Shortcuts without a public API (functorch state, dispatch modes, DisableFuncTorch,
functorch unwrapping) are listed as such.

    PYTHONPATH=src python benchmarks/private_api.py [--repeats 15]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

import normlab as nl
from normlab import _private, kernels
from normlab.kernels import _plan


def _per_call(fn, calls: int = 20000) -> float:
    t0 = time.thread_time()
    for _ in range(calls):
        fn()
    return (time.thread_time() - t0) / calls * 1e6


class _Identity(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g


_super_apply = super(torch.autograd.Function, _Identity).apply


def _counted_layer_calls(patch_name: str) -> int:
    """How often one training step + one eval call of the (64, 100) layer calls
    ``normlab.kernels._plan.<patch_name>``."""
    calls = [0]
    original = getattr(_plan, patch_name)

    def counted(*a):
        calls[0] += 1
        return original(*a)

    bn = nl.nn.BatchNorm1d(100, activation="relu")
    x = torch.randn(64, 100, requires_grad=True)
    bn(x).sum().backward()  # compile/load first
    setattr(_plan, patch_name, counted)
    try:
        bn(x).sum().backward()
        bn.eval()
        with torch.no_grad():
            bn(x)
    finally:
        setattr(_plan, patch_name, original)
    return calls[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()
    torch.set_num_threads(1)
    x = torch.randn(64, 100, requires_grad=True)
    name = kernels.KERNELS_ENV
    raw = _private.env_raw(name)
    pairs = {
        "env_raw (os.environ._data)": (raw, lambda: os.environ.get(name), "_env_raw"),
        "_get_tracing_state (replaced)": (
            torch._C._get_tracing_state,
            torch.jit.is_tracing,
            "_jit_tracing",
        ),
        "Function.apply via unwrap_if_dead": (
            lambda: _super_apply(_private.unwrap_if_dead(x)),
            lambda: _Identity.apply(x),
            None,
        ),
    }
    counts = {label: (_counted_layer_calls(p) if p else 1) for label, (_, _, p) in pairs.items()}
    samples = {label: ([], []) for label in pairs}
    for _ in range(args.repeats):
        for label, (short, public, _) in pairs.items():
            samples[label][0].append(_per_call(short))
            samples[label][1].append(_per_call(public))
    print(
        f"{'shortcut':36} {'µs short':>9} {'µs public':>9} {'per layer':>9} {'µs saved':>9}  verdict"
    )
    for label, (s, p) in samples.items():
        ms, mp = statistics.median(s), statistics.median(p)
        saved = (mp - ms) * counts[label]
        verdict = "keep" if saved >= 0.3 else "replace"
        print(f"{label:36} {ms:9.3f} {mp:9.3f} {counts[label]:9d} {saved:9.2f}  {verdict}")
    for label in ("functorch_active", "dispatch_modes", "DisableFuncTorch", "functorch_value"):
        print(f"{label:36} {'—':>9} {'none':>9} {'—':>9} {'—':>9}  keep (only way)")


if __name__ == "__main__":
    main()
