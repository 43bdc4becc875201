"""Tests of the comparison figure (pipeline/report.py)."""
from __future__ import annotations

import matplotlib.image
import numpy as np
import pytest

from mbir_batch.report import HEADER_INCHES, PANEL_INCHES, make_report_png, mid_planes


@pytest.fixture(scope="module")
def reference() -> np.ndarray:
    z, y, x = np.mgrid[:12, :16, :20]
    return (((y - 8) ** 2 + (x - 10) ** 2 < 30) * (0.5 + 0.02 * z)).astype(np.float32)


def _pixel_size(n_rows: int, n_cols: int, dpi: int) -> tuple[int, int]:
    return round((n_rows * PANEL_INCHES + HEADER_INCHES) * dpi), round(n_cols * PANEL_INCHES * dpi)


def test_report_png_has_expected_size(tmp_path, reference):
    noise = np.random.default_rng(0).normal(0, 0.05, reference.shape).astype(np.float32)
    results = {"fbp": reference + noise, "dds": reference + 0.3 * noise}
    path = make_report_png(reference, results, tmp_path / "out" / "report.png", title="svct-8view",
                           voxel_size=(2.0, 1.0, 1.0), dpi=50)
    assert path.stat().st_size > 1000
    image = matplotlib.image.imread(path)
    assert image.shape[:2] == _pixel_size(3, 6, 50)
    assert image[..., :3].std() > 0.05  # not a blank canvas


def test_report_without_reference_has_no_error_columns(tmp_path, reference):
    path = make_report_png(None, {"fbp": reference}, tmp_path / "report.png", dpi=40)
    assert matplotlib.image.imread(path).shape[:2] == _pixel_size(1, 3, 40)


def test_report_rejects_mismatched_shapes(tmp_path, reference):
    with pytest.raises(ValueError, match="one shape"):
        make_report_png(reference, {"fbp": reference[:-1]}, tmp_path / "report.png")


def test_mid_planes_are_orthogonal(reference):
    axial, coronal, sagittal = mid_planes(reference)
    assert axial.shape == (16, 20) and coronal.shape == (12, 20) and sagittal.shape == (12, 16)
    np.testing.assert_array_equal(coronal, reference[:, 8, :])


def test_label_shows_na_for_a_skipped_ssim():
    """1-2-slice volumes have no coronal/sagittal SSIM (None): the PNG label says n/a instead of crashing."""
    from mbir_batch.report import _label

    scores = {"axial": {"psnr": 30.0, "ssim": 0.9}, "coronal": {"psnr": 29.0, "ssim": None},
              "sagittal": {"psnr": 28.0, "ssim": None}}
    assert "SSIM 0.900/n/a/n/a" in _label("DDS", scores)
