"""Image-quality metrics per viewing axis: PSNR and SSIM over axial, coronal and sagittal slices.

DiffusionMBIR (Chung et al., CVPR 2023, Tables 1-3) scores a volume by PSNR and SSIM
averaged over the slices of each orthogonal plane, because a 2D prior applied to
axial slices can look good axially and still be incoherent across slices; the
coronal and sagittal scores expose that. This module follows that protocol.
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

PSNR_CAP_DB = 100.0
AXES = {"axial": 0, "coronal": 1, "sagittal": 2}
SSIM_MIN_SIDE = 3
"""The smallest slice side SSIM is computed on (its window is odd, at most 7, at least 3)."""


def _slice_psnr(reference: np.ndarray, image: np.ndarray, data_range: float) -> float:
    """PSNR = 10 log10(data_range^2 / MSE), capped at ``PSNR_CAP_DB`` (an exact match gives the cap)."""
    if np.array_equal(reference, image):
        return PSNR_CAP_DB
    return min(PSNR_CAP_DB, float(peak_signal_noise_ratio(reference, image, data_range=data_range)))


def _slice_ssim(reference: np.ndarray, image: np.ndarray, data_range: float) -> float:
    """SSIM (Wang et al. 2004) with skimage's 7x7 window, shrunk to fit small slices."""
    win_size = min(7, *reference.shape)
    win_size -= 1 - win_size % 2  # odd
    if win_size < SSIM_MIN_SIDE:
        raise ValueError(f"SSIM needs slices of at least 3x3 pixels, got {reference.shape}")
    return float(structural_similarity(reference, image, data_range=data_range, win_size=win_size))


def psnr_ssim_per_axis(reference, volume, *, block: int = 32) -> dict[str, dict[str, float]]:
    """Mean PSNR and SSIM over the slices of each orthogonal plane.

    Parameters
    ----------
    reference, volume : np.ndarray
        (Z, H, W) ground truth and reconstruction: numpy or zarr arrays (read ``block``
        slices at a time). Axial slices are ``volume[z]``,
        coronal ``volume[:, y, :]`` and sagittal ``volume[:, :, x]``.

    Returns
    -------
    dict
        ``{"axial" | "coronal" | "sagittal": {"psnr": dB, "ssim": float}}``, each the mean
        over that plane's slices. The data range of both metrics is
        ``reference.max() - reference.min()`` of the whole reference volume (1.0 when the
        reference is constant), so every slice is scored on the same scale. A slice that
        matches exactly has an infinite PSNR; it counts as ``PSNR_CAP_DB`` (100 dB) instead,
        and every slice PSNR is capped there, so the mean is always finite.

        SSIM uses skimage's 7x7 window, shrunk to the largest odd size that fits a slice of
        3 to 6 pixels. A plane whose slices are thinner than 3 pixels (the coronal and sagittal
        planes of a volume of 1 or 2 slices) has no SSIM: its ``"ssim"`` is ``None`` and
        ``"ssim_skipped"`` says why. PSNR is defined for any slice size.

        Slices whose *reference* is constant (coronal and sagittal edge slices that hold only
        air: about 20 of 64 coronal slices of a 64^3 phantom) are left out of the means. They
        hold no structure, and a method that clamps to [0, 1] reproduces them exactly and
        would collect the 100 dB cap for each, which would inflate its coronal and sagittal
        scores against methods that do not clamp. If every slice of a plane is constant, all
        of them are scored.
    """
    shape = tuple(reference.shape)
    if len(shape) != 3 or shape != tuple(volume.shape):
        raise ValueError(f"reference and volume must be (Z, H, W) of one shape, got {shape} "
                         f"and {tuple(volume.shape)}")
    # Both may be zarr arrays: read them in blocks of slices, so scoring a volume larger than
    # memory holds at most two blocks at a time.
    lo, hi = np.inf, -np.inf
    for z0 in range(0, shape[0], block):
        ref = np.asarray(reference[z0:z0 + block])
        lo, hi = min(lo, float(ref.min())), max(hi, float(ref.max()))
        if not np.isfinite(np.asarray(volume[z0:z0 + block])).all():
            raise ValueError("volume holds NaN or infinite values")
    data_range = (hi - lo) or 1.0
    scores: dict[str, dict[str, float]] = {}
    for name, axis in AXES.items():
        plane = tuple(n for a, n in enumerate(shape) if a != axis)
        with_ssim = min(plane) >= SSIM_MIN_SIDE
        psnr, ssim, varying = [], [], []
        for k0 in range(0, shape[axis], block):
            index = [slice(None)] * 3
            index[axis] = slice(k0, k0 + block)
            ref_block = np.asarray(reference[tuple(index)], dtype=np.float64)
            vol_block = np.asarray(volume[tuple(index)], dtype=np.float64)
            for k in range(ref_block.shape[axis]):
                r, v = np.take(ref_block, k, axis=axis), np.take(vol_block, k, axis=axis)
                psnr.append(_slice_psnr(r, v, data_range))
                if with_ssim:
                    ssim.append(_slice_ssim(r, v, data_range))
                varying.append(bool(np.ptp(r) > 0))
        keep = np.asarray(varying) if any(varying) else np.ones(len(varying), dtype=bool)
        scores[name] = {"psnr": float(np.mean(np.asarray(psnr)[keep]))}
        if with_ssim:
            scores[name]["ssim"] = float(np.mean(np.asarray(ssim)[keep]))
        else:
            scores[name].update(ssim=None, ssim_skipped=f"SSIM needs slices of at least {SSIM_MIN_SIDE}x"
                                f"{SSIM_MIN_SIDE} pixels; {name} slices are {plane[0]}x{plane[1]}")
    return scores


def format_metrics_table(rows: Mapping[str, Mapping[str, Mapping[str, float]]]) -> str:
    """Markdown table: one row per method, PSNR (dB) and SSIM for each axis.

    Parameters
    ----------
    rows : mapping
        ``{method name: psnr_ssim_per_axis(...) result}``, in display order. A skipped SSIM
        (``None``) is shown as ``n/a``.
    """
    header = ["method"] + [f"PSNR {a} (dB)" for a in AXES] + [f"SSIM {a}" for a in AXES]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method, scores in rows.items():
        cells = [f"{scores[a]['psnr']:.2f}" for a in AXES] + [_ssim_cell(scores[a].get("ssim")) for a in AXES]
        lines.append("| " + " | ".join([method] + cells) + " |")
    return "\n".join(lines)


def _ssim_cell(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def axis_scores(scores: Mapping[str, Mapping[str, float | None]]) -> tuple[str, str]:
    """PSNR and SSIM of the three axes as short text, e.g. ``("28.1/33.0/30.2", "0.812/n/a/n/a")``.

    The order is axial/coronal/sagittal; a skipped SSIM (``None``) is ``n/a``.
    """
    psnr = "/".join(f"{scores[a]['psnr']:.1f}" for a in AXES)
    ssim = "/".join("n/a" if scores[a].get("ssim") is None else f"{scores[a]['ssim']:.3f}" for a in AXES)
    return psnr, ssim


def scores_line(metrics: Mapping[str, Mapping[str, float | None]] | None) -> str:
    """``", PSNR 28.1/33.0/30.2 dB, SSIM 0.812/0.903/0.855 (axial/coronal/sagittal)"``, or ``""``."""
    if not metrics:
        return ""
    psnr, ssim = axis_scores(metrics)
    return f", PSNR {psnr} dB, SSIM {ssim} ({'/'.join(AXES)})"
