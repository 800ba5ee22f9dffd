"""SyncBatchNorm: k gloo ranks holding slices of a batch ≡ one process on the whole batch.

The reference is torch's own ``BatchNorm1d/2d`` on the concatenated batch in one process
(independent of normlab), and float64 statistics for the scale test. Multi-process cases
run on persistent gloo pools (tests/distributed_helpers.py), one per world size.
"""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.distributed as dist

import normlab as nl
from tests import reference as ref
from tests.distributed_helpers import GlooPool, short_timeout_group

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(120)]

LR = 0.1


@pytest.fixture(scope="module")
def pool2():
    with GlooPool(2) as pool:
        yield pool


@pytest.fixture(scope="module")
def pool3():
    with GlooPool(3) as pool:
        yield pool


# --------------------------------------------------------------------------------------
# Cases: one process-global description, drawn identically by every rank and the parent


def _partitions(k: int, n: int, seed: int) -> list[list[int]]:
    """Five per-rank splits of a batch of n: even, one empty rank, one rank of size 1,
    empty + size 1 together, and a random composition (global count always n > 1)."""
    g = torch.Generator().manual_seed(seed)
    even = [n // k + (r < n % k) for r in range(k)]
    empty = [0] + [n // (k - 1) + (r < n % (k - 1)) for r in range(k - 1)]
    one = [1] + [(n - 1) // (k - 1) + (r < (n - 1) % (k - 1)) for r in range(k - 1)]
    both = [0, 1, n - 1] if k >= 3 else [1, n - 1]
    cuts = sorted(torch.randint(0, n + 1, (k - 1,), generator=g).tolist())
    rand = [b - a for a, b in zip([0, *cuts], [*cuts, n])]
    parts = [even, empty, one, both + [0] * (k - len(both)), rand]
    perm = torch.randperm(k, generator=g).tolist()  # the odd parts land on different ranks
    return [[p[perm[r]] for r in range(k)] for p in parts]


def _step_data(cfg: dict, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(cfg["seed"] * 1000 + step)
    shape = (cfg["n"], *cfg["sample_shape"])
    x = 3.0 + 2.0 * torch.randn(shape, generator=g)
    dy = torch.randn(shape, generator=g)
    return x, dy


def _init_affine(layer: torch.nn.Module, c: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    if layer.weight is not None:
        with torch.no_grad():
            layer.weight.copy_(1 + 0.5 * torch.randn(c, generator=g))
            layer.bias.copy_(0.5 * torch.randn(c, generator=g))


def _sgd(layer: torch.nn.Module) -> None:
    with torch.no_grad():
        for p in layer.parameters():
            p -= LR * p.grad
            p.grad = None


def _steps_worker(rank: int, world: int, cfg: dict) -> list[dict]:
    layer = nl.nn.SyncBatchNorm(cfg["c"], channel_dim=cfg["channel_dim"], **cfg["kwargs"])
    _init_affine(layer, cfg["c"], cfg["seed"])
    records = []
    for step, sizes in enumerate(cfg["parts"]):
        x, dy = _step_data(cfg, step)
        lo = sum(sizes[:rank])
        x_local = x[lo : lo + sizes[rank]].clone().requires_grad_()
        y = layer(x_local)
        (y * dy[lo : lo + sizes[rank]]).sum().backward()
        grads = torch.stack([layer.weight.grad, layer.bias.grad])
        dist.all_reduce(grads)  # what DDP does (a sum here, not a mean)
        records.append(
            {
                "y": y.detach(),
                "dx": x_local.grad,
                "grads": grads,
                "running_mean": layer.running_mean.clone(),
                "running_var": layer.running_var.clone(),
                "tracked": int(layer.num_batches_tracked),
            }
        )
        layer.weight.grad, layer.bias.grad = grads[0].clone(), grads[1].clone()
        _sgd(layer)
    layer.eval()
    x, _ = _step_data(cfg, 99)
    records.append({"eval": layer(x)})
    return records


def _torch_reference(cfg: dict) -> list[dict]:
    """torch's BatchNorm in one process on the whole batch, same steps."""
    cd = cfg["channel_dim"]
    nd = 1 + len(cfg["sample_shape"])
    cls = torch.nn.BatchNorm1d if nd in (2, 3) else torch.nn.BatchNorm2d
    layer = cls(cfg["c"], **cfg["kwargs"])
    _init_affine(layer, cfg["c"], cfg["seed"])

    def to_cf(t):  # torch's layers want the channel at dim 1
        return t.movedim(cd % nd, 1)

    records = []
    for step in range(len(cfg["parts"])):
        x, dy = _step_data(cfg, step)
        x = x.clone().requires_grad_()
        y = layer(to_cf(x)).movedim(1, cd % nd)
        (y * dy).sum().backward()
        records.append(
            {
                "y": y.detach(),
                "dx": x.grad,
                "grads": torch.stack([layer.weight.grad, layer.bias.grad]),
                "running_mean": layer.running_mean.clone(),
                "running_var": layer.running_var.clone(),
                "tracked": int(layer.num_batches_tracked),
            }
        )
        _sgd(layer)
    layer.eval()
    x, _ = _step_data(cfg, 99)
    records.append({"eval": layer(to_cf(x)).movedim(1, cd % nd)})
    return records


CASES = [
    # (world, per-sample shape, channel_dim, kwargs)
    (2, (4, 3, 2), 1, {}),  # (N, C, H, W)
    (2, (5, 3), -1, {"momentum": None}),  # (N, L, C), channel last, cumulative average
    (3, (3,), 1, {}),  # (N, C)
    (3, (2, 4), 1, {"momentum": 0.3}),  # (N, C, L)
]


@pytest.mark.parametrize("world, sample_shape, channel_dim, kwargs", CASES)
def test_k_ranks_match_one_process_over_five_steps(
    request, world, sample_shape, channel_dim, kwargs
):
    pool = request.getfixturevalue(f"pool{world}")
    n = 9
    cfg = {
        "seed": 7 + world,
        "n": n,
        "sample_shape": sample_shape,
        "c": sample_shape[channel_dim] if channel_dim != 1 else sample_shape[0],
        "channel_dim": channel_dim,
        "kwargs": kwargs,
    }
    cfg["parts"] = _partitions(world, n, cfg["seed"])
    assert any(0 in p for p in cfg["parts"]) and any(1 in p for p in cfg["parts"])
    per_rank = pool.run(_steps_worker, cfg)
    expected = _torch_reference(cfg)
    for step, sizes in enumerate(cfg["parts"]):
        want = expected[step]
        for rank, records in enumerate(per_rank):
            got = records[step]
            lo = sum(sizes[:rank])
            sl = slice(lo, lo + sizes[rank])
            where = f"step {step}, rank {rank}, sizes {sizes}"
            torch.testing.assert_close(
                got["y"], want["y"][sl], msg=lambda m, where=where: f"{where}: y {m}"
            )
            torch.testing.assert_close(
                got["dx"], want["dx"][sl], msg=lambda m, where=where: f"{where}: dx {m}"
            )
            torch.testing.assert_close(
                got["grads"], want["grads"], msg=lambda m, where=where: f"{where}: {m}"
            )
            for key in ("running_mean", "running_var"):
                torch.testing.assert_close(
                    got[key], want[key], msg=lambda m, where=where: f"{where}: {m}"
                )
            assert got["tracked"] == want["tracked"]
    for records in per_rank:
        torch.testing.assert_close(records[-1]["eval"], expected[-1]["eval"])


# --------------------------------------------------------------------------------------
# Very different sizes and scales per rank: Chan's merge vs one process and float64


def _scaled_rank_data(rank: int, c: int = 4) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + rank)
    n = 10 ** (rank + 1)
    scale = 0.1 ** (rank - 1)
    return (1000.0 + scale * (torch.randn(n, c, generator=g) + 3.0 * (rank + 1))).float()


def _scales_worker(rank: int, world: int) -> dict:
    layer = nl.nn.SyncBatchNorm(4, momentum=1.0)  # running stats = this batch's statistics
    x = _scaled_rank_data(rank)
    y = layer(x)
    return {"mean": layer.running_mean, "var": layer.running_var, "y": y.detach()}


def test_ranks_of_very_different_sizes_and_scales_match_float64(pool3):
    per_rank = pool3.run(_scales_worker)
    parts = [_scaled_rank_data(r) for r in range(3)]
    whole = torch.cat(parts)  # 10 + 100 + 1000 rows, scales 10, 1, 0.1, offset 1000
    mean64, _, unbiased64, _ = ref.batch_stats(whole)
    y64 = ref.batch_norm_train(whole)
    one = nl.nn.BatchNorm1d(4, momentum=1.0)
    one(whole)
    for rank, got in enumerate(per_rank):
        torch.testing.assert_close(got["mean"].double(), mean64, rtol=1e-7, atol=0)
        torch.testing.assert_close(got["var"].double(), unbiased64, rtol=1e-5, atol=0)
        torch.testing.assert_close(got["var"], one.running_var, rtol=1e-5, atol=0)
        lo = sum(len(p) for p in parts[:rank])
        assert (got["y"].double() - y64[lo : lo + len(parts[rank])]).abs().max() < 1e-4
    # The case is hard: the textbook float32 E[x²] − E[x]² from all-reduced sums is off.
    n = len(whole)
    naive = (whole.pow(2).sum(0) / n - (whole.sum(0) / n).pow(2)) * n / (n - 1)
    assert ((naive.double() - unbiased64) / unbiased64).abs().max() > 1e-3


# --------------------------------------------------------------------------------------
# Edge cases: one sample per rank, global count 1, every rank empty


def _one_sample_worker(rank: int, world: int, sizes: list[int]) -> dict:
    layer = nl.nn.SyncBatchNorm(3)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(sum(sizes), 3, generator=g)
    lo = sum(sizes[:rank])
    x_local = x[lo : lo + sizes[rank]].clone().requires_grad_()
    try:
        y = layer(x_local)
    except ValueError as e:
        return {"error": str(e), "tracked": int(layer.num_batches_tracked)}
    y.pow(2).sum().backward()
    return {"y": y.detach(), "dx": x_local.grad, "running_var": layer.running_var}


def test_one_sample_per_rank_is_valid_while_the_global_count_exceeds_one(pool2):
    got = pool2.run(_one_sample_worker, [1, 1])
    x = torch.randn(2, 3, generator=torch.Generator().manual_seed(5)).requires_grad_()
    theirs = torch.nn.BatchNorm1d(3)
    y = theirs(x)
    y.pow(2).sum().backward()
    for rank in range(2):
        torch.testing.assert_close(got[rank]["y"], y.detach()[rank : rank + 1])
        torch.testing.assert_close(got[rank]["dx"], x.grad[rank : rank + 1])
        torch.testing.assert_close(got[rank]["running_var"], theirs.running_var)


def test_a_global_count_of_one_raises_on_every_rank(pool2):
    got = pool2.run(_one_sample_worker, [0, 1])
    for rank in range(2):
        assert "more than 1 value per channel" in got[rank]["error"]
        assert got[rank]["tracked"] == 0


def _all_empty_worker(rank: int, world: int) -> dict:
    layer = nl.nn.SyncBatchNorm(3, nonfinite="raise")
    _init_affine(layer, 3, 1)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.empty(0, 3, 2, requires_grad=True)
    y = layer(x)
    y.sum().backward()  # every rank still joins the backward all-reduce
    return {
        "shape": tuple(y.shape),
        "grads": [layer.weight.grad, layer.bias.grad, x.grad],
        "unchanged": all(torch.equal(v, layer.state_dict()[k]) for k, v in before.items()),
    }


def test_every_rank_empty_no_nan_no_hang_statistics_unchanged(pool3):
    for got in pool3.run(_all_empty_worker, timeout=30):
        assert got["shape"] == (0, 3, 2)
        dw, db, dx = got["grads"]
        assert torch.equal(dw, torch.zeros(3)) and torch.equal(db, torch.zeros(3))
        assert dx.shape == (0, 3, 2)
        assert got["unchanged"]


# --------------------------------------------------------------------------------------
# When there is nothing to synchronise there is no collective; how many there are otherwise


_COLLECTIVES = (
    "all_reduce",
    "all_gather_single",
    "all_gather_into_tensor",
    "all_gather",
    "broadcast",
    "barrier",
)


def _count_collectives(fn):
    """Run fn() with torch.distributed's collectives wrapped; return (result, counts)."""
    counts = dict.fromkeys(_COLLECTIVES, 0)
    originals = {name: getattr(dist, name) for name in _COLLECTIVES}

    def wrap(name):
        def counted(*args, **kwargs):
            counts[name] += 1
            return originals[name](*args, **kwargs)

        return counted

    try:
        for name in _COLLECTIVES:
            setattr(dist, name, wrap(name))
        return fn(), counts
    finally:
        for name, f in originals.items():
            setattr(dist, name, f)


def _collective_count_worker(rank: int, world: int, layers: int, steps: int) -> list[dict]:
    torch.manual_seed(0)
    blocks = []
    for _ in range(layers):
        blocks += [torch.nn.Conv2d(2, 2, 3, padding=1), nl.nn.SyncBatchNorm(2), torch.nn.ReLU()]
    model = torch.nn.Sequential(*blocks)
    per_step = []
    for _ in range(steps):
        x = torch.randn(rank + 2, 2, 4, 4)

        def train_step(x=x):
            model(x).square().mean().backward()

        _, fwd_bwd = _count_collectives(train_step)
        per_step.append(fwd_bwd)
    model.eval()
    _, eval_counts = _count_collectives(lambda: model(torch.randn(3, 2, 4, 4)))
    per_step.append(eval_counts)
    return per_step


def test_one_collective_per_layer_per_direction(pool2):
    layers, steps = 3, 3
    for per_step in pool2.run(_collective_count_worker, layers, steps):
        first, *rest, evaluation = per_step
        # first step: the fixed-size handshake, then the statistics exchange
        assert first["all_gather_single"] == 2 * layers
        assert first["all_reduce"] == layers
        for counts in rest:
            assert counts["all_gather_single"] == layers  # forward
            assert counts["all_reduce"] == layers  # backward
        assert sum(evaluation.values()) == 0
        others = ("broadcast", "barrier", "all_gather", "all_gather_into_tensor")
        assert all(c[name] == 0 for c in per_step for name in others)


def _single_rank_group_worker(rank: int, world: int) -> dict:
    solo = dist.new_group([0])  # every rank creates it; only rank 0 is a member
    if rank != 0:
        return {}
    x = torch.randn(6, 3, 2)
    ours = nl.nn.SyncBatchNorm(3, process_group=solo)
    theirs = torch.nn.BatchNorm1d(3)
    y, counts = _count_collectives(lambda: ours(x))
    return {"counts": counts, "close": torch.allclose(y, theirs(x), atol=1e-6)}


def test_a_group_of_one_rank_is_local_batch_norm(pool2):
    got = pool2.run(_single_rank_group_worker)[0]
    assert got["close"]
    assert sum(got["counts"].values()) == 0


def test_without_a_process_group_it_is_batch_norm_and_never_communicates(monkeypatch):
    assert not dist.is_initialized()

    def forbidden(*args, **kwargs):
        raise AssertionError("no collective expected without a process group")

    for name in _COLLECTIVES:
        monkeypatch.setattr(dist, name, forbidden)
    x = torch.randn(8, 4, 3, 3, requires_grad=True)
    ours, theirs = nl.nn.SyncBatchNorm(4), torch.nn.BatchNorm2d(4)
    y = ours(x)
    torch.testing.assert_close(y, theirs(x))
    y.sum().backward()
    torch.testing.assert_close(ours.running_var, theirs.running_var)


# --------------------------------------------------------------------------------------
# Faults: an error on every rank, within bounded time


def _mismatch_worker(rank: int, world: int, kind: str, after_first: bool) -> str:
    c = 4 if (kind == "channels" and rank == 1) else 3
    dtype = torch.float64 if (kind == "dtype" and rank == 1) else torch.float32
    layer = nl.nn.SyncBatchNorm(c, dtype=dtype)
    if after_first:  # a good step first: the handshake is behind us
        good = nl.nn.SyncBatchNorm(3)
        good(torch.randn(4, 3))
        layer = good if kind in ("dtype", "input") else layer
    x = torch.randn(4, c, dtype=dtype)
    if kind == "input" and rank == 1:
        x = torch.randn(4, 5)  # rejected locally: 5 channels for a 3-channel layer
    layer(x)
    return "no error"


@pytest.mark.parametrize(
    "kind, after_first",
    [("channels", False), ("dtype", False), ("dtype", True), ("input", False), ("input", True)],
)
def test_ranks_that_disagree_fail_on_every_rank(pool2, kind, after_first):
    outcomes = pool2.run_raw(_mismatch_worker, kind, after_first, timeout=30)
    assert not any(o.ok for o in outcomes), outcomes
    for o in outcomes:
        if kind == "input" and o.rank == 1:  # the rank with the bad input: its own error
            assert o.error_type == "ValueError" and "5 channels" in o.message
            continue
        assert o.error_type == "SyncMismatchError", o
        expected = {"channels": "number of channels", "dtype": "dtype", "input": "rank(s) [1]"}
        assert expected[kind] in o.message
        if kind == "channels":
            assert "rank 0: 3, rank 1: 4" in o.message
        if kind == "dtype":
            assert "rank 0: float32, rank 1: float64" in o.message
    # the group is still healthy afterwards
    assert pool2.run(_one_sample_worker, [1, 1])[0]["y"].shape == (1, 3)


def _backward_mismatch_worker(rank: int, world: int) -> str:
    from normlab.distributed import all_reduce_checked

    sums = torch.ones(2, 2)
    if rank == 0:
        all_reduce_checked(sums, where="test")
    else:
        dist.all_reduce(torch.zeros(5, dtype=torch.float64))  # some other collective
    return "no error"


def test_backward_all_reduce_detects_a_foreign_collective(pool2):
    outcomes = pool2.run_raw(_backward_mismatch_worker, timeout=30)
    assert outcomes[0].error_type == "SyncMismatchError"
    assert "matched with a different collective" in outcomes[0].message


def _absent_rank_worker(rank: int, world: int, seconds: float, leaves: bool) -> str:
    import time

    group = short_timeout_group(seconds)
    try:
        if rank != 1:
            nl.nn.SyncBatchNorm(3, process_group=group)(torch.randn(4, 3))
        elif not leaves:
            time.sleep(3 * seconds)  # alive, but never arrives at the layer
        return "returned"
    finally:
        dist.destroy_process_group(group)  # rank 1 leaving: its connections close


@pytest.mark.parametrize("leaves", [False, True])
def test_a_rank_that_never_arrives_is_an_error_after_the_group_timeout(pool3, leaves):
    outcomes = pool3.run_raw(_absent_rank_worker, 1.0, leaves, timeout=30)
    assert outcomes[1].ok
    for o in (outcomes[0], outcomes[2]):
        assert not o.ok and o.error_type == "RuntimeError", o
        if leaves:  # the closed connection is noticed at once
            assert "Connection reset" in o.message or "Connection closed" in o.message, o
        else:  # gloo's timeout ends the wait
            assert "Timed out waiting 1000ms" in o.message, o.message


# --------------------------------------------------------------------------------------
# Drop-in: signature, state_dict, conversion (single process)


def test_signature_and_state_dict_match_torch():
    ours_sig = inspect.signature(nl.nn.SyncBatchNorm.__init__).parameters
    torch_sig = inspect.signature(torch.nn.SyncBatchNorm.__init__).parameters
    for name, p in torch_sig.items():
        assert name in ours_sig, name
        assert ours_sig[name].default == p.default and ours_sig[name].kind == p.kind, name
    assert list(ours_sig)[: len(torch_sig)] == list(torch_sig)
    ours = nl.nn.SyncBatchNorm(5, 1e-3, 0.2, True, True, None, bias=False)
    theirs = torch.nn.SyncBatchNorm(5, 1e-3, 0.2, True, True, None, bias=False)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    with torch.no_grad():
        theirs.running_mean.uniform_()
        theirs.weight.uniform_()
    ours.load_state_dict(theirs.state_dict())
    theirs.load_state_dict(ours.state_dict())
    torch.testing.assert_close(ours.running_mean, theirs.running_mean)
    # not a torch.nn.SyncBatchNorm subclass: DDP rejects those on CPU
    assert not isinstance(ours, torch.nn.SyncBatchNorm)
    assert isinstance(ours, torch.nn.modules.batchnorm._BatchNorm)


def test_convert_shares_state_and_reverts():
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 3, 3),
        torch.nn.BatchNorm2d(3),
        torch.nn.Sequential(nl.nn.BatchNorm(3, channel_dim=1, activation="relu", momentum=None)),
        torch.nn.SyncBatchNorm(3, bias=False),
    )
    bn = model[1]
    converted = nl.nn.SyncBatchNorm.convert_sync_batchnorm(model, process_group="pg")
    assert converted is model
    assert isinstance(model[1], nl.nn.SyncBatchNorm) and model[1].process_group == "pg"
    assert model[1].weight is bn.weight and model[1].running_var is bn.running_var
    assert model[2][0].activation == "relu" and model[2][0].momentum is None
    assert model[3].bias is None and model[3].weight is not None
    x = torch.randn(4, 1, 5, 5)
    model.eval()
    y = model(x)
    back = nl.nn.SyncBatchNorm.revert_sync_batchnorm(model)
    assert not any(isinstance(m, nl.nn.SyncBatchNorm) for m in back.modules())
    assert type(back[1]) is nl.nn.BatchNorm and back[1].weight is bn.weight
    torch.testing.assert_close(back(x), y)
    single = nl.nn.SyncBatchNorm.convert_sync_batchnorm(torch.nn.BatchNorm1d(2))
    assert isinstance(single, nl.nn.SyncBatchNorm)
