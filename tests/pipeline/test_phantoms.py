"""Tests of the procedural CT phantoms (pipeline/phantoms.py)."""
from __future__ import annotations

import numpy as np
import pytest

from mbir_batch.phantoms import HELDOUT_SEED_START, TRAIN_SEEDS, make_phantom


@pytest.fixture(scope="module")
def volume() -> np.ndarray:
    return make_phantom(3, 32)


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def test_shape_dtype_range(volume):
    assert volume.shape == (32, 32, 32)
    assert volume.dtype == np.float32
    assert volume.min() >= 0.0 and volume.max() <= 1.0
    assert make_phantom(3, 32, depth=12).shape == (12, 32, 32)


def test_deterministic_by_seed(volume):
    np.testing.assert_array_equal(volume, make_phantom(3, 32))
    assert np.abs(volume - make_phantom(4, 32)).mean() > 0.02


def test_anatomy_has_air_lung_soft_tissue_and_bone(volume):
    assert (volume < 0.01).mean() > 0.1  # air around the body
    assert ((volume > 0.03) & (volume < 0.2)).mean() > 0.01  # lung
    assert ((volume > 0.25) & (volume < 0.6)).mean() > 0.2  # fat and soft tissue
    assert (volume > 0.75).sum() > 20  # bone


def test_continuous_along_z_but_changing(volume):
    adjacent = [_corr(volume[k], volume[k + 1]) for k in range(31)]
    assert min(adjacent) > 0.9
    far = [np.abs(volume[k] - volume[k + 16]).mean() for k in range(16)]
    assert min(far) > 0.02
    assert np.mean(adjacent) > max(_corr(volume[k], volume[k + 16]) for k in range(16))


def test_seed_ranges_are_disjoint():
    assert HELDOUT_SEED_START not in TRAIN_SEEDS and TRAIN_SEEDS.stop == HELDOUT_SEED_START


def test_invalid_arguments_raise():
    with pytest.raises(ValueError, match="size"):
        make_phantom(0, 4)


def test_torso_output_is_unchanged_by_the_family_option():
    """Benchmarks and tests rely on make_phantom(seed) being the same volume as before families existed:
    values recorded from the code before the ``family`` option was added."""
    volume = make_phantom(3, 32)
    assert float(volume.mean()) == pytest.approx(0.1254231333732605, abs=1e-7)
    assert float(volume[16, 16, 16]) == pytest.approx(0.4141691327095032, abs=1e-6)
    assert float(volume[10, 20, 5]) == pytest.approx(0.30574795603752136, abs=1e-6)
    np.testing.assert_array_equal(volume, make_phantom(3, 32, family="torso"))
