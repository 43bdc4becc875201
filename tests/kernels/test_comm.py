"""Tests for kernels/comm.py: LocalComm, the Comm protocol and the global dot product."""

from __future__ import annotations

import pytest
import torch
from mbir_batch.kernels.comm import Comm, LocalComm, make_dot


def test_local_comm_is_the_identity_with_no_neighbours() -> None:
    comm = LocalComm()
    assert isinstance(comm, Comm)
    assert (comm.rank, comm.world_size) == (0, 1)
    t = torch.arange(4.0)
    assert torch.equal(comm.all_reduce_sum(t), t)
    assert comm.halo_exchange(t[:1], t[-1:]) == (None, None)
    assert comm.bytes_sent() == 0


def test_dot_is_a_0dim_float64_scalar(gen: torch.Generator) -> None:
    a = torch.randn(3, 5, 7, generator=gen)
    b = torch.randn(3, 5, 7, generator=gen)
    value = make_dot(LocalComm())(a, b)
    assert value.dim() == 0 and value.dtype == torch.float64
    assert float(value) == pytest.approx(float(torch.sum(a.double() * b.double())), rel=1e-6)


def test_dot_accumulates_in_float64() -> None:
    # float32 accumulation loses the 1 between +1e8 and -1e8 (float32 spacing at 1e8 is 8)
    a = torch.tensor([1e4, 1.0, -1e4])
    b = torch.tensor([1e4, 1.0, 1e4])
    assert float(torch.sum(a * b)) == 0.0
    assert float(make_dot(LocalComm())(a, b)) == 1.0


def test_dot_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="shapes differ"):
        make_dot(LocalComm())(torch.zeros(3), torch.zeros(4))


def test_dot_over_simulated_slabs_equals_whole(gen, sharded, bounds) -> None:
    a = torch.randn(10, 4, 4, generator=gen)
    b = torch.randn(10, 4, 4, generator=gen)
    whole = float(make_dot(LocalComm())(a, b))
    spans = bounds(10, 3)
    values = sharded(lambda comm: float(make_dot(comm)(a[slice(*spans[comm.rank])], b[slice(*spans[comm.rank])])), 3)
    assert values == pytest.approx([whole] * 3, rel=1e-12)


def test_simulated_comm_satisfies_the_protocol(sharded) -> None:
    results = sharded(lambda comm: isinstance(comm, Comm), 2)
    assert results == [True, True]
