"""Communication per step does not grow with the volume depth (DESIGN.md, "Distribution").

Two gloo ranks (Ray actors, real TorchDistComm) run one data step of each kind on slabs of a
16- and a 32-slice volume: ``admm_tv_z_step`` (the DDS / DiffusionMBIR data step) and
``admm_tv_3d_step`` (the ADMM-TV baseline). The bytes a rank sends in one step must be the same
for both depths, and equal the count from the algorithm: O(H*W) per CG iteration.
bench/scaling.py measures the same through SlabSolver at 32-128 slices.
"""

from __future__ import annotations

import pytest
import torch
from mbir_batch.cluster.dist_comm import TorchDistComm, free_port, node_ip
from mbir_batch.cluster.plan import plan_slabs

SIZE = 8
CG_ITERS = 3


def _expected(method: str, neighbours: int) -> int:
    """Halo slices (float32 H x W, one per neighbour) and all-reduced float64 scalars of one step."""
    halo = SIZE * SIZE * 4 * neighbours
    if method == "tv-z":  # D_z^T rhs, first M x, one M p per CG iteration, D_z x, D_z^T dual; ||b||, r.r, 2/iter, (primal, dual)
        return (CG_ITERS + 4) * halo + (2 * CG_ITERS + 2) * 8 + 16
    # 3D TV: D^T rhs; D and D^T in every M application (first + per iteration); D x; D^T once (dual residual)
    return (2 * CG_ITERS + 5) * halo + (2 * CG_ITERS + 4) * 8


def _actor_class(ray):
    @ray.remote(num_cpus=1)
    class BytesActor:
        def address(self) -> tuple[str, int]:
            return node_ip(), free_port()

        def step_bytes(self, method: str, rank: int, world: int, addr: str, port: int, depth: int) -> int:
            from mbir_batch.kernels.admm import AdmmState, admm_tv_step, admm_tv_z_step
            from mbir_batch.kernels.tv import Gradient3D

            torch.set_num_threads(1)
            slab = plan_slabs(depth, 8, world)[rank]
            x = torch.rand(slab.depth, SIZE, SIZE, generator=torch.Generator().manual_seed(rank))
            comm = TorchDistComm(rank, world, "gloo", addr=addr, port=port, timeout_s=60)
            try:
                def identity(v):
                    return v

                kwargs = {"A": identity, "AT": identity, "aty": x, "rho": 1.0, "lam": 0.1, "cg_iters": CG_ITERS, "comm": comm}
                if method == "tv-z":
                    x1, state, _ = admm_tv_z_step(x, AdmmState.zeros_like(x), **kwargs)
                    before = comm.bytes_sent()
                    admm_tv_z_step(x1, state, **kwargs)
                else:
                    tv = Gradient3D(1.0, comm)
                    x1, state, _ = admm_tv_step(x, AdmmState.zeros_for(tv, x), tv=tv, **kwargs)
                    before = comm.bytes_sent()
                    admm_tv_step(x1, state, tv=tv, **kwargs)
                return comm.bytes_sent() - before
            finally:
                comm.close()

    return BytesActor


@pytest.fixture(scope="module")
def pair(ray_session):
    ray = ray_session
    actors = [_actor_class(ray).remote() for _ in range(2)]
    yield ray, actors
    for actor in actors:
        ray.kill(actor)


@pytest.mark.parametrize("method", ["tv-z", "tv-3d"])
def test_bytes_per_step_do_not_grow_with_depth(pair, method):
    ray, actors = pair
    sent = {}
    for depth in (16, 32):
        addr, port = ray.get(actors[0].address.remote())
        sent[depth] = ray.get([a.step_bytes.remote(method, rank, 2, addr, port, depth)
                               for rank, a in enumerate(actors)], timeout=120)
    assert sent[16] == sent[32], sent
    assert sent[16] == [_expected(method, 1)] * 2, sent
