"""Tests for kernels/admm.py: one ADMM-TV iteration on a slab (DiffusionMBIR Sec. 3), for D_z and 3D TV."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from mbir_batch.kernels.admm import AdmmInfo, AdmmState, admm_tv_step, admm_tv_z_step
from mbir_batch.kernels.comm import LocalComm
from mbir_batch.kernels.radon import ParallelBeam
from mbir_batch.kernels.tv import DiffZ, Gradient3D

N, DEPTH = 24, 16


def _blocky_volume() -> torch.Tensor:
    """Piecewise constant along z: three blocks of identical slices."""
    yy, xx = np.mgrid[:N, :N] - (N - 1) / 2
    volume = np.zeros((DEPTH, N, N), np.float32)
    volume[:6] = 0.8 * (xx**2 + yy**2 < 8**2)
    volume[6:12] = 0.6 * ((abs(xx) < 7) & (abs(yy) < 5))
    volume[12:] = 0.4 * ((xx - 2) ** 2 + yy**2 < 6**2) + 0.3 * ((xx + 6) ** 2 + (yy + 5) ** 2 < 3**2)
    return torch.from_numpy(volume)


@pytest.fixture
def problem(radon_cache):
    """8-view sparse-view CT of the blocky volume with 5 % noise; starts from the FBP."""
    op = ParallelBeam(shape=(N, N), angles_deg=np.linspace(0, 180, 8, endpoint=False), det_count=34,
                      cache_dir=radon_cache)
    truth = _blocky_volume()
    sinogram = op.A(truth)
    sinogram = sinogram + 0.05 * sinogram.abs().max() * torch.randn(sinogram.shape, generator=torch.Generator().manual_seed(0))
    return op, truth, sinogram, op.fbp(sinogram).clamp(0, 1)


def _run(op, sinogram, x, iters, *, lam, rho, cg_iters, comm=None):
    comm = comm or LocalComm()
    state = AdmmState.zeros_like(x)
    aty = op.AT(sinogram)
    infos = []
    for _ in range(iters):
        x, state, info = admm_tv_z_step(x, state, A=op.A, AT=op.AT, aty=aty, rho=rho, lam=lam,
                                        cg_iters=cg_iters, comm=comm)
        infos.append(info)
    return x, state, infos


def _rel_err(x: torch.Tensor, truth: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(x - truth) / torch.linalg.vector_norm(truth))


def test_zeros_like() -> None:
    x = torch.rand(3, 4, 5)
    state = AdmmState.zeros_like(x)
    assert state.z.shape == state.w.shape == x.shape and state.z.dtype == x.dtype
    assert torch.count_nonzero(state.z) == 0 and torch.count_nonzero(state.w) == 0


def test_lam_zero_reduces_the_data_residual(problem) -> None:
    op, _, sinogram, start = problem
    x, _, infos = _run(op, sinogram, start, 1, lam=0.0, rho=1.0, cg_iters=30)
    before = torch.linalg.vector_norm(op.A(start) - sinogram)
    after = torch.linalg.vector_norm(op.A(x) - sinogram)
    assert float(after) < 0.5 * float(before)
    assert infos[0].cg_residual < 0.05


def test_tv_z_improves_on_the_start_and_on_plain_least_squares(problem) -> None:
    op, truth, sinogram, start = problem
    x_tv, state, infos = _run(op, sinogram, start, 6, lam=5.0, rho=5.0, cg_iters=5)
    x_ls, _, _ = _run(op, sinogram, start, 6, lam=0.0, rho=5.0, cg_iters=5)
    assert _rel_err(x_tv, truth) < 0.6 * _rel_err(start, truth)
    assert _rel_err(x_tv, truth) < _rel_err(x_ls, truth)
    assert all(isinstance(info, AdmmInfo) and info.primal_residual >= 0 and info.dual_residual >= 0 for info in infos)
    # Neumann: the volume's last difference is 0, so z and w stay 0 there
    assert torch.count_nonzero(state.z[-1]) == 0 and torch.count_nonzero(state.w[-1]) == 0


def test_inputs_are_not_modified(problem) -> None:
    op, _, sinogram, start = problem
    state = AdmmState(z=torch.ones_like(start), w=torch.ones_like(start))
    x_before, z_before = start.clone(), state.z.clone()
    admm_tv_z_step(start, state, A=op.A, AT=op.AT, aty=op.AT(sinogram), rho=1.0, lam=0.1, cg_iters=2, comm=LocalComm())
    assert torch.equal(start, x_before) and torch.equal(state.z, z_before)


@pytest.mark.parametrize("pieces", [2, 3, 5])
def test_sharded_run_equals_whole_volume(problem, sharded, bounds, pieces) -> None:
    op, _, sinogram, start = problem
    whole, whole_state, whole_infos = _run(op, sinogram, start, 3, lam=2.0, rho=2.0, cg_iters=4)
    spans = bounds(DEPTH, pieces)

    def slab(comm):
        z0, z1 = spans[comm.rank]
        return _run(op, sinogram[z0:z1], start[z0:z1], 3, lam=2.0, rho=2.0, cg_iters=4, comm=comm)

    results = sharded(slab, pieces)
    # Bit-identical: everything but the global sums is slice-local, and the sums' split-dependent
    # float64 rounding does not reach the float32 CG steps (see comm.make_dot). The residuals are
    # those float64 sums themselves, so they agree to float64 rounding only.
    assert torch.equal(torch.cat([r[0] for r in results]), whole)
    assert torch.equal(torch.cat([r[1].z for r in results]), whole_state.z)
    assert torch.equal(torch.cat([r[1].w for r in results]), whole_state.w)
    for rank_result in results:
        for info, expected in zip(rank_result[2], whole_infos):
            assert info.primal_residual == pytest.approx(expected.primal_residual, rel=1e-12)
            assert info.dual_residual == pytest.approx(expected.dual_residual, rel=1e-12)
            assert info.cg_residual == pytest.approx(expected.cg_residual, rel=1e-12)


def test_rejects_bad_arguments() -> None:
    x = torch.zeros(2, 3, 3)
    state = AdmmState.zeros_like(x)
    kwargs = {"A": lambda v: v, "AT": lambda v: v, "aty": x, "cg_iters": 1, "comm": LocalComm()}
    with pytest.raises(ValueError, match="rho"):
        admm_tv_z_step(x, state, rho=0.0, lam=0.1, **kwargs)
    with pytest.raises(ValueError, match="lam"):
        admm_tv_z_step(x, state, rho=1.0, lam=-0.1, **kwargs)
    with pytest.raises(ValueError, match="share a shape"):
        admm_tv_z_step(x, AdmmState.zeros_like(torch.zeros(3, 3, 3)), rho=1.0, lam=0.1, **kwargs)


def _run_3d(op, sinogram, x, iters, *, lam_xy, comm=None):
    comm = comm or LocalComm()
    tv = Gradient3D(lam_xy, comm)
    state = AdmmState.zeros_for(tv, x)
    aty = op.AT(sinogram)
    for _ in range(iters):
        x, state, info = admm_tv_step(x, state, A=op.A, AT=op.AT, aty=aty, tv=tv, rho=2.0, lam=2.0, cg_iters=4,
                                      comm=comm)
    return x, state, info


def test_3d_tv_improves_on_the_start(problem) -> None:
    op, truth, sinogram, start = problem
    x, state, info = _run_3d(op, sinogram, start, 6, lam_xy=1.0)
    assert state.z.shape == state.w.shape == (3, *start.shape)
    assert _rel_err(x, truth) < 0.6 * _rel_err(start, truth)
    assert info.primal_residual >= 0 and info.dual_residual >= 0


def test_3d_tv_without_in_slice_weight_is_the_z_step(problem) -> None:
    """lam_xy = 0 leaves only D_z in D: x and the z-parts of (z, w) are those of the D_z step."""
    op, _, sinogram, start = problem
    x3, state3, _ = _run_3d(op, sinogram, start, 2, lam_xy=0.0)
    xz, statez, _ = _run(op, sinogram, start, 2, lam=2.0, rho=2.0, cg_iters=4)
    assert torch.allclose(x3, xz, rtol=1e-6, atol=1e-6)
    assert torch.allclose(state3.z[2], statez.z, atol=1e-6) and torch.allclose(state3.w[2], statez.w, atol=1e-6)
    assert torch.count_nonzero(state3.z[:2]) == 0 and torch.count_nonzero(state3.w[:2]) == 0


@pytest.mark.parametrize("pieces", [2, 3])
def test_3d_tv_sharded_run_equals_whole_volume(problem, sharded, bounds, pieces) -> None:
    op, _, sinogram, start = problem
    whole, whole_state, _ = _run_3d(op, sinogram, start, 3, lam_xy=0.5)
    spans = bounds(DEPTH, pieces)

    def slab(comm):
        z0, z1 = spans[comm.rank]
        return _run_3d(op, sinogram[z0:z1], start[z0:z1], 3, lam_xy=0.5, comm=comm)

    results = sharded(slab, pieces)
    assert torch.equal(torch.cat([r[0] for r in results]), whole)
    assert torch.equal(torch.cat([r[1].z for r in results], dim=1), whole_state.z)
    assert torch.equal(torch.cat([r[1].w for r in results], dim=1), whole_state.w)


def test_the_state_must_lie_in_the_range_of_the_tv_operator() -> None:
    x = torch.zeros(2, 3, 3)
    kwargs = {"A": lambda v: v, "AT": lambda v: v, "aty": x, "rho": 1.0, "lam": 0.1, "cg_iters": 1, "comm": LocalComm()}
    with pytest.raises(ValueError, match=r"range shape \(3, 2, 3, 3\)"):
        admm_tv_step(x, AdmmState.zeros_like(x), tv=Gradient3D(1.0, LocalComm()), **kwargs)
    x_new, _, _ = admm_tv_step(x, AdmmState.zeros_for(DiffZ(LocalComm()), x), tv=DiffZ(LocalComm()), **kwargs)
    assert x_new.shape == x.shape
