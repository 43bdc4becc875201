"""bench/ood_phantoms.py: the out-of-distribution families are valid volumes and unlike the training families."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

from ood_phantoms import OOD_FAMILIES, make_brain_phantom, make_ellipsoid_phantom, render_families  # noqa: E402

from mbir_batch.phantoms import make_phantom  # noqa: E402

SIZE = 32


@pytest.mark.parametrize("name", sorted(OOD_FAMILIES))
def test_shape_range_determinism(name):
    make = OOD_FAMILIES[name]
    volume = make(3, SIZE)
    assert volume.shape == (SIZE, SIZE, SIZE) and volume.dtype == np.float32
    assert volume.min() >= 0.0 and volume.max() <= 1.0 and (volume > 0.05).mean() > 0.2
    np.testing.assert_array_equal(volume, make(3, SIZE))
    assert np.abs(volume - make(4, SIZE)).mean() > 0.01
    assert make(3, SIZE, depth=5).shape == (5, SIZE, SIZE)
    with pytest.raises(ValueError, match="size >= 8"):
        make(0, 4)


@pytest.mark.parametrize("name", sorted(OOD_FAMILIES))
def test_continuous_along_z(name):
    """A 3D volume, not a stack of unrelated slices: neighbours correlate, slices 8 apart much less.
    (The brain's sulci are about a pixel wide at this size, so its neighbours correlate less than
    the smooth training families'.)"""
    volume = OOD_FAMILIES[name](1, SIZE)
    area = (volume > 0.05).mean(axis=(1, 2))
    rows = [k for k in range(SIZE - 8) if min(area[k], area[k + 1], area[k + 8]) > 0.25]
    near = [np.corrcoef(volume[k].ravel(), volume[k + 1].ravel())[0, 1] for k in rows]
    far = [np.corrcoef(volume[k].ravel(), volume[k + 8].ravel())[0, 1] for k in rows]
    assert len(rows) >= 8 and min(near) > 0.6 and np.mean(near) > 0.8
    assert np.mean(near) > np.mean(far) + 0.1


def test_ellipsoids_are_piecewise_smooth_without_texture():
    """Away from edges the ellipsoid family is linear ramps: its Laplacian vanishes almost everywhere,
    unlike the textured training families."""
    def flat_fraction(volume):
        lap = np.abs(volume[1:-1, 1:-1, :-2] + volume[1:-1, 1:-1, 2:] - 2 * volume[1:-1, 1:-1, 1:-1])
        return float((lap[volume[1:-1, 1:-1, 1:-1] > 0.1] < 1e-3).mean())

    training = max(flat_fraction(make_phantom(2, SIZE, family=f)) for f in ("torso", "head", "extremity"))
    assert flat_fraction(make_ellipsoid_phantom(2, SIZE)) > max(0.3, 2.5 * training)


def test_brain_is_t1_like_with_a_folded_cortex():
    """White matter brighter than grey and CSF dark (the training head is CT-like: white darker than grey);
    and the grey ribbon folds: many more grey/white boundary voxels than a smooth ribbon would have."""
    volume = make_brain_phantom(5, 64)
    wm, gm = (volume > 0.6) & (volume < 0.75), (volume > 0.4) & (volume < 0.52)
    assert wm.mean() > 0.05 and gm.mean() > 0.05
    head = make_phantom(5, 64, family="head")
    assert ((head > 0.6) & (head < 0.75)).mean() < 0.02  # no T1-white-matter band in the training head
    mid = volume[32]
    boundary = (np.abs(np.diff(mid, axis=0)) > 0.1).sum() + (np.abs(np.diff(mid, axis=1)) > 0.1).sum()
    unfolded = 2 * np.pi * 0.6 * 32 * 4  # ~4 edges around an unfolded ribbon of radius 0.6 (in pixels)
    assert boundary > 1.5 * unfolded


def test_render_families_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    path = render_families(tmp_path / "families.png", size=16, seeds=(0,))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
