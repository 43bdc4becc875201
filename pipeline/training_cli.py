"""Between ``mbir-batch train`` and the trainers: option checks, training data, the held-out report.

:func:`prepare_training` checks every option before any work and turns a bad one into a one-line
:class:`~mbir_batch.errors.UserError` that names the option and its valid values, reads the
user's volumes, and returns the run for the caller to start. Objectives: ``edm``
(:func:`mbir_batch.train.train_denoiser`, the project's model format) and ``ddpm``
(:func:`mbir_batch.train_ddpm.train_ddpm`, a diffusers directory). It draws nothing: progress goes
to a callback (the CLI draws the bar, :mod:`mbir_batch.cli.train`). Imports only numpy at module
level.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
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
        from .dataset import open_dataset
        from .output import open_output

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


OBJECTIVES = ("edm", "ddpm")
PHANTOM_SETS = ("torso", "mixture")


def parse_channels(channels: str) -> tuple[int, ...]:
    """``"32,64,128,128"`` -> (32, 64, 128, 128); anything else is a :class:`ConfigError` naming --channels."""
    try:
        widths = tuple(int(c) for c in channels.split(","))
    except ValueError:
        raise ConfigError(f"--channels: expected comma-separated integers, got {channels!r}") from None
    if not widths or min(widths) < 1:
        raise ConfigError(f"--channels: expected positive integers, got {channels!r}")
    return widths


def architecture(resolution: int, channels: str, *, layers_per_block: int | None = None,
                 norm_groups: int | None = None) -> Any:
    """The :class:`DenoiserConfig` of the options, or a one-line :class:`ConfigError` naming the option.

    The UNet halves the slice once per level below the first, so ``--resolution`` must be a
    positive multiple of 2**(levels - 1) (8 for the default 4 levels); the message lists valid values.
    """
    from .kernels.denoiser import DenoiserConfig
    from .train import BUNDLED_CONFIG

    widths = parse_channels(channels)
    factor = 2 ** (len(widths) - 1)
    if resolution < factor or resolution % factor:
        below = max(factor, resolution // factor * factor)
        near = sorted({below, below + factor} if resolution > factor else {factor, 2 * factor})
        raise ConfigError(f"--resolution {resolution}: must be a positive multiple of {factor} with --channels "
                          f"{','.join(map(str, widths))} ({len(widths)} levels, one halving each); "
                          f"the nearest valid values are {near[0]} and {near[1]}")
    try:
        return DenoiserConfig(resolution=resolution, channels=widths,
                              layers_per_block=layers_per_block or BUNDLED_CONFIG.layers_per_block,
                              sigma_min=BUNDLED_CONFIG.sigma_min, sigma_max=BUNDLED_CONFIG.sigma_max,
                              sigma_data=BUNDLED_CONFIG.sigma_data,
                              norm_groups=norm_groups or min(BUNDLED_CONFIG.norm_groups, widths[0]))
    except ValueError as err:
        raise ConfigError(f"--channels {channels}: {str(err).removeprefix('DenoiserConfig: ')}") from None


def phantom_maker(name: str) -> Callable[[int, int], Any]:
    """The phantom factory of ``--phantom-set``: ``torso`` (:func:`mbir_batch.phantoms.make_phantom`) or
    ``mixture`` (:func:`mbir_batch.phantoms_mixture.make_training_phantom`: families and augmentations)."""
    if name == "torso":
        from .phantoms import make_phantom

        return make_phantom
    if name == "mixture":
        from .phantoms_mixture import make_training_phantom

        return make_training_phantom
    raise ConfigError(f"--phantom-set {name!r}: expected one of {', '.join(PHANTOM_SETS)}")


def check_objective(objective: str, init_from: Path | None) -> None:
    """Reject an unknown ``--objective`` and an ``--init-from`` that is not a model file."""
    if objective not in OBJECTIVES:
        raise ConfigError(f"--objective {objective!r}: expected one of {', '.join(OBJECTIVES)}")
    if init_from is not None:
        from .kernels.denoiser import DenoiserLoadError, read_model_card

        try:
            read_model_card(init_from)
        except DenoiserLoadError as err:
            raise ConfigError(f"--init-from: {err}") from None


def prepare_training(*, out: Path, resolution: int, steps: int, batch: int, lr: float, channels: str,
                     volumes: list[Path], phantoms: bool, checkpoint_every: int, max_minutes: float | None,
                     device: str, threads: int | None, command: str, objective: str = "edm",
                     phantom_set: str = "torso", init_from: Path | None = None, export_every: int | None = None,
                     layers_per_block: int | None = None, norm_groups: int | None = None, warmup: int = 200,
                     ema: float = 0.999, phantoms_per_pool: int = 8, refresh_every: int = 500, workers: int = 0,
                     bf16: bool = False, seed: int = 0, checkpoint: Path | None = None, resume: bool = True,
                     first_seed: int = 0, log_every: int = 10) -> Callable[..., Any]:
    """Check every option and read the user's volumes; return the training run, not yet started.

    The returned callable takes ``progress=`` (``progress(step, loss, steps_per_s)``, called every
    ``log_every`` steps) and returns the trainer's result. ``objective`` ``edm`` writes
    ``OUT.safetensors`` + ``OUT.json``; ``ddpm`` writes the diffusers directory ``OUT/``. Both
    checkpoint to ``OUT.ckpt.pt`` (or ``checkpoint``) and resume from it unless ``resume`` is
    False. Phantom seeds run from ``first_seed`` to the end of the training range;
    ``phantoms_per_pool`` phantoms (none with ``phantoms=False``) and the volumes make each pool.

    Raises
    ------
    UserError
        A bad option (one line naming it and its valid values), or a volume that cannot be read.
    """
    import torch

    from .train import TRAIN_SEEDS

    config = architecture(resolution, channels, layers_per_block=layers_per_block, norm_groups=norm_groups)
    check_objective(objective, init_from)
    make = phantom_maker(phantom_set)
    if not 0 <= first_seed < TRAIN_SEEDS.stop:
        raise ConfigError(f"--first-seed {first_seed}: training seeds are 0..{TRAIN_SEEDS.stop - 1}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: no CUDA device is visible to torch {torch.__version__}")
    if not phantoms and not volumes:
        raise ConfigError("--no-phantoms needs at least one --volume to train on")
    arrays = [load_training_volume(path) for path in volumes]
    for path, array in zip(volumes, arrays):
        if min(array.shape[1:]) < resolution:
            raise UserError(f"{path}: slices {array.shape[1:]} are smaller than --resolution {resolution}")
    return functools.partial(
        _trainer(objective), config, out=out, steps=steps, batch=batch, lr=lr, warmup=warmup, ema=ema, volumes=arrays,
        phantoms_per_pool=phantoms_per_pool if phantoms else 0, refresh_every=refresh_every,
        checkpoint_every=checkpoint_every, export_every=export_every, device=device, threads=threads, bf16=bf16,
        workers=workers, max_minutes=max_minutes, resume=resume, seed=seed, checkpoint_path=checkpoint,
        init_from=init_from, seeds=range(first_seed, TRAIN_SEEDS.stop), make=make, report_every=log_every,
        command=command)


def written_model(objective: str, result: Any) -> Path:
    """What a training run wrote: the diffusers directory (ddpm) or the model card (edm)."""
    return result.out if objective == "ddpm" else result.json_path


def _trainer(objective: str) -> Callable[..., Any]:
    if objective == "ddpm":
        from .train_ddpm import train_ddpm

        return train_ddpm
    from .train import train_denoiser

    return train_denoiser


def heldout_lines(objective: str, result: Any, device: str) -> list[str]:
    """Held-out (seeds >= 9000) denoising MSE of the exported model against the identity, one line per level."""
    if objective == "ddpm":
        from diffusers import UNet2DModel

        from .train_ddpm import heldout_ddpm_mse

        unet = UNet2DModel.from_pretrained(result.out).to(device)
        return [f"held-out t {t:4d} (sigma {sigma:.3f}): MSE denoised {mse_d:.2e}  identity {mse_n:.2e}  "
                f"gain {10 * math.log10(mse_n / mse_d):+.1f} dB"
                for t, (sigma, mse_d, mse_n) in heldout_ddpm_mse(unet).items()]
    from .kernels.denoiser import load_denoiser
    from .train import heldout_denoising_mse

    model = load_denoiser(result.json_path, device=device)
    return [f"held-out sigma {sigma:.2f}: MSE denoised {mse_d:.2e}  noisy {mse_n:.2e}  "
            f"gain {10 * math.log10(mse_n / mse_d):+.1f} dB"
            for sigma, (mse_d, mse_n) in heldout_denoising_mse(model).items()]
