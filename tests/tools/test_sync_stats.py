"""sync_running_stats: every rank's running statistics made equal, on 1-3 gloo ranks.

References are independent of the implementation: the three modes recomputed in float64
in this process from every rank's buffers as they were before the call (no
``merge_moments``), and torch's own BatchNorm2d in one process on the union of the
ranks' batches for the skewed-shard case.
"""

from __future__ import annotations

import contextlib
from collections import Counter

import pytest
import torch
import torch.distributed as dist
from torch import nn

import normlab as nl
from normlab.distributed import SyncMismatchError
from tests.distributed_helpers import short_timeout_group

distributed = [pytest.mark.distributed, pytest.mark.timeout(120)]

# --------------------------------------------------------------------------------------
# A model with every kind of layer that has (or lacks) running statistics


def _zoo() -> nn.ModuleDict:
    torch.manual_seed(0)
    return nn.ModuleDict(
        {
            "torch_bn2d": nn.BatchNorm2d(3),
            "nl_bn2d": nl.nn.BatchNorm2d(4),
            "nl_any_rank": nl.nn.BatchNorm(2, channel_dim=-1),
            "sync": nl.nn.SyncBatchNorm(3),
            "renorm": nl.nn.BatchRenorm1d(2),
            "ghost": nl.nn.GhostBatchNorm2d(3, virtual_batch_size=4),
            "cumulative": nn.BatchNorm1d(2, momentum=None),  # weighted by num_batches_tracked
            "f64": nn.BatchNorm1d(2).double(),
            "bf16": nn.BatchNorm1d(3).to(torch.bfloat16),
            "torch_in": nn.InstanceNorm2d(3, track_running_stats=True),  # no between term
            "nl_in": nl.nn.InstanceNorm1d(2, track_running_stats=True),
            "agreed": nn.BatchNorm1d(5).double(),  # equal on every rank: left bit for bit
            "untracked": nn.BatchNorm2d(2, track_running_stats=False),  # no buffers
            "frozen": nl.nn.FrozenBatchNorm2d(2),  # fixed statistics: not synchronised
            "plain": nn.Linear(2, 2),
        }
    )


SYNCED = [
    "torch_bn2d",
    "nl_bn2d",
    "nl_any_rank",
    "sync",
    "renorm",
    "ghost",
    "cumulative",
    "f64",
    "bf16",
    "torch_in",
    "nl_in",
    "agreed",
]
INSTANCE = {"torch_in", "nl_in"}


def _fill(model: nn.Module, rank: int, *, nan_in: str | None = None) -> None:
    """Per-rank buffers, different on every rank (means offset by up to 6) except in the
    layer named 'agreed'."""
    with torch.no_grad():
        for i, (name, m) in enumerate(model.items()):
            if getattr(m, "running_mean", None) is None:
                continue
            seed = 100 * i + (0 if name == "agreed" else rank)
            g = torch.Generator().manual_seed(seed)
            c = m.running_mean.numel()
            m.running_mean.copy_(torch.randn(c, generator=g) * 2 + 3 * seed % 7)
            m.running_var.copy_(torch.rand(c, generator=g) * 2 + 0.25)
            if getattr(m, "num_batches_tracked", None) is not None:
                m.num_batches_tracked.fill_(int(torch.randint(1, 50, (), generator=g)))
            if name == "agreed":  # (x + x + x) / 3 != x in float64 for 0.1 and 0.7
                m.running_mean.copy_(torch.tensor([0.1, 0.7, 1.1, 2.3, 0.3], dtype=torch.float64))
                m.running_var.copy_(torch.tensor([0.7, 0.1, 1.1, 2.3, 0.3], dtype=torch.float64))
            if name == nan_in:
                m.running_var[0] = float("nan")


def _buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        k: v.clone()
        for k, v in model.named_buffers()
        if not isinstance(v, nn.parameter.UninitializedBuffer)
    }


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """Bit for bit the same buffers (a NaN equals a NaN in the same place)."""
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and torch.equal(a[k].nan_to_num(7.0), b[k].nan_to_num(7.0))
        for k in a
    )


@contextlib.contextmanager
def _counting_collectives():
    """Count this process's calls of torch.distributed collectives (outermost calls only:
    a deprecated alias forwarding to its new name counts once)."""
    names = [
        "all_gather_single",
        "all_gather_into_tensor",
        "all_gather",
        "all_reduce",
        "broadcast",
        "reduce_scatter",
        "reduce_scatter_tensor",
        "gather",
        "scatter",
        "barrier",
        "all_to_all",
        "all_to_all_single",
    ]
    counts: Counter = Counter()
    depth = [0]
    originals = {n: getattr(dist, n) for n in names if hasattr(dist, n)}

    def wrap(name, fn):
        def counted(*args, **kwargs):
            if depth[0] == 0:
                counts[name] += 1
            depth[0] += 1
            try:
                return fn(*args, **kwargs)
            finally:
                depth[0] -= 1

        return counted

    for name, fn in originals.items():
        setattr(dist, name, wrap(name, fn))
    try:
        yield counts
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)


# --------------------------------------------------------------------------------------
# Workers (module level: they are pickled to the gloo pool)


def _sync_worker(rank, world, mode, kwargs, nan_in=None):
    model = _zoo()
    _fill(model, rank, nan_in=nan_in if rank == 1 else None)
    before = _buffers(model)
    counts = kwargs.get("counts")
    if isinstance(counts, list):
        kwargs = {**kwargs, "counts": counts[rank]}
    with _counting_collectives() as calls:
        report = nl.sync_running_stats(model, mode, **kwargs)
    return before, _buffers(model), report, dict(calls)


def _reference(befores: list[dict], mode: str, counts=None, src=0) -> dict[str, torch.Tensor]:
    """The expected buffers of every synchronised layer, in float64 (then the layer's
    dtype), straight from the definitions."""
    out = {}
    k = len(befores)
    for name in SYNCED:
        m = torch.stack([b[f"{name}.running_mean"].double() for b in befores])  # (k, C)
        v = torch.stack([b[f"{name}.running_var"].double() for b in befores])
        nbt_key = f"{name}.num_batches_tracked"
        nbt = torch.tensor([float(b[nbt_key]) for b in befores]) if nbt_key in befores[0] else None
        if mode == "broadcast":
            mean, var, n = m[src], v[src], None if nbt is None else nbt[src]
        else:
            if mode == "mean":
                w = torch.ones(k, dtype=torch.float64)
            elif counts is not None:
                w = torch.tensor(counts, dtype=torch.float64)
            elif name == "cumulative":
                w = nbt.double()
            else:
                w = torch.ones(k, dtype=torch.float64)
            use = w > 0
            w, m, v = w[use], m[use], v[use]
            mean = (w[:, None] * m).sum(0) / w.sum()
            within = (w[:, None] * v).sum(0) / w.sum()
            between = (w[:, None] * (m - mean) ** 2).sum(0) / w.sum()
            plain = mode == "mean" or name in INSTANCE
            var = within if plain else within + between
            n = None if nbt is None else nbt.max()
        dtype = befores[0][f"{name}.running_mean"].dtype
        out[f"{name}.running_mean"] = mean.to(dtype)
        out[f"{name}.running_var"] = var.to(dtype)
        if n is not None:
            out[nbt_key] = torch.tensor(int(n))
    return out


def _check_synced(results, expected):
    afters = [r[1] for r in results]
    for key, value in expected.items():
        for rank, after in enumerate(afters):
            assert after[key].dtype == value.dtype, key
            # the same bits on every rank: every rank merged the same gathered rows
            assert torch.equal(after[key], afters[0][key]), (key, rank)
        if key.startswith("agreed."):
            assert torch.equal(afters[0][key], results[0][0][key]), key  # untouched
        torch.testing.assert_close(afters[0][key], value, msg=key)
    for before, after, _, _ in results:
        for key in before:  # FrozenBN's buffers are its own business
            if key.startswith("frozen."):
                assert torch.equal(after[key], before[key]), key


@pytest.fixture
def pool2(gloo_pools):
    return gloo_pools.get(2)


@pytest.fixture
def pool3(gloo_pools):
    return gloo_pools.get(3)


# --------------------------------------------------------------------------------------
# The modes against float64 references


@pytest.mark.parametrize(
    ("mode", "kwargs"),
    [
        ("pooled", {}),
        ("pooled", {"counts": [3, 0, 5]}),  # rank 1 contributes nothing (and holds a NaN)
        ("mean", {}),
        ("broadcast", {"src": 2}),
    ],
    ids=["pooled", "pooled-counts", "mean", "broadcast"],
)
@pytest.mark.distributed
@pytest.mark.timeout(120)
def test_modes_match_float64_reference_on_three_ranks(pool3, mode, kwargs):
    nan_in = "nl_bn2d" if "counts" in kwargs else None
    results = pool3.run(_sync_worker, mode, kwargs, nan_in)
    befores = [r[0] for r in results]
    expected = _reference(befores, mode, kwargs.get("counts"), kwargs.get("src", 0))
    _check_synced(results, expected)
    for _, _, report, _ in results:
        assert report == nl.tools.SyncReport(
            mode,
            3,
            tuple(SYNCED),
            sum(2 * befores[0][f"{n}.running_mean"].numel() for n in SYNCED)
            + sum(f"{n}.num_batches_tracked" in befores[0] for n in SYNCED),
        )


def test_reference_differs_between_modes_on_this_data():
    """The per-mode expectations above are not all the same numbers (a test that
    could not tell the modes apart would prove nothing)."""
    befores = []
    for rank in range(3):
        model = _zoo()
        _fill(model, rank)
        befores.append(_buffers(model))
    pooled, mean = _reference(befores, "pooled"), _reference(befores, "mean")
    broadcast = _reference(befores, "broadcast", src=2)
    key = "torch_bn2d.running_var"
    assert (pooled[key] - mean[key]).abs().min() > 0.1  # the between-rank term
    assert not torch.allclose(pooled[key], broadcast[key])
    assert torch.equal(pooled["torch_in.running_var"], mean["torch_in.running_var"])


# --------------------------------------------------------------------------------------
# Skewed shards: 'pooled' is one process on all the data, 'mean' is not

C, HW = 3, 4


def _shard(rank: int, batch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(40 + rank)
    return torch.randn(batch, C, HW, HW, generator=g) + 5.0 * rank  # N(0, 1) and N(5, 1)


def _one_batch_stats(x: torch.Tensor) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(C, momentum=1.0).train()  # momentum 1: the batch's own statistics
    with torch.no_grad():
        bn(x)
    return bn


def _skewed_worker(rank, world, batches):
    batch = batches[rank]
    out = {}
    for mode, counts in (("pooled", batch), ("mean", None)):
        bn = _one_batch_stats(_shard(rank, batch))
        mine = (bn.running_mean.clone(), bn.running_var.clone())
        nl.sync_running_stats(bn, mode, counts=counts)
        out[mode] = (mine, (bn.running_mean.clone(), bn.running_var.clone()))
    return out


@pytest.mark.parametrize("batches", [(8, 8), (6, 10)], ids=["even", "uneven"])
@pytest.mark.distributed
@pytest.mark.timeout(120)
def test_pooled_is_one_process_on_all_data_and_mean_misses_the_between_term(pool2, batches):
    results = pool2.run(_skewed_worker, batches)
    union = _one_batch_stats(torch.cat([_shard(r, b) for r, b in enumerate(batches)]))
    ref_mean, ref_var = union.running_mean.double(), union.running_var.double()
    n = [b * HW * HW for b in batches]  # values per channel behind each rank's statistics
    total = sum(n)
    v = [r["pooled"][0][1].double() for r in results]  # each rank's own unbiased variance
    m = [r["pooled"][0][0].double() for r in results]

    pooled_mean, pooled_var = (t.double() for t in results[0]["pooled"][1])
    torch.testing.assert_close(pooled_mean, ref_mean, rtol=1e-6, atol=1e-6)
    # Bessel applied per rank, not once to the union (module docstring): exactly
    # var_union + (Σ v_k − var_union) / N: from −1/N to +1/(min n_k − 1) relative.
    torch.testing.assert_close(pooled_var, ref_var + (sum(v) - ref_var) / total, rtol=1e-6, atol=0)
    relative = (pooled_var - ref_var) / ref_var
    assert (relative >= -1 / total).all() and (relative < 1 / (min(n) - 1)).all()

    mean_mean, mean_var = (t.double() for t in results[0]["mean"][1])
    torch.testing.assert_close(mean_var, (v[0] + v[1]) / 2, rtol=1e-6, atol=0)
    torch.testing.assert_close(mean_mean, (m[0] + m[1]) / 2, rtol=1e-6, atol=1e-6)
    # the rank means are 5 apart: the union's variance is ~1 + 2.5² = 7.25, 'mean' says ~1
    assert (mean_var < 0.2 * ref_var).all()
    if batches[0] == batches[1]:  # equal weights: 'mean' is 'pooled' minus the between term
        between = ((m[0] - m[1]) / 2) ** 2
        torch.testing.assert_close(pooled_var - mean_var, between, rtol=1e-5, atol=0)
        assert (between > 5).all()


# --------------------------------------------------------------------------------------
# Collectives: two per call (header + payload), whatever the number of layers


def _count_worker(rank, world, mode, what):
    models = {
        "zoo": _zoo,
        "one": lambda: nn.Sequential(nn.BatchNorm1d(4)),
        "none": lambda: nn.Sequential(nn.Linear(2, 2), nl.nn.FrozenBatchNorm1d(2)),
    }
    model = models[what]()
    if what == "zoo":
        _fill(model, rank)
    with _counting_collectives() as calls:
        report = nl.sync_running_stats(model, mode)
    return dict(calls), len(report.layers)


@pytest.mark.distributed
@pytest.mark.timeout(120)
def test_one_payload_collective_per_model_not_per_layer(pool2):
    gather = "all_gather_single" if hasattr(dist, "all_gather_single") else None
    gather = gather or "all_gather_into_tensor"
    for mode in ("pooled", "mean"):
        for what, layers in (("zoo", len(SYNCED)), ("one", 1)):
            for calls, n in pool2.run(_count_worker, mode, what):
                assert n == layers
                assert calls == {gather: 2}, (mode, what)  # header, payload
    for what in ("zoo", "one"):
        for calls, _ in pool2.run(_count_worker, "broadcast", what):
            assert calls == {gather: 1, "broadcast": 1}, what
    for calls, n in pool2.run(_count_worker, "pooled", "none"):  # no BN statistics:
        assert n == 0 and calls == {gather: 1}  # only the header (every rank agrees)


# --------------------------------------------------------------------------------------
# No-ops: no process group, or a group of one


def test_without_process_group_nothing_happens():
    assert not dist.is_initialized()
    model = _zoo()
    _fill(model, 0)
    before = _buffers(model)
    for mode in ("pooled", "mean", "broadcast"):
        report = nl.sync_running_stats(model, mode)
        assert report == nl.tools.SyncReport(mode, 1, (), 0)
    assert _same(_buffers(model), before)


def _single_rank_worker(rank, world):
    model = _zoo()
    _fill(model, rank)
    before = _buffers(model)
    with _counting_collectives() as calls:
        reports = [nl.sync_running_stats(model, mode) for mode in ("pooled", "broadcast")]
    return reports, dict(calls), _same(_buffers(model), before)


@pytest.mark.distributed
@pytest.mark.timeout(120)
def test_world_size_one_is_a_noop(gloo_pools):
    [(reports, calls, unchanged)] = gloo_pools.get(1).run(_single_rank_worker)
    assert [r.world_size for r in reports] == [1, 1]
    assert all(r.layers == () for r in reports)
    assert calls == {} and unchanged


def test_bad_arguments_raise_even_on_one_process():
    model = nn.BatchNorm1d(2)
    with pytest.raises(ValueError, match="mode must be 'pooled'"):
        nl.sync_running_stats(model, "avg")
    with pytest.raises(ValueError, match="counts= weighs the ranks in mode='pooled' only"):
        nl.sync_running_stats(model, "mean", counts=4)
    for bad in (-1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="counts must be finite and ≥ 0"):
            nl.sync_running_stats(model, counts=bad)
    for bad in (True, "3", [1, 2]):
        with pytest.raises(TypeError, match="counts must be a number"):
            nl.sync_running_stats(model, counts=bad)
    for bad in (-1, 1.0, True):
        with pytest.raises(ValueError, match="src must be a rank"):
            nl.sync_running_stats(model, "broadcast", src=bad)
    with pytest.raises(TypeError, match=r"model must be an nn\.Module"):
        nl.sync_running_stats({"bn": model})
    assert nl.sync_running_stats(model, counts=torch.tensor(3)).world_size == 1


# --------------------------------------------------------------------------------------
# Faults: an error on every rank (never a hang), and nothing changed


def _fault_worker(rank, world, case):
    group = short_timeout_group(10.0)  # a missed detection would wait this long, then fail
    model = _zoo()
    mode, kwargs = "pooled", {"group": group}
    if case == "extra layer" and rank == 1:
        model["extra"] = nn.BatchNorm1d(2)
    elif case == "other dtype" and rank == 1:
        model["f64"].float()
    elif case == "no bn" and rank == 1:
        model = nn.Sequential(nn.Linear(2, 2))
    elif case == "modes" and rank == 1:
        mode = "mean"
    elif case == "src":
        mode, kwargs = "broadcast", {**kwargs, "src": rank}
    elif case == "bad counts" and rank == 1:
        kwargs["counts"] = -1
    elif case == "bad src":
        mode, kwargs = "broadcast", {**kwargs, "src": 7}
    if isinstance(model, nn.ModuleDict):
        _fill(model, rank, nan_in="ghost" if case == "nan" and rank == 1 else None)
    if case == "lazy":
        model["lazy"] = nn.LazyBatchNorm1d()
    before = _buffers(model)
    try:
        nl.sync_running_stats(model, mode, **kwargs)
        error = None
    except Exception as e:  # the outcome itself is what the test checks
        error = (type(e).__name__, str(e))
    return error, _same(_buffers(model), before)


MISMATCH = "SyncMismatchError: sync_running_stats: "
FAULTS = {
    # case: (the start of the error on rank 0, on rank 1)
    "extra layer": (MISMATCH + "the ranks' models differ (rank 0: 12 layers",) * 2,
    "other dtype": (
        MISMATCH + "the ranks' models differ (rank 0: 12 layers, 80 elements; "
        "rank 1: 12 layers, 80 elements) (same sizes",
    )
    * 2,
    "no bn": (
        MISMATCH + "the ranks' models differ (rank 0: 12 layers, 80 elements; rank 1: 0 layers",
    )
    * 2,
    "modes": (MISMATCH + "the ranks passed different arguments (rank 0: 'pooled', rank 1: 'mean')",)
    * 2,
    "src": (
        MISMATCH + "the ranks passed different arguments (rank 0: 'broadcast' src=0, "
        "rank 1: 'broadcast' src=1)",
    )
    * 2,
    "bad counts": (
        MISMATCH + "rank(s) [1] rejected the call",
        "ValueError: sync_running_stats: counts must be finite",
    ),
    "bad src": ("ValueError: sync_running_stats: src=7 is not a rank",) * 2,
    "lazy": ("ValueError: sync_running_stats: layer 'lazy' (LazyBatchNorm1d) has not been",) * 2,
    "nan": (
        "ValueError: sync_running_stats: non-finite running statistics or a negative "
        "running_var in 'ghost' on rank(s) [1]; nothing was changed",
    )
    * 2,
}


@pytest.mark.parametrize("case", list(FAULTS))
@pytest.mark.distributed
@pytest.mark.timeout(120)
def test_faults_raise_on_every_rank_and_change_nothing(pool2, case):
    outcomes = pool2.run(_fault_worker, case)
    for rank, (error, unchanged) in enumerate(outcomes):
        assert error is not None, (case, rank)
        assert f"{error[0]}: {error[1]}".startswith(FAULTS[case][rank]), (case, rank, error)
        assert unchanged, (case, rank)
    assert issubclass(SyncMismatchError, RuntimeError)
