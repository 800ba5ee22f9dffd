"""Measurements behind the norm-family layers (issue 6, items 1-4).

    .venv/bin/python benchmarks/norm_family.py

1. Accuracy: max |error| in normalised units against a float64 reference, for float32
   input with channel offsets 1e4 and 1e6 (std 0.1), normlab vs torch, for GroupNorm,
   LayerNorm and InstanceNorm.
2. Time (median of repeats, forward + backward, 1 thread; the machine is shared, so
   read ratios, not absolute numbers): ghost BN vectorised vs a loop over chunks; batch
   renorm vs BatchNorm; GroupNorm/LayerNorm vs torch.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.reference

from tests import reference as ref

import normlab as nl


def accuracy() -> None:
    print("max |y - y_float64| (normalised units), float32 input, std 0.1")
    g = torch.Generator().manual_seed(0)
    for offset in (1e4, 1e6):
        x = (torch.randn(8, 16, 16, 16, generator=g, dtype=torch.float64) * 0.1 + offset).float()
        rows = [
            (
                "GroupNorm(4)",
                nl.nn.GroupNorm(4, 16),
                torch.nn.GroupNorm(4, 16),
                ref.group_norm(x, 4),
            ),
            (
                "LayerNorm(C,H,W)",
                nl.nn.LayerNorm((16, 16, 16)),
                torch.nn.LayerNorm((16, 16, 16)),
                ref.layer_norm(x, 3),
            ),
            (
                "InstanceNorm2d",
                nl.nn.InstanceNorm2d(16),
                torch.nn.InstanceNorm2d(16),
                ref.group_norm(x, 16),
            ),
        ]
        for name, ours, theirs, y64 in rows:
            with torch.no_grad():
                e_ours = (ours(x).double() - y64).abs().max().item()
                e_torch = (theirs(x).double() - y64).abs().max().item()
            print(f"  offset {offset:.0e}  {name:18s} normlab {e_ours:.2e}   torch {e_torch:.2e}")


def _time(fn, repeats=15) -> float:
    for _ in range(3):
        fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def speed() -> None:
    torch.set_num_threads(1)
    x = torch.randn(256, 64, 8, 8, requires_grad=True)
    dy = torch.randn_like(x)

    def step(m):
        def run():
            x.grad = None
            m(x).backward(dy)

        return run

    ghost = nl.nn.GhostBatchNorm2d(64, virtual_batch_size=16)
    bn = torch.nn.BatchNorm2d(64)

    def loop():  # the common reference implementation: BN per chunk
        x.grad = None
        torch.cat([bn(c) for c in x.split(16)]).backward(dy)

    nbn = nl.nn.BatchNorm2d(64)

    def nl_loop():  # the same loop on normlab's engine: what vectorising saves
        x.grad = None
        torch.cat([nbn(c) for c in x.split(16)]).backward(dy)

    t_ghost, t_loop, t_nl_loop = _time(step(ghost)), _time(loop), _time(nl_loop)
    t_whole = _time(step(nbn))
    print(
        f"ghost BN (N=256, C=64, 8x8, vbs=16, fwd+bwd): vectorised {t_ghost * 1e3:.1f} ms "
        f"(normlab BN on the whole batch: {t_whole * 1e3:.1f} ms); "
        f"loop over 16 chunks: normlab BN {t_nl_loop * 1e3:.1f} ms "
        f"({t_nl_loop / t_ghost:.2f}x), torch BN {t_loop * 1e3:.1f} ms ({t_loop / t_ghost:.2f}x)"
    )
    renorm = nl.nn.BatchRenorm2d(64, warmup_steps=0, r_max_steps=0, d_max_steps=0)
    t_rn, t_bn, t_tbn = _time(step(renorm)), _time(step(nl.nn.BatchNorm2d(64))), _time(step(bn))
    print(
        f"batch renorm {t_rn * 1e3:.1f} ms vs normlab BN {t_bn * 1e3:.1f} ms "
        f"(ratio {t_rn / t_bn:.2f}) vs torch BN {t_tbn * 1e3:.1f} ms"
    )
    for name, ours, theirs in [
        ("GroupNorm(8, 64)", nl.nn.GroupNorm(8, 64), torch.nn.GroupNorm(8, 64)),
        ("LayerNorm(64,8,8)", nl.nn.LayerNorm((64, 8, 8)), torch.nn.LayerNorm((64, 8, 8))),
    ]:
        a, b = _time(step(ours)), _time(step(theirs))
        print(f"{name}: normlab {a * 1e3:.1f} ms, torch {b * 1e3:.1f} ms (ratio {a / b:.2f})")


if __name__ == "__main__":
    accuracy()
    speed()
