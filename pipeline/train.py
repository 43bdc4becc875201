"""Training the 2D slice denoiser with the EDM objective (Karras et al., NeurIPS 2022, Sec. 5).

Loss, in image space (x in [0, 1]; the network's [-1, 1] space has twice the sigmas):

    L = E_{x, sigma, n} [ lambda(sigma) || D(x + sigma n; sigma) - x ||^2 ],
    lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2,
    ln(2 sigma) ~ N(P_mean, P_std^2),  P_mean = -1.2, P_std = 1.2.

Data are axial slices of procedural phantoms (:mod:`mbir_batch.phantoms`, ``TRAIN_SEEDS``)
and/or of caller-supplied volumes in [0, 1], with dihedral flips/rotations and a mild
intensity jitter. The slice pool is rebuilt from new phantom seeds every ``refresh_every``
steps (the next pool is generated in worker processes while the current one trains).
The exported model holds the EMA weights. Checkpoints (``<out>.ckpt.pt``, written atomically)
hold model, EMA, optimizer, step and RNG state, so a killed run resumes where it stopped.
The loop itself (:func:`run_training_loop`) takes the loss as an argument; the DDPM trainer
(:mod:`mbir_batch.train_ddpm`) uses it with its own loss and export.

Run it as ``mbir-batch train`` (:mod:`mbir_batch.cli.train`, every option). This module imports
only torch, numpy, diffusers, safetensors and the phantoms module.
"""
from __future__ import annotations

import copy
import math
import multiprocessing
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

from .kernels.denoiser import Denoiser, DenoiserConfig, denoise_slab, load_denoiser, read_model_card, save_denoiser
from .errors import ConfigError
from .phantoms import HELDOUT_SEED_START, PHANTOM_VERSION, TRAIN_SEEDS, make_phantom

P_MEAN, P_STD = -1.2, 1.2
BUNDLED_CONFIG = DenoiserConfig(resolution=64, channels=(32, 64, 128, 128), layers_per_block=2,
                                sigma_min=0.005, sigma_max=10.0, sigma_data=0.25, norm_groups=32)
Progress = Callable[[int, float, float], None]
PhantomMaker = Callable[[int, int], np.ndarray]


@dataclass
class TrainResult:
    """What :func:`train_denoiser` produced."""

    json_path: Path
    weights_path: Path
    steps: int
    wall_s: float
    loss_curve: list[tuple[int, float]] = field(default_factory=list)


class SlicePool:
    """Pools of (N, R, R) float32 training slices; pool ``k`` is a deterministic function of k.

    Pool k holds the axial slices of ``phantoms_per_pool`` phantoms (seeds taken in turn from
    ``seeds``) plus every slice of the user ``volumes`` (random R x R crops when larger).
    With ``workers > 0`` phantoms are made in a process pool and pool k + 1 is prefetched.
    """

    def __init__(self, *, resolution: int, seeds: Sequence[int], phantoms_per_pool: int,
                 volumes: Sequence[np.ndarray] = (), workers: int = 0, make: PhantomMaker = make_phantom) -> None:
        if not phantoms_per_pool and not volumes:
            raise ValueError("training needs phantoms (phantoms_per_pool > 0) or user volumes")
        for i, vol in enumerate(volumes):
            if vol.ndim != 3 or min(vol.shape[1:]) < resolution:
                raise ValueError(f"volume {i}: shape {vol.shape} is not (Z, H, W) with H, W >= {resolution}")
            if not np.isfinite(vol).all() or vol.min() < -0.1 or vol.max() > 1.1:
                raise ValueError(f"volume {i}: intensities must be finite and scaled to [0, 1]")
        self.resolution, self.seeds, self.per_pool, self.make = resolution, list(seeds), phantoms_per_pool, make
        self.volumes = [np.asarray(v, dtype=np.float32) for v in volumes]
        self._executor = (ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
                          if workers > 0 and phantoms_per_pool else None)
        self._pending: dict[int, list[Future]] = {}
        self.seeds_used: set[int] = set()

    def pool_seeds(self, k: int) -> list[int]:
        return [self.seeds[(k * self.per_pool + j) % len(self.seeds)] for j in range(self.per_pool)]

    def _submit(self, k: int) -> None:
        if self._executor is not None and k not in self._pending:
            self._pending[k] = [self._executor.submit(self.make, s, self.resolution)
                                for s in self.pool_seeds(k)]

    def get(self, k: int) -> np.ndarray:
        """Pool k as an (N, R, R) array; starts making pool k + 1 in the background."""
        self._submit(k)
        futures = self._pending.pop(k, None)
        phantoms = ([f.result() for f in futures] if futures is not None else
                    [self.make(s, self.resolution) for s in self.pool_seeds(k)])
        self.seeds_used.update(self.pool_seeds(k))
        self._submit(k + 1)
        slices = [p[p.reshape(len(p), -1).max(axis=1) > 0.05] for p in phantoms]
        rng = np.random.default_rng([k, 7919])
        r = self.resolution
        for vol in self.volumes:
            ys = rng.integers(0, vol.shape[1] - r + 1, len(vol))
            xs = rng.integers(0, vol.shape[2] - r + 1, len(vol))
            slices.append(np.stack([vol[z, y:y + r, x:x + r] for z, (y, x) in enumerate(zip(ys, xs))]))
        return np.concatenate(slices).astype(np.float32)

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random dihedral transform (flips, transposes = all 90-degree rotations) and mild
    intensity jitter x * U(0.9, 1.1) + U(-0.03, 0.03) of a (B, R, R) batch."""
    b = x.shape[0]
    coins = torch.rand(4, b, 1, 1, generator=gen, device=x.device)
    x = torch.where(coins[0] < 0.5, x.flip(-1), x)
    x = torch.where(coins[1] < 0.5, x.flip(-2), x)
    x = torch.where(coins[2] < 0.5, x.transpose(-1, -2), x)
    scale = 0.9 + 0.2 * coins[3]
    offset = 0.06 * torch.rand(b, 1, 1, generator=gen, device=x.device) - 0.03
    return x * scale + offset


def edm_loss(model: Denoiser, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """EDM training loss of a (B, 1, R, R) clean batch (see the module docstring)."""
    b = x.shape[0]
    sigma = torch.exp(P_MEAN + P_STD * torch.randn(b, generator=gen, device=x.device)) / 2.0
    noise = torch.randn(x.shape, generator=gen, device=x.device)
    sd = model.config.sigma_data
    weight = ((sigma**2 + sd**2) / (sigma * sd) ** 2).view(-1, 1, 1, 1)
    denoised = model(x + sigma.view(-1, 1, 1, 1) * noise, sigma)
    return (weight * (denoised.float() - x) ** 2).mean()


def machine_description(device: torch.device) -> dict[str, str | int]:
    info: dict[str, str | int] = {"host": platform.node(), "platform": platform.platform(),
                                  "python": platform.python_version(), "torch": torch.__version__,
                                  "cpu_threads": torch.get_num_threads()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def prepare_run(out: Path | str, checkpoint_path: Path | str | None, device: str | torch.device,
                threads: int | None, seed: int) -> tuple[Path, Path, torch.device]:
    """The start every trainer shares: make ``out``'s folder, set CPU ``threads`` and torch's global
    ``seed`` (it fixes the initial weights); returns (out, checkpoint path (default
    ``<out>.ckpt.pt``), device)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    ckpt_path = Path(checkpoint_path) if checkpoint_path else out.with_name(out.name + ".ckpt.pt")
    device = torch.device(device)
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    return out, ckpt_path, device


def _atomic_save(obj: dict, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def check_checkpoint_identity(want: dict, have: dict, path: Path) -> None:
    """Raise :class:`ConfigError` when the checkpoint at ``path`` is of another objective or architecture.

    ``want`` and ``have`` are ``{"objective": ..., "config": {...}}``; the message names the
    differing settings and the two ways out a user has (the CLI has no "ignore" switch).
    """
    if have == want:
        return
    if have.get("objective") != want.get("objective"):
        diff = f"objective {have.get('objective')} (asked for {want.get('objective')})"
    else:
        old, new = have.get("config") or {}, want.get("config") or {}
        diff = ", ".join(f"{k} {old.get(k)} (asked for {new.get(k)})" for k in sorted(set(old) | set(new))
                         if old.get(k) != new.get(k)) or ", ".join(
            f"{k} {have.get(k)} (asked for {want.get(k)})" for k in sorted(set(have) | set(want))
            if have.get(k) != want.get(k))
    raise ConfigError(f"{path}: this checkpoint is of a different architecture or objective: {diff}; "
                      f"to keep it, resume with its settings; otherwise use a new --out, "
                      f"or delete {path} (or pass --no-resume) to start over")


@dataclass
class LoopState:
    """What :func:`run_training_loop` hands back: EMA model, steps done, wall time and loss curve."""

    ema_model: torch.nn.Module
    steps: int
    elapsed_s: float
    curve: list[tuple[int, float]]


def run_training_loop(model: torch.nn.Module, loss_fn: Callable[[torch.nn.Module, torch.Tensor, torch.Generator],
                                                                  torch.Tensor],
                      pool_source: SlicePool, *, identity: dict, ckpt_path: Path, steps: int, batch: int,
                      lr: float, warmup: int, ema: float, refresh_every: int, checkpoint_every: int,
                      device: torch.device, bf16: bool, max_minutes: float | None, resume: bool, seed: int,
                      report_every: int, progress: Progress | None,
                      export: Callable[[LoopState], None], export_every: int | None = None) -> LoopState:
    """Adam + linear warm-up + grad clipping 1 + EMA on ``loss_fn(model, x, gen)``, resumably.

    ``x`` is an augmented (B, 1, R, R) batch of [0, 1] slices drawn from ``pool_source`` (pool
    ``step // refresh_every``). EMA decay is min(ema, (1 + t) / (10 + t)). Every
    ``checkpoint_every`` steps, and at the end, model, EMA, optimizer, step, RNG states and the
    loss curve go atomically to ``ckpt_path`` (tagged with ``identity``: a resume with another
    identity is refused); a checkpoint before ``steps`` at a multiple of ``export_every`` is
    also exported (``export(state)``), and so is the end state. With ``resume`` a checkpoint
    there is continued; the closing pool source is closed in any case.
    """
    ema_model = copy.deepcopy(model).requires_grad_(False).eval()
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, fused=device.type == "cuda")
    gen = torch.Generator(device=device).manual_seed(seed)
    state = LoopState(ema_model, 0, 0.0, [])
    if resume and ckpt_path.is_file():
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=False)
        have = {"objective": "edm", **ckpt.get("identity", {"config": ckpt.get("config")})}
        check_checkpoint_identity(identity, have, ckpt_path)
        model.load_state_dict(ckpt["model"])
        ema_model.load_state_dict(ckpt["ema"])
        optimizer.load_state_dict(ckpt["optimizer"])
        gen.set_state(ckpt["generator"].cpu())
        torch.set_rng_state(ckpt["torch_rng"].cpu())
        state.steps, state.elapsed_s, state.curve = ckpt["step"], ckpt["elapsed_s"], [tuple(p) for p in ckpt["curve"]]

    def checkpoint() -> None:
        for buf_ema, buf in zip(ema_model.buffers(), model.buffers()):
            buf_ema.copy_(buf)
        _atomic_save({"identity": identity, "config": identity.get("config"), "model": model.state_dict(),
                      "ema": ema_model.state_dict(), "optimizer": optimizer.state_dict(),
                      "generator": gen.get_state(), "torch_rng": torch.get_rng_state(), "step": state.steps,
                      "elapsed_s": state.elapsed_s, "curve": state.curve}, ckpt_path)
        if export_every and state.steps % export_every == 0 and state.steps < steps:
            export(state)

    use_bf16 = bf16 and device.type == "cuda"
    pool_index, pool = -1, None
    budget_s = math.inf if max_minutes is None else 60.0 * max_minutes
    t_start, t_report, loss_sum, n_sum = time.monotonic() - state.elapsed_s, time.monotonic(), None, 0
    ema_params, model_params = list(ema_model.parameters()), list(model.parameters())
    model.train()
    try:
        while state.steps < steps and time.monotonic() - t_start < budget_s:
            step = state.steps
            if step // refresh_every != pool_index:
                pool_index = step // refresh_every
                pool = torch.from_numpy(pool_source.get(pool_index)).to(device)
            idx = torch.randint(len(pool), (batch,), generator=gen, device=device)
            x = augment(pool[idx], gen).unsqueeze(1)
            if device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            for group in optimizer.param_groups:
                group["lr"] = lr * min(1.0, (step + 1) / max(1, warmup))
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_bf16):
                loss = loss_fn(model, x, gen)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            decay = min(ema, (1 + step) / (10 + step))
            with torch.no_grad():
                torch._foreach_lerp_(ema_params, model_params, 1.0 - decay)
            state.steps = step = step + 1
            loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
            n_sum += 1
            if step % report_every == 0 or step == steps:
                mean_loss = float(loss_sum) / n_sum
                if not math.isfinite(mean_loss):
                    raise FloatingPointError(f"training loss became {mean_loss} at step {step}")
                now = time.monotonic()
                state.curve.append((step, mean_loss))
                if progress is not None:
                    progress(step, mean_loss, n_sum / max(now - t_report, 1e-9))
                t_report, loss_sum, n_sum = now, None, 0
            state.elapsed_s = time.monotonic() - t_start
            if step % checkpoint_every == 0:
                checkpoint()
    finally:
        pool_source.close()
    state.elapsed_s = time.monotonic() - t_start
    if state.steps % checkpoint_every or not state.steps:
        checkpoint()
    export(state)
    return state


def data_card(pool_source: SlicePool, resolution: int, volumes: Sequence[np.ndarray]) -> dict:
    """The ``data`` entry of a model card: phantom family, version, seeds used, user volumes, augmentation."""
    used = sorted(pool_source.seeds_used)
    make = pool_source.make
    phantoms = {"module": make.__module__, "version": getattr(make, "version", PHANTOM_VERSION),
                "size": resolution, "count": len(used), "seeds": f"{used[0]}..{used[-1]}" if used else "none"}
    if make is not make_phantom:
        phantoms["function"] = make.__name__
    return {"phantoms": phantoms,
            "user_volumes": [list(v.shape) for v in volumes],
            "augmentation": "dihedral flips/transposes, x*U(0.9,1.1)+U(-0.03,0.03)"
                            + getattr(pool_source.make, "augmentation", "")}


def train_denoiser(config: DenoiserConfig, *, out: Path | str, steps: int, batch: int = 32,
                   lr: float = 2e-4, seeds: Sequence[int] = TRAIN_SEEDS, phantoms_per_pool: int = 8,
                   volumes: Sequence[np.ndarray] = (), refresh_every: int = 500, ema: float = 0.999,
                   warmup: int = 200, checkpoint_every: int = 500, device: str | torch.device = "cpu",
                   threads: int | None = None, bf16: bool = False, workers: int = 0,
                   max_minutes: float | None = None, resume: bool = True, seed: int = 0,
                   report_every: int = 10, progress: Progress | None = None,
                   command: str | None = None, checkpoint_path: Path | str | None = None,
                   init_from: Path | str | None = None, make: PhantomMaker = make_phantom,
                   export_every: int | None = None) -> TrainResult:
    """Train a :class:`Denoiser` with the EDM loss and export its EMA weights to ``out``.

    Parameters
    ----------
    config : DenoiserConfig
        Architecture and sigma range of the model.
    out : path
        Model stem: writes ``<out>.safetensors`` and ``<out>.json``.
    checkpoint_path : path, optional
        Training checkpoint (default ``<out>.ckpt.pt``), resumed from when ``resume``.
    steps, batch, lr, warmup : training length, batch size, Adam learning rate, linear warm-up.
    seeds, phantoms_per_pool, refresh_every : phantom seeds (taken in turn), phantoms per pool
        and steps between pool refreshes. ``phantoms_per_pool=0`` trains on ``volumes`` only.
    make : ``make(seed, size) -> (Z, H, W)`` phantom factory (default the torso family;
        :func:`mbir_batch.phantoms_mixture.make_training_phantom` for the mixture).
    volumes : (Z, H, W) arrays in [0, 1], H, W >= resolution (cropped at random).
    ema : EMA decay (with the warm-up min(ema, (1 + t) / (10 + t))).
    device, threads, bf16, workers : torch device, CPU threads, bf16 autocast (CUDA only),
        phantom worker processes (0: made in this process).
    max_minutes : wall budget; training stops at ``steps`` or the budget, whichever comes first.
    progress : called as ``progress(step, loss, steps_per_s)`` every ``report_every`` steps.
    command : recorded in the model's JSON (default: ``sys.argv``).
    init_from : a saved model (JSON) of the same architecture to fine-tune from (strictly
        loaded; ignored when resuming from a checkpoint). Its training record is kept in the
        new model's JSON under ``finetuned_from``.
    export_every : also export the EMA model at every checkpoint whose step is a multiple of
        this (so a long run can be evaluated while it trains); default only at the end.
    """
    out, ckpt_path, device = prepare_run(out, checkpoint_path, device, threads, seed)
    if device.type == "cuda":  # TF32 matmuls/convolutions and cuDNN autotuning
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = torch.backends.cudnn.benchmark = True
    model = Denoiser(config).to(device)
    finetuned_from = None
    if init_from is not None:
        finetuned_from = {"model": str(init_from), "training": read_model_card(init_from).get("training")}
        if not (resume and ckpt_path.is_file()):
            model.load_state_dict(load_denoiser(init_from, device=device, expect=config).state_dict())
    pool_source = SlicePool(resolution=config.resolution, seeds=seeds, phantoms_per_pool=phantoms_per_pool,
                            volumes=volumes, workers=workers, make=make)
    started = datetime.now(UTC).isoformat(timespec="seconds")

    def export(state: LoopState) -> None:
        meta = {
            "data": data_card(pool_source, config.resolution, volumes),
            "objective": {"loss": "EDM", "P_mean": P_MEAN, "P_std": P_STD, "space": "network [-1,1]"},
            "command": command if command is not None else " ".join(sys.argv),
            "steps": state.steps, "batch": batch, "lr": lr, "ema": ema, "warmup": warmup,
            "bf16": bf16 and device.type == "cuda", "wall_time_s": round(state.elapsed_s, 1),
            "device": str(device), "machine": machine_description(device),
            "final_loss": state.curve[-1][1] if state.curve else None,
            "loss_curve": state.curve[:: max(1, len(state.curve) // 100)],
            "created": datetime.now(UTC).isoformat(timespec="seconds"), "started": started,
        }
        if finetuned_from is not None:
            meta["finetuned_from"] = finetuned_from
        paths.append(save_denoiser(state.ema_model, out, meta))

    paths: list[tuple[Path, Path]] = []
    state = run_training_loop(
        model, edm_loss, pool_source, identity={"objective": "edm", "config": config.to_dict()},
        ckpt_path=ckpt_path, steps=steps, batch=batch, lr=lr, warmup=warmup, ema=ema,
        refresh_every=refresh_every, checkpoint_every=checkpoint_every, device=device, bf16=bf16,
        max_minutes=max_minutes, resume=resume, seed=seed, report_every=report_every, progress=progress,
        export=export, export_every=export_every)
    return TrainResult(*paths[-1], state.steps, state.elapsed_s, state.curve)


@torch.no_grad()
def heldout_denoising_mse(model: Denoiser, *, sigmas: Sequence[float] = (0.05, 0.1, 0.2, 0.4),
                          seeds: Sequence[int] = (HELDOUT_SEED_START, HELDOUT_SEED_START + 1),
                          seed: int = 0) -> dict[float, tuple[float, float]]:
    """{sigma: (MSE(D(x + sigma n), x), MSE(x + sigma n, x))} on held-out phantom slices."""
    r = model.config.resolution
    clean = torch.from_numpy(np.concatenate([make_phantom(s, r) for s in seeds]))
    gen = torch.Generator().manual_seed(seed)
    result = {}
    for sigma in sigmas:
        noisy = clean + sigma * torch.randn(clean.shape, generator=gen)
        denoised = denoise_slab(model, noisy.to(next(model.parameters()).device), sigma).cpu()
        result[float(sigma)] = (float(((denoised - clean) ** 2).mean()), float(((noisy - clean) ** 2).mean()))
    return result
