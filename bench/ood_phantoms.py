"""Out-of-distribution phantom families: volumes the priors are never trained on (issue 13, item 6).

Two families, each with its own seed stream, unlike every training family
(:mod:`mbir_batch.phantoms_mixture`: torso, head, extremity) in shape and in texture:

``ellipsoids`` (for tuning adaptation)
    A 3D Shepp-Logan-like volume: a shell and 8-20 arbitrarily rotated ellipsoids whose
    intensities *add* where they overlap, each with its own linear intensity ramp, sharp
    (one-pixel) edges, no anatomy and no texture.
``brain`` (for reporting only; never tune on it)
    A T1-weighted-looking head: scalp, a dark skull with bright marrow, subarachnoid CSF, and
    a *folded* cortex: the grey-matter ribbon is the band 0 <= S < T of the level set
    S = d + A F, where d is the depth inside the brain's ellipsoid, F a smooth random field and
    A the folding depth, so sulci filled with CSF cut into the brain and white matter (brighter
    than grey, as in T1) fills the gyri; deep grey nuclei, ventricles, and a cerebellum with a
    finer folding. The training head family has no folding and CT contrast (white darker than grey).

Both return float32 (Z, H, W) in [0, 1], like :func:`mbir_batch.phantoms.make_phantom`, with
``depth`` defaulting to ``size`` and slice spacing equal to the pixel size. Nothing here comes
from an atlas or a template (those are kept for independent evaluation).

``python bench/ood_phantoms.py --png runs/families.png`` draws the mid-slices (axial, coronal,
sagittal) of every training family and of both OOD families, to look at.
"""
from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import numpy as np
from mbir_batch.phantom_shapes import _smooth_noise, _step

OOD_VERSION = 1  # bump whenever the output for a seed changes
_TAGS = {"ellipsoids": 5151, "brain": 6262}


def _grid(size: int, depth: int, s_mid: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """(z, y, x) coordinate arrays broadcastable to (Z, H, W) and the pixel size (image spans [-1, 1])."""
    pixel = 2.0 / size
    xs = ((np.arange(size) + 0.5) * pixel - 1.0).astype(np.float32)
    zs = (s_mid + (np.arange(depth) - (depth - 1) / 2) * pixel).astype(np.float32)
    return zs[:, None, None], xs[None, :, None], xs[None, None, :], pixel


def _ellipsoid_depth(z, y, x, centre, axes, rotation=None) -> np.ndarray:
    """Approximate signed distance inside (positive) an ellipsoid: (1 - f) / |grad f|, f its radial function."""
    p = [x - centre[0], y - centre[1], z - centre[2]]
    if rotation is not None:
        p = [rotation[i, 0] * p[0] + rotation[i, 1] * p[1] + rotation[i, 2] * p[2] for i in range(3)]
    u = [c / a for c, a in zip(p, axes)]
    f = np.sqrt(u[0] ** 2 + u[1] ** 2 + u[2] ** 2) + 1e-6
    grad = np.sqrt(sum((c / a) ** 2 for c, a in zip(u, axes))) / f + 1e-6
    return ((1.0 - f) / grad).astype(np.float32)


def _check(name: str, seed: int, size: int, depth: int | None) -> int:
    depth = size if depth is None else depth
    if seed < 0 or size < 8 or depth < 1:
        raise ValueError(f"{name} needs seed >= 0, size >= 8, depth >= 1; got {seed}, {size}, {depth}")
    return depth


def make_ellipsoid_phantom(seed: int, size: int, depth: int | None = None) -> np.ndarray:
    """OOD family ``ellipsoids``: additive, rotated 3D ellipsoids with linear ramps (see module docstring)."""
    depth = _check("make_ellipsoid_phantom", seed, size, depth)
    rng = np.random.default_rng(np.random.SeedSequence([OOD_VERSION, _TAGS["ellipsoids"], seed]))
    u = rng.uniform
    z, y, x, pixel = _grid(size, depth, u(-0.3, 0.3))
    width = pixel
    outer = (u(0.7, 0.9), u(0.75, 0.95), u(1.2, 2.0))
    shell = u(0.03, 0.07)
    volume = u(0.6, 1.0) * _step(_ellipsoid_depth(z, y, x, (0, 0, 0), outer), width)
    base = u(0.15, 0.45)
    volume += (base - volume.max()) * _step(_ellipsoid_depth(z, y, x, (0, 0, 0), outer) - shell, width)
    for _ in range(int(rng.integers(8, 21))):
        rotation, _ = np.linalg.qr(rng.normal(size=(3, 3)))
        axes = (u(0.04, 0.4), u(0.04, 0.4), u(0.04, 0.6))
        centre = (u(-0.55, 0.55) * outer[0], u(-0.55, 0.55) * outer[1], u(-0.6, 0.6) * outer[2])
        inside = _step(_ellipsoid_depth(z, y, x, centre, axes, rotation), width)
        ramp = rng.normal(0, 0.15, 3)
        value = u(-0.25, 0.35) + ramp[0] * (x - centre[0]) + ramp[1] * (y - centre[1]) + ramp[2] * (z - centre[2])
        volume = volume + value * inside * _step(_ellipsoid_depth(z, y, x, (0, 0, 0), outer) - shell, width)
    return np.clip(volume, 0.0, 1.0).astype(np.float32)


def make_brain_phantom(seed: int, size: int, depth: int | None = None) -> np.ndarray:
    """OOD family ``brain``: a T1-like head with a folded cortex (see module docstring)."""
    depth = _check("make_brain_phantom", seed, size, depth)
    anatomy, texture = np.random.SeedSequence([OOD_VERSION, _TAGS["brain"], seed]).spawn(2)
    rng, trng = np.random.default_rng(anatomy), np.random.default_rng(texture)
    u = rng.uniform
    z, y, x, pixel = _grid(size, depth, u(-0.35, 0.25))
    width = 1.2 * pixel
    shape = (depth, size, size)
    brain_axes = (u(0.58, 0.68), u(0.72, 0.84), u(0.62, 0.74))
    centre = (u(-0.03, 0.03), u(-0.05, 0.03), 0.0)
    d_brain = _ellipsoid_depth(z, y, x, centre, brain_axes)
    skull_gap, skull, scalp = u(0.015, 0.03), u(0.035, 0.06), u(0.03, 0.06)
    t1 = {"scalp": u(0.6, 0.75), "bone": u(0.05, 0.12), "marrow": u(0.5, 0.65), "csf": u(0.1, 0.2),
          "gm": u(0.42, 0.5), "wm": u(0.62, 0.72), "deep": u(0.5, 0.56)}
    volume = t1["scalp"] * _step(d_brain + skull_gap + skull + scalp, width)
    volume += (t1["bone"] - volume) * _step(d_brain + skull_gap + skull, width)
    volume += (t1["marrow"] - volume) * _step(d_brain + skull_gap + 0.7 * skull, width) * _step(
        -(d_brain + skull_gap + 0.3 * skull), width)
    intracranial = _step(d_brain + skull_gap, width)
    volume += (t1["csf"] - volume) * intracranial
    # sulci: thin CSF sheets along the zero set of a smooth random field F, cut in from the surface
    # to a depth; the grey ribbon lines the surface and both sides of every sulcus; white matter inside
    cell = max(0.035 * size, 1.6)
    folding = _smooth_noise(trng, shape, cell)
    slope = np.sqrt(sum(g**2 for g in np.gradient(folding))) + 1e-3
    sheet = np.abs(folding) / slope * pixel          # distance to the sulcal sheet
    depth_s, half_width, ribbon, gap = u(0.13, 0.2), u(0.5, 0.8) * pixel, u(0.04, 0.06), u(0.008, 0.02)
    sulcus = _step(half_width - sheet, width) * _step(depth_s - d_brain, 2 * width)
    grey = np.maximum(_step(gap + ribbon - d_brain, width),
                      _step(half_width + ribbon - sheet, width) * _step(depth_s + ribbon - d_brain, 2 * width))
    brain = intracranial * _step(d_brain - gap, width) * (1 - sulcus)
    volume += (t1["wm"] - volume) * brain
    volume += (t1["gm"] + 0.015 * _smooth_noise(trng, shape, 1.0) - volume) * brain * grey
    cb_centre = (centre[0], centre[1] + 0.5 * brain_axes[1], 0.6 * brain_axes[2])
    d_cb = _ellipsoid_depth(z, y, x, cb_centre, (0.75 * brain_axes[0], 0.3 * brain_axes[1], 0.3 * brain_axes[2]))
    folia = _smooth_noise(trng, shape, max(cell / 2.5, 1.0))
    cerebellum = _step(d_cb + 0.03 * folia, width) * intracranial
    volume += (t1["gm"] - volume) * cerebellum
    volume += (t1["wm"] - volume) * cerebellum * _step(d_cb - 0.08 + 0.03 * folia, width)
    for side in (-1, 1):  # deep grey nuclei, then the ventricles around them
        nucleus = (centre[0] + side * u(0.12, 0.18), centre[1] + u(-0.05, 0.08), u(0.05, 0.15))
        volume += (t1["deep"] - volume) * _step(_ellipsoid_depth(z, y, x, nucleus, (0.09, 0.13, 0.1)), width)
        horn = (centre[0] + side * u(0.05, 0.09), centre[1] + u(-0.1, 0.0), u(-0.15, 0.0))
        rotation, _ = np.linalg.qr(np.eye(3) + rng.normal(0, 0.15, (3, 3)))
        vent = _ellipsoid_depth(z, y, x, horn, (u(0.03, 0.06), u(0.25, 0.35), u(0.06, 0.12)), rotation)
        volume += (t1["csf"] - volume) * _step(vent + 0.015 * folding, width)
    return np.clip(volume, 0.0, 1.0).astype(np.float32)


OOD_FAMILIES: dict[str, Callable[..., np.ndarray]] = {"ellipsoids": make_ellipsoid_phantom,
                                                      "brain": make_brain_phantom}
ROLES = {"ellipsoids": "tune adaptation here", "brain": "report only (never tune on it)"}


def render_families(path: Path, *, size: int = 64, seeds: tuple[int, ...] = (0, 1, 2)) -> Path:
    """PNG of the axial, coronal and sagittal mid-slices of each training and OOD family, ``seeds`` each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from mbir_batch.phantoms import FAMILY_NAMES, make_phantom

    makers = {f"train: {f}": (lambda s, n, f=f: make_phantom(s, n, family=f)) for f in FAMILY_NAMES}
    makers.update({f"OOD: {name}": make for name, make in OOD_FAMILIES.items()})
    fig, axes = plt.subplots(len(makers), 3 * len(seeds), figsize=(1.6 * 3 * len(seeds), 1.8 * len(makers)))
    for row, (label, make) in enumerate(makers.items()):
        for j, seed in enumerate(seeds):
            volume = make(seed, size)
            mid = [volume[volume.shape[0] // 2], volume[:, size // 2], volume[:, :, size // 2]]
            for k, image in enumerate(mid):
                ax = axes[row, 3 * j + k]
                ax.imshow(image, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
                if k == 0:
                    ax.set_title(f"{label} #{seed}", fontsize=7, loc="left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Render the training and out-of-distribution phantom families.")
    p.add_argument("--png", type=Path, required=True, help="output PNG")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds per family")
    args = p.parse_args(argv)
    path = render_families(args.png, size=args.size, seeds=tuple(int(s) for s in args.seeds.split(",")))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
