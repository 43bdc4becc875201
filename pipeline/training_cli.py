"""Glue between the training command lines and the trainers: option checks, sources, progress.

``mbir-batch train`` (typer, :mod:`mbir_batch.cli`) calls :func:`run_training`;
``python -m mbir_batch.train`` (argparse, no typer/rich needed on a bare GPU node) calls
:func:`train_main`. Both check the options before any work and turn bad ones into one-line
:class:`~mbir_batch.errors.UserError` messages that name the option and its valid values.
Objectives: ``edm`` (:func:`mbir_batch.train.train_denoiser`, the project's model format) and
``ddpm`` (:func:`mbir_batch.train_ddpm.train_ddpm`, a diffusers directory).
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Sequence
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


def run_training(*, out: Path, resolution: int, steps: int, batch: int, lr: float, channels: str,
                 volumes: list[Path], phantoms: bool, checkpoint_every: int, max_minutes: float | None,
                 device: str, threads: int | None, console: Any, command: str, objective: str = "edm",
                 phantom_set: str = "torso", init_from: Path | None = None,
                 export_every: int | None = None) -> None:
    """``mbir-batch train``: check every option, then train with a rich progress bar.

    ``objective`` ``edm`` writes ``OUT.safetensors`` + ``OUT.json``; ``ddpm`` writes the
    diffusers directory ``OUT/``. Both checkpoint to ``OUT.ckpt.pt`` and resume from it.
    """
    import torch
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    config = architecture(resolution, channels)
    check_objective(objective, init_from)
    make = phantom_maker(phantom_set)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: no CUDA device is visible to torch {torch.__version__}")
    if not phantoms and not volumes:
        raise ConfigError("--no-phantoms needs at least one --volume to train on")
    arrays = [load_training_volume(path) for path in volumes]
    for path, array in zip(volumes, arrays):
        if min(array.shape[1:]) < resolution:
            raise UserError(f"{path}: slices {array.shape[1:]} are smaller than --resolution {resolution}")
    columns = (TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]:.4f}"),
               TextColumn("{task.fields[rate]:.2f} steps/s"), TimeRemainingColumn())
    with Progress(*columns, console=console) as bar:
        task = bar.add_task("train", total=steps, loss=float("nan"), rate=0.0)

        def progress(step: int, loss: float, rate: float) -> None:
            bar.update(task, completed=step, loss=loss, rate=rate)

        trainer = _trainer(objective)
        result = trainer(config, out=out, steps=steps, batch=batch, lr=lr, volumes=arrays,
                         phantoms_per_pool=8 if phantoms else 0, checkpoint_every=checkpoint_every,
                         device=device, threads=threads, max_minutes=max_minutes, progress=progress,
                         command=command, init_from=init_from, make=make, export_every=export_every)
    written = result.out if objective == "ddpm" else result.json_path
    console.print(f"trained {result.steps} steps in {result.wall_s:.0f} s -> {written}", soft_wrap=True,
                  markup=False, highlight=False)


def _trainer(objective: str) -> Callable[..., Any]:
    if objective == "ddpm":
        from .train_ddpm import train_ddpm

        return train_ddpm
    from .train import train_denoiser

    return train_denoiser


def _parser() -> argparse.ArgumentParser:
    from .train import BUNDLED_CONFIG

    p = argparse.ArgumentParser(prog="python -m mbir_batch.train",
                                description="Train the 2D slice prior (EDM denoiser or DDPM epsilon model).")
    p.add_argument("--out", type=Path, required=True,
                   help="edm: model stem (OUT.safetensors + OUT.json); ddpm: output directory")
    p.add_argument("--objective", choices=OBJECTIVES, default="edm")
    p.add_argument("--phantom-set", choices=PHANTOM_SETS, default="torso",
                   help="torso: the original chest/abdomen family; mixture: families + augmentations")
    p.add_argument("--resolution", type=int, default=BUNDLED_CONFIG.resolution)
    p.add_argument("--channels", default=",".join(map(str, BUNDLED_CONFIG.channels)))
    p.add_argument("--layers-per-block", type=int, default=BUNDLED_CONFIG.layers_per_block)
    p.add_argument("--norm-groups", type=int, default=None, help="GroupNorm groups (default min(32, first width))")
    p.add_argument("--steps", type=int, default=100_000)
    p.add_argument("--max-minutes", type=float, default=None)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--phantoms-per-pool", type=int, default=8)
    p.add_argument("--refresh-every", type=int, default=500)
    p.add_argument("--checkpoint-every", type=int, default=500)
    p.add_argument("--export-every", type=int, default=None,
                   help="also export the EMA model at checkpoints that are multiples of this")
    p.add_argument("--device", default=None, help="default: cuda when visible, else cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--workers", type=int, default=0, help="phantom generator processes")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (CUDA only)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint", type=Path, default=None, help="default: OUT.ckpt.pt")
    p.add_argument("--no-resume", action="store_true")
    p.add_argument("--init-from", type=Path, default=None,
                   help="start from this EDM model (JSON) of the same architecture (ddpm: its UNet weights)")
    p.add_argument("--first-seed", type=int, default=0, help="first phantom seed of the training range")
    p.add_argument("--log-every", type=int, default=100)
    return p


def train_main(argv: Sequence[str] | None = None) -> None:
    """``python -m mbir_batch.train``: train, then print held-out denoising figures.

    A bad option or a checkpoint of another architecture ends in one line on stderr, exit 2.
    """
    from .train import TRAIN_SEEDS

    p = _parser()
    args = p.parse_args(argv)
    try:
        import torch

        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        config = architecture(args.resolution, args.channels, layers_per_block=args.layers_per_block,
                              norm_groups=args.norm_groups)
        check_objective(args.objective, args.init_from)
        if not 0 <= args.first_seed < TRAIN_SEEDS.stop:
            raise ConfigError(f"--first-seed {args.first_seed}: training seeds are 0..{TRAIN_SEEDS.stop - 1}")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise UserError(f"--device {device}: no CUDA device is visible to torch {torch.__version__}")

        def report(step: int, loss: float, rate: float) -> None:
            print(f"step {step:7d}  loss {loss:.5f}  {rate * args.batch:8.1f} slices/s", flush=True)

        result = _trainer(args.objective)(
            config, out=args.out, steps=args.steps, batch=args.batch, lr=args.lr, warmup=args.warmup, ema=args.ema,
            phantoms_per_pool=args.phantoms_per_pool, refresh_every=args.refresh_every,
            checkpoint_every=args.checkpoint_every, export_every=args.export_every, device=device,
            threads=args.threads, bf16=args.bf16, workers=args.workers, max_minutes=args.max_minutes,
            resume=not args.no_resume, seed=args.seed, checkpoint_path=args.checkpoint, init_from=args.init_from,
            seeds=range(args.first_seed, TRAIN_SEEDS.stop), make=phantom_maker(args.phantom_set),
            report_every=args.log_every, progress=report,
            command="python -m mbir_batch.train " + " ".join(sys.argv[1:] if argv is None else argv))
    except UserError as err:
        p.exit(2, f"error: {err}\n")
    _print_heldout(args.objective, result, device)


def _print_heldout(objective: str, result: Any, device: str) -> None:
    """Held-out (seeds >= 9000) denoising MSE of the exported model against the identity."""
    if objective == "ddpm":
        from diffusers import UNet2DModel

        from .train_ddpm import heldout_ddpm_mse

        print(f"trained {result.steps} steps in {result.wall_s:.0f} s -> {result.out}", flush=True)
        unet = UNet2DModel.from_pretrained(result.out).to(device)
        for t, (sigma, mse_d, mse_n) in heldout_ddpm_mse(unet).items():
            print(f"held-out t {t:4d} (sigma {sigma:.3f}): MSE denoised {mse_d:.2e}  identity {mse_n:.2e}  "
                  f"gain {10 * math.log10(mse_n / mse_d):+.1f} dB", flush=True)
        return
    from .kernels.denoiser import load_denoiser
    from .train import heldout_denoising_mse

    print(f"trained {result.steps} steps in {result.wall_s:.0f} s -> {result.json_path}", flush=True)
    model = load_denoiser(result.json_path, device=device)
    for sigma, (mse_d, mse_n) in heldout_denoising_mse(model).items():
        print(f"held-out sigma {sigma:.2f}: MSE denoised {mse_d:.2e}  noisy {mse_n:.2e}  "
              f"gain {10 * math.log10(mse_n / mse_d):+.1f} dB", flush=True)
