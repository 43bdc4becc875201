"""Geometry helpers of the procedural phantoms: the grid, soft shapes, blobs, vessel trees, smooth noise.

Everything here renders anti-aliased soft masks on a coordinate grid; :mod:`mbir_batch.phantoms`
and the other families compose them into anatomy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage


def _streams(name: str, key: Sequence[int], seed: int, size: int,
             depth: int | None) -> tuple[int, np.random.Generator, np.random.Generator]:
    """``(depth, anatomy rng, texture rng)`` of the phantom ``name``(seed, size, depth).

    ``depth`` defaults to ``size``; bad arguments raise ``ValueError`` naming ``name``. The two
    generators are independent children of ``SeedSequence([*key, seed])`` (``key`` holds the
    family's version), so the anatomy of a seed does not depend on ``size``.
    """
    depth = size if depth is None else depth
    if seed < 0 or size < 8 or depth < 1:
        raise ValueError(f"{name} needs seed >= 0, size >= 8, depth >= 1; got {seed}, {size}, {depth}")
    anatomy_seed, texture_seed = np.random.SeedSequence([*key, seed]).spawn(2)
    return depth, np.random.default_rng(anatomy_seed), np.random.default_rng(texture_seed)


@dataclass(frozen=True)
class _Grid:
    """Where a (depth, size, size) phantom is sampled, and its texture.

    The image spans [-1, 1]^2 with pixel 2 / size; slices are one pixel apart along ``s``,
    centred on the anatomy's ``s_mid``; soft edges are 1.5 pixels wide.
    """

    xs: np.ndarray  # float32 pixel centres, along x (columns) and y (rows)
    width: float  # soft-edge width
    s_coords: np.ndarray  # level s of each slice
    shape: tuple[int, int, int]
    tex: list[np.ndarray]  # unit-variance smooth noise, correlation 1, 4 and size / 6 voxels (fine, medium, coarse)


def _grid(size: int, depth: int, s_mid: float, texture_rng: np.random.Generator) -> _Grid:
    """The :class:`_Grid` of a phantom; its texture fields are drawn from ``texture_rng``."""
    pixel = 2.0 / size
    xs = ((np.arange(size) + 0.5) * pixel - 1.0).astype(np.float32)
    s_coords = s_mid + (np.arange(depth) - (depth - 1) / 2) * pixel
    shape = (depth, size, size)
    tex = [_smooth_noise(texture_rng, shape, cell) for cell in (1.0, 4.0, max(size / 6, 2.0))]
    return _Grid(xs, 1.5 * pixel, s_coords, shape, tex)


def _step(d: np.ndarray, width: float) -> np.ndarray:
    """Smooth step of a signed distance ``d`` (positive inside) over ``width``."""
    t = np.clip(0.5 + d / width, 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _paint(img: np.ndarray, region, value, alpha: np.ndarray) -> None:
    """Alpha-blend ``value`` (scalar, full-slice or region-sized array) into ``img[region]``."""
    v = value[region] if isinstance(value, np.ndarray) and value.shape == img.shape else value
    img[region] += alpha * (v - img[region])


@dataclass
class _Blob:
    """Ellipsoid whose centre drifts, rotates and has lobulated cross-sections along s."""

    centre: np.ndarray  # (x, y, s)
    axes: np.ndarray  # semi-axes (x, y, s)
    angle: float
    drift: np.ndarray  # in-plane centre velocity d(x, y)/ds
    twist: float  # d angle / ds
    lobes: np.ndarray  # rows (order, amplitude, phase)

    def sd(self, xs: np.ndarray, s: float, pad: float = 0.0):
        """Return ``(region, signed distance)`` (negative inside) of the slice at ``s``, or None."""
        dz = (s - self.centre[2]) / self.axes[2]
        if abs(dz) >= 1.0:
            return None
        q = np.sqrt(1.0 - dz * dz)
        cx, cy = self.centre[:2] + self.drift * (s - self.centre[2])
        return _ellipse(xs, cx, cy, (self.axes[0] + pad) * q, (self.axes[1] + pad) * q,
                        self.angle + self.twist * (s - self.centre[2]), self.lobes, 2.0 * s)


def _ellipse(xs, cx, cy, a, b, angle=0.0, lobes=(), phase=0.0):
    """Approximate signed distance (negative inside) to an ellipse, on its bounding box.

    Returns ``(region, distance)`` with ``region`` the (rows, cols) slices of the box, or
    None when the box is empty. ``lobes`` rows ``(order, amplitude, phase)`` lobulate it.
    """
    if a <= 0 or b <= 0:
        return None
    reach = 1.2 * max(a, b) + 3 * (xs[1] - xs[0])
    jx = slice(*np.searchsorted(xs, [cx - reach, cx + reach]))
    iy = slice(*np.searchsorted(xs, [cy - reach, cy + reach]))
    if jx.start >= jx.stop or iy.start >= iy.stop:
        return None
    dx, dy = xs[None, jx] - np.float32(cx), xs[iy, None] - np.float32(cy)
    cos, sin = np.float32(np.cos(angle)), np.float32(np.sin(angle))
    u, v = (dx * cos + dy * sin) / np.float32(a), (dy * cos - dx * sin) / np.float32(b)
    f = np.sqrt(u * u + v * v) + np.float32(1e-6)
    if len(lobes):
        th = np.arctan2(v, u)
        f = f * (1.0 - sum(np.float32(amp) * np.cos(k * th + np.float32(ph + phase)) for k, amp, ph in lobes))
    grad = np.sqrt((u / np.float32(a)) ** 2 + (v / np.float32(b)) ** 2) / f + np.float32(1e-6)
    return (iy, jx), (f - 1.0) / grad


def _blob(rng, centre, axes, jitter=0.1, lobes=2, lobe_amp=0.06) -> _Blob:
    axes = np.asarray(axes, float) * rng.uniform(1 - jitter, 1 + jitter, 3)
    return _Blob(np.asarray(centre, float) + rng.normal(0, jitter * 0.3, 3), axes,
                 rng.uniform(-0.4, 0.4), rng.normal(0, 0.12, 2), rng.normal(0, 0.3),
                 np.array([(k, rng.uniform(0, lobe_amp), rng.uniform(0, 2 * np.pi))
                           for k in rng.choice([2, 3, 4, 5], lobes, replace=False)]).reshape(-1, 3))


def _tree(rng, roots, directions, length, radius, depth: int, spread: float = 0.45) -> np.ndarray:
    """Branching tube trees grown from ``roots`` (n, 3), two or three children per tip.

    Returns segment rows ``(x0, y0, s0, x1, y1, s1, r0, r1)``; the first n rows are the roots.
    """
    tips, dirs = np.array(roots, float), np.array(directions, float)
    length, radius = np.broadcast_to(length, len(tips)).astype(float), np.broadcast_to(radius, len(tips))
    rows = []
    for _ in range(depth + 1):
        dirs = dirs / np.linalg.norm(dirs, axis=1, keepdims=True)
        ends = tips + dirs * length[:, None]
        rows.append(np.column_stack([tips, ends, radius, 0.9 * radius]))
        children = np.where(rng.random(len(tips)) < 0.25, 3, 2)
        tips, parent = np.repeat(ends, children, 0), np.repeat(dirs, children, 0)
        kick = rng.normal(0, 1, parent.shape)
        kick -= (kick * parent).sum(1, keepdims=True) * parent
        kick /= np.linalg.norm(kick, axis=1, keepdims=True) + 1e-12
        dirs = parent + np.tan(rng.uniform(0.3, 1.0, len(parent)) * spread)[:, None] * kick
        length = np.repeat(length, children) * rng.uniform(0.75, 0.9, len(parent))
        radius = np.repeat(radius, children) * 0.85
    return np.concatenate(rows)


def _render_segments(alpha: np.ndarray, segments: np.ndarray, s_coords, xs, width: float) -> None:
    """Max-composite soft tapered capsules, rows ``(x0, y0, s0, x1, y1, s1, r0, r1)``, into (Z, H, W)."""
    pixel = xs[1] - xs[0]
    segments = np.asarray(segments, dtype=np.float64).reshape(-1, 8)
    segments = segments[segments[:, 6] >= 0.2 * pixel]  # thinner ones would add < 0.03 of contrast
    pad = np.maximum(segments[:, 6:7], pixel) + 2 * pixel
    lo = np.minimum(segments[:, 0:3], segments[:, 3:6]) - pad
    hi = np.maximum(segments[:, 0:3], segments[:, 3:6]) + pad
    box = [(np.searchsorted(axis, lo[:, k]), np.searchsorted(axis, hi[:, k]))
           for k, axis in ((2, s_coords), (1, xs), (0, xs))]
    hits = np.flatnonzero(np.all([start < stop for start, stop in box], axis=0))
    for n in hits:
        kz, iy, jx = (slice(start[n], stop[n]) for start, stop in box)
        p0, d, (r0, r1) = segments[n, :3], segments[n, 3:6] - segments[n, :3], segments[n, 6:]
        grid = (xs[None, None, jx] - p0[0], xs[None, iy, None] - p0[1], (s_coords[kz, None, None] - p0[2]))
        t = np.clip(sum(g * c for g, c in zip(grid, d)) / max(d.dot(d), 1e-12), 0.0, 1.0)
        dist = np.sqrt(sum((g - t * c) ** 2 for g, c in zip(grid, d)))
        radius = r0 + t * (r1 - r0)
        shown = np.maximum(radius, 0.6 * pixel)  # sub-pixel tubes keep their partial volume
        a = _step(shown - dist, width) * np.minimum(1.0, (radius / shown) ** 2)
        np.maximum(alpha[kz, iy, jx], a, out=alpha[kz, iy, jx])


def _smooth_noise(rng, shape, cell: float) -> np.ndarray:
    """Unit-variance smooth random field with correlation length ``cell`` voxels.

    Coarse fields are low-resolution noise blown up by separable Gaussian-weighted
    interpolation matrices (three small matrix products instead of a 3D filter).
    """
    if cell <= 1.5:
        field = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), cell * 0.7)
    else:
        field = rng.standard_normal([int(np.ceil(n / cell)) + 4 for n in shape]).astype(np.float32)
        for axis, n in enumerate(shape):
            offsets = (np.arange(n) + 0.5) / cell + 1.5 - np.arange(field.shape[axis])[:, None]
            weights = np.exp(-0.5 * (offsets / 0.8) ** 2).astype(np.float32)
            field = np.moveaxis(np.tensordot(field, weights / weights.sum(0), axes=([axis], [0])), -1, axis)
    return (field - field.mean()) / (field.std() + 1e-8)
