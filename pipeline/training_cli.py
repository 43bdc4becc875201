"""Glue between `mbir-batch train` and :func:`mbir_batch.train.train_denoiser`: sources and a progress bar."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .errors import ConfigError, UserError


def load_training_volume(path: Path) -> np.ndarray:
    """A [0, 1] volume from a dataset's ``reference``, an output's ``volume``, or a NIfTI/TIFF/npy file.

    Files go through the same explicit normalisation as ``mbir-batch import`` (99.5th percentile);
    zarr stores are already in the project's [0, 1] intensity space.
    """
    if path.suffix == ".zarr" or (path / "zarr.json").exists() or (path / ".zgroup").exists():
        from .dataset import open_dataset, open_output

        try:
            store = open_output(path)
            return np.asarray(store.read_volume(), np.float32)
        except UserError:
            dataset = open_dataset(path)
            if not dataset.has_reference:
                raise UserError(f"{path}: neither a complete output nor a dataset with a reference") from None
            return np.asarray(dataset.read_reference(0, dataset.meta.volume_shape[0]), np.float32)
    from .io import choose_normalization
    from .volume_files import read_volume

    volume, _ = read_volume(path)
    in_unit_range = volume.min() >= 0.0 and volume.max() <= 1.0
    return choose_normalization(volume, path, percentile=None if in_unit_range else 99.5).apply(volume)


def run_training(*, out: Path, resolution: int, steps: int, batch: int, lr: float, channels: str,
                 volumes: list[Path], phantoms: bool, checkpoint_every: int, max_minutes: float | None,
                 device: str, threads: int | None, console: Any, command: str) -> None:
    import torch
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from .kernels.denoiser import DenoiserConfig
    from .train import BUNDLED_CONFIG, train_denoiser

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: no CUDA device is visible to torch {torch.__version__}")
    try:
        widths = tuple(int(c) for c in channels.split(","))
    except ValueError:
        raise ConfigError(f"--channels: expected comma-separated integers, got {channels!r}") from None
    if not phantoms and not volumes:
        raise ConfigError("--no-phantoms needs at least one --volume to train on")
    arrays = [load_training_volume(path) for path in volumes]
    for path, array in zip(volumes, arrays):
        if min(array.shape[1:]) < resolution:
            raise UserError(f"{path}: slices {array.shape[1:]} are smaller than --resolution {resolution}")
    config = DenoiserConfig(resolution=resolution, channels=widths, layers_per_block=BUNDLED_CONFIG.layers_per_block,
                            sigma_min=BUNDLED_CONFIG.sigma_min, sigma_max=BUNDLED_CONFIG.sigma_max,
                            sigma_data=BUNDLED_CONFIG.sigma_data, norm_groups=min(BUNDLED_CONFIG.norm_groups, widths[0]))
    columns = (TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]:.4f}"),
               TextColumn("{task.fields[rate]:.2f} steps/s"), TimeRemainingColumn())
    with Progress(*columns, console=console) as bar:
        task = bar.add_task("train", total=steps, loss=float("nan"), rate=0.0)

        def progress(step: int, loss: float, rate: float) -> None:
            bar.update(task, completed=step, loss=loss, rate=rate)

        result = train_denoiser(config, out=out, steps=steps, batch=batch, lr=lr, volumes=arrays,
                                phantoms_per_pool=8 if phantoms else 0, checkpoint_every=checkpoint_every,
                                device=device, threads=threads, max_minutes=max_minutes, progress=progress,
                                command=command)
    console.print(f"trained {result.steps} steps in {result.wall_s:.0f} s -> {result.json_path}")
