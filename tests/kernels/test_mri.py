"""Tests for kernels/mri.py: the Cartesian operator and the sampling masks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from mbir_batch.kernels.mri import (
    CartesianMRI,
    gaussian_1d_mask,
    random_2d_mask,
    uniform_1d_mask,
)

MASKS = {"uniform_1d": uniform_1d_mask, "gaussian_1d": gaussian_1d_mask, "random_2d": random_2d_mask}


@pytest.mark.parametrize("kind", MASKS)
def test_operator_contract_for_each_mask(contract, gen, kind) -> None:
    op = CartesianMRI(MASKS[kind]((16, 20), accel=4, seed=3))
    x = torch.rand(3, 16, 20, generator=gen)
    contract.check_operator(op, x, torch.complex64, gen)
    contract.check_shapes(op, x[0], (16, 20), torch.complex64)


def test_operator_contract_for_a_per_slice_mask(contract, gen) -> None:
    mask = gaussian_1d_mask((4, 16, 16), accel=3, seed=1)
    assert mask.shape == (4, 16, 16) and not torch.equal(mask[0], mask[1])
    op = CartesianMRI(mask)
    contract.check_operator(op, torch.rand(4, 16, 16, generator=gen), torch.complex64, gen)


def test_odd_sizes_are_adjoint(contract, gen) -> None:
    op = CartesianMRI(random_2d_mask((15, 17), accel=2, seed=0))
    contract.check_operator(op, torch.rand(2, 15, 17, generator=gen), torch.complex64, gen)


def test_forward_follows_the_data_contract(gen) -> None:
    mask = uniform_1d_mask((16, 16), accel=4)
    x = torch.rand(2, 16, 16, generator=gen)
    expected = np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(x.numpy(), axes=(-2, -1)), norm="ortho"), axes=(-2, -1))
    expected = expected * mask.numpy()
    assert np.allclose(CartesianMRI(mask).A(x).numpy(), expected, atol=1e-5)


def test_full_sampling_is_the_identity(gen) -> None:
    op = CartesianMRI(torch.ones(16, 16, dtype=torch.bool))
    x = torch.rand(2, 16, 16, generator=gen)
    assert torch.allclose(op.AT(op.A(x)), x, atol=1e-6)
    assert torch.equal(op.zero_filled(op.A(x)), op.AT(op.A(x)))
    assert op.normal_norm_estimate() == 1.0


@pytest.mark.parametrize("kind", MASKS)
@pytest.mark.parametrize("accel", [4, 8])
def test_sampling_fraction_is_one_over_accel(kind, accel) -> None:
    mask = MASKS[kind]((64, 64), accel=accel, seed=0)
    assert mask.dtype == torch.bool and mask.shape == (64, 64)
    assert float(mask.float().mean()) == pytest.approx(1 / accel, abs=0.02)
    assert bool(mask[32, 32])  # DC (centre after fftshift) is always sampled


@pytest.mark.parametrize("kind", MASKS)
def test_masks_are_deterministic_by_seed(kind) -> None:
    make = MASKS[kind]
    assert torch.equal(make((32, 48), accel=4, seed=5), make((32, 48), accel=4, seed=5))
    if kind != "uniform_1d":
        assert not torch.equal(make((32, 48), accel=4, seed=5), make((32, 48), accel=4, seed=6))


@pytest.mark.parametrize("kind", ["uniform_1d", "gaussian_1d"])
def test_1d_masks_sample_whole_lines_with_a_full_centre(kind) -> None:
    mask = MASKS[kind]((32, 50), accel=4, center_fraction=0.1, seed=2)
    assert torch.equal(mask, mask[:1].expand_as(mask))  # whole columns
    assert bool(mask[0, 25 - 2 : 25 + 3].all())  # round(0.1 * 50) = 5 centre lines around DC


def test_uniform_lines_are_equispaced() -> None:
    columns = torch.nonzero(uniform_1d_mask((8, 128), accel=8, center_fraction=0.0, seed=1)[0]).flatten()
    gaps = torch.diff(columns)
    assert int(gaps.max() - gaps.min()) <= 1


def test_slab_slices_a_per_slice_mask_and_shares_a_2d_one(gen) -> None:
    mask = random_2d_mask((5, 8, 8), accel=2)
    op = CartesianMRI(mask)
    assert torch.equal(op.slab(1, 3).mask, mask[1:3])
    shared = CartesianMRI(mask[0])
    assert torch.equal(shared.slab(1, 3).mask, mask[0])
    x = torch.rand(5, 8, 8, generator=gen)
    assert torch.allclose(op.slab(1, 3).A(x[1:3]), op.A(x)[1:3])
    with pytest.raises(ValueError, match="z0"):
        op.slab(3, 9)


def test_rejects_bad_inputs() -> None:
    with pytest.raises(TypeError, match="bool"):
        CartesianMRI(torch.ones(4, 4))
    op = CartesianMRI(torch.ones(3, 4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="3 slices"):
        op.A(torch.zeros(2, 4, 4))
    with pytest.raises(ValueError, match="accel"):
        uniform_1d_mask((8, 8), accel=0.5)


def test_cpu_and_cuda_match(contract, cuda, gen) -> None:
    op = CartesianMRI(gaussian_1d_mask((16, 16), accel=4))
    contract.check_devices_match(op, torch.rand(3, 16, 16, generator=gen), cuda)
