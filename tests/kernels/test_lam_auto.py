"""Tests of ``lam: auto``'s kernels: the masked operator, the hold-out masks, the parabola refinement,
the choice itself on problems whose answer is known, and its independence of the slab split."""

from __future__ import annotations

import math

import pytest
import torch

from mbir_batch.kernels.admm import AdmmState, admm_tv_step
from mbir_batch.kernels.comm import LocalComm
from mbir_batch.kernels.lam_auto import (LamAutoSettings, MaskedOperator, choose_lam, cross_validate, gather_slices,
                                         holdout_mask, parabola_vertex)
from mbir_batch.kernels.mri import CartesianMRI, uniform_1d_mask
from mbir_batch.kernels.radon import ParallelBeam
from mbir_batch.kernels.tv import DiffZ


class DenseOperator:
    """A random dense slice-wise operator ``(H, W) -> (V, B)``, independent of the project's CT and MRI code."""

    def __init__(self, domain=(6, 6), range_=(6, 8), seed=0):
        gen = torch.Generator().manual_seed(seed)
        self.domain_shape, self.range_shape = domain, range_
        self.matrix = torch.randn(range_[0] * range_[1], domain[0] * domain[1], generator=gen) / 6.0

    # One matrix-vector product per slice: a slice's result must not depend on how many slices the
    # slab has (a batched matmul may block the rows differently for another slab depth).
    def A(self, x):
        return torch.stack([(self.matrix @ s.reshape(-1)).reshape(self.range_shape) for s in x])

    def AT(self, r):
        return torch.stack([(self.matrix.T @ s.reshape(-1)).reshape(self.domain_shape) for s in r])


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: tiny tensors run faster on one thread


# -- the masked operator ------------------------------------------------------------------------

def test_masked_ct_operator_is_adjoint_and_masks(contract, gen, radon_cache):
    op = ParallelBeam(shape=(16, 16), angles_deg=[0.0, 45.0, 90.0, 135.0], det_count=23, cache_dir=radon_cache)
    held = holdout_mask(0.3, 5, torch.arange(4), op.range_shape)
    fit = MaskedOperator(op, ~held)
    x = torch.randn(4, 16, 16, generator=gen)
    contract.check_operator(fit, x, torch.float32, gen)
    assert torch.all(fit.A(x)[held] == 0)
    assert torch.equal(fit.A(x)[~held], op.A(x)[~held])


def test_masked_mri_operator_is_adjoint(contract, gen):
    op = CartesianMRI(uniform_1d_mask((16, 16), accel=4.0, seed=1))
    held = holdout_mask(0.2, 5, torch.arange(3), op.range_shape, measured=op.mask)
    contract.check_operator(MaskedOperator(op, ~held), torch.randn(3, 16, 16, generator=gen), torch.complex64, gen)


def test_masked_operator_refuses_a_keep_of_the_wrong_shape():
    with pytest.raises(ValueError, match="operator's range"):
        MaskedOperator(DenseOperator(), torch.ones(2, 8, 6, dtype=torch.bool))


# -- the hold-out masks -------------------------------------------------------------------------

@pytest.mark.parametrize("per_slice", [False, True])
def test_the_mask_of_a_global_slice_does_not_depend_on_the_split(per_slice):
    whole = holdout_mask(0.25, 3, torch.arange(10), (8, 12), per_slice=per_slice)
    for cuts in (((0, 5), (5, 10)), ((0, 3), (3, 4), (4, 10))):
        parts = torch.cat([holdout_mask(0.25, 3, torch.arange(a, b), (8, 12), per_slice=per_slice) for a, b in cuts])
        assert torch.equal(whole, parts)
    assert torch.equal(whole[0], whole[1]) != per_slice  # shared: one mask; per slice: each its own
    assert not torch.equal(whole, holdout_mask(0.25, 4, torch.arange(10), (8, 12), per_slice=per_slice))


def test_the_mask_holds_out_the_fraction_of_the_measured_entries_only():
    assert int(holdout_mask(0.1, 0, [0], (8, 91)).sum()) == round(0.1 * 8 * 91)
    measured = torch.zeros(2, 8, 10, dtype=torch.bool)
    measured[0, :, :5] = True
    measured[1, :, 3:] = True
    held = holdout_mask(0.25, 0, [0, 1], (8, 10), measured=measured)
    assert not bool((held & ~measured).any())
    assert held[0].sum() == round(0.25 * 40) and held[1].sum() == round(0.25 * 56)


# -- the refinement and the choice --------------------------------------------------------------

def test_parabola_vertex_of_a_hand_computed_quadratic():
    # through (0, 3), (1, 1), (2, 2): e = 1.5 t^2 - 3.5 t + 3, vertex at t = 3.5 / 3
    assert math.isclose(parabola_vertex([0.0, 1.0, 2.0], [3.0, 1.0, 2.0]), 7.0 / 6.0, rel_tol=1e-12)
    logs = [math.log(v) for v in (0.01, 0.03, 0.1, 0.3)]
    errors = [(t - math.log(0.05)) ** 2 for t in logs]
    assert math.isclose(parabola_vertex(logs, errors), math.log(0.05), rel_tol=1e-9)
    assert parabola_vertex(logs, [4, 3, 2, 1]) == logs[-1]  # minimum at the end: no extrapolation
    assert parabola_vertex([0.0, 1.0, 2.0], [3.0, 1.0, 1.0]) == 1.5  # a tie at t = 1, 2: midway


def test_choose_lam_takes_the_smallest_error_and_skips_non_finite_ones():
    grid = (0.01, 0.1, 1.0)
    assert choose_lam(grid, [2.0, 1.0, 3.0], refine=False) == 0.1
    assert choose_lam(grid, [math.nan, 2.0, 1.0]) == 1.0
    with pytest.raises(ValueError, match="non-finite"):
        choose_lam(grid, [math.nan, math.inf, math.nan])


def admm_reconstruct(comm, *, iters=20):
    """A stand-in for the short DDS runs: ``iters`` ADMM-TV-z iterations from zero (no prior)."""

    def reconstruct(operator, measurements, lam):
        x = operator.AT(measurements) * 0
        state = AdmmState.zeros_like(x)
        aty = operator.AT(measurements)
        for _ in range(iters):
            x, state, _ = admm_tv_step(x, state, A=operator.A, AT=operator.AT, aty=aty, tv=DiffZ(comm), rho=1.0,
                                       lam=lam, cg_iters=6, comm=comm)
        return x

    return reconstruct


def z_problem(constant_in_z: bool, noise: float, depth=12, seed=1):
    gen = torch.Generator().manual_seed(seed)
    op = DenseOperator()
    truth = torch.rand(1 if constant_in_z else depth, 6, 6, generator=gen).expand(depth, 6, 6).contiguous()
    y = op.A(truth)
    return op, truth, y + noise * float(y.std()) * torch.randn(y.shape, generator=gen)


GRID = LamAutoSettings(candidates=(0.001, 0.01, 0.1, 1.0), fraction=0.2)


@pytest.mark.parametrize("constant_in_z", [True, False])
def test_cross_validation_picks_the_candidate_the_truth_picks(constant_in_z):
    """A z-constant volume under heavy noise wants a large lam, independent slices under little noise
    a small one; the held-out error must rank the grid's best as the error against the truth does."""
    op, truth, y = z_problem(constant_in_z, noise=0.5 if constant_in_z else 0.01)
    reconstruct = admm_reconstruct(LocalComm())
    report = cross_validate(reconstruct, op, y, z0=0, depth=12, seed=3, settings=GRID, comm=LocalComm())
    truth_errors = [float(torch.sum((reconstruct(op, y, lam) - truth) ** 2)) for lam in GRID.candidates]
    best = min(range(4), key=truth_errors.__getitem__)
    assert min(range(4), key=report.errors.__getitem__) == best
    assert best == (3 if constant_in_z else 0)  # the two cases want opposite ends of the grid
    assert report.lam == GRID.candidates[best]  # a minimum at the end of the grid is not extrapolated


# -- split invariance ---------------------------------------------------------------------------

def test_gather_slices_is_exact_for_any_split(sharded, bounds):
    values = torch.randn(10, 4, dtype=torch.float64) * torch.logspace(-8, 8, 10, dtype=torch.float64)[:, None]
    whole = gather_slices(values, 0, 10, LocalComm())
    assert torch.equal(whole, values)
    for pieces in (2, 3):
        cuts = bounds(10, pieces)
        tables = sharded(lambda comm: gather_slices(values[slice(*cuts[comm.rank])], cuts[comm.rank][0], 10, comm),
                         pieces)
        assert all(torch.equal(table, values) for table in tables)


def test_cross_validation_chooses_the_same_for_any_split(sharded, bounds):
    op, _, y = z_problem(True, noise=0.5)
    settings = LamAutoSettings(candidates=(0.01, 0.1, 1.0), fraction=0.2, per_slice=True)

    def slab(comm, z0=0, z1=12):
        return cross_validate(admm_reconstruct(comm, iters=10), op, y[z0:z1], z0=z0, depth=12, seed=3,
                              settings=settings, comm=comm)

    whole = slab(LocalComm())
    for pieces in (2, 3):
        cuts = bounds(12, pieces)
        reports = sharded(lambda comm: slab(comm, *cuts[comm.rank]), pieces)
        assert all((r.lam, r.errors) == (whole.lam, whole.errors) for r in reports)
