"""``mbir-batch import`` and ``mbir-batch export``: files in, finished reconstructions out.

Both raise `UserError` subclasses for every user mistake; the CLI turns them into
one red ``error:`` line and exit status 2.
"""
from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from mbir_batch.cli.common import ACCEL, ARC, NOISE, TASK, VIEWS, Task, console, err_console, flag
from mbir_batch.errors import ConfigError, one_line

__all__ = ["export", "import_data", "parse_angles"]


class ExportTo(str, Enum):
    """The file formats ``export`` writes."""

    nifti = "nifti"
    tiff = "tiff"
    npy = "npy"


def parse_angles(spec: str) -> list[float]:
    """``"START:STOP:N"`` (N angles uniform over [START, STOP)) or a comma list ``"0,22.5,45"``."""
    try:
        if ":" in spec:
            start, stop, count = spec.split(":")
            count = int(count)
            if count < 1:
                raise ValueError("N must be >= 1")
            return [float(start) + (float(stop) - float(start)) * k / count for k in range(count)]
        return [float(v) for v in spec.split(",") if v.strip()]
    except ValueError as error:
        raise ConfigError(f"--angles-deg: expected START:STOP:N or a comma list of degrees, got {spec!r} "
                          f"({one_line(error)})") from error


def import_data(
    src: Path = typer.Argument(..., help="NIfTI (.nii/.nii.gz), DICOM series folder or .dcm file, TIFF stack, .npy; "
                                         "a sinogram with --sinogram, k-space (.npy/.h5) with --kspace."),
    out: Path = typer.Option(..., "--out", help="Dataset to write (dataset.zarr)."),
    task: Task = TASK,
    views: Optional[int] = VIEWS,
    arc: float = ARC,
    accel: float = ACCEL,
    noise: float = NOISE,
    hu_window: Optional[tuple[float, float]] = typer.Option(None, "--hu-window", help="CT: map [LO, HI] to [0, 1]."),
    percentile: Optional[float] = typer.Option(None, "--percentile", help="MRI: map the P-th percentile to 1."),
    use_max: bool = flag("--max", "Map the maximum to 1."),
    seed: int = typer.Option(0, "--seed", help="Seed of the mask and the noise."),
    sinogram: bool = flag("--sinogram", "SRC is a (Z, views, det) sinogram (.npy/.tiff)."),
    geometry: Optional[Path] = typer.Option(None, "--geometry", help="Sinogram geometry YAML."),
    angles_deg: Optional[str] = typer.Option(None, "--angles-deg", help="Sinogram angles: START:STOP:N or a,b,c."),
    det_spacing: Optional[float] = typer.Option(None, "--det-spacing", help="Detector bin width (pixels)."),
    size: Optional[int] = typer.Option(None, "--size", help="Sinogram import: slice size H = W."),
    kspace: bool = flag("--kspace", "SRC is centred k-space (Z, H, W) (.npy/.h5)."),
    mask: Optional[Path] = typer.Option(None, "--mask", help="k-space sampling mask (.npy)."),
    voxel_size: Optional[tuple[float, float, float]] = typer.Option(None, "--voxel-size",
                                                                      help="Sinogram/k-space: DZ DY DX in mm."),
    chunk_z: int = typer.Option(8, "--chunk-z", help="Slices per Zarr chunk."),
    overwrite: bool = flag("--overwrite", "Replace an existing dataset."),
) -> None:
    """Import a volume (simulating measurements), a measured sinogram or k-space into a dataset.zarr."""
    from mbir_batch import io

    if sinogram and kspace:
        raise ConfigError("--sinogram and --kspace exclude each other")
    if (sinogram or kspace) and (hu_window is not None or percentile is not None or use_max):
        raise ConfigError("--hu-window/--percentile/--max apply to volume imports, not to measurements")
    if chunk_z < 1:
        raise ConfigError(f"--chunk-z: must be >= 1, got {chunk_z}")
    if sinogram:
        io.import_sinogram(src, out, angles_deg=parse_angles(angles_deg) if angles_deg else None,
                           det_spacing=det_spacing, geometry_file=geometry, image_size=size,
                           voxel_size_mm=voxel_size, chunk_z=chunk_z, overwrite=overwrite)
        console.print(f"wrote {out} (CT sinogram from {src})", highlight=False, soft_wrap=True)
        return
    if kspace:
        io.import_kspace(src, out, mask_path=mask, voxel_size_mm=voxel_size or (1.0, 1.0, 1.0), chunk_z=chunk_z,
                         overwrite=overwrite)
        console.print(f"wrote {out} (MRI k-space from {src})", highlight=False, soft_wrap=True)
        return
    with Progress(TextColumn("simulating {task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=err_console, transient=True,
                  disable=not err_console.is_terminal) as progress:
        bar = progress.add_task(task.value, total=None)
        io.import_volume(src, out, task=task.value, views=views, arc=arc, accel=accel, noise=noise,
                         hu_window=hu_window, percentile=percentile, use_max=use_max, seed=seed, chunk_z=chunk_z,
                         overwrite=overwrite,
                         progress=lambda done, total: progress.update(bar, completed=done, total=total))
    console.print(f"wrote {out} ({task.value} from {src})", highlight=False, soft_wrap=True)


def export(
    output: Path = typer.Argument(..., help="A complete output store (OUT.zarr)."),
    to: ExportTo = typer.Option(ExportTo.nifti, "--to", help="File format."),
    dest: Optional[Path] = typer.Option(None, "--dest", help="File to write (default: OUT.nii.gz / .tif / .npy)."),
    overwrite: bool = flag("--overwrite", "Replace an existing file."),
) -> None:
    """Export a reconstruction in the imported file's intensity units, spacing and orientation."""
    from mbir_batch.io import export_volume

    written = export_volume(output, dest, to=to.value, overwrite=overwrite)
    console.print(f"wrote {written}", highlight=False, soft_wrap=True)
