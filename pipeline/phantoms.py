"""Procedural 3D chest/abdomen CT phantoms, deterministic by seed.

The bundled denoiser is trained on axial slices of these volumes, so they must hold
what a total-variation prior does not already favour: smooth intensity gradients,
low-amplitude organ texture, thin branching vessels and small bright details.
A phantom is a trunk section (lung apex to lower abdomen, the part chosen by seed)
with a body outline, skin and subcutaneous fat, muscle wall, lungs with branching
vessels and airways, heart, aorta, liver (with portal vessels), spleen, stomach,
kidneys, bowel, spine with vertebrae and discs, oblique ribs and calcifications.
Every structure is a smooth parametric shape of the anatomical axis ``s`` (same unit
as the in-plane coordinates, the image spans [-1, 1]), so it continues over many
slices while it changes along z. Edges are rendered as a smooth step of an
approximate signed distance, about 1.5 pixels wide, which avoids aliasing.

Anatomy is drawn from one random stream and texture from another, so one seed gives
the same anatomy at every size. Intensities are in [0, 1]: air 0, lung ~0.1,
fat ~0.32, soft tissue ~0.45, enhanced blood ~0.62, bone 0.7-0.95.

Seeds: training uses ``TRAIN_SEEDS`` (0..8999). Held-out evaluation and benchmark
seeds are ``>= HELDOUT_SEED_START`` (9000); the demo uses 9001.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PHANTOM_VERSION = 2  # bump whenever the output for a seed changes (recorded in model metadata)
TRAIN_SEEDS = range(9000)
HELDOUT_SEED_START = 9000
FAMILY_NAMES = ("torso", "head", "extremity")  # make_phantom(..., family=...)

_SKIN, _FAT, _MUSCLE, _SOFT, _CORTEX, _MARROW, _AIR = 0.47, 0.3, 0.46, 0.43, 0.93, 0.72, 0.01

from .phantom_shapes import (  # noqa: F401
    _Blob,
    _blob,
    _ellipse,
    _paint,
    _render_segments,
    _smooth_noise,
    _step,
    _tree,
)


@dataclass
class _Anatomy:
    """Per-seed anatomy: scalars of the trunk plus lists of blobs and tube segments."""

    p: dict
    blobs: dict
    bowel: list
    lesions: list
    vessels: dict


def _body(an: _Anatomy, s: float, theta):
    """Body centre ``(cx, cy)``, outer radius R, fat F and muscle M along angle ``theta``."""
    p = an.p
    a = p["a0"] * (1 + 0.05 * np.sin(1.7 * s + p["ph"][0])) * (1 - p["waist"] * np.exp(-((s - 2.4) / 0.6) ** 2))
    b = p["b0"] * (1 + 0.06 * np.sin(1.3 * s + p["ph"][1])) * (1 + p["belly"] * _step(s - p["s_dome"] - 0.5, 1.0))
    cx, cy = 0.02 * np.sin(0.9 * s + p["ph"][2]), p["cy0"] + 0.02 * np.sin(0.8 * s + p["ph"][3])
    sin, cos = np.sin(theta), np.cos(theta)
    bdir = np.where(sin > 0, b * p["flat"], b)
    n = p["n_exp"]
    radius = ((np.abs(cos) / a) ** n + (np.abs(sin) / bdir) ** n) ** (-1.0 / n)
    amps, omegas, phases = p["fourier"]
    for k, (amp, om, ph) in enumerate(zip(amps, omegas, phases), start=2):
        radius = radius * (1 + amp * np.sin(om * s + ph) * np.cos(k * theta + ph))
    fat = p["fat0"] * (1 + 0.5 * np.cos(theta - p["ph"][4])) * (1 + p["fat_abd"] * _step(s - p["s_dome"], 0.8))
    muscle = p["m0"] * (1 + 1.3 * np.clip(sin, 0, 1) ** 3)
    return cx, cy, radius, fat, muscle


def _spine(an: _Anatomy, s: float):
    """Vertebral body centre (x, y) at level ``s``; the spine follows the posterior wall."""
    cx, cy, r, f, m = _body(an, s, np.pi / 2)
    return cx + 0.025 * np.sin(0.7 * s + an.p["ph"][5]), cy + r - f - m - 0.5 * an.p["vb"][1]


def _sample_anatomy(rng: np.random.Generator) -> _Anatomy:
    u = rng.uniform
    a0 = u(0.76, 0.9)
    s_dome, s_apex = u(1.15, 1.45), u(-0.1, 0.15)
    # body half-width a0 / depth b0, landmarks along s (apex, diaphragm dome, aortic arch and bifurcation),
    # vertebra height and ribs, organ intensities; "ph" are phases of the smooth variations along s.
    p = {"a0": a0, "b0": a0 * u(0.62, 0.8), "waist": u(0, 0.1), "belly": u(0, 0.2), "cy0": u(0.0, 0.06),
         "ph": rng.uniform(0, 2 * np.pi, 8), "flat": u(0.85, 1.0), "n_exp": u(2.1, 2.8),
         "fourier": (rng.uniform(0, 0.035, 4), rng.uniform(0.5, 2.5, 4), rng.uniform(0, 2 * np.pi, 4)),
         "fat0": u(0.02, 0.08), "fat_abd": u(0, 1.2), "m0": u(0.045, 0.07), "s_dome": s_dome, "s_apex": s_apex,
         "dome_left": u(0.03, 0.12), "s_mid": u(0.6, 2.1), "vb": (u(0.09, 0.12), u(0.075, 0.095)),
         "h_vert": u(0.13, 0.17), "s_vert0": u(0, 1), "rib0": s_apex + u(0.05, 0.15), "rib_gap": u(0.13, 0.17),
         "rib_drop": u(0.45, 0.65), "rib_r": (u(0.014, 0.02), u(0.02, 0.028)), "rib_side": u(-0.04, 0.04),
         "n_ribs": int(rng.integers(10, 13)), "med_w": u(0.07, 0.12), "contrast": rng.random() < 0.75,
         "blood": u(0.58, 0.7), "liver": u(0.5, 0.58), "lung": u(0.06, 0.1), "fatness": u(0.45, 1.0),
         "s_arch": s_apex + u(0.35, 0.5), "s_bif": s_dome + u(1.0, 1.4), "r_aorta": u(0.045, 0.065)}
    if not p["contrast"]:
        p["blood"] = u(0.44, 0.48)
    lat = a0 * 0.85
    blobs = {"heart": _blob(rng, (0.12, -0.15, s_dome - 0.2), (0.3 * lat, 0.26, 0.3), lobes=1),
             "liver": _blob(rng, (-0.42 * lat, -0.02, s_dome + 0.35), (0.5 * lat, 0.6 * p["b0"], 0.6), lobes=3),
             "spleen": _blob(rng, (0.55 * lat, 0.22, s_dome + 0.35), (0.12, 0.24, 0.28), jitter=0.25),
             "stomach": _blob(rng, (0.3 * lat, -0.22, s_dome + 0.35), (0.2, 0.16, 0.3), jitter=0.25, lobe_amp=0.1)}
    for name, side in (("kidney_r", -1), ("kidney_l", 1)):
        if rng.random() < 0.95:
            s_k = s_dome + u(0.5, 0.8) + (0.08 if side < 0 else 0.0)
            blobs[name] = _blob(rng, (side * 0.36 * lat, 0.26, s_k), (0.1, 0.15, 0.26), jitter=0.15)
            blobs[name].angle = side * u(0.3, 0.7)
    if rng.random() < 0.7:
        blobs["gallbladder"] = _blob(rng, (-0.25 * lat, -0.25, s_dome + 0.6), (0.07, 0.11, 0.15), jitter=0.2)
    heart = blobs["heart"]
    blobs["lv"] = _blob(rng, heart.centre + (0.08, 0.02, 0.03), heart.axes * (0.45, 0.5, 0.6), jitter=0.05, lobes=0)
    blobs["rv"] = _blob(rng, heart.centre + (-0.1, -0.06, 0.0), heart.axes * (0.45, 0.4, 0.55), jitter=0.05, lobes=0)
    for name in ("lv", "rv"):
        blobs[name].angle, blobs[name].twist, blobs[name].drift = heart.angle, heart.twist, heart.drift
    bowel = []
    for _ in range(rng.integers(50, 90)):
        centre = (u(-0.55, 0.55) * lat, u(-0.45, 0.1), s_dome + u(0.6, 2.2))
        long = rng.random() < 0.3
        axes = (u(0.05, 0.12), u(0.05, 0.11), u(0.3, 0.6) if long else u(0.06, 0.18))
        bowel.append((_blob(rng, centre, axes, jitter=0.2, lobe_amp=0.12), rng.choice([_AIR, 0.2, 0.40, 0.75])))
    lesions = [(_blob(rng, blobs["liver"].centre + rng.normal(0, 0.15, 3), [u(0.03, 0.08)] * 3, lobes=1),
                u(0.3, 0.4) if rng.random() < 0.7 else p["liver"] + 0.12) for _ in range(rng.integers(0, 4))]
    fan = np.stack(np.meshgrid(np.linspace(-1.3, 1.1, 5), np.linspace(-1.0, 1.0, 4)), -1).reshape(-1, 2)
    roots, directions = [], []
    for side in (-1, 1):
        roots += [(side * (p["med_w"] + 0.08), -0.02, s_dome - u(0.45, 0.6))] * len(fan)
        directions += [(side * u(0.3, 1.0), front, lift) for lift, front in fan]
    directions = np.array(directions) + rng.normal(0, 0.2, (len(roots), 3))
    porta = blobs["liver"].centre + (0.15, 0.05, 0.05)
    anchors = [b.centre for k, b in blobs.items() if k in ("liver", "kidney_r", "kidney_l", "heart", "spleen")]
    dots = np.array([anchors[k] for k in rng.integers(len(anchors), size=rng.integers(2, 9))])
    dots += rng.normal(0, 0.12, dots.shape)
    radii = rng.uniform(0.01, 0.022, (len(dots), 1))
    vessels = {"lung": _tree(rng, roots, directions, rng.uniform(0.2, 0.26, len(roots)), u(0.02, 0.026), 5, 0.6),
               "liver": _tree(rng, [porta] * 3, rng.normal(0, 1, (3, 3)) * (1, 1, 0.7) - (0.8, 0, 0),
                              rng.uniform(0.12, 0.2, 3), u(0.015, 0.022), 3, spread=0.5),
               "dots": np.hstack([dots, dots, radii, radii]), "n_roots": len(roots)}
    if rng.random() < 0.05:
        del blobs["spleen"]  # splenectomy
    return _Anatomy(p, blobs, bowel, lesions, vessels)


def _tubes(an: _Anatomy) -> dict:
    """Airways and mediastinal great vessels as segment lists, rendered slice by slice."""
    p, lung, n_roots = an.p, an.vessels["lung"], an.vessels["n_roots"]
    x_top, y_top = _spine(an, p["s_apex"] - 0.4)
    carina = np.array([0.0, -0.02, lung[0, 2] - 0.08])
    airway = [(np.array([x_top, y_top - 0.28, p["s_apex"] - 0.6]), carina, 0.05, 0.045)]
    for start, end, radius in zip(lung[:n_roots, :3], lung[:n_roots, 3:6], lung[:n_roots, 6]):
        hilum = start + (0, 0.04, 0)
        airway += [(carina, hilum, 0.035, 0.03), (hilum, end + (0, 0.04, 0), 0.7 * radius, 0.5 * radius)]
    heart = an.blobs["heart"].centre
    x_d, y_d = _spine(an, p["s_arch"])
    top = np.array([0.0, -0.1, p["s_arch"]])
    descending = np.array([x_d + 0.1, y_d - p["vb"][1] - p["r_aorta"], p["s_arch"]])
    trunk = heart + (0.02, -0.05, -0.35)
    vessels = [(heart + (-0.03, 0.0, -0.15), top, p["r_aorta"] * 1.1, p["r_aorta"]),
               (top, descending, p["r_aorta"], p["r_aorta"]),
               (heart + (0.08, -0.1, -0.1), trunk, 0.05, 0.05),
               (np.array([-0.12, -0.06, p["s_apex"] - 0.2]), heart + (-0.2, 0.0, -0.1), 0.04, 0.04)]
    vessels += [(trunk, start, 0.035, 0.03) for start in lung[:n_roots:10, :3]]
    return {"airway": _pack(airway), "wall": _pack(airway) + np.r_[np.zeros(6), 0.01, 0.01], "vessels": _pack(vessels)}


def _pack(segments) -> np.ndarray:
    return np.array([np.r_[p0, p1, r0, r1] for p0, p1, r0, r1 in segments]).reshape(-1, 8)


def _organs(img, an, s, xs, width, tex, clip, overlay_liver) -> None:
    """Abdominal organs below the diaphragm, clipped by ``clip`` (cavity x below dome)."""
    p, (fine, medium, coarse), contrast = an.p, tex, an.p["contrast"]
    for blob, content in [(an.blobs["stomach"], -1.0)] + an.bowel:
        hit = blob.sd(xs, s)
        if hit is not None:
            region, sd = hit
            _paint(img, region, 0.48, _step(-sd, width) * clip[region])
            value = content + (0.08 if content == 0.2 else 0.01) * fine[region]  # 0.2: mottled faeces
            if content < 0:  # stomach: gas floats anteriorly (-y) above the fluid level
                value = 0.40 + (_AIR - 0.40) * _step(blob.centre[1] - 0.3 * blob.axes[1] - xs[region[0], None], width)
            _paint(img, region, value, _step(-sd - 0.015, width) * clip[region])
    x_sp, y_vb = _spine(an, s)
    psoas = 0.1 * np.clip((s - p["s_dome"] - 0.5) / 1.0, 0.0, 1.0)
    for side in (-1, 1) if psoas > 0.01 else ():
        region, sd = _ellipse(xs, x_sp + side * (p["vb"][0] + 0.8 * psoas), y_vb, psoas, 0.8 * psoas + 0.01)
        _paint(img, region, _MUSCLE + 0.01 * medium, _step(-sd, width))
    for name, value in (("liver", p["liver"]), ("spleen", p["liver"] - 0.02), ("gallbladder", 0.38),
                        ("kidney_r", 0.66), ("kidney_l", 0.66)):
        hit = an.blobs[name].sd(xs, s) if name in an.blobs else None
        if hit is None:
            continue
        region, sd = hit
        alpha = _step(-sd, width) * clip[region]
        if name.startswith("kidney"):  # cortex, medulla, sinus fat
            for inset, value in ((0.0, 0.66 if contrast else 0.47), (0.025, 0.56 if contrast else 0.45),
                                 (0.06, _FAT + 0.02)):
                _paint(img, region, value + 0.01 * medium, _step(-sd - inset, width) * clip[region])
            continue
        _paint(img, region, value + 0.02 * coarse + 0.012 * medium + 0.008 * fine, alpha)
        if name == "liver":
            _paint(img, region, value + (0.1 if contrast else -0.05), overlay_liver[region] * alpha)
            for blob, lesion_value in an.lesions:
                lesion = blob.sd(xs, s)
                if lesion is not None:
                    _paint(img, lesion[0], lesion_value, _step(-lesion[1], width) * clip[lesion[0]])


def _skeleton(img, an, s, xs, width, tex, geometry) -> None:
    """Spine (vertebral bodies, discs, arches), ribs and sternum."""
    p, fine = an.p, tex[0]
    cx, cy, dx, dy, rho, rc, muscle = geometry
    full = (slice(None), slice(None))
    x_sp, y_vb = _spine(an, s)
    rx, ry = p["vb"]
    h = p["h_vert"]
    frac = ((s - p["s_vert0"]) / h) % 1.0
    bone = float(_step(min(frac, 1 - frac) * h - 0.018, width))
    arch = float(_step(0.32 * h - abs(frac - 0.5) * h, width))
    region, sd = _ellipse(xs, x_sp, y_vb, rx, ry)
    _paint(img, region, 0.5 + (_CORTEX - 0.5) * bone, _step(-sd, width))
    _paint(img, region, 0.5 + (_MARROW - 0.5 + 0.04 * fine) * bone, _step(-sd - 0.012, width))
    y_canal = y_vb + ry + 0.05
    if arch > 0:
        for ex, ey, a, b, ang in ((0, 0, 0.075, 0.07, 0), (0, 0.11, 0.02, 0.065, 0),
                                  (-0.1, -0.015, 0.065, 0.02, -0.35), (0.1, -0.015, 0.065, 0.02, 0.35)):
            region, sd = _ellipse(xs, x_sp + ex, y_canal + ey, a, b, ang)
            _paint(img, region, 0.85, _step(-sd, width) * arch)
    region, sd = _ellipse(xs, x_sp, y_canal, 0.045, 0.04)
    _paint(img, region, 0.38, _step(-sd, width))
    if p["rib0"] - 0.1 < s < p["rib0"] + p["n_ribs"] * p["rib_gap"] + p["rib_drop"] + 0.1:
        psi = np.arccos(np.clip(dy / rho, -1.0, 1.0))  # 0 = posterior
        g = np.clip((psi - 0.35) / 2.35, 0.0, 1.0)
        s_rib = p["rib0"] + p["rib_side"] * np.sign(dx) + p["rib_drop"] * g**1.3
        index = np.round((s - s_rib) / p["rib_gap"])
        ds = s - s_rib - index * p["rib_gap"]
        rr, rz = p["rib_r"]
        sd_rib = rr * (1.0 - np.sqrt(((rho - rc - 0.4 * muscle) / rr) ** 2 + (ds / rz) ** 2))
        end = 2.7 - 0.3 * np.clip(index - 8, 0, None)  # floating ribs are shorter
        extent = _step((psi - 0.35) * rho, width) * _step((end - psi) * rho, width)
        extent *= (index >= 0) & (index < p["n_ribs"])
        cartilage = _step(psi - end + 0.45, 0.15)
        _paint(img, full, _CORTEX + (0.55 - _CORTEX) * cartilage, _step(sd_rib, width) * extent)
        marrow = _MARROW + 0.03 * fine + (0.52 - _MARROW) * cartilage
        _paint(img, full, marrow, _step(sd_rib - 0.006, width) * extent)
    if p["s_apex"] + 0.1 < s < p["s_dome"] + 0.1:
        _, _, r_ant, f_ant, m_ant = _body(an, s, -np.pi / 2)
        region, sd = _ellipse(xs, cx, cy - (r_ant - 0.012 - f_ant - 0.5 * m_ant), 0.07, 0.025)
        _paint(img, region, _CORTEX, _step(-sd, width))
        _paint(img, region, _MARROW, _step(-sd - 0.008, width))


def _render_slice(an, s, xs, width, tex, overlays, tubes) -> np.ndarray:
    p, (fine, medium, coarse) = an.p, tex
    lung_vessels, liver_vessels, dots = overlays
    full = (slice(None), slice(None))
    cx, cy, *_ = _body(an, s, 0.0)
    dx, dy = xs[None, :] - np.float32(cx), xs[:, None] - np.float32(cy)
    rho = np.sqrt(dx * dx + dy * dy) + np.float32(1e-6)
    angles = np.linspace(-np.pi, np.pi, 721)
    theta = np.arctan2(dy, dx)
    radius, fat, muscle = (np.interp(theta, angles, table).astype(np.float32) for table in _body(an, s, angles)[2:])
    inside = (radius - rho).astype(np.float32)
    img = np.zeros_like(inside)
    _paint(img, full, _SKIN, _step(inside, width))
    _paint(img, full, _FAT + 0.01 * fine + 0.01 * coarse, _step(inside - 0.012, width))
    _paint(img, full, _MUSCLE + 0.012 * fine + 0.01 * medium, _step(inside - 0.012 - fat, width))
    cavity_d = inside - 0.012 - fat - muscle
    cavity = _step(cavity_d, width)
    abdomen = float(_step(s - p["s_dome"] - 0.1, 0.5))
    abdomen_bg = _SOFT + (_FAT - _SOFT) * p["fatness"] * (0.6 + 0.4 * coarse) + 0.01 * medium
    _paint(img, full, (0.36 + 0.02 * coarse) * (1 - abdomen) + abdomen_bg * abdomen, cavity)
    ax = np.abs(dx)
    s_dia = p["s_dome"] + p["dome_left"] * _step(dx, 0.2) + 1.5 * ((ax - 0.45 * p["a0"]) ** 2 + (dy + 0.05) ** 2)
    if s > p["s_dome"] - 0.1:
        _organs(img, an, s, xs, width, tex, cavity * _step(s - s_dia - 0.015, width), liver_vessels)
    x_sp, y_vb = _spine(an, s)
    half_width = p["med_w"] * (0.5 + 1.3 * np.exp(-((dy + 0.05) / 0.3) ** 2))  # widest at the hila
    mediastinum = _step(half_width - np.abs(xs[None, :] - x_sp), width)
    heart = an.blobs["heart"].sd(xs, s, pad=0.03)
    if heart is not None:
        np.maximum(mediastinum[heart[0]], _step(-heart[1], width), out=mediastinum[heart[0]])
        _paint(img, heart[0], _FAT + 0.01 * fine, _step(-heart[1], width))
        for name, value in (("heart", 0.5), ("lv", p["blood"]), ("rv", p["blood"] - 0.03)):
            hit = an.blobs[name].sd(xs, s)
            if hit is not None:
                _paint(img, hit[0], value + 0.01 * medium, _step(-hit[1], width) * cavity[hit[0]])
    region, sd = _ellipse(xs, x_sp, y_vb + 0.05, p["vb"][0] + 0.1, p["vb"][1] + 0.12)
    np.maximum(mediastinum[region], _step(-sd, width), out=mediastinum[region])
    if s < p["s_dome"] + 1.5:
        s_top = p["s_apex"] + 1.2 * ((ax - 0.35 * p["a0"]) ** 2 + (dy + 0.1) ** 2)
        lung = _step(cavity_d - 0.012, width) * _step(s_dia - s, width) * _step(s - s_top, width)
        lung *= 1 - mediastinum
        value = p["lung"] + 0.05 * np.clip(dy / 0.5, 0, 1) + 0.012 * medium + 0.008 * fine + 0.01 * coarse
        _paint(img, full, value, lung)
        _paint(img, full, 0.5 + 0.03 * coarse, lung_vessels * lung)
    great = np.zeros((1,) + img.shape, np.float32)
    _render_segments(great, tubes["vessels"], np.array([s]), xs, width)
    r_ao, y_ao = p["r_aorta"], y_vb - p["vb"][1] - p["r_aorta"]
    split = 0.25 * max(s - p["s_bif"], 0.0)
    if s > p["s_arch"]:
        for side in ((-1, 1) if split > 0 else (0,)):
            hit = _ellipse(xs, x_sp + 0.1 + side * split, y_ao, r_ao * (1 - 0.3 * abs(side)), r_ao)
            np.maximum(great[0][hit[0]], _step(-hit[1], width), out=great[0][hit[0]])
    if s > p["s_dome"] - 0.15:
        hit = _ellipse(xs, x_sp - 0.1 - split, y_ao - 0.04, 0.045, 0.04)
        np.maximum(great[0][hit[0]], _step(-hit[1], width), out=great[0][hit[0]])
    _paint(img, full, p["blood"] + 0.01 * medium, great[0] * cavity)
    _skeleton(img, an, s, xs, width, tex, (cx, cy, dx, dy, rho, radius - 0.012 - fat - muscle, muscle))
    airway = np.zeros_like(great)
    _render_segments(airway, tubes["wall"], np.array([s]), xs, width)
    _paint(img, full, 0.45, airway[0] * _step(inside, width))
    airway[:] = 0
    _render_segments(airway, tubes["airway"], np.array([s]), xs, width)
    _paint(img, full, _AIR, airway[0])
    _paint(img, full, 1.0, dots)
    return img


def make_phantom(seed: int, size: int, depth: int | None = None, *, family: str = "torso") -> np.ndarray:
    """Procedural chest/abdomen CT volume, deterministic by ``seed``.

    Parameters
    ----------
    seed : int
        Non-negative seed; ``TRAIN_SEEDS`` for training, ``>= HELDOUT_SEED_START`` for evaluation.
    size : int
        In-plane size H = W (the image spans the unit box [-1, 1]^2, pixel 2 / size).
    depth : int, optional
        Number of axial slices Z (default ``size``); slice spacing equals the pixel size.
    family : str
        ``"torso"`` (this module, the default, unchanged output per seed), ``"head"``
        (:mod:`mbir_batch.phantoms_head`) or ``"extremity"`` (:mod:`mbir_batch.phantoms_extremity`).
        The training mixture of all of them, with augmentations, is
        :func:`mbir_batch.phantoms_mixture.make_training_phantom`.

    Returns
    -------
    np.ndarray
        float32 (Z, H, W) in [0, 1].
    """
    if family != "torso":
        if family == "head":
            from .phantoms_head import make_head_phantom as make
        elif family == "extremity":
            from .phantoms_extremity import make_extremity_phantom as make
        else:
            raise ValueError(f"make_phantom: unknown family {family!r}; expected one of {', '.join(FAMILY_NAMES)}")
        return make(seed, size, depth)
    depth = size if depth is None else depth
    if seed < 0 or size < 8 or depth < 1:
        raise ValueError(f"make_phantom needs seed >= 0, size >= 8, depth >= 1; got {seed}, {size}, {depth}")
    anatomy_seed, texture_seed = np.random.SeedSequence([PHANTOM_VERSION, seed]).spawn(2)
    an = _sample_anatomy(np.random.default_rng(anatomy_seed))
    pixel = 2.0 / size
    width = 1.5 * pixel
    xs = ((np.arange(size) + 0.5) * pixel - 1.0).astype(np.float32)
    s_coords = an.p["s_mid"] + (np.arange(depth) - (depth - 1) / 2) * pixel
    shape = (depth, size, size)
    rng = np.random.default_rng(texture_seed)
    tex = [_smooth_noise(rng, shape, cell) for cell in (1.0, 4.0, max(size / 6, 2.0))]
    overlays = [np.zeros(shape, np.float32) for _ in range(3)]
    for alpha, key in zip(overlays, ("lung", "liver", "dots")):
        _render_segments(alpha, an.vessels[key], s_coords, xs, width)
    tubes = _tubes(an)
    volume = np.empty(shape, np.float32)
    for k, s in enumerate(s_coords):
        volume[k] = _render_slice(an, float(s), xs, width, [t[k] for t in tex], [o[k] for o in overlays], tubes)
    return np.clip(volume, 0.0, 1.0, out=volume)
