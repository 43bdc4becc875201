"""Tests for kernels/tv.py: D_z with halos (sharded == whole), adjoints, soft threshold."""

from __future__ import annotations

import pytest
import torch
from mbir_batch.kernels.comm import LocalComm
from mbir_batch.kernels.tv import (
    DiffZ,
    Gradient3D,
    diff_xy,
    diff_xy_adjoint,
    diff_z,
    diff_z_adjoint,
    diff_z_adjoint_comm,
    diff_z_comm,
    diff_z_normal,
    diff_z_normal_comm,
    soft_threshold,
)

DEPTH, SHAPE = 12, (5, 6)


@pytest.fixture
def volume(gen: torch.Generator) -> torch.Tensor:
    return torch.randn(DEPTH, *SHAPE, generator=gen)


def test_diff_z_on_the_whole_volume_is_neumann(volume: torch.Tensor) -> None:
    d = diff_z(volume, None)
    assert d.shape == volume.shape and d.dtype == volume.dtype
    assert torch.allclose(d[:-1], volume[1:] - volume[:-1])
    assert torch.count_nonzero(d[-1]) == 0
    assert torch.count_nonzero(diff_z(torch.ones(4, 2, 2), None)) == 0


def test_diff_z_adjoint_is_exact_at_the_volume_end(contract, volume, gen) -> None:
    d = torch.randn(volume.shape, generator=gen)
    contract.check_adjoint(lambda x: diff_z(x, None), lambda y: diff_z_adjoint(y, None, volume_end=True), volume, d)
    # the literal formula is the adjoint on the range of D_z (volume's last difference 0)
    d[-1] = 0
    contract.check_adjoint(lambda x: diff_z(x, None), lambda y: diff_z_adjoint(y, None), volume, d)
    assert torch.equal(diff_z_adjoint(d, None), diff_z_adjoint(d, None, volume_end=True))


def test_diff_z_adjoint_formula(gen) -> None:
    d = torch.randn(3, 2, 2, generator=gen)
    prev = torch.randn(2, 2, generator=gen)
    g = diff_z_adjoint(d, prev)
    assert torch.allclose(g[0], prev - d[0])
    assert torch.allclose(g[1:], d[:-1] - d[1:])


@pytest.mark.parametrize("pieces", [2, 3])
def test_diff_z_and_adjoint_split_with_halos_equal_whole(volume, gen, bounds, pieces) -> None:
    d = torch.randn(volume.shape, generator=gen)
    d[-1] = 0
    spans = bounds(DEPTH, pieces)
    forward, adjoint = [], []
    for i, (z0, z1) in enumerate(spans):
        next_first = volume[z1] if i < pieces - 1 else None
        prev_last = d[z0 - 1] if i > 0 else None
        forward.append(diff_z(volume[z0:z1], next_first))
        adjoint.append(diff_z_adjoint(d[z0:z1], prev_last))
    assert torch.equal(torch.cat(forward), diff_z(volume, None))
    assert torch.allclose(torch.cat(adjoint), diff_z_adjoint(d, None))


@pytest.mark.parametrize("pieces", [1, 2, 3])
def test_comm_variants_on_simulated_slabs_equal_whole(volume, gen, sharded, bounds, pieces) -> None:
    d = torch.randn(volume.shape, generator=gen)  # last entry non-zero: the last rank must ignore it
    spans = bounds(DEPTH, pieces)

    def kernel(comm):
        z0, z1 = spans[comm.rank]
        return (
            diff_z_comm(volume[z0:z1], comm),
            diff_z_adjoint_comm(d[z0:z1], comm),
            diff_z_normal_comm(volume[z0:z1], comm),
            comm.bytes_sent(),
        )

    results = sharded(kernel, pieces)
    assert torch.equal(torch.cat([r[0] for r in results]), diff_z(volume, None))
    assert torch.allclose(torch.cat([r[1] for r in results]), diff_z_adjoint(d, None, volume_end=True))
    normal = diff_z_adjoint(diff_z(volume, None), None)
    assert torch.allclose(torch.cat([r[2] for r in results]), normal, atol=1e-6)
    # per exchange a rank sends at most one (H, W) slice each way, whatever the slab depth
    slice_bytes = SHAPE[0] * SHAPE[1] * 4
    assert all(r[3] <= 3 * 2 * slice_bytes for r in results)


def test_local_comm_variants_equal_plain_calls(volume) -> None:
    comm = LocalComm()
    assert torch.equal(diff_z_comm(volume, comm), diff_z(volume, None))
    assert torch.equal(diff_z_adjoint_comm(volume, comm), diff_z_adjoint(volume, None, volume_end=True))
    assert torch.allclose(diff_z_normal_comm(volume, comm), diff_z_normal(volume, None, None))


def test_diff_z_rejects_an_empty_slab() -> None:
    with pytest.raises(ValueError, match="Z >= 1"):
        diff_z(torch.zeros(0, 2, 2), None)


def test_diff_xy_is_neumann_and_its_adjoint_is_exact(contract, volume, gen) -> None:
    dx, dy = diff_xy(volume)
    assert dx.shape == dy.shape == volume.shape
    assert torch.allclose(dx[..., :-1], volume[..., 1:] - volume[..., :-1])
    assert torch.allclose(dy[..., :-1, :], volume[..., 1:, :] - volume[..., :-1, :])
    assert torch.count_nonzero(dx[..., -1]) == 0 and torch.count_nonzero(dy[..., -1, :]) == 0
    gx = torch.randn(volume.shape, generator=gen)
    gy = torch.randn(volume.shape, generator=gen)
    contract.check_adjoint(
        lambda x: torch.stack(diff_xy(x)), lambda y: diff_xy_adjoint(y[0], y[1]), volume, torch.stack([gx, gy])
    )


def test_soft_threshold() -> None:
    v = torch.tensor([-3.0, -0.5, 0.0, 0.2, 2.0])
    assert torch.allclose(soft_threshold(v, 1.0), torch.tensor([-2.0, 0.0, 0.0, 0.0, 1.0]))
    assert torch.equal(soft_threshold(v, 0.0), v)
    with pytest.raises(ValueError, match="thresh"):
        soft_threshold(v, -1.0)


def test_diff_z_object_is_the_comm_functions(volume) -> None:
    comm = LocalComm()
    op = DiffZ(comm)
    assert torch.equal(op(volume), diff_z_comm(volume, comm)) and torch.equal(op.A(volume), op(volume))
    assert torch.equal(op.T(volume), diff_z_adjoint_comm(volume, comm)) and torch.equal(op.AT(volume), op.T(volume))
    assert torch.equal(op.normal(volume), diff_z_normal_comm(volume, comm))  # the fused normal, not T(A x)
    assert torch.allclose(op.normal(volume), op.T(op(volume)), atol=1e-6)


def test_gradient_3d_stacks_weighted_in_slice_differences_and_d_z(volume, gen) -> None:
    op = Gradient3D(0.5, LocalComm())
    d = op(volume)
    dx, dy = diff_xy(volume)
    assert d.shape == (3, *volume.shape)
    assert torch.equal(d[0], 0.5 * dx) and torch.equal(d[1], 0.5 * dy) and torch.equal(d[2], diff_z(volume, None))
    g = torch.randn(d.shape, generator=gen)
    assert torch.equal(op.T(g), 0.5 * diff_xy_adjoint(g[0], g[1]) + diff_z_adjoint(g[2], None, volume_end=True))
    assert torch.equal(op.normal(volume), op.T(op(volume)))
    assert torch.equal(Gradient3D.zeros(volume), torch.zeros(3, *volume.shape))
