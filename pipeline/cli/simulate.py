"""``mbir-batch simulate``: a dataset of simulated measurements of a procedural phantom."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from mbir_batch.cli.common import ACCEL, ARC, NOISE, TASK, VIEWS, Task, console, flag
from mbir_batch.errors import ConfigError

__all__ = ["simulate"]


def simulate(
    out: Path = typer.Option(..., "--out", help="Dataset to write (dataset.zarr)."),
    phantom: int = typer.Option(9001, "--phantom", help="Phantom seed (training uses 0-8999; 9000+ is held out)."),
    size: int = typer.Option(64, "--size", help="Slice size H = W."),
    depth: Optional[int] = typer.Option(None, "--depth", help="Number of slices Z (default: size)."),
    task: Task = TASK,
    views: Optional[int] = VIEWS,
    arc: float = ARC,
    accel: float = ACCEL,
    noise: float = NOISE,
    overwrite: bool = flag("--overwrite", "Replace an existing dataset."),
) -> None:
    """Write a dataset.zarr with simulated measurements of a procedural phantom and its reference."""
    from mbir_batch.dataset import DatasetMeta, create_dataset
    from mbir_batch.io import simulate_measurements
    from mbir_batch.phantoms import make_phantom

    for option, value, least in (("--size", size, 8), ("--depth", depth, 1), ("--phantom", phantom, 0)):
        if value is not None and value < least:
            raise ConfigError(f"{option}: must be >= {least}, got {value}")
    with console.status(f"phantom {phantom} ({depth or size}x{size}x{size})"):
        volume = make_phantom(phantom, size, depth)
    views_default = 8 if task == Task.svct else None
    simulated = simulate_measurements(
        volume, task=task.value, views=views if views is not None else views_default, arc=arc, accel=accel,
        noise=noise, seed=phantom,
    )
    meta = DatasetMeta(
        version=1, modality=simulated.modality, geometry=simulated.geometry, volume_shape=tuple(volume.shape),
        voxel_size_mm=(1.0, 1.0, 1.0), noise_sigma=noise,
        source={"kind": "phantom", "seed": phantom, "task": task.value},
    )
    create_dataset(out, meta, sinogram=simulated.sinogram, kspace=simulated.kspace, mask=simulated.mask,
                   reference=volume, overwrite=overwrite)
    console.print(f"wrote {out} ({simulated.modality}, volume {tuple(volume.shape)})")
