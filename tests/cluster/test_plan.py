"""The shard plan: contiguous, chunk-aligned, balanced, non-empty slabs."""

from __future__ import annotations

from itertools import pairwise

import pytest

from mbir_batch.cluster.plan import ShardPlanError, max_workers, plan_slabs


@pytest.mark.parametrize("depth,chunk,workers", [(24, 8, 1), (24, 8, 2), (24, 8, 3), (64, 8, 3), (30, 8, 4),
                                                 (7, 8, 1), (100, 1, 7)])
def test_slabs_cover_volume_aligned_and_balanced(depth, chunk, workers):
    slabs = plan_slabs(depth, chunk, workers)
    assert [s.rank for s in slabs] == list(range(workers))
    assert slabs[0].z0 == 0 and slabs[-1].z1 == depth
    assert all(a.z1 == b.z0 for a, b in pairwise(slabs))
    assert all(s.depth > 0 and s.z0 % chunk == 0 for s in slabs)
    assert all(s.z1 % chunk == 0 for s in slabs[:-1])
    chunks = [-(-s.depth // chunk) for s in slabs]
    assert max(chunks) - min(chunks) <= 1


def test_more_workers_than_chunks_is_an_error_naming_the_limit():
    assert max_workers(24, 8) == 3
    with pytest.raises(ShardPlanError, match=r"ct\.zarr: 4 workers .* at most 3"):
        plan_slabs(24, 8, 4, name="ct.zarr")
    with pytest.raises(ShardPlanError):
        plan_slabs(24, 8, 0)
