"""Tests of the training families (head, extremity) and of the training mixture with augmentations."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from mbir_batch.phantoms import FAMILY_NAMES, HELDOUT_SEED_START, TRAIN_SEEDS, make_phantom
from mbir_batch.phantoms_extremity import make_extremity_phantom
from mbir_batch.phantoms_head import make_head_phantom
from mbir_batch.phantoms_mixture import (
    FAMILY_WEIGHTS,
    Augmentation,
    apply_augmentation,
    family_of,
    make_training_phantom,
)
from mbir_batch.train import SlicePool

SIZE = 32


def _signature(volume: np.ndarray) -> tuple[float, float]:
    """(dark, rim): the fraction of the body (holes filled) darker than 0.2 (lung, bowel gas, airways),
    and the fraction of bone voxels (> 0.75) within 3 pixels of the body outline (a skull is a rim)."""
    body = ndimage.binary_fill_holes(volume > 0.2, structure=np.ones((1, 3, 3)))
    rim = body & ~ndimage.binary_erosion(body, structure=np.ones((1, 3, 3)), iterations=3)
    bone = volume > 0.75
    return float((body & (volume < 0.2)).sum() / max(body.sum(), 1)), float((bone & rim).sum() / max(bone.sum(), 1))


@pytest.mark.parametrize("family", ["head", "extremity"])
def test_family_shape_range_determinism_and_z_continuity(family):
    volume = make_phantom(5, SIZE, family=family)
    assert volume.shape == (SIZE, SIZE, SIZE) and volume.dtype == np.float32
    assert volume.min() >= 0.0 and volume.max() <= 1.0 and volume.max() > 0.8  # bone is there
    np.testing.assert_array_equal(volume, make_phantom(5, SIZE, family=family))
    assert np.abs(volume - make_phantom(6, SIZE, family=family)).mean() > 0.02
    assert make_phantom(5, SIZE, depth=7, family=family).shape == (7, SIZE, SIZE)
    body = [k for k in range(SIZE - 1) if volume[k].max() > 0.3 and volume[k + 1].max() > 0.3]
    adjacent = [np.corrcoef(volume[k].ravel(), volume[k + 1].ravel())[0, 1] for k in body]
    assert len(body) > SIZE // 2 and min(adjacent) > 0.85


def test_family_dispatch_and_errors():
    np.testing.assert_array_equal(make_phantom(2, SIZE, family="head"), make_head_phantom(2, SIZE))
    np.testing.assert_array_equal(make_phantom(2, SIZE, family="extremity"), make_extremity_phantom(2, SIZE))
    np.testing.assert_array_equal(make_phantom(2, SIZE, family="torso"), make_phantom(2, SIZE))
    with pytest.raises(ValueError, match="unknown family 'brain'"):
        make_phantom(2, SIZE, family="brain")
    for make in (make_head_phantom, make_extremity_phantom):
        with pytest.raises(ValueError, match="size >= 8"):
            make(0, 4)


def test_families_are_distinct():
    """Each family has its own anatomy: only the torso holds air inside the body (lungs, gas) in every
    seed; the head's bone is a rim at the outline (skull), the limbs' bone lies inside (femur, tibia)."""
    stats = {f: np.array([_signature(make_phantom(s, SIZE, family=f)) for s in range(100, 112)]) for f in FAMILY_NAMES}
    assert stats["torso"][:, 0].min() > 0.05 > max(stats["head"][:, 0].max(), stats["extremity"][:, 0].max())
    assert np.median(stats["head"][:, 1]) > 0.6 > 0.1 > np.median(stats["extremity"][:, 1])
    head_rim, limb_rim = stats["head"][:, 1], stats["extremity"][:, 1]
    assert (head_rim[:, None] > limb_rim[None, :]).mean() > 0.9  # rank statistic: almost every pair ordered


def test_mixture_draws_families_by_weight_and_is_deterministic():
    counts = {f: 0 for f in FAMILY_WEIGHTS}
    for seed in range(3000):
        counts[family_of(seed)] += 1
    for family, weight in FAMILY_WEIGHTS.items():
        assert abs(counts[family] / 3000 - weight) < 3 * np.sqrt(weight * (1 - weight) / 3000), counts
    for seed in (0, 1, 2, 9000):
        volume = make_training_phantom(seed, SIZE)
        assert volume.dtype == np.float32 and volume.shape == (SIZE, SIZE, SIZE)
        assert volume.min() >= 0.0 and volume.max() <= 1.0
        np.testing.assert_array_equal(volume, make_training_phantom(seed, SIZE))
        plain = make_training_phantom(seed, SIZE, augment=False)
        np.testing.assert_array_equal(plain, make_phantom(seed, SIZE, family=family_of(seed)))
    changed = [not np.array_equal(make_training_phantom(s, SIZE), make_training_phantom(s, SIZE, augment=False))
               for s in range(8)]
    assert sum(changed) >= 6


def test_augmentation_steps_do_what_they_say():
    volume = make_phantom(4, SIZE)
    rng = np.random.default_rng(0)
    np.testing.assert_array_equal(apply_augmentation(volume, Augmentation(), rng), volume)
    identity = apply_augmentation(volume, Augmentation(geometry=(0.0, 1.0, 0.0, 0.0)), rng)
    np.testing.assert_allclose(identity, volume, atol=1e-5)
    quarter = apply_augmentation(volume, Augmentation(geometry=(np.pi / 2, 1.0, 0.0, 0.0)), rng)
    assert min(np.abs(quarter - np.rot90(volume, k, axes=(1, 2))).max() for k in (1, 3)) < 1e-4
    zoomed = apply_augmentation(volume, Augmentation(geometry=(0.0, 1.3, 0.0, 0.0)), rng)
    assert (zoomed > 0.05).mean() > 1.3 * (volume > 0.05).mean()  # the body covers more of the field
    window = apply_augmentation(np.array([[[0.1, 0.2, 0.5, 0.8, 0.9]]], np.float32),
                                Augmentation(window=(0.2, 0.8)), rng)
    np.testing.assert_allclose(window.ravel(), [0.0, 0.0, 0.5, 1.0, 1.0], atol=1e-6)
    gamma = apply_augmentation(np.full((1, 2, 2), 0.25, np.float32), Augmentation(gamma=0.5), rng)
    np.testing.assert_allclose(gamma, 0.5, atol=1e-6)
    curve = apply_augmentation(np.array([[[0.0, 0.125, 1.0]]], np.float32),
                               Augmentation(curve=(0.0, 0.6, 0.7, 0.8, 0.9)), rng)
    np.testing.assert_allclose(curve.ravel(), [0.0, 0.3, 0.9], atol=1e-6)
    blurred = apply_augmentation(volume, Augmentation(blur=(1.0, 0.0)), rng)
    assert np.abs(np.diff(blurred, axis=2)).mean() < 0.8 * np.abs(np.diff(volume, axis=2)).mean()
    textured = apply_augmentation(volume, Augmentation(texture=(0.03, 1.5)), rng)
    air = volume < 0.01
    assert np.abs(textured - volume)[air].max() < 1e-6 and np.abs(textured - volume)[volume > 0.3].std() > 0.01


def test_trainer_never_draws_held_out_seeds():
    """The trainer's pools cycle through TRAIN_SEEDS only, however long it runs, for both phantom sets."""
    for make in (make_phantom, make_training_phantom):
        pool = SlicePool(resolution=SIZE, seeds=TRAIN_SEEDS, phantoms_per_pool=16, make=make)
        drawn = {s for k in range(0, 2000) for s in pool.pool_seeds(k)}
        assert max(drawn) < HELDOUT_SEED_START and len(drawn) == len(TRAIN_SEEDS)
