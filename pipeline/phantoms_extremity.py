"""Procedural 3D extremity CT phantoms (a training family of the mixture), deterministic by seed.

An axial section through a thigh, lower leg, upper arm or forearm, sometimes both limbs side
by side: skin, subcutaneous fat of varying thickness with small branching vessels, muscle
bundles (a Voronoi partition of slowly drifting seed lines, each bundle with its own
intensity) separated by thin fat septa, one or two long bones with a cortical ring around
marrow whose cortex thins and whose marrow turns trabecular towards the joint end, and
neurovascular bundles (artery, vein, nerve in a fat sheath) that run along the limb.

Coordinates follow :mod:`mbir_batch.phantoms` (image [-1, 1]^2, ``s`` along the limb, slice
spacing one pixel, soft edges about 1.5 pixels). Intensities in [0, 1]: air 0.01,
fat ~0.3, muscle ~0.46, enhanced artery ~0.6, marrow 0.3-0.7, cortical bone 0.85-0.95.
"""
from __future__ import annotations

import numpy as np

from .phantom_shapes import _ellipse, _grid, _paint, _render_segments, _step, _streams, _tree

EXTREMITY_VERSION = 1  # bump whenever the output for a seed changes
_SKIN, _FAT, _AIR = 0.47, 0.3, 0.01
# bones per limb kind: (x, y) offset in limb radii, radius in limb radii, cortex fraction of the radius
_BONES = {"thigh": [((0.05, 0.1), 0.2, 0.35)], "arm": [((0.0, 0.05), 0.22, 0.33)],
          "leg": [((-0.15, -0.25), 0.24, 0.3), ((0.45, 0.15), 0.1, 0.4)],
          "forearm": [((-0.3, 0.0), 0.16, 0.32), ((0.3, 0.05), 0.15, 0.32)]}


def _sample(rng: np.random.Generator) -> dict:
    u = rng.uniform
    kind = str(rng.choice(list(_BONES)))
    pair = rng.random() < 0.3
    radius = u(0.35, 0.48) if pair else u(0.5, 0.85)
    limbs = []
    for k, side in enumerate((-1, 1) if pair else (0,)):
        centre = np.array([side * u(0.45, 0.52) + u(-0.05, 0.05), u(-0.08, 0.08)])
        r = radius * u(0.95, 1.05)
        mirror = -1.0 if side < 0 else 1.0
        n_bundles = int(rng.integers(6, 14))
        limbs.append({
            "centre": centre, "r": r, "drift": rng.normal(0, 0.05, 2), "taper": u(-0.12, 0.12),
            "lobes": np.array([(j, u(0, 0.05), u(0, 6.3)) for j in (2, 3, 4)]), "angle": u(-0.5, 0.5),
            "fat": u(0.04, 0.22) * r, "fat_bias": u(0, 0.6), "fat_phase": u(0, 6.3),
            "bones": [(centre + r * np.array([mirror * ox, oy]) + rng.normal(0, 0.01, 2), br * r * u(0.85, 1.15),
                       cf * u(0.8, 1.2), u(0.32, 0.62), u(-0.5, 0.5)) for (ox, oy), br, cf in _BONES[kind]],
            "bundles": (centre + r * 0.7 * rng.uniform(-1, 1, (n_bundles, 2)), rng.normal(0, 0.08, (n_bundles, 2)),
                        u(0.43, 0.49, n_bundles)),
            "septum": u(0.006, 0.015), "nv": [(rng.uniform(0, 2 * np.pi), u(0.25, 0.55)) for _ in
                                               range(int(rng.integers(1, 4)))]})
    return {"kind": kind, "limbs": limbs, "s_mid": u(-0.6, 0.6), "s_joint": u(0.9, 1.6) * rng.choice([-1, 1]),
            "contrast": rng.random() < 0.6, "artery": u(0.56, 0.68), "texture": u(0.006, 0.02)}


def _vessel_trees(rng: np.random.Generator, p: dict) -> np.ndarray:
    """Small subcutaneous / intramuscular vessel trees growing along the limb, as segment rows."""
    rows = []
    for limb in p["limbs"]:
        n = int(rng.integers(3, 8))
        phi = rng.uniform(0, 2 * np.pi, n)
        rho = limb["r"] * rng.uniform(0.55, 0.95, n)
        roots = np.column_stack([limb["centre"][0] + rho * np.cos(phi), limb["centre"][1] + rho * np.sin(phi),
                                 p["s_mid"] + rng.uniform(-1.2, 0.2, n)])
        dirs = np.column_stack([rng.normal(0, 0.3, (n, 2)), np.ones(n)])
        rows.append(_tree(rng, roots, dirs, rng.uniform(0.25, 0.4, n), rng.uniform(0.008, 0.014), 3, spread=0.35))
    return np.concatenate(rows)


def _render_limb(img, limb: dict, p: dict, s: float, xs, width: float, tex) -> None:
    fine, medium, coarse = tex
    ds = s - p["s_mid"]
    cx, cy = limb["centre"] + limb["drift"] * ds
    r = limb["r"] * (1 + limb["taper"] * ds)
    hit = _ellipse(xs, cx, cy, r, 0.9 * r, limb["angle"], limb["lobes"], 2.0 * s)
    if hit is None:
        return
    region, sd = hit
    X, Y = xs[None, region[1]], xs[region[0], None]
    theta = np.arctan2(Y - cy, X - cx)
    fat = limb["fat"] * (1 + limb["fat_bias"] * np.cos(theta - limb["fat_phase"]))
    _paint(img, region, _SKIN + 0.01 * fine[region], _step(-sd, width))
    _paint(img, region, _FAT + 0.01 * fine[region] + 0.01 * coarse[region], _step(-sd - 0.012, width))
    muscle_alpha = _step(-sd - 0.012 - fat, width)
    seeds, drift, values = limb["bundles"]
    centres = seeds + drift * ds
    dist = np.sqrt((X[..., None] - centres[:, 0]) ** 2 + (Y[..., None] - centres[:, 1]) ** 2)
    order = np.argsort(dist, axis=-1)
    d1 = np.take_along_axis(dist, order[..., :1], -1)[..., 0]
    d2 = np.take_along_axis(dist, order[..., 1:2], -1)[..., 0]
    bundle_value = values[order[..., 0]] + 0.012 * medium[region] + 0.008 * fine[region]
    _paint(img, region, bundle_value, muscle_alpha)
    wavy = 0.5 * (d2 - d1) + 0.01 * coarse[region] + 0.004 * medium[region]
    septa = _step(limb["septum"] - np.abs(wavy), width)  # fat planes between bundles, slightly wavy
    _paint(img, region, _FAT + 0.02, septa * muscle_alpha)
    for phi, depth in limb["nv"]:  # neurovascular bundles: fat sheath, artery, vein, nerve
        bx, by = cx + depth * r * np.cos(phi), cy + depth * r * np.sin(phi)
        for dx, dy, radius, value in ((0, 0, 0.05, _FAT), (-0.018, 0, 0.016, p["artery"] if p["contrast"] else 0.47),
                                      (0.02, 0.004, 0.02, 0.5 if p["contrast"] else 0.45), (0.0, 0.028, 0.012, 0.42)):
            h = _ellipse(xs, bx + dx * r, by + dy * r, radius * r / 0.6, radius * r / 0.6)
            if h is not None:
                _paint(img, h[0], value, _step(-h[1], width) * muscle_alpha[_sub(region, h[0])])
    joint = float(_step(0.6 - abs(s - p["s_joint"]), 0.5))  # metaphysis: wider bone, thin cortex, trabeculae
    for (bx, by), br, cortex, marrow, ang in limb["bones"]:
        bx, by = bx + limb["drift"][0] * ds, by + limb["drift"][1] * ds
        rb = br * (1 + 0.6 * joint) * (1 + limb["taper"] * ds)
        h = _ellipse(xs, bx, by, rb, 0.9 * rb, ang, ((3, 0.04, ang),), 0.0)
        if h is None:
            continue
        rg, bsd = h
        _paint(img, rg, 0.88 + 0.04 * fine[rg], _step(-bsd, width))
        inner = cortex * br * (1 - 0.7 * joint)
        trabecular = marrow + joint * (0.15 + 0.12 * fine[rg] + 0.05 * medium[rg])
        _paint(img, rg, trabecular + 0.02 * medium[rg], _step(-bsd - inner, width))


def _sub(outer, inner):
    """Index of the region ``inner`` relative to the region ``outer`` (both (rows, cols) slices)."""
    rows = slice(max(inner[0].start - outer[0].start, 0), max(inner[0].stop - outer[0].start, 0))
    cols = slice(max(inner[1].start - outer[1].start, 0), max(inner[1].stop - outer[1].start, 0))
    return rows, cols


def make_extremity_phantom(seed: int, size: int, depth: int | None = None) -> np.ndarray:
    """Procedural limb CT volume, deterministic by ``seed`` (same arguments and output as ``make_phantom``).

    Returns float32 (Z, H, W) in [0, 1]; ``depth`` defaults to ``size``, slice spacing = pixel.
    """
    depth, rng, texture_rng = _streams("make_extremity_phantom", (EXTREMITY_VERSION, 2718), seed, size, depth)
    p = _sample(rng)
    trees = _vessel_trees(rng, p)
    g = _grid(size, depth, p["s_mid"], texture_rng)
    vessels = np.zeros(g.shape, np.float32)
    _render_segments(vessels, trees, g.s_coords, g.xs, g.width)
    volume = np.zeros(g.shape, np.float32)
    for k, s in enumerate(g.s_coords):
        for limb in p["limbs"]:
            _render_limb(volume[k], limb, p, float(s), g.xs, g.width, [t[k] for t in g.tex])
        inside = volume[k] > 0.2
        _paint(volume[k], (slice(None), slice(None)), 0.55 if p["contrast"] else 0.47, vessels[k] * inside)
    return np.clip(volume, 0.0, 1.0, out=volume)
