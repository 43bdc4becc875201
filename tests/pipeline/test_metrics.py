"""Tests of per-axis PSNR / SSIM (pipeline/metrics.py)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from mbir_batch.metrics import PSNR_CAP_DB, format_metrics_table, psnr_ssim_per_axis

AXES = ("axial", "coronal", "sagittal")


@pytest.fixture(scope="module")
def reference() -> np.ndarray:
    rng = np.random.default_rng(0)
    volume = rng.uniform(0.0, 2.0, (24, 32, 40))
    volume[0] = 0.7  # a constant axial slice
    return volume


def test_identical_volume_gives_the_cap(reference):
    scores = psnr_ssim_per_axis(reference, reference.copy())
    for axis in AXES:
        assert scores[axis]["psnr"] == PSNR_CAP_DB
        assert scores[axis]["ssim"] == pytest.approx(1.0)


def test_known_noise_level_gives_expected_psnr(reference):
    sigma = 0.05
    noisy = reference + np.random.default_rng(1).normal(0.0, sigma, reference.shape)
    data_range = reference.max() - reference.min()
    expected = 10.0 * math.log10(data_range**2 / sigma**2)
    scores = psnr_ssim_per_axis(reference, noisy)
    for axis in AXES:
        assert scores[axis]["psnr"] == pytest.approx(expected, abs=0.1)
        assert 0.0 < scores[axis]["ssim"] < 1.0


def test_constant_reference_slice_with_error_is_finite(reference):
    noisy = reference.copy()
    noisy[0] += 0.01
    scores = psnr_ssim_per_axis(reference, noisy)
    assert all(math.isfinite(scores[a]["psnr"]) for a in AXES)
    # The constant axial slice 0 is left out of the axial mean (the other slices are exact) ...
    assert scores["axial"]["psnr"] == PSNR_CAP_DB
    # ... but its error shows in every coronal and sagittal slice, which it crosses.
    assert scores["coronal"]["psnr"] < PSNR_CAP_DB and scores["sagittal"]["psnr"] < PSNR_CAP_DB


def test_shape_mismatch_raises(reference):
    with pytest.raises(ValueError, match="shape"):
        psnr_ssim_per_axis(reference, reference[:-1])


def test_format_metrics_table(reference):
    scores = psnr_ssim_per_axis(reference, reference + 0.01)
    table = format_metrics_table({"fbp": scores, "dds": scores})
    lines = table.splitlines()
    assert len(lines) == 4 and lines[0].startswith("| method | PSNR axial")
    assert lines[2].startswith("| fbp | ") and f"{scores['axial']['psnr']:.2f}" in lines[2]


def test_constant_reference_slices_are_left_out():
    """An all-air edge slice reproduced exactly must not add a 100 dB term to the plane's mean."""
    rng = np.random.default_rng(3)
    reference = np.zeros((8, 8, 8))
    reference[:, 2:6, 2:6] = rng.uniform(0.2, 1.0, (8, 4, 4))
    volume = reference + rng.normal(0, 0.05, reference.shape) * (reference > 0)
    scores = psnr_ssim_per_axis(reference, volume)
    # Independent expectation: coronal slices 2..5 only (the others are constant in the reference).
    expected = np.mean([10 * np.log10(reference.max() ** 2 / np.mean((reference[:, y] - volume[:, y]) ** 2))
                        for y in range(2, 6)])
    assert abs(scores["coronal"]["psnr"] - expected) < 1e-6


def test_blockwise_scoring_of_zarr_arrays_equals_in_memory():
    """The driver scores zarr arrays block by block; the figures must equal the in-memory ones."""
    import zarr

    rng = np.random.default_rng(1)
    reference = rng.uniform(0, 1, (20, 12, 10)).astype(np.float32)
    reference[:, 0] = 0.0
    volume = (reference + rng.normal(0, 0.05, reference.shape)).astype(np.float32)
    stored = zarr.create_array(store={}, shape=volume.shape, chunks=(8, 12, 10), dtype="float32")
    stored[:] = volume
    expected = psnr_ssim_per_axis(reference, volume, block=1000)
    assert psnr_ssim_per_axis(reference, stored, block=3) == expected
    assert psnr_ssim_per_axis(reference, volume, block=7) == expected


@pytest.mark.parametrize("depth", [1, 2])
def test_thin_volume_skips_ssim_across_slices_and_says_why(depth):
    """1 or 2 slices: coronal/sagittal slices are 1-2 pixels thick; SSIM is skipped, PSNR is kept."""
    rng = np.random.default_rng(3)
    reference = rng.uniform(0.0, 1.0, (depth, 12, 10))
    noisy = reference + rng.normal(0.0, 0.05, reference.shape)
    scores = psnr_ssim_per_axis(reference, noisy)
    assert 0.0 < scores["axial"]["ssim"] < 1.0 and "ssim_skipped" not in scores["axial"]
    for axis, plane in (("coronal", f"{depth}x10"), ("sagittal", f"{depth}x12")):
        assert scores[axis]["ssim"] is None
        assert scores[axis]["ssim_skipped"].endswith(f"{axis} slices are {plane}")
        expected = np.mean([10 * math.log10(np.ptp(reference) ** 2 / np.mean((r - v) ** 2))
                            for r, v in zip(np.moveaxis(reference, AXES.index(axis), 0),
                                            np.moveaxis(noisy, AXES.index(axis), 0))])
        assert scores[axis]["psnr"] == pytest.approx(expected, rel=1e-9)
    table = format_metrics_table({"FBP": scores})
    assert table.splitlines()[2].count("n/a") == 2


def test_three_slices_have_ssim_on_every_axis():
    rng = np.random.default_rng(4)
    reference = rng.uniform(0.0, 1.0, (3, 8, 8))
    scores = psnr_ssim_per_axis(reference, reference + 0.01)
    assert all(scores[axis]["ssim"] is not None for axis in AXES)
