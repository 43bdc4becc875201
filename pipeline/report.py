"""``mbir-batch report``: score finished outputs of one dataset, and draw the comparison figure.

`build_report` reads the outputs and their dataset's reference and returns the metrics table
(PSNR/SSIM per axis, :func:`~mbir_batch.metrics.psnr_ssim_per_axis`); rows are labelled with
the method's report label from the registry (:mod:`mbir_batch.methods`).

`make_report_png` draws what a radiologist compares methods on: the three orthogonal mid-planes
at the same grey window, and where each method errs. The figure has one row for the reference
and one per method. Columns are the axial, coronal and sagittal mid-planes, then (when a
reference exists) the absolute error ``|result - reference|`` on the same planes, with one error
colour scale shared by all methods. Each row is labelled with the method name and its PSNR /
SSIM per axis. It takes arrays only; reading stores is `build_report`'s job.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from mbir_batch.errors import UserError
from mbir_batch.metrics import axis_scores, format_metrics_table, psnr_ssim_per_axis

__all__ = ["build_report", "make_report_png", "method_label", "mid_planes"]

PANEL_INCHES = 2.4
HEADER_INCHES = 0.5
PLANES = ("axial", "coronal", "sagittal")


def mid_planes(volume: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Axial ``volume[Z//2]``, coronal ``volume[:, H//2, :]`` and sagittal ``volume[:, :, W//2]``."""
    z, h, w = volume.shape
    return volume[z // 2], volume[:, h // 2, :], volume[:, :, w // 2]


def _label(name: str, scores: Mapping[str, Mapping[str, float]] | None) -> str:
    if scores is None:
        return name
    psnr, ssim = axis_scores(scores)
    return f"{name}\nPSNR {psnr} dB\nSSIM {ssim}\n(ax/cor/sag)"


def make_report_png(reference: np.ndarray | None, results: Mapping[str, np.ndarray], path: str | Path, *,
                    title: str | None = None, window: tuple[float, float] | None = None,
                    voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
                    metrics: Mapping[str, Mapping[str, Mapping[str, float]]] | None = None,
                    dpi: int = 100) -> Path:
    """Write the comparison figure to a PNG.

    Parameters
    ----------
    reference : np.ndarray or None
        (Z, H, W) ground truth. Without it there are no error maps and no scores.
    results : mapping
        ``{method name: (Z, H, W) volume}``, one figure row each, in order.
    path : str or Path
        PNG to write (parent folders are created).
    title : str, optional
        Figure title.
    window : (lo, hi), optional
        Grey window for every image; default the reference's 0.5 / 99.5 percentiles,
        or (0, 1) without a reference.
    voxel_size : (dz, dy, dx)
        Voxel size, used as the display aspect: ``dy/dx`` axial, ``dz/dx`` coronal,
        ``dz/dy`` sagittal.
    metrics : mapping, optional
        Precomputed ``{method: psnr_ssim_per_axis(reference, volume)}``; computed when
        missing and a reference exists.
    dpi : int
        Resolution. The PNG is ``round(n_cols * PANEL_INCHES * dpi)`` pixels wide and
        ``round((n_rows * PANEL_INCHES + HEADER_INCHES) * dpi)`` high, with
        ``n_cols`` 6 with a reference (3 without) and ``n_rows`` the number of methods
        plus one for the reference.

    Returns
    -------
    Path
        The written PNG.
    """
    shapes = {name: np.shape(volume) for name, volume in results.items()}
    if reference is not None:
        shapes = {"reference": np.shape(reference), **shapes}
    if not results or any(len(s) != 3 for s in shapes.values()) or len(set(shapes.values())) != 1:
        raise ValueError(f"make_report_png needs one or more (Z, H, W) volumes of one shape, got {shapes}")
    dz, dy, dx = (float(v) for v in voxel_size)
    aspects = (dy / dx, dz / dx, dz / dy)
    if window is None:
        window = (0.0, 1.0) if reference is None else tuple(np.percentile(reference, (0.5, 99.5)))
    lo, hi = float(window[0]), float(window[1])
    if not hi > lo:
        hi = lo + 1.0
    rows: list[tuple[str, np.ndarray]] = ([("reference", reference)] if reference is not None else [])
    rows += list(results.items())
    scores = dict(metrics or {})
    errors: dict[str, tuple[np.ndarray, ...]] = {}
    if reference is not None:
        for name, volume in results.items():
            if name not in scores:
                scores[name] = psnr_ssim_per_axis(reference, volume)
            errors[name] = tuple(np.abs(r - v) for r, v in zip(mid_planes(volume), mid_planes(reference)))
    error_max = max([float(np.percentile(np.concatenate([e.ravel() for e in planes]), 99.5))
                     for planes in errors.values()] + [1e-6])
    n_cols = 6 if reference is not None else 3
    figure = Figure(figsize=(n_cols * PANEL_INCHES, len(rows) * PANEL_INCHES + HEADER_INCHES), dpi=dpi,
                    layout="constrained")
    axes = figure.subplots(len(rows), n_cols, squeeze=False)
    for row, (name, volume) in enumerate(rows):
        for col, plane in enumerate(mid_planes(np.asarray(volume))):
            grey = axes[row, col].imshow(plane, cmap="gray", vmin=lo, vmax=hi, aspect=aspects[col],
                                         interpolation="nearest")
            if row == 0:
                axes[row, col].set_title(PLANES[col], fontsize=9)
        axes[row, 0].set_ylabel(_label(name, scores.get(name)), fontsize=7)
        for col in range(3, n_cols):
            if name not in errors:
                axes[row, col].set_axis_off()
                continue
            error = axes[row, col].imshow(errors[name][col - 3], cmap="magma", vmin=0.0, vmax=error_max,
                                          aspect=aspects[col - 3], interpolation="nearest")
            axes[0, col].set_title(f"|error| {PLANES[col - 3]}", fontsize=9)
        for ax in axes[row]:
            ax.set_xticks([])
            ax.set_yticks([])
    figure.colorbar(grey, ax=axes[:, :3].ravel().tolist(), shrink=0.6, label=f"window [{lo:.3g}, {hi:.3g}]")
    if errors:
        figure.colorbar(error, ax=axes[:, 3:].ravel().tolist(), shrink=0.6, label="|result - reference|")
    if title:
        figure.suptitle(title, fontsize=11)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=dpi)
    return path


def method_label(path: Path, attrs: Mapping) -> str:
    """The row label of an output: its method's report label (e.g. ``DiffusionMBIR``), else the name."""
    from mbir_batch.methods import METHODS

    method = attrs.get("method") or path.name
    return METHODS[method].label if method in METHODS else str(method)


def build_report(outputs: list[Path], *, png: Path | None = None, reference: Path | None = None,
                 markdown: Path | None = None) -> str:
    """Score complete outputs of one dataset against its reference; return a markdown table.

    The reference comes from ``reference`` or else from the dataset recorded in the first
    output's attrs. All outputs must share its volume shape.
    """
    from mbir_batch.dataset import open_dataset
    from mbir_batch.output import open_output

    volumes: dict[str, np.ndarray] = {}
    input_path = reference
    voxel_size = (1.0, 1.0, 1.0)
    for path in outputs:
        store = open_output(path)
        name = method_label(path, store.attrs)
        if name in volumes:
            name = f"{name} ({path.name})"
        volumes[name] = store.read_volume()
        if input_path is None and store.attrs.get("input"):
            input_path = Path(store.attrs["input"])
    ref = None
    if input_path is not None:
        dataset = open_dataset(input_path)
        voxel_size = tuple(dataset.meta.voxel_size_mm)
        if dataset.has_reference:
            ref = np.asarray(dataset.read_reference(0, dataset.meta.volume_shape[0]))
    for name, volume in volumes.items():
        if ref is not None and volume.shape != ref.shape:
            raise UserError(f"{name}: volume shape {volume.shape} does not match the reference {ref.shape}")
    if ref is None:
        table = "no reference in the dataset: nothing to score\n"
    else:
        table = format_metrics_table({name: psnr_ssim_per_axis(ref, volume) for name, volume in volumes.items()})
    if markdown is not None:
        markdown.write_text(table)
    if png is not None:
        make_report_png(ref, volumes, png, voxel_size=voxel_size)
    return table
