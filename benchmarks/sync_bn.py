"""What synchronising batch-norm statistics costs on this machine, at 2 gloo ranks.

    python benchmarks/sync_bn.py [--steps 60] [--repeats 3] [--json]

1. End to end: median time of a ``normlab train`` step (DDP, the digits CNN with three
   BN layers, global batch 128) with ``--sync`` and ``--no-sync``, alternating runs.
2. Per layer: median forward + backward time of one ``SyncBatchNorm`` vs the same layer
   without synchronisation (normlab ``BatchNorm``), input (64, 32, 8, 8) per rank.
3. normlab's own extra CPU work per layer: the synchronised path with the collectives
   stubbed out (so the difference is computation, not communication or waiting).
4. Collectives per layer per step, counted by wrapping ``torch.distributed``.

Timings on a shared 2-core machine are noisy: the load average is printed with them.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist


def _end_to_end(steps: int, repeats: int) -> dict:
    from normlab.recipes.ddp import TrainConfig, train

    times: dict[str, list[float]] = {"sync": [], "local": []}
    for _ in range(repeats):
        for sync in (True, False):
            r = train(TrainConfig(steps=steps, batch_size=128, nproc=2, sync=sync, log_every=0))
            times["sync" if sync else "local"].append(r.median_step_ms)
    sync_ms, local_ms = statistics.median(times["sync"]), statistics.median(times["local"])
    return {
        "step_ms_sync": sync_ms,
        "step_ms_local": local_ms,
        "overhead_ms": sync_ms - local_ms,
        "overhead_pct": 100 * (sync_ms - local_ms) / local_ms,
        "runs": times,
    }


def _layer_worker(rank: int, world: int, store: str, iters: int, out) -> None:
    import normlab as nl

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        store=dist.FileStore(store, world),
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
    x = torch.randn(64, 32, 8, 8, requires_grad=True)
    dy = torch.randn_like(x)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    row, rows, sums = torch.zeros(5 + 64, dtype=torch.float64), None, torch.zeros(65).double()
    rows = torch.zeros(2 * row.numel(), dtype=torch.float64)

    def bare_collectives():  # what the layer exchanges, without the layer
        gather(rows, row)
        dist.all_reduce(sums)

    sync_layer, local_layer = nl.nn.SyncBatchNorm(32), nl.nn.BatchNorm2d(32)
    result = {}
    for name, fn in (
        ("sync", lambda: sync_layer(x).backward(dy)),
        ("local", lambda: local_layer(x).backward(dy)),
        ("collectives_only", bare_collectives),
    ):
        samples = []
        for i in range(iters + 5):
            dist.barrier()  # start together: measure the layer, not the other rank's lag
            t0 = time.perf_counter()
            fn()
            if i >= 5:
                samples.append(time.perf_counter() - t0)
        samples.sort()
        result[name] = 1e6 * statistics.median(samples)
        result[name + "_p10"] = 1e6 * samples[len(samples) // 10]
    # collectives per step of the synchronised layer (after its first call)
    counts = {"all_gather_single": 0, "all_gather_into_tensor": 0, "all_reduce": 0}
    originals = {k: getattr(dist, k) for k in counts if hasattr(dist, k)}

    def counting(name):
        def f(*a, **k):
            counts[name] += 1
            return originals[name](*a, **k)

        return f

    for k in originals:
        setattr(dist, k, counting(k))
    layer = nl.nn.SyncBatchNorm(32)
    layer(x).backward(dy)  # first call: includes the one-off handshake
    first = dict(counts)
    counts.update(dict.fromkeys(counts, 0))
    layer(x).backward(dy)
    for k, f in originals.items():
        setattr(dist, k, f)
    result["collectives_first_step"] = first
    result["collectives_per_step"] = dict(counts)
    dist.destroy_process_group()
    if rank == 0:
        out.put(result)


def _per_layer(iters: int) -> dict:
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        procs = [
            ctx.Process(target=_layer_worker, args=(r, 2, store, iters, out)) for r in range(2)
        ]
        for p in procs:
            p.start()
        result = out.get(timeout=300)
        for p in procs:
            p.join(timeout=30)
    result["overhead_us"] = result["sync"] - result["local"]
    result["overhead_us_p10"] = result["sync_p10"] - result["local_p10"]
    return result


def _cpu_overhead(iters: int) -> dict:
    """normlab's own extra work per layer, communication excluded: the synchronised path
    in one process with the collectives replaced by copies (a 1-rank "group")."""
    from unittest import mock

    import normlab as nl

    def gather(out, row, group=None):
        return out.copy_(row)

    patches = [
        # both names: SyncBatchNorm asks the package, the protocol its own module
        mock.patch("normlab.distributed.is_distributed", lambda group=None: True),
        mock.patch("normlab.distributed.stats.is_distributed", lambda group=None: True),
        mock.patch.object(dist, "get_world_size", lambda group=None: 1),
        mock.patch.object(dist, "all_gather_single", gather, create=True),
        mock.patch.object(dist, "all_reduce", lambda t, op=None, group=None: t),
    ]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    result = {}
    try:
        for p in patches:
            p.start()
        for shape in ((64, 32, 8, 8), (16, 8, 4, 4)):
            x = torch.randn(*shape, requires_grad=True)
            dy = torch.randn_like(x)
            layers = {"sync": nl.nn.SyncBatchNorm(shape[1]), "local": nl.nn.BatchNorm2d(shape[1])}
            samples: dict[str, list[float]] = {"sync": [], "local": []}
            for _ in range(iters):
                for name, layer in layers.items():  # interleaved: same machine state
                    t0 = time.perf_counter()
                    layer(x).backward(dy)
                    samples[name].append(time.perf_counter() - t0)
            q = {k: 1e6 * sorted(v)[len(v) // 4] for k, v in samples.items()}  # lower quartile
            result[str(shape)] = {**q, "overhead_us": q["sync"] - q["local"]}
    finally:
        for p in patches:
            p.stop()
        torch.set_num_threads(threads)
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--skip-train", action="store_true", help="per-layer numbers only")
    args = parser.parse_args(argv)
    load_before = os.getloadavg()
    result = {
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "load_average_before": load_before,
        "end_to_end": None if args.skip_train else _end_to_end(args.steps, args.repeats),
        "per_layer_us": _per_layer(args.iters),
        "cpu_only_us": _cpu_overhead(args.iters),
        "load_average_after": os.getloadavg(),
    }
    if args.json:
        json.dump(result, sys.stdout, indent=2)
        print()
    else:
        e, p = result["end_to_end"], result["per_layer_us"]
        print(f"load average before/after: {load_before} / {result['load_average_after']}")
        if e:
            print(
                f"train step, 2 ranks, batch 128: sync {e['step_ms_sync']:.2f} ms, local "
                f"{e['step_ms_local']:.2f} ms, overhead {e['overhead_ms']:+.2f} ms "
                f"({e['overhead_pct']:+.1f}%)"
            )
        print(
            f"one BN layer fwd+bwd, (64, 32, 8, 8) per rank, median (10th percentile): sync "
            f"{p['sync']:.0f} ({p['sync_p10']:.0f}) µs, local {p['local']:.0f} "
            f"({p['local_p10']:.0f}) µs, overhead {p['overhead_us']:+.0f} "
            f"({p['overhead_us_p10']:+.0f}) µs; the two collectives alone "
            f"{p['collectives_only']:.0f} ({p['collectives_only_p10']:.0f}) µs"
        )
        for shape, c in result["cpu_only_us"].items():
            print(
                f"normlab's own extra CPU work per layer {shape} (collectives stubbed, lower "
                f"quartile): sync {c['sync']:.0f} µs, local {c['local']:.0f} µs, "
                f"overhead {c['overhead_us']:+.0f} µs"
            )
        print(f"collectives per layer, first step: {p['collectives_first_step']}")
        print(f"collectives per layer, later steps: {p['collectives_per_step']}")
    return result


if __name__ == "__main__":
    main()
