"""TorchDistComm over Ray actors (gloo): all-reduce, halo exchange, and sharded D_z."""

from __future__ import annotations

import pytest
import torch

from mbir_batch.cluster.dist_comm import TorchDistComm, free_port, node_ip
from mbir_batch.cluster.plan import plan_slabs
from mbir_batch.kernels.comm import Comm, LocalComm
from mbir_batch.kernels.tv import diff_z, diff_z_adjoint, diff_z_adjoint_comm, diff_z_comm


def _comm_actor_class(ray):
    @ray.remote(num_cpus=1)
    class CommActor:
        """One rank of a gloo group, driven step by step from the test."""

        def address(self) -> tuple[str, int]:
            return node_ip(), free_port()

        def join(self, rank: int, world_size: int, addr: str, port: int) -> None:
            self.comm = TorchDistComm(rank, world_size, "gloo", addr=addr, port=port, timeout_s=60)

        def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
            return self.comm.all_reduce_sum(t)

        def halo(self, first: torch.Tensor, last: torch.Tensor):
            return self.comm.halo_exchange(first, last)

        def diff_z(self, slab: torch.Tensor) -> torch.Tensor:
            return diff_z_comm(slab, self.comm)

        def diff_z_adjoint(self, slab: torch.Tensor) -> torch.Tensor:
            return diff_z_adjoint_comm(slab, self.comm)

        def bytes_sent(self) -> int:
            return self.comm.bytes_sent()

        def close(self) -> None:
            self.comm.close()

    return CommActor


@pytest.fixture(scope="module")
def group3(ray_session):
    """Three ranks joined in one gloo process group (shared by this module's tests)."""
    ray = ray_session
    actors = [_comm_actor_class(ray).remote() for _ in range(3)]
    addr, port = ray.get(actors[0].address.remote())
    ray.get([a.join.remote(rank, 3, addr, port) for rank, a in enumerate(actors)])
    yield ray, actors
    ray.get([a.close.remote() for a in actors])
    for actor in actors:
        ray.kill(actor)


def test_torch_dist_comm_satisfies_protocol():
    assert isinstance(LocalComm(), Comm)
    assert set(vars(TorchDistComm)) >= {"all_reduce_sum", "halo_exchange", "bytes_sent"}


def test_all_reduce_sums_over_ranks(group3):
    ray, actors = group3
    parts = [torch.tensor([1.0, 2.0], dtype=torch.float64) * (rank + 1) for rank in range(3)]
    results = ray.get([a.all_reduce.remote(t) for a, t in zip(actors, parts)])
    for result in results:
        torch.testing.assert_close(result, torch.tensor([6.0, 12.0], dtype=torch.float64), rtol=0, atol=0)
    scalar = ray.get([a.all_reduce.remote(torch.tensor(float(r), dtype=torch.float64).reshape(()))
                      for r, a in enumerate(actors)])
    assert all(float(s) == 3.0 and s.shape == () for s in scalar)


def test_halo_exchange_neighbours_and_ends(group3):
    ray, actors = group3
    slabs = [torch.full((2, 3, 4), float(10 * rank)) + torch.arange(2.0).view(2, 1, 1) for rank in range(3)]
    before = ray.get([a.bytes_sent.remote() for a in actors])
    results = ray.get([a.halo.remote(s[0], s[-1]) for a, s in zip(actors, slabs)])
    (prev0, next0), (prev1, next1), (prev2, next2) = results
    assert prev0 is None and next2 is None
    torch.testing.assert_close(next0, slabs[1][0])
    torch.testing.assert_close(prev1, slabs[0][-1])
    torch.testing.assert_close(next1, slabs[2][0])
    torch.testing.assert_close(prev2, slabs[1][-1])
    sent = [b - a for a, b in zip(before, ray.get([a.bytes_sent.remote() for a in actors]))]
    slice_bytes = 3 * 4 * 4
    assert sent == [slice_bytes, 2 * slice_bytes, slice_bytes]


def test_sharded_diff_z_equals_whole_volume(group3):
    ray, actors = group3
    generator = torch.Generator().manual_seed(0)
    volume = torch.rand(24, 5, 6, generator=generator)
    slabs = plan_slabs(24, 8, 3)
    parts = ray.get([a.diff_z.remote(volume[s.z0:s.z1]) for a, s in zip(actors, slabs)])
    torch.testing.assert_close(torch.cat(parts), diff_z(volume, None), rtol=0, atol=0)
    d = torch.rand(24, 5, 6, generator=generator)
    adjoint = ray.get([a.diff_z_adjoint.remote(d[s.z0:s.z1]) for a, s in zip(actors, slabs)])
    whole = diff_z_adjoint(d, None, volume_end=True)
    torch.testing.assert_close(torch.cat(adjoint), whole, rtol=0, atol=0)
