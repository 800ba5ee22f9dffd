"""Does normlab slow down torch's own ops around it? (issue 12, item 2)

    python benchmarks/side_effects.py [--part spin|ops|model|all] [--repeats 9]
                                      [--inner 5] [--steps 7] [--threads 2] [--json]

The prefixes: a normlab ``BatchNorm2d(activation="relu")`` forward+backward of a
(32, 64, 56, 56) input (the kernels' threaded path); ``torch.nn.BatchNorm2d`` +
``ReLU(inplace=True)`` forward+backward of the same input (the same memory-bound work,
done by torch); a 20 ms sleep (*idle*: torch's thread team goes to sleep, as during any
stretch without torch ops).

1. **Spin.** CPU time the whole process burns while its main thread sleeps 20 ms right
   after each prefix: threads that keep spinning after their last parallel region,
   on the cores the next ops need. Little affected by the machine's load.
2. **Ops.** Torch-only ops (a conv forward+backward, ``relu``, ``threshold_backward``,
   ``fill_``, ``zero_``, a matmul) *alone* (after themselves) and right after each
   prefix, interleaved (each repeat runs every op and prefix in turn); each sample times
   the op only, ``--inner`` times, straight after its prefix; medians over ``--repeats``.
   Ratios: ``after normlab / alone``, ``after normlab / after torch`` and
   ``after normlab / after idle`` (~1.0: normlab leaves torch's ops alone).
3. **Model.** A small ResNet-like network (7x7 stem, Conv-BN-ReLU basic blocks with
   residual adds and ``ReLU(inplace=True)``, batch 16, 3x112x112) trained for
   ``--steps`` steps with torch's ``BatchNorm2d`` and with normlab's, alternating steps;
   step medians, then ``torch.profiler`` runs of 3 steps of each (two rounds,
   alternating, medians), grouped by op: self CPU time of torch's ops next to torch's BN
   and next to normlab's BN.

Also printed: Numba's threading layer, the OpenMP runtimes mapped into the process, the
thread count and the load average (a shared machine: compare ratios within one run).
``NUMBA_THREADING_LAYER=workqueue`` runs the kernels on the fork-safe layer (its own pool).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import sys
import time

import torch
import torch.nn.functional as F

N, C, H, W = 32, 64, 56, 56  # the BN prefix's input (25.7 MB float32)


def _runtime_info() -> dict:
    import numba

    maps = open("/proc/self/maps").read() if os.path.exists("/proc/self/maps") else ""
    runtimes = sorted(set(re.findall(r"\S*lib(?:g|i)omp\S*\.so\S*", maps)))
    try:
        layer = numba.threading_layer()
    except ValueError:
        layer = "(not started)"
    return {
        "numba_threading_layer": layer,
        "openmp_runtimes": runtimes,
        "torch_threads": torch.get_num_threads(),
        "process_threads": len(os.listdir("/proc/self/task")) if maps else None,
        "loadavg": os.getloadavg(),
    }


# -- part 1: torch ops after a BN step ----------------------------------------------------
def _prefixes():
    import normlab.nn as nln

    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, C, H, W, generator=g).requires_grad_()
    dy = torch.randn(N, C, H, W, generator=g)
    ours = nln.BatchNorm2d(C, activation="relu")
    theirs = torch.nn.Sequential(torch.nn.BatchNorm2d(C), torch.nn.ReLU(inplace=True))

    def after(module):
        def run():
            out = module(x)
            torch.autograd.grad(out, x, dy)

        return run

    return {
        "alone": None,
        "after normlab": after(ours),
        "after torch": after(theirs),
        "after idle": lambda: time.sleep(IDLE),
    }


IDLE = 0.02  # s: the "after idle" prefix, and the window of part 3


def part_spin(repeats: int) -> dict:
    """CPU time the process burns while its main thread sleeps ``IDLE`` s right after a
    prefix: threads still spinning after their last parallel region (ms per window)."""
    prefixes = _prefixes()
    burnt = {p: [] for p in prefixes if p != "alone"}
    for _ in range(repeats):
        for p in burnt:
            prefixes[p]()
            start = time.process_time()
            time.sleep(IDLE)
            burnt[p].append((time.process_time() - start) * 1e3)
    return {p: statistics.median(v) for p, v in burnt.items()}


def _ops():
    g = torch.Generator().manual_seed(1)
    conv = torch.nn.Conv2d(64, 64, 3, padding=1, bias=False)
    xc = torch.randn(8, 64, 28, 28, generator=g).requires_grad_()
    dyc = torch.randn(8, 64, 28, 28, generator=g)
    a = torch.randn(16, 64, 56, 56, generator=g)  # 12.8 MB
    grad = torch.randn_like(a)
    out = torch.empty_like(a)
    m1, m2 = torch.randn(512, 512, generator=g), torch.randn(512, 512, generator=g)

    def conv_fwd_bwd():
        torch.autograd.grad(conv(xc), (xc, conv.weight), dyc)

    return {
        "conv fwd+bwd (8,64,28,28)": conv_fwd_bwd,
        "relu (16,64,56,56)": lambda: torch.relu(a),
        "threshold_backward": lambda: torch.ops.aten.threshold_backward(grad, a, 0.0),
        "fill_": lambda: out.fill_(1.5),
        "zero_": lambda: out.zero_(),
        "matmul 512x512": lambda: torch.mm(m1, m2),
    }


def part_ops(repeats: int, inner: int) -> dict:
    prefixes, ops = _prefixes(), _ops()
    for fn in [p for p in prefixes.values() if p] + list(ops.values()):  # warm-up, JIT
        for _ in range(2):
            fn()
    samples = {(p, o): [] for p in prefixes for o in ops}
    for _ in range(repeats):
        for o, op in ops.items():
            for p, prefix in prefixes.items():
                total = 0.0
                for _ in range(inner):
                    if prefix is None:
                        op()  # the op after itself
                    else:
                        prefix()
                    start = time.perf_counter()
                    op()
                    total += time.perf_counter() - start
                samples[(p, o)].append(total / inner * 1e3)
    result = {}
    for o in ops:
        med = {p: statistics.median(samples[(p, o)]) for p in prefixes}
        spread = {
            p: (min(samples[(p, o)]) / med[p], max(samples[(p, o)]) / med[p]) for p in prefixes
        }
        result[o] = {"ms": med, "spread": spread}
    return result


def _print_ops(result: dict) -> None:
    print(
        f"{'op':28} {'alone ms':>9} {'after nl':>9} {'after t':>9} {'after idle':>10} "
        f"{'nl/alone':>9} {'nl/t':>6} {'nl/idle':>8}"
    )
    for o, r in result.items():
        ms = r["ms"]
        a, n, t, i = ms["alone"], ms["after normlab"], ms["after torch"], ms["after idle"]
        print(f"{o:28} {a:9.3f} {n:9.3f} {t:9.3f} {i:10.3f} {n / a:9.2f} {n / t:6.2f} {n / i:8.2f}")


# -- part 2: a small ResNet-like training step --------------------------------------------
class _Block(torch.nn.Module):
    def __init__(self, cin, cout, stride, bn):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = bn(cout)
        self.relu = torch.nn.ReLU(inplace=True)
        self.conv2 = torch.nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = bn(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = torch.nn.Sequential(
                torch.nn.Conv2d(cin, cout, 1, stride, bias=False), bn(cout)
            )

    def forward(self, x):
        identity = x if self.down is None else self.down(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


def _resnetish(bn) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 32, 7, 2, 3, bias=False),  # 112 -> 56
        bn(32),
        torch.nn.ReLU(inplace=True),
        _Block(32, 32, 1, bn),
        _Block(32, 32, 1, bn),
        _Block(32, 64, 2, bn),  # 56 -> 28
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(64, 10),
    )


def part_model(steps: int, batch: int = 16, size: int = 112) -> dict:
    import normlab.nn as nln

    g = torch.Generator().manual_seed(2)
    x = torch.randn(batch, 3, size, size, generator=g)
    target = torch.randint(0, 10, (batch,), generator=g)
    models = {
        "torch BN": _resnetish(torch.nn.BatchNorm2d),
        "normlab BN": _resnetish(nln.BatchNorm2d),
    }
    optims = {k: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for k, m in models.items()}

    def step(name):
        model, opt = models[name], optims[name]
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), target).backward()
        opt.step()

    for name in models:  # warm-up
        for _ in range(2):
            step(name)
    times = {name: [] for name in models}
    cpu = {name: [] for name in models}
    faults = {name: [] for name in models}
    for _ in range(steps):
        for name in models:
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            c0, start = time.process_time(), time.perf_counter()
            step(name)
            times[name].append((time.perf_counter() - start) * 1e3)
            cpu[name].append((time.process_time() - c0) * 1e3)
            faults[name].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    result = {
        "step_ms": {k: statistics.median(v) for k, v in times.items()},
        "step_cpu_ms": {k: statistics.median(v) for k, v in cpu.items()},
        "step_page_faults": {k: statistics.median(v) for k, v in faults.items()},
        "profile": {},
    }

    from torch.profiler import ProfilerActivity, profile

    for _ in range(2):  # the profiles alternate too: two rounds, kept per name
        for name in models:
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(3):
                    step(name)
            ops = result["profile"].setdefault(name, {})
            for ev in prof.key_averages():
                ops.setdefault(ev.key, []).append(ev.self_cpu_time_total / 1e3)
    for name, ops in result["profile"].items():
        result["profile"][name] = {k: statistics.median(v) for k, v in ops.items()}
    return result


_WATCH = (
    "aten::mkldnn_convolution",
    "aten::convolution_backward",
    "aten::threshold_backward",
    "aten::relu_",
    "aten::fill_",
    "aten::zero_",
    "aten::add_",
    "aten::add",
    "aten::mul_",
    "aten::native_batch_norm",
    "aten::native_batch_norm_backward",
)


def _print_model(result: dict) -> None:
    steps = result["step_ms"]
    print(
        "step (median ms): "
        + ", ".join(f"{k} {v:.1f}" for k, v in steps.items())
        + f"; normlab/torch {steps['normlab BN'] / steps['torch BN']:.2f}"
    )
    tp, nl = result["profile"]["torch BN"], result["profile"]["normlab BN"]
    cpu, faults = result["step_cpu_ms"], result["step_page_faults"]
    print(
        "per step (medians): process CPU ms "
        + ", ".join(f"{k} {v:.1f}" for k, v in cpu.items())
        + "; minor page faults "
        + ", ".join(f"{k} {v:.0f}" for k, v in faults.items())
    )
    print(f"{'op (self CPU, 3 steps)':36} {'torch BN ms':>12} {'normlab BN ms':>14} {'ratio':>6}")
    names = [k for k in _WATCH if k in tp or k in nl]
    others = sorted((k for k in nl if k not in _WATCH), key=lambda k: -nl[k])[:6]
    for k in names + others:
        a, b = tp.get(k, 0.0), nl.get(k, 0.0)
        ratio = f"{b / a:6.2f}" if a > 0 and b > 0 else "     -"
        print(f"{k[:36]:36} {a:12.1f} {b:14.1f} {ratio}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--inner", type=int, default=5, help="op calls per sample")
    ap.add_argument("--steps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--part", choices=("ops", "spin", "model", "all"), default="all")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = {}
    if args.part in ("spin", "all"):
        out["spin"] = part_spin(max(args.repeats, 7))
    if args.part in ("ops", "all"):
        out["ops"] = part_ops(args.repeats, args.inner)
    if args.part in ("model", "all"):
        out["model"] = part_model(args.steps)
    out["environment"] = _runtime_info()
    if args.json:
        json.dump(out, sys.stdout, indent=1)
        print()
        return
    env = out["environment"]
    print(
        f"numba layer {env['numba_threading_layer']}, OpenMP runtimes {env['openmp_runtimes']}, "
        f"torch threads {env['torch_threads']}, process threads {env['process_threads']}, "
        f"load {env['loadavg'][0]:.2f}"
    )
    if "spin" in out:
        print(
            f"CPU ms burnt in a {IDLE * 1e3:.0f} ms sleep right after: "
            + ", ".join(f"{k[6:]} {v:.2f}" for k, v in out["spin"].items())
        )
    if "ops" in out:
        _print_ops(out["ops"])
    if "model" in out:
        _print_model(out["model"])


if __name__ == "__main__":
    main()
