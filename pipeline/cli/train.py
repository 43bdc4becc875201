"""``mbir-batch train``: train a 2D slice prior on phantoms and/or your volumes, resumably.

Every training option is here (there is no second training command line); the checks and the
trainers are :func:`mbir_batch.training_cli.prepare_training`'s. This module draws the progress
bar (on a terminal; elsewhere, e.g. into a log file, one line per ``--log-every`` steps) and prints
what was written.
"""
from __future__ import annotations

import sys
from enum import Enum
from pathlib import Path
from typing import Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from mbir_batch.cli.common import console, flag

__all__ = ["train"]


class Objective(str, Enum):
    """``edm``: the project's EDM denoiser; ``ddpm``: a diffusers VP epsilon model (DDPMScheduler recipe)."""

    edm = "edm"
    ddpm = "ddpm"


class PhantomSet(str, Enum):
    """``torso``: the chest/abdomen family; ``mixture``: every family with augmentations."""

    torso = "torso"
    mixture = "mixture"


def train(
    out: Path = typer.Option(..., "--out", help="Model to write: OUT.safetensors + OUT.json (ddpm: a directory)."),
    objective: Objective = typer.Option(Objective.edm, "--objective",
                                        help="edm: the project's EDM denoiser; ddpm: a diffusers VP epsilon model "
                                        "(linear betas, 1000 steps)."),
    phantom_set: PhantomSet = typer.Option(PhantomSet.torso, "--phantom-set",
                                           help="torso: the chest/abdomen family; mixture: families + "
                                           "augmentations."),
    resolution: int = typer.Option(64, "--resolution", help="Slice size the model is trained at."),
    channels: str = typer.Option("32,64,128,128", "--channels", help="UNet block channels, comma-separated."),
    layers_per_block: int = typer.Option(2, "--layers-per-block", help="ResNet blocks per UNet level."),
    norm_groups: Optional[int] = typer.Option(None, "--norm-groups",
                                              help="GroupNorm groups (default: min(32, first width))."),
    steps: int = typer.Option(2000, "--steps", help="Optimiser steps."),
    max_minutes: Optional[float] = typer.Option(None, "--max-minutes", help="Stop after this wall time."),
    batch: int = typer.Option(32, "--batch", help="Slices per batch."),
    lr: float = typer.Option(2e-4, "--lr", help="Learning rate."),
    warmup: int = typer.Option(200, "--warmup", help="Linear learning-rate warm-up steps."),
    ema: float = typer.Option(0.999, "--ema", help="EMA decay of the exported weights."),
    volumes: list[Path] = typer.Option([], "--volume",
                                       help="Also train on a dataset's reference, an output volume or a NIfTI."),
    phantoms: bool = typer.Option(True, "--phantoms/--no-phantoms", help="Train on procedural phantoms."),
    phantoms_per_pool: int = typer.Option(8, "--phantoms-per-pool", help="Phantoms in each slice pool."),
    refresh_every: int = typer.Option(500, "--refresh-every", help="Steps between two slice pools."),
    first_seed: int = typer.Option(0, "--first-seed", help="First phantom seed of the training range."),
    checkpoint_every: int = typer.Option(200, "--checkpoint-every", help="Checkpoint every N steps (resumable)."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="Checkpoint file (default: OUT.ckpt.pt)."),
    resume: bool = typer.Option(True, "--resume/--no-resume", help="Resume from the checkpoint when there is one."),
    export_every: Optional[int] = typer.Option(None, "--export-every",
                                               help="Also export the EMA model at checkpoints that are multiples "
                                               "of N steps."),
    init_from: Optional[Path] = typer.Option(None, "--init-from",
                                             help="Start from this EDM model (.json) of the same architecture "
                                             "(ddpm: its UNet weights)."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
    bf16: bool = flag("--bf16", "bf16 autocast (CUDA only)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads."),
    workers: int = typer.Option(0, "--workers", help="Phantom generator processes (0: in the training process)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the initialisation, noise and augmentation."),
    log_every: int = typer.Option(10, "--log-every", help="Update the progress every N steps."),
    heldout: bool = flag("--heldout", "After training, print the held-out denoising MSE (seeds >= 9000)."),
) -> None:
    """Train the 2D slice prior (EDM denoiser, or DDPM epsilon model) on phantoms and/or volumes; resumable."""
    from mbir_batch.training_cli import heldout_lines, prepare_training, written_model

    start = prepare_training(
        out=out, objective=objective.value, phantom_set=phantom_set.value, resolution=resolution, channels=channels,
        layers_per_block=layers_per_block, norm_groups=norm_groups, steps=steps, max_minutes=max_minutes,
        batch=batch, lr=lr, warmup=warmup, ema=ema, volumes=volumes, phantoms=phantoms,
        phantoms_per_pool=phantoms_per_pool, refresh_every=refresh_every, first_seed=first_seed,
        checkpoint_every=checkpoint_every, checkpoint=checkpoint, resume=resume, export_every=export_every,
        init_from=init_from, device=device, bf16=bf16, threads=threads, workers=workers, seed=seed,
        log_every=log_every, command=" ".join(["mbir-batch", *sys.argv[1:]]))
    columns = (TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
               TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[rate]:.2f} steps/s"),
               TimeRemainingColumn())
    with Progress(*columns, console=console, disable=not console.is_terminal) as bar:
        task = bar.add_task("train", total=steps, loss=float("nan"), rate=0.0)

        def progress(step: int, loss: float, rate: float) -> None:
            bar.update(task, completed=step, loss=loss, rate=rate)
            if not console.is_terminal:  # a log file gets the loss curve line by line
                console.print(f"step {step:7d}  loss {loss:.5f}  {rate * batch:8.1f} slices/s")

        result = start(progress=progress)
    written = written_model(objective.value, result)
    console.print(f"trained {result.steps} steps in {result.wall_s:.0f} s -> {written}", soft_wrap=True)
    if heldout:
        for line in heldout_lines(objective.value, result, device):
            console.print(line)
