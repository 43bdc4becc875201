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

Run as ``python -m mbir_batch.train --help``. Imports only torch, numpy, diffusers,
safetensors and the phantoms module (usable on a bare GPU node).
"""
from __future__ import annotations

import argparse
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

from .kernels.denoiser import (
    Denoiser,
    DenoiserConfig,
    denoise_slab,
    load_denoiser,
    read_model_card,
    save_denoiser,
)
from .phantoms import HELDOUT_SEED_START, PHANTOM_VERSION, TRAIN_SEEDS, make_phantom

P_MEAN, P_STD = -1.2, 1.2
BUNDLED_CONFIG = DenoiserConfig(resolution=64, channels=(32, 64, 128, 128), layers_per_block=2,
                                sigma_min=0.005, sigma_max=10.0, sigma_data=0.25, norm_groups=32)
Progress = Callable[[int, float, float], None]


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
                 volumes: Sequence[np.ndarray] = (), workers: int = 0) -> None:
        if not phantoms_per_pool and not volumes:
            raise ValueError("training needs phantoms (phantoms_per_pool > 0) or user volumes")
        for i, vol in enumerate(volumes):
            if vol.ndim != 3 or min(vol.shape[1:]) < resolution:
                raise ValueError(f"volume {i}: shape {vol.shape} is not (Z, H, W) with H, W >= {resolution}")
            if not np.isfinite(vol).all() or vol.min() < -0.1 or vol.max() > 1.1:
                raise ValueError(f"volume {i}: intensities must be finite and scaled to [0, 1]")
        self.resolution, self.seeds, self.per_pool = resolution, list(seeds), phantoms_per_pool
        self.volumes = [np.asarray(v, dtype=np.float32) for v in volumes]
        self._executor = (ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
                          if workers > 0 and phantoms_per_pool else None)
        self._pending: dict[int, list[Future]] = {}
        self.seeds_used: set[int] = set()

    def pool_seeds(self, k: int) -> list[int]:
        return [self.seeds[(k * self.per_pool + j) % len(self.seeds)] for j in range(self.per_pool)]

    def _submit(self, k: int) -> None:
        if self._executor is not None and k not in self._pending:
            self._pending[k] = [self._executor.submit(make_phantom, s, self.resolution)
                                for s in self.pool_seeds(k)]

    def get(self, k: int) -> np.ndarray:
        """Pool k as an (N, R, R) array; starts making pool k + 1 in the background."""
        self._submit(k)
        futures = self._pending.pop(k, None)
        phantoms = ([f.result() for f in futures] if futures is not None else
                    [make_phantom(s, self.resolution) for s in self.pool_seeds(k)])
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


def _atomic_save(obj: dict, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def train_denoiser(config: DenoiserConfig, *, out: Path | str, steps: int, batch: int = 32,
                   lr: float = 2e-4, seeds: Sequence[int] = TRAIN_SEEDS, phantoms_per_pool: int = 8,
                   volumes: Sequence[np.ndarray] = (), refresh_every: int = 500, ema: float = 0.999,
                   warmup: int = 200, checkpoint_every: int = 500, device: str | torch.device = "cpu",
                   threads: int | None = None, bf16: bool = False, workers: int = 0,
                   max_minutes: float | None = None, resume: bool = True, seed: int = 0,
                   report_every: int = 10, progress: Progress | None = None,
                   command: str | None = None, checkpoint_path: Path | str | None = None,
                   init_from: Path | str | None = None) -> TrainResult:
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
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    ckpt_path = Path(checkpoint_path) if checkpoint_path else out.with_name(out.name + ".ckpt.pt")
    device = torch.device(device)
    if threads:
        torch.set_num_threads(threads)
    use_bf16 = bf16 and device.type == "cuda"
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(seed)
    model = Denoiser(config).to(device)
    ema_model = copy.deepcopy(model).requires_grad_(False).eval()
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, fused=device.type == "cuda")
    gen = torch.Generator(device=device).manual_seed(seed)
    step, elapsed, curve = 0, 0.0, []
    finetuned_from = None
    if init_from is not None and not (resume and ckpt_path.is_file()):
        start = load_denoiser(init_from, device=device, expect=config)
        model.load_state_dict(start.state_dict())
        ema_model.load_state_dict(start.state_dict())
        finetuned_from = {"model": str(init_from), "training": read_model_card(init_from).get("training")}
    if resume and ckpt_path.is_file():
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=False)
        if ckpt.get("config") != config.to_dict():
            raise ValueError(f"{ckpt_path}: checkpoint is for a different architecture "
                             f"({ckpt.get('config')}); delete it or pass resume=False")
        model.load_state_dict(ckpt["model"])
        ema_model.load_state_dict(ckpt["ema"])
        optimizer.load_state_dict(ckpt["optimizer"])
        gen.set_state(ckpt["generator"].cpu())
        torch.set_rng_state(ckpt["torch_rng"].cpu())
        step, elapsed, curve = ckpt["step"], ckpt["elapsed_s"], [tuple(p) for p in ckpt["curve"]]

    def checkpoint() -> None:
        _atomic_save({"config": config.to_dict(), "model": model.state_dict(), "ema": ema_model.state_dict(),
                      "optimizer": optimizer.state_dict(), "generator": gen.get_state(),
                      "torch_rng": torch.get_rng_state(), "step": step, "elapsed_s": elapsed,
                      "curve": curve}, ckpt_path)

    pool_source = SlicePool(resolution=config.resolution, seeds=seeds, phantoms_per_pool=phantoms_per_pool,
                            volumes=volumes, workers=workers)
    pool_index, pool = -1, None
    budget_s = math.inf if max_minutes is None else 60.0 * max_minutes
    t_start, t_report, loss_sum, n_sum = time.monotonic() - elapsed, time.monotonic(), None, 0
    ema_params, model_params = list(ema_model.parameters()), list(model.parameters())
    model.train()
    try:
        while step < steps and time.monotonic() - t_start < budget_s:
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
                loss = edm_loss(model, x, gen)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            decay = min(ema, (1 + step) / (10 + step))
            with torch.no_grad():
                torch._foreach_lerp_(ema_params, model_params, 1.0 - decay)
            step += 1
            loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
            n_sum += 1
            if step % report_every == 0 or step == steps:
                mean_loss = float(loss_sum) / n_sum
                if not math.isfinite(mean_loss):
                    raise FloatingPointError(f"training loss became {mean_loss} at step {step}")
                now = time.monotonic()
                curve.append((step, mean_loss))
                if progress is not None:
                    progress(step, mean_loss, n_sum / max(now - t_report, 1e-9))
                t_report, loss_sum, n_sum = now, None, 0
            elapsed = time.monotonic() - t_start
            if step % checkpoint_every == 0:
                checkpoint()
    finally:
        pool_source.close()
    elapsed = time.monotonic() - t_start
    checkpoint()
    for buf_ema, buf in zip(ema_model.buffers(), model.buffers()):
        buf_ema.copy_(buf)
    used = sorted(pool_source.seeds_used)
    meta = {
        "data": {"phantoms": {"module": "mbir_batch.phantoms", "version": PHANTOM_VERSION,
                              "size": config.resolution, "count": len(used),
                              "seeds": f"{used[0]}..{used[-1]}" if used else "none"},
                 "user_volumes": [list(v.shape) for v in volumes],
                 "augmentation": "dihedral flips/transposes, x*U(0.9,1.1)+U(-0.03,0.03)"},
        "objective": {"loss": "EDM", "P_mean": P_MEAN, "P_std": P_STD, "space": "network [-1,1]"},
        "command": command if command is not None else " ".join(sys.argv),
        "steps": step, "batch": batch, "lr": lr, "ema": ema, "warmup": warmup, "bf16": use_bf16,
        "wall_time_s": round(elapsed, 1), "device": str(device), "machine": machine_description(device),
        "final_loss": curve[-1][1] if curve else None,
        "loss_curve": curve[:: max(1, len(curve) // 100)],
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    if finetuned_from is not None:
        meta["finetuned_from"] = finetuned_from
    json_path, weights_path = save_denoiser(ema_model.cpu(), out, meta)
    return TrainResult(json_path, weights_path, step, elapsed, curve)


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


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: train a denoiser (defaults: the bundled 64^2 architecture)."""
    p = argparse.ArgumentParser(prog="python -m mbir_batch.train", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True, help="model stem, e.g. pipeline/models/svct-phantom-64")
    p.add_argument("--resolution", type=int, default=BUNDLED_CONFIG.resolution)
    p.add_argument("--channels", default=",".join(map(str, BUNDLED_CONFIG.channels)))
    p.add_argument("--layers-per-block", type=int, default=BUNDLED_CONFIG.layers_per_block)
    p.add_argument("--norm-groups", type=int, default=BUNDLED_CONFIG.norm_groups)
    p.add_argument("--steps", type=int, default=100_000)
    p.add_argument("--max-minutes", type=float, default=None)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--phantoms-per-pool", type=int, default=8)
    p.add_argument("--refresh-every", type=int, default=500)
    p.add_argument("--checkpoint-every", type=int, default=500)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--workers", type=int, default=0, help="phantom generator processes")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (CUDA only)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint", type=Path, default=None, help="default: <out>.ckpt.pt")
    p.add_argument("--no-resume", action="store_true")
    p.add_argument("--init-from", type=Path, default=None, help="fine-tune from this model (JSON)")
    p.add_argument("--first-seed", type=int, default=0, help="first phantom seed of the training range")
    p.add_argument("--log-every", type=int, default=100)
    args = p.parse_args(argv)
    channels = tuple(int(c) for c in args.channels.split(","))
    config = DenoiserConfig(resolution=args.resolution, channels=channels, layers_per_block=args.layers_per_block,
                            norm_groups=args.norm_groups, sigma_min=BUNDLED_CONFIG.sigma_min,
                            sigma_max=BUNDLED_CONFIG.sigma_max, sigma_data=BUNDLED_CONFIG.sigma_data)

    def report(step: int, loss: float, rate: float) -> None:
        print(f"step {step:7d}  loss {loss:.5f}  {rate * args.batch:8.0f} slices/s", flush=True)

    result = train_denoiser(
        config, out=args.out, steps=args.steps, batch=args.batch, lr=args.lr, warmup=args.warmup, ema=args.ema,
        phantoms_per_pool=args.phantoms_per_pool, refresh_every=args.refresh_every,
        checkpoint_every=args.checkpoint_every, device=args.device, threads=args.threads, bf16=args.bf16,
        workers=args.workers, max_minutes=args.max_minutes, resume=not args.no_resume, seed=args.seed,
        checkpoint_path=args.checkpoint, init_from=args.init_from, seeds=range(args.first_seed, TRAIN_SEEDS.stop),
        report_every=args.log_every, progress=report,
        command="python -m mbir_batch.train " + " ".join(sys.argv[1:] if argv is None else argv))
    print(f"trained {result.steps} steps in {result.wall_s:.0f} s -> {result.json_path}", flush=True)
    model = load_denoiser(result.json_path, device=args.device)
    for sigma, (mse_d, mse_n) in heldout_denoising_mse(model).items():
        print(f"held-out sigma {sigma:.2f}: MSE denoised {mse_d:.2e}  noisy {mse_n:.2e}  "
              f"gain {10 * math.log10(mse_n / mse_d):+.1f} dB", flush=True)


if __name__ == "__main__":
    main()
