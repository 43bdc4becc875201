"""Training a VP epsilon-prediction model with diffusers' DDPM recipe (Ho et al., NeurIPS 2020).

This is the objective DDS (Chung et al., ICLR 2024) and guided-diffusion train with, not the
project's EDM loss: it exists so that the VP adapter of :mod:`mbir_batch` can be checked on a
model trained the way the papers' checkpoints were.

    x_model = 2 x - 1                     (x: slice in [0, 1]; the model's data range is [-1, 1])
    t ~ U{0, ..., T - 1},  eps ~ N(0, I)
    x_t = sqrt(abar_t) x_model + sqrt(1 - abar_t) eps          (``DDPMScheduler.add_noise``)
    L = E || eps_theta(x_t, t) - eps ||^2                        (Ho et al., Eq. 14, "L_simple")

with T = 1000 and the linear beta schedule beta_t from 1e-4 to 0.02, abar_t = prod_{s<=t} (1 - beta_s).
In image space the noise std of x_t / sqrt(abar_t) is sigma_t = sqrt((1 - abar_t) / abar_t) / 2.

Output: one directory holding ``unet.save_pretrained`` (``config.json`` +
``diffusion_pytorch_model.safetensors``, EMA weights), ``scheduler.save_pretrained``
(``scheduler_config.json``) and :data:`CARD_NAME`, a JSON record of how it was trained.
The data pipeline, EMA, checkpointing and resume are the EDM trainer's
(:func:`mbir_batch.train.run_training_loop`).
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from diffusers import DDPMScheduler, UNet2DModel

from .kernels.denoiser import Denoiser, DenoiserConfig, load_denoiser, read_model_card
from .phantoms import HELDOUT_SEED_START, TRAIN_SEEDS, make_phantom
from .train import (
    LoopState,
    PhantomMaker,
    Progress,
    SlicePool,
    data_card,
    machine_description,
    prepare_run,
    run_training_loop,
)

CARD_NAME = "mbir_batch_training.json"
SCHEDULER = {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02,
             "prediction_type": "epsilon"}


@dataclass
class DDPMTrainResult:
    """What :func:`train_ddpm` produced."""

    out: Path
    steps: int
    wall_s: float
    loss_curve: list[tuple[int, float]] = field(default_factory=list)


def make_scheduler() -> DDPMScheduler:
    """diffusers' DDPM scheduler with DDS's training settings (:data:`SCHEDULER`)."""
    return DDPMScheduler(**SCHEDULER)


def make_unet(config: DenoiserConfig) -> UNet2DModel:
    """The diffusers ``UNet2DModel`` of the project's denoiser architecture ``config`` (no EDM wrapper)."""
    return Denoiser(config).unet


def ddpm_loss(unet: UNet2DModel, x: torch.Tensor, gen: torch.Generator, *,
              scheduler: DDPMScheduler) -> torch.Tensor:
    """L_simple of a (B, 1, R, R) clean batch ``x`` in [0, 1] (see the module docstring)."""
    x_model = 2.0 * x - 1.0
    t = torch.randint(0, scheduler.config.num_train_timesteps, (x.shape[0],), generator=gen, device=x.device)
    eps = torch.randn(x.shape, generator=gen, device=x.device)
    x_t = scheduler.add_noise(x_model, eps, t)
    eps_hat = unet(x_t, t, return_dict=False)[0]
    return ((eps_hat.float() - eps) ** 2).mean()


def _export(unet: UNet2DModel, scheduler: DDPMScheduler, out: Path, card: dict) -> None:
    """Write the model directory to ``out`` atomically (a sibling temp dir, then renames)."""
    tmp, old = out.with_name(out.name + ".tmp"), out.with_name(out.name + ".old")
    for path in (tmp, old):
        shutil.rmtree(path, ignore_errors=True)
    unet.save_pretrained(tmp, safe_serialization=True)
    scheduler.save_pretrained(tmp)
    (tmp / CARD_NAME).write_text(json.dumps(card, indent=2, default=str) + "\n")
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def train_ddpm(config: DenoiserConfig, *, out: Path | str, steps: int, batch: int = 32, lr: float = 2e-4,
               seeds: Sequence[int] = TRAIN_SEEDS, phantoms_per_pool: int = 8, volumes: Sequence[np.ndarray] = (),
               refresh_every: int = 500, ema: float = 0.999, warmup: int = 200, checkpoint_every: int = 500,
               export_every: int | None = None, device: str | torch.device = "cpu", threads: int | None = None,
               bf16: bool = False, workers: int = 0, max_minutes: float | None = None, resume: bool = True,
               seed: int = 0, report_every: int = 10, progress: Progress | None = None,
               command: str | None = None, checkpoint_path: Path | str | None = None,
               init_from: Path | str | None = None, make: PhantomMaker = make_phantom) -> DDPMTrainResult:
    """Train a DDPM epsilon-prediction ``UNet2DModel`` and export its EMA weights to the directory ``out``.

    Parameters are those of :func:`mbir_batch.train.train_denoiser` (data, schedule, EMA,
    checkpointing in ``<out>.ckpt.pt``, resume); ``config`` gives only the UNet architecture
    and resolution (its sigmas are unused). ``init_from`` is a saved EDM denoiser (JSON) of the
    same architecture whose UNet weights initialise this one (a warm start of the network's
    features; the objective here is DDPM all the same). It is recorded in the card.
    ``export_every`` also exports at checkpoints whose step is a multiple of it.
    """
    out, ckpt_path, device = prepare_run(out, checkpoint_path, device, threads, seed)
    unet = make_unet(config).to(device)
    scheduler = make_scheduler()
    warm_start = None
    if init_from is not None:
        warm_start = {"model": str(init_from), "what": "UNet weights of an EDM denoiser of the same architecture; "
                      "its time embedding was trained on c_noise = log(2 sigma) / 4, not on t",
                      "training": read_model_card(init_from).get("training")}
        if not (resume and ckpt_path.is_file()):
            unet.load_state_dict(load_denoiser(init_from, device=device, expect=config).unet.state_dict())
    pool_source = SlicePool(resolution=config.resolution, seeds=seeds, phantoms_per_pool=phantoms_per_pool,
                            volumes=volumes, workers=workers, make=make)
    started = datetime.now(UTC).isoformat(timespec="seconds")

    def export(state: LoopState) -> None:
        card = {
            "format": "diffusers UNet2DModel + DDPMScheduler", "data_range": [-1.0, 1.0],
            "image_space": "x in [0, 1] -> x_model = 2x - 1", "resolution": config.resolution,
            "architecture": config.to_dict(), "weights": "EMA",
            "parameters": sum(p.numel() for p in state.ema_model.parameters()),
            "objective": {"loss": "DDPM L_simple (MSE on epsilon)", **SCHEDULER,
                          "timesteps": "uniform integers 0..999", "noising": "DDPMScheduler.add_noise"},
            "data": data_card(pool_source, config.resolution, volumes),
            "command": command if command is not None else " ".join(sys.argv),
            "steps": state.steps, "batch": batch, "lr": lr, "ema": ema, "warmup": warmup,
            "wall_time_s": round(state.elapsed_s, 1), "device": str(device),
            "machine": machine_description(device), "started": started,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "final_loss": state.curve[-1][1] if state.curve else None,
            "loss_curve": state.curve[:: max(1, len(state.curve) // 100)],
        }
        if warm_start is not None:
            card["warm_start"] = warm_start
        _export(state.ema_model, scheduler, out, card)

    state = run_training_loop(
        unet, lambda model, x, gen: ddpm_loss(model, x, gen, scheduler=scheduler), pool_source,
        identity={"objective": "ddpm", "config": config.to_dict(), "scheduler": SCHEDULER},
        ckpt_path=ckpt_path, steps=steps, batch=batch, lr=lr, warmup=warmup, ema=ema,
        refresh_every=refresh_every, checkpoint_every=checkpoint_every, device=device, bf16=bf16,
        max_minutes=max_minutes, resume=resume, seed=seed, report_every=report_every, progress=progress,
        export=export, export_every=export_every)
    return DDPMTrainResult(out, state.steps, state.elapsed_s, state.curve)


@torch.no_grad()
def heldout_ddpm_mse(unet: UNet2DModel, *, timesteps: Sequence[int] = (50, 150, 300, 500),
                     seeds: Sequence[int] = (HELDOUT_SEED_START, HELDOUT_SEED_START + 1),
                     seed: int = 0) -> dict[int, tuple[float, float, float]]:
    """{t: (sigma_t, MSE(x0_hat, x), MSE(x_t / sqrt(abar_t), x))} in [0, 1] image space.

    x0_hat = (x_t - sqrt(1 - abar_t) eps_theta) / sqrt(abar_t) is the model's denoised
    estimate; the last entry is the identity estimate (the rescaled noisy input), so
    x0_hat beats the identity when the second entry is the smaller.
    """
    r = unet.config.sample_size
    clean = torch.from_numpy(np.concatenate([make_phantom(s, r) for s in seeds])).unsqueeze(1)
    abar = make_scheduler().alphas_cumprod
    device = next(unet.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    was_training = unet.training
    unet.eval()
    result = {}
    for t in timesteps:
        a = float(abar[t])
        eps = torch.randn(clean.shape, generator=gen)
        x_t = a**0.5 * (2 * clean - 1) + (1 - a) ** 0.5 * eps
        eps_hat = torch.cat([unet(chunk.to(device), torch.full((len(chunk),), t, device=device)).sample.cpu()
                             for chunk in x_t.split(32)])
        x0 = ((x_t - (1 - a) ** 0.5 * eps_hat) / a**0.5 + 1) / 2
        identity = (x_t / a**0.5 + 1) / 2
        result[int(t)] = (((1 - a) / a) ** 0.5 / 2, float(((x0 - clean) ** 2).mean()),
                          float(((identity - clean) ** 2).mean()))
    unet.train(was_training)
    return result
