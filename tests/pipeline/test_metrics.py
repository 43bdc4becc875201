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
    assert scores["axial"]["psnr"] < PSNR_CAP_DB


def test_shape_mismatch_raises(reference):
    with pytest.raises(ValueError, match="shape"):
        psnr_ssim_per_axis(reference, reference[:-1])


def test_format_metrics_table(reference):
    scores = psnr_ssim_per_axis(reference, reference + 0.01)
    table = format_metrics_table({"fbp": scores, "dds": scores})
    lines = table.splitlines()
    assert len(lines) == 4 and lines[0].startswith("| method | PSNR axial")
    assert lines[2].startswith("| fbp | ") and f"{scores['axial']['psnr']:.2f}" in lines[2]
