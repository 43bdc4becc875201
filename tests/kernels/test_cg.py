"""Tests for kernels/cg.py: conjugate gradient with an injected dot."""

from __future__ import annotations

import pytest
import torch
from mbir_batch.kernels.cg import CGInfo, conjugate_gradient
from mbir_batch.kernels.comm import LocalComm, make_dot


def _spd_system(gen: torch.Generator, n: int = 24) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    eigenvalues = torch.linspace(1.0, 20.0, n, dtype=torch.float64)
    matrix = (q * eigenvalues) @ q.T
    solution = torch.randn(n, generator=gen, dtype=torch.float64)
    return matrix.float(), (matrix @ solution).float(), solution.float()


def test_cg_solves_an_spd_system_to_tolerance(gen: torch.Generator) -> None:
    matrix, rhs, solution = _spd_system(gen)
    x, info = conjugate_gradient(lambda v: matrix @ v, rhs, torch.zeros_like(rhs),
                                 dot=make_dot(LocalComm()), iters=200, tol=1e-5)
    assert isinstance(info, CGInfo)
    assert 0 < info.iters < 200
    assert info.residual <= 1e-5
    true_residual = torch.linalg.vector_norm(rhs - matrix @ x) / torch.linalg.vector_norm(rhs)
    assert float(true_residual) < 1e-4
    assert torch.allclose(x, solution, atol=1e-3)


def test_cg_warm_start_at_the_solution_returns_immediately(gen: torch.Generator) -> None:
    matrix, rhs, solution = _spd_system(gen)
    calls = []

    def apply(v: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return matrix @ v

    x, info = conjugate_gradient(apply, rhs, solution, dot=make_dot(LocalComm()), iters=50, tol=1e-4)
    assert info.iters == 0 and len(calls) == 1
    assert torch.equal(x, solution)


def test_cg_with_zero_tol_runs_exactly_iters_and_does_not_modify_x0(gen: torch.Generator) -> None:
    matrix, rhs, _ = _spd_system(gen)
    x0 = torch.zeros_like(rhs)
    _, info = conjugate_gradient(lambda v: matrix @ v, rhs, x0, dot=make_dot(LocalComm()), iters=7)
    assert info.iters == 7
    assert torch.count_nonzero(x0) == 0
    assert 0 < info.residual < 1


def test_cg_residual_decreases_with_iterations(gen: torch.Generator) -> None:
    matrix, rhs, _ = _spd_system(gen)
    residuals = [
        conjugate_gradient(lambda v: matrix @ v, rhs, torch.zeros_like(rhs), dot=make_dot(LocalComm()), iters=k)[1].residual
        for k in (0, 3, 10)
    ]
    assert residuals[0] == pytest.approx(1.0)
    assert residuals[0] > residuals[1] > residuals[2]


def test_cg_zero_rhs_and_converged_start_give_no_nan() -> None:
    matrix = torch.eye(4)
    x, info = conjugate_gradient(lambda v: matrix @ v, torch.zeros(4), torch.zeros(4), dot=make_dot(LocalComm()), iters=5)
    assert torch.equal(x, torch.zeros(4)) and info.residual == 0.0


def test_cg_rejects_bad_arguments() -> None:
    dot = make_dot(LocalComm())
    with pytest.raises(ValueError, match="iters"):
        conjugate_gradient(lambda v: v, torch.ones(3), torch.zeros(3), dot=dot, iters=-1)
    with pytest.raises(ValueError, match="tol"):
        conjugate_gradient(lambda v: v, torch.ones(3), torch.zeros(3), dot=dot, iters=1, tol=-1.0)
    with pytest.raises(ValueError, match="differ"):
        conjugate_gradient(lambda v: v, torch.ones(3), torch.zeros(4), dot=dot, iters=1)


def test_cg_on_the_singular_mri_normal_operator_stays_finite_past_convergence() -> None:
    """Re F^H P F is singular: once CG has converged, rounding noise in its null space must not
    be divided by a ~0 curvature (this blew slice2d's CS-MRI volumes up to inf/NaN)."""
    from mbir_batch.kernels.mri import CartesianMRI, gaussian_1d_mask

    gen = torch.Generator().manual_seed(3)
    op = CartesianMRI(gaussian_1d_mask((32, 32), accel=4.0, seed=1))
    truth = torch.rand(8, 32, 32, generator=gen)
    y = op.A(truth)
    start = 10.0 * torch.randn(8, 32, 32, generator=gen)
    x, info = conjugate_gradient(lambda v: op.AT(op.A(v)), op.AT(y), start, dot=make_dot(LocalComm()), iters=40)
    assert torch.isfinite(x).all()
    assert float((op.A(x) - y).abs().max()) < 1e-3 * float(y.abs().max())
    assert info.residual < 1e-4


def test_cg_propagates_nan_instead_of_hiding_it() -> None:
    rhs = torch.ones(4, 4)
    rhs[1, 2] = float("nan")
    x, _ = conjugate_gradient(lambda v: 2.0 * v, rhs, torch.zeros(4, 4), dot=make_dot(LocalComm()), iters=3)
    assert torch.isnan(x).any()
