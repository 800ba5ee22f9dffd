"""normlab.distributed.stats: Chan's merge and the single-process no-op paths.

Multi-rank behaviour is tested in tests/nn/test_syncbatchnorm.py over gloo.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from normlab import distributed as D
from normlab.distributed import processes, stats
from tests import reference as ref


@st.composite
def partitions(draw):
    """A batch split into 1..5 parts, some empty or of one row, at mixed scales."""
    sizes = draw(st.lists(st.sampled_from([0, 1, 2, 3, 7, 40]), min_size=1, max_size=5))
    if sum(sizes) < 2:
        sizes = [*sizes, 2]
    scales = [draw(st.sampled_from([1e-2, 1.0, 1e2])) for _ in sizes]
    offset = draw(st.sampled_from([0.0, 1e3, 1e6]))
    seed = draw(st.integers(0, 2**16))
    return sizes, scales, offset, seed


@given(partitions())
def test_merge_equals_the_statistics_of_the_concatenation(case):
    sizes, scales, offset, seed = case
    g = torch.Generator().manual_seed(seed)
    parts = [
        offset + s * torch.randn(n, 3, generator=g, dtype=torch.float64)
        for n, s in zip(sizes, scales)
    ]
    counts = torch.tensor(sizes)
    means = torch.stack([p.mean(0) if len(p) else torch.full((3,), float("nan")) for p in parts])
    m2s = torch.stack([((p - p.mean(0)) ** 2).sum(0) if len(p) else torch.zeros(3) for p in parts])
    n, mean, m2 = D.merge_moments(counts, means, m2s)
    whole_mean, whole_var, _, whole_n = ref.batch_stats(torch.cat(parts))
    assert int(n) == whole_n
    torch.testing.assert_close(mean, whole_mean, rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(m2 / n, whole_var, rtol=1e-9, atol=1e-12)


def test_merge_of_nothing_is_zero_not_nan():
    n, mean, m2 = D.merge_moments(
        torch.zeros(3), torch.full((3, 2), float("nan")), torch.full((3, 2), float("nan"))
    )
    assert int(n) == 0
    assert torch.equal(mean, torch.zeros(2)) and torch.equal(m2, torch.zeros(2))


def test_single_process_helpers_are_no_ops():
    assert not D.is_distributed()
    mean, m2 = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0])
    n, gmean, gm2 = D.all_gather_moments(5, mean, m2)
    assert n == 5 and torch.equal(gmean, mean.double()) and torch.equal(gm2, m2.double())
    sums = torch.randn(2, 3)
    assert D.all_reduce_checked(sums) is sums
    assert D.all_reduce_sum(sums) is sums


def test_the_package_reexports_both_rooms():
    # `from normlab.distributed import X` keeps working for every public name of either part
    for module in (stats, processes):
        public = [n for n in vars(module) if not n.startswith("_")]
        defined = [
            n for n in public if getattr(getattr(module, n), "__module__", None) == module.__name__
        ]
        assert defined and all(getattr(D, n) is getattr(module, n) for n in defined)
    assert set(D.__all__) <= set(vars(D))


def test_header_rows_name_the_offending_ranks_in_order_of_the_checks():
    rows = torch.tensor([[7.0, 0.0, 3.0], [7.0, 1.0, 4.0], [8.0, 0.0, 3.0]], dtype=torch.float64)
    heads = D.HeaderRows(rows, "where")
    assert heads.rows == rows.tolist()
    with pytest.raises(D.SyncMismatchError, match=r"^where: rank\(s\) \[2\] is foreign$"):
        heads.expect(0, 7.0, "is foreign")
    with pytest.raises(D.SyncMismatchError, match=r"^where: rank\(s\) \[1\] failed$"):
        heads.expect(1, 0.0, "failed")
    with pytest.raises(D.SyncMismatchError, match=r"^C \(rank 0: c3; rank 1: c4; rank 2: c3\)$"):
        heads.agree(
            [int(h[2]) for h in heads.rows], lambda p: f"C ({p})", show=lambda c: f"c{c}", sep="; "
        )
    same = D.HeaderRows(rows[:, 1:2].clone().zero_(), "where")
    same.expect(0, 0.0, "never raised")  # every rank agrees: no error
    same.agree([h[0] for h in same.rows], lambda p: "never raised")
