"""The training mixture: several anatomy families with random contrast, geometry, blur and texture.

A prior trained on one phantom family draws that family's anatomy into every volume
(issue 13). :func:`make_training_phantom` instead draws, per seed, a family

    torso (chest and abdomen levels, :func:`mbir_batch.phantoms.make_phantom`)   weight 0.4
    head (:mod:`mbir_batch.phantoms_head`)                                        weight 0.3
    extremity (:mod:`mbir_batch.phantoms_extremity`)                              weight 0.3

and then a random augmentation, applied in this order (each with its own probability):

1. texture noise: x += a n * m, n a unit-variance smooth field of correlation length c
   voxels, m a soft mask of the non-air voxels; a ~ U(0.005, 0.03), c ~ U(1, 3);   p = 0.5
2. in-plane geometry: rotation by U(-180, 180) degrees, zoom by U(0.75, 1.3), shift by
   U(-0.1, 0.1) of the field of view, cubic interpolation, air outside;          p = 0.7
3. blur: Gaussian, sigma U(0.3, 1) pixels in-plane and up to that along z;       p = 0.3
4. windowing x <- clip((x - lo) / (hi - lo), 0, 1), lo ~ U(0, 0.3), hi ~ U(0.65, 1);  p = 0.5
5. gamma x <- x^g, ln g ~ U(-0.5, 0.5);                                          p = 0.5
6. a random intensity curve, piecewise linear through (k / 4, v_k) with v_0 = 0,
   v_4 ~ U(0.7, 1), monotone (sorted v) with p = 0.8, otherwise not, so that tissue order
   can change as between CT and MR contrasts;                                    p = 0.25

The result is clipped to [0, 1]. Everything is a deterministic function of the seed; the
family streams are independent of each other (head seed 5 has nothing to do with torso seed 5).
Seeds follow :mod:`mbir_batch.phantoms`: 0..8999 train, 9000 and above are held out.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .phantom_shapes import _smooth_noise, _step
from .phantoms import make_phantom
from .phantoms_extremity import make_extremity_phantom
from .phantoms_head import make_head_phantom

MIXTURE_VERSION = 1  # bump whenever the output for a seed changes (recorded in model cards)
FAMILIES: dict[str, Callable[..., np.ndarray]] = {"torso": make_phantom, "head": make_head_phantom,
                                                  "extremity": make_extremity_phantom}
FAMILY_WEIGHTS = {"torso": 0.4, "head": 0.3, "extremity": 0.3}


@dataclass(frozen=True)
class Augmentation:
    """One draw of the augmentation; ``None`` fields are steps that are not applied."""

    texture: tuple[float, float] | None = None          # (amplitude, correlation length in voxels)
    geometry: tuple[float, float, float, float] | None = None  # (angle rad, zoom, shift x, shift y)
    blur: tuple[float, float] | None = None             # (sigma in-plane, sigma z) in pixels
    window: tuple[float, float] | None = None           # (lo, hi)
    gamma: float | None = None
    curve: tuple[float, ...] | None = None              # values at 0, 1/4, ..., 1


def family_of(seed: int) -> str:
    """The family that ``make_training_phantom(seed, ...)`` draws (deterministic by seed)."""
    rng = np.random.default_rng(np.random.SeedSequence([MIXTURE_VERSION, 4242, seed]))
    names = list(FAMILY_WEIGHTS)
    return names[rng.choice(len(names), p=list(FAMILY_WEIGHTS.values()))]


def sample_augmentation(rng: np.random.Generator) -> Augmentation:
    """Draw an :class:`Augmentation` with the probabilities of the module docstring."""
    u = rng.uniform
    coins = rng.random(6)
    texture = (u(0.005, 0.03), u(1.0, 3.0)) if coins[0] < 0.5 else None
    geometry = (u(-np.pi, np.pi), u(0.75, 1.3), u(-0.1, 0.1), u(-0.1, 0.1)) if coins[1] < 0.7 else None
    blur = None
    if coins[2] < 0.3:
        sigma = u(0.3, 1.0)
        blur = (sigma, sigma * u(0.0, 1.0))
    window = (u(0.0, 0.3), u(0.65, 1.0)) if coins[3] < 0.5 else None
    gamma = float(np.exp(u(-0.5, 0.5))) if coins[4] < 0.5 else None
    curve = None
    if coins[5] < 0.25:
        inner = rng.uniform(0.05, 1.0, 3)
        top = u(0.7, 1.0)
        if rng.random() < 0.8:
            inner = np.sort(inner) * top
        curve = (0.0, *map(float, inner), top)
    return Augmentation(texture, geometry, blur, window, gamma, curve)


def apply_augmentation(volume: np.ndarray, aug: Augmentation, rng: np.random.Generator) -> np.ndarray:
    """Apply ``aug`` to a (Z, H, W) volume in [0, 1] (``rng`` draws the texture field); returns a new array."""
    x = np.array(volume, dtype=np.float32)
    if aug.texture is not None:
        amplitude, cell = aug.texture
        x += amplitude * _smooth_noise(rng, x.shape, cell) * _step(x - 0.05, 0.05)
    if aug.geometry is not None:
        angle, zoom, sx, sy = aug.geometry
        n = x.shape[1]
        cos, sin = np.cos(angle) / zoom, np.sin(angle) / zoom
        matrix = np.array([[1.0, 0.0, 0.0], [0.0, cos, -sin], [0.0, sin, cos]])
        centre = np.array([0.0, (n - 1) / 2, (x.shape[2] - 1) / 2])
        offset = centre - matrix @ (centre + np.array([0.0, sy * n / 2, sx * n / 2]))
        x = ndimage.affine_transform(x, matrix, offset=offset, order=3, mode="constant", cval=0.0)
    if aug.blur is not None:
        x = ndimage.gaussian_filter(x, (aug.blur[1], aug.blur[0], aug.blur[0]))
    np.clip(x, 0.0, 1.0, out=x)
    if aug.window is not None:
        lo, hi = aug.window
        x = np.clip((x - lo) / (hi - lo), 0.0, 1.0)
    if aug.gamma is not None:
        x = x ** np.float32(aug.gamma)
    if aug.curve is not None:
        x = np.interp(x, np.linspace(0.0, 1.0, len(aug.curve)), aug.curve)
    return np.clip(x, 0.0, 1.0).astype(np.float32)


def make_training_phantom(seed: int, size: int, depth: int | None = None, *, augment: bool = True) -> np.ndarray:
    """A phantom of the training mixture: the family :func:`family_of` ``(seed)``, then its augmentation.

    Parameters and output as :func:`mbir_batch.phantoms.make_phantom`: float32 (Z, H, W) in [0, 1],
    ``depth`` defaulting to ``size``. ``augment=False`` returns the family's phantom unchanged.
    """
    family = family_of(seed)
    volume = FAMILIES[family](seed, size, depth)
    if not augment:
        return volume
    aug_seed, texture_seed = np.random.SeedSequence([MIXTURE_VERSION, 999, seed]).spawn(2)
    aug = sample_augmentation(np.random.default_rng(aug_seed))
    return apply_augmentation(volume, aug, np.random.default_rng(texture_seed))


make_training_phantom.version = MIXTURE_VERSION  # type: ignore[attr-defined]
make_training_phantom.augmentation = (  # type: ignore[attr-defined]
    "; per phantom (mbir_batch.phantoms_mixture): family torso/head/extremity 0.4/0.3/0.3, texture noise, "
    "rotation/zoom/shift, blur, windowing, gamma, random intensity curve")
