"""Procedural 3D head CT phantoms (a training family of the mixture), deterministic by seed.

A head from the vertex down to the maxillary sinuses and upper neck, the part chosen by seed:
scalp and subcutaneous fat; skull with outer and inner tables and textured diploe; a thin CSF
rim; brain parenchyma whose white-matter core is a smooth, unfolded region a few percent
darker than the grey matter (as in CT); lateral, third and fourth ventricles that grow with a
per-seed atrophy factor; falx, pineal and choroid calcifications; and, at the skull base,
orbits (globe, lens, orbital fat), frontal, sphenoid and maxillary sinuses, nasal cavity with
septum, petrous bones with mastoid air cells, clivus and cerebellum. The gyral folding of the
cortex is deliberately absent: a folded-cortex family is one of the out-of-distribution test
families of ``bench/ood_phantoms.py``.

Coordinates follow :mod:`mbir_batch.phantoms`: the image spans [-1, 1]^2, ``s`` is the
anatomical axis (towards the feet) in the same unit, slices are one pixel apart, edges are a
smooth step about 1.5 pixels wide. Intensities in [0, 1]: air 0.01, fat ~0.3, CSF ~0.36,
white matter ~0.44, grey matter ~0.47, bone 0.7-0.95.
"""
from __future__ import annotations

import numpy as np

from .phantom_shapes import _blob, _ellipse, _grid, _paint, _render_segments, _step, _streams

HEAD_VERSION = 1  # bump whenever the output for a seed changes
_AIR, _FAT, _SKIN, _CSF, _WM, _GM, _CORTEX = 0.01, 0.3, 0.47, 0.36, 0.44, 0.47, 0.92


def _sample(rng: np.random.Generator) -> dict:
    u = rng.uniform
    a, b = u(0.6, 0.72), u(0.76, 0.9)
    p = {"a": a, "b": b, "c": u(0.8, 0.95), "cx": u(-0.04, 0.04), "cy": u(-0.06, 0.04), "roll": u(-0.12, 0.12),
         "s_mid": u(-0.45, 0.45), "skull": u(0.035, 0.06), "scalp": u(0.025, 0.05), "fat": u(0.005, 0.02),
         "atrophy": u(0.0, 1.0), "gm": u(0.46, 0.49), "wm_drop": u(0.015, 0.045), "csf": u(0.34, 0.38),
         "diploe": u(0.68, 0.8), "lobes": np.array([(k, u(0, 0.025), u(0, 6.3)) for k in (2, 3, 5)]),
         "frontal_sinus": rng.random() < 0.8, "lens": u(0.52, 0.6), "pineal": rng.random() < 0.6,
         "s_base": u(0.22, 0.32), "s_orbit": u(0.18, 0.3), "s_max": u(0.5, 0.6)}
    rim = 1.0 + 0.6 * p["atrophy"]
    p["ventricles"] = [_blob(rng, (side * 0.1, u(-0.12, -0.02), -0.18), (0.07 * rim, 0.3, 0.2 * rim),
                             jitter=0.12, lobes=2, lobe_amp=0.12) for side in (-1, 1)]
    for v, side in zip(p["ventricles"], (-1, 1)):
        v.angle, v.drift = side * u(0.05, 0.25), np.array([side * 0.1, 0.0])
    p["horns"] = [_blob(rng, (side * 0.14, 0.22, -0.1), (0.05 * rim, 0.1, 0.1), jitter=0.15, lobes=1)
                  for side in (-1, 1)]
    p["calc"] = [(side * 0.12 + rng.normal(0, 0.02), u(0.0, 0.12), -0.12 + rng.normal(0, 0.03),
                  u(0.008, 0.015)) for side in (-1, 1) if rng.random() < 0.5]
    p["air_cells"] = rng.uniform(-1, 1, (int(rng.integers(6, 14)), 3))
    return p


def _outline(p: dict, s: float):
    """Semi-axes (a, b) and centre (cx, cy) of the head's outer surface at level ``s``."""
    if s < 0:
        q = np.sqrt(max(1.0 - (s / p["c"]) ** 2, 0.0))
    else:  # below the widest level the head narrows slowly, then to the neck
        q = 1.0 - 0.15 * _step(s - 0.4, 0.5) - 0.25 * _step(s - 0.85, 0.3)
    cy = p["cy"] + 0.08 * _step(s - 0.85, 0.3)
    return p["a"] * q, p["b"] * q, p["cx"], cy


def _render_slice(p: dict, s: float, xs: np.ndarray, width: float, tex, calcs: np.ndarray) -> np.ndarray:
    fine, medium, coarse = tex
    a, b, cx, cy = _outline(p, s)
    img = np.zeros((len(xs), len(xs)), np.float32)
    head = _ellipse(xs, cx, cy, a, b, p["roll"], p["lobes"], 3.0 * s) if a > 2 * width else None
    if head is None:
        return img
    region, sd = head
    dx, dy = xs[None, region[1]] - np.float32(cx), xs[region[0], None] - np.float32(cy)
    _paint(img, region, _SKIN + 0.01 * fine[region], _step(-sd, width))
    _paint(img, region, _FAT + 0.01 * medium[region], _step(-sd - p["scalp"], width))
    inner, t = p["scalp"] + p["fat"], p["skull"]
    neck = float(_step(s - 0.75, 0.15))
    vault = 1.0 - neck
    _paint(img, region, _CORTEX, _step(-sd - inner, width) * vault)  # outer table, diploe, inner table
    _paint(img, region, p["diploe"] + 0.06 * fine[region] + 0.03 * medium[region],
           _step(-sd - inner - 0.3 * t, width) * vault)
    _paint(img, region, _CORTEX, _step(-sd - inner - 0.7 * t, width) * vault)
    cavity = _step(-sd - inner - t, width) * vault
    face = float(_step(s - p["s_orbit"] + 0.05, 0.1)) * _step(-(dy + 0.25 * b), 2 * width)
    _paint(img, region, p["csf"] + 0.005 * fine[region], cavity)
    rim = 0.01 + 0.015 * p["atrophy"]
    brain = _step(-sd - inner - t - rim, width) * vault * (1 - face)
    _paint(img, region, 0.45 + 0.012 * medium[region], cavity * face)  # face below the orbits: soft tissue
    _paint(img, region, p["gm"] + 0.008 * fine[region] + 0.006 * medium[region], brain)
    wm_core = _step(-sd - inner - t - rim - 0.07 - 0.04 * coarse[region], 3 * width)
    _paint(img, region, p["gm"] - p["wm_drop"] + 0.006 * medium[region], brain * wm_core)
    fissure = _step(0.012 - np.abs(dx), width) * _step(np.abs(dy) - 0.25, width) * float(_step(0.15 - s, 0.1))
    _paint(img, region, p["csf"], fissure * brain)  # interhemispheric fissure with the falx
    _paint(img, region, 0.6, _step(0.004 - np.abs(dx), width) * fissure * brain)
    for blob in p["ventricles"] + p["horns"]:
        hit = blob.sd(xs, s)
        if hit is not None:
            _paint(img, hit[0], p["csf"], _step(-hit[1], width))
    _fill3(img, xs, s, (cx, cy - 0.02, 0.08), (0.012 + 0.01 * p["atrophy"], 0.12, 0.1), p["csf"], width)
    if p["pineal"]:
        _fill3(img, xs, s, (cx, cy + 0.13, 0.05), (0.015, 0.015, 0.02), 0.85, width)
    _paint(img, (slice(None), slice(None)), 0.85, calcs)
    _skull_base(img, p, s, xs, width, tex, (cx, cy, a, b))
    if neck > 0:  # upper neck: muscles, cervical vertebra with marrow, pharynx
        _paint(img, region, 0.46 + 0.012 * medium[region], _step(-sd - inner, width) * neck)
        _fill(img, xs, (cx, cy + 0.18), (0.13, 0.1), 0.9, width, scale=neck)
        _fill(img, xs, (cx, cy + 0.18), (0.13, 0.1), 0.66 + 0.04 * fine, width, inset=0.015, scale=neck)
        _fill(img, xs, (cx, cy - 0.12), (0.09, 0.05), _AIR, width, scale=neck)
    return img


def _fill(img, xs, centre, axes, value, width: float, *, inset: float = 0.0, scale=1.0, angle: float = 0.0) -> None:
    """Paint ``value`` (scalar or full-slice array) into an ellipse shrunk by ``inset``; nothing if it is empty."""
    hit = _ellipse(xs, centre[0], centre[1], axes[0], axes[1], angle)
    if hit is not None:
        _paint(img, hit[0], value, _step(-hit[1] - inset, width) * scale)


def _fill3(img, xs, s: float, centre, axes, value, width: float, **kw) -> None:
    """:func:`_fill` of the cross-section at level ``s`` of an ellipsoid with centre (x, y, s0), semi-axes (a, b, c)."""
    dz = (s - centre[2]) / axes[2]
    if abs(dz) < 1.0:
        q = np.sqrt(1.0 - dz * dz)
        _fill(img, xs, centre[:2], (axes[0] * q, axes[1] * q), value, width, **kw)


def _skull_base(img, p: dict, s: float, xs, width: float, tex, geometry) -> None:
    """Orbits, sinuses, nasal cavity, petrous bones with mastoid cells, clivus, posterior fossa."""
    fine, medium, _ = tex
    cx, cy, a, b = geometry
    lateral, sb, so, sm = a / 0.66, p["s_base"], p["s_orbit"], p["s_max"]
    for side in (-1, 1):  # petrous ridges with mastoid air cells
        _fill3(img, xs, s, (cx + side * 0.3 * lateral, cy + 0.22, sb + 0.1), (0.26, 0.05, 0.1), 0.9 + 0.04 * fine,
               width, angle=side * 0.7)
        for x, y, z in p["air_cells"][p["air_cells"][:, 0] * side > 0][:6]:
            _fill3(img, xs, s, (cx + side * (0.42 + 0.06 * abs(x)) * lateral, cy + 0.3 + 0.05 * y, sb + 0.1 + 0.06 * z),
                   (0.025, 0.025, 0.025), _AIR, width)
    _fill3(img, xs, s, (cx, cy + 0.12, sb + 0.2), (0.06, 0.1, 0.2), 0.85 + 0.05 * fine, width)  # clivus
    _fill3(img, xs, s, (cx, cy - 0.02, sb + 0.06), (0.09, 0.07, 0.08), _AIR, width)  # sphenoid sinus
    for side in (-1, 1):  # bony orbit, orbital fat, globe (wall, vitreous), lens
        ox, oy = cx + side * 0.3 * lateral, cy - 0.62 * b
        _fill3(img, xs, s, (ox, oy, so), (0.17, 0.2, 0.2), 0.85, width)
        _fill3(img, xs, s, (ox, oy, so), (0.17, 0.2, 0.2), _FAT + 0.01 * medium, width, inset=0.02)
        _fill3(img, xs, s, (ox, oy - 0.04, so), (0.11, 0.11, 0.11), 0.5, width)
        _fill3(img, xs, s, (ox, oy - 0.04, so), (0.11, 0.11, 0.11), 0.44, width, inset=0.012)
        _fill3(img, xs, s, (ox, oy - 0.125, so), (0.03, 0.012, 0.03), p["lens"], width)
    if p["frontal_sinus"]:
        _fill3(img, xs, s, (cx, cy - 0.88 * b + 0.1, -0.12), (0.12, 0.035, 0.1), _AIR, width)
    for side in (-1, 1):  # maxillary sinuses with bony walls
        centre = (cx + side * 0.2, cy - 0.5 * b, sm)
        _fill3(img, xs, s, centre, (0.14, 0.16, 0.18), 0.85, width, angle=side * 0.3)
        _fill3(img, xs, s, centre, (0.14, 0.16, 0.18), _AIR, width, inset=0.015, angle=side * 0.3)
    nose = (cx, cy - 0.62 * b, 0.5 * (so + sm) + 0.05)  # nasal cavity, septum, turbinates
    _fill3(img, xs, s, nose, (0.07, 0.2, 0.3), _AIR, width)
    _fill3(img, xs, s, nose, (0.006, 0.19, 0.28), 0.55 + 0.1 * fine, width)
    for side in (-1, 1):
        _fill3(img, xs, s, (cx + side * 0.045, nose[1] + 0.02, nose[2]), (0.015, 0.1, 0.22), 0.5, width)


def make_head_phantom(seed: int, size: int, depth: int | None = None) -> np.ndarray:
    """Procedural head CT volume, deterministic by ``seed`` (same arguments and output as ``make_phantom``).

    Returns float32 (Z, H, W) in [0, 1]; ``depth`` defaults to ``size``, slice spacing = pixel.
    """
    depth, rng, texture_rng = _streams("make_head_phantom", (HEAD_VERSION, 1729), seed, size, depth)
    p = _sample(rng)
    g = _grid(size, depth, p["s_mid"], texture_rng)
    calcs = np.zeros(g.shape, np.float32)
    if p["calc"]:
        rows = np.array([(x, y, z, x, y, z + 0.02, r, r) for x, y, z, r in p["calc"]])
        rows[:, [0, 3]] += p["cx"]
        rows[:, [1, 4]] += p["cy"]
        _render_segments(calcs, rows, g.s_coords, g.xs, g.width)
    volume = np.empty(g.shape, np.float32)
    for k, s in enumerate(g.s_coords):
        volume[k] = _render_slice(p, float(s), g.xs, g.width, [t[k] for t in g.tex], calcs[k])
    return np.clip(volume, 0.0, 1.0, out=volume)
