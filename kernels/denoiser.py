"""The 2D slice denoiser D(x, sigma): a diffusers ``UNet2DModel`` with EDM preconditioning.

Karras, Aittala, Aila, Laine, "Elucidating the Design Space of Diffusion-Based Generative
Models", NeurIPS 2022 (EDM), Table 1 / Eq. (7):

    D(x; sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x; c_noise(sigma))

    c_skip = sd^2 / (s^2 + sd^2)      c_out = s sd / sqrt(s^2 + sd^2)
    c_in   = 1 / sqrt(s^2 + sd^2)     c_noise = log(s) / 4

Spaces. Callers work in *image space*: x in [0, 1], sigma the std of additive Gaussian
noise on that scale, and every sigma in :class:`DenoiserConfig` is in image space. The
network sees the centred copy u = 2x - 1 with noise level 2 sigma and data std 2 sigma_data
(EDM's defaults are for data in [-1, 1]); its output is mapped back by x0 = (u0 + 1) / 2.
The preconditioning coefficients depend only on sigma / sigma_data and so are the same in
both spaces; only c_noise = log(2 sigma) / 4 carries the factor.

Files. A model is ``<stem>.safetensors`` (float32 weights of :class:`Denoiser`) plus
``<stem>.json`` (architecture, sigma range, weights sha256, and how it was trained).
Loading is strict: any missing, mismatched or corrupted piece raises
:class:`DenoiserLoadError` naming the file; there is never a silent fallback to random weights.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import UNet2DModel
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .model_card import (
    FORMAT,
    FORMAT_VERSION,
    DenoiserLoadError,
    JsonRecord,
    card_paths,
    card_weights,
    file_sha256,
    one_line,
    read_model_card,
)
from .model_paths import BUNDLED_MODEL_NAME, bundled_model_path  # noqa: F401  (light, no torch)


@dataclass(frozen=True)
class DenoiserConfig(JsonRecord):
    """Architecture and noise range of a :class:`Denoiser` (all sigmas in [0, 1] image space).

    Parameters
    ----------
    resolution : int
        Slice size H = W the network is trained for; must divide by 2**(len(channels) - 1).
    channels : tuple of int
        ``block_out_channels`` of the UNet, one entry per resolution level.
    layers_per_block : int
        ResNet blocks per level.
    attention_levels : tuple of bool or None
        Self-attention per level; ``None`` means only at the lowest resolution (attention at
        high resolution is very slow on CPU). The mid block has attention iff the lowest level does.
    sigma_min, sigma_max : float
        The noise range the model is meant to be sampled over (sampler defaults).
    sigma_data : float
        EDM's data standard deviation, image space (0.25 here = EDM's 0.5 on [-1, 1]).
    norm_groups : int
        GroupNorm groups; must divide every entry of ``channels``.
    attention_head_dim : int
        Channels per attention head.
    """

    resolution: int = 64
    channels: tuple[int, ...] = (32, 64, 128, 128)
    layers_per_block: int = 2
    attention_levels: tuple[bool, ...] | None = None
    sigma_min: float = 0.005
    sigma_max: float = 10.0
    sigma_data: float = 0.25
    norm_groups: int = 32
    attention_head_dim: int = 8

    def __post_init__(self) -> None:
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        levels = len(self.channels)
        if self.attention_levels is None:
            object.__setattr__(self, "attention_levels", (False,) * (levels - 1) + (True,))
        else:
            object.__setattr__(self, "attention_levels", tuple(bool(a) for a in self.attention_levels))
        if levels < 1 or len(self.attention_levels) != levels:
            raise ValueError(f"DenoiserConfig: attention_levels has {len(self.attention_levels)} "
                             f"entries, channels has {levels}")
        if self.resolution % (2 ** (levels - 1)) != 0:
            raise ValueError(f"DenoiserConfig: resolution {self.resolution} is not divisible by "
                             f"2**{levels - 1} (one halving per level)")
        bad = [c for c in self.channels if c % self.norm_groups]
        if bad:
            raise ValueError(f"DenoiserConfig: channels {bad} not divisible by norm_groups {self.norm_groups}")
        bad = [c for c, a in zip(self.channels, self.attention_levels) if a and c % self.attention_head_dim]
        if bad:
            raise ValueError(f"DenoiserConfig: attention channels {bad} not divisible by "
                             f"attention_head_dim {self.attention_head_dim}")
        if not 0 < self.sigma_min < self.sigma_max or self.sigma_data <= 0:
            raise ValueError("DenoiserConfig: need 0 < sigma_min < sigma_max and sigma_data > 0")


class Denoiser(nn.Module):
    """EDM-preconditioned UNet: ``forward(x, sigma) -> x0`` on (B, 1, H, W) image-space slices.

    Symbols: x = noisy slice, sigma = noise std (scalar or (B,)), F = ``self.unet``.
    """

    def __init__(self, config: DenoiserConfig) -> None:
        super().__init__()
        self.config = config
        ch, att = config.channels, config.attention_levels
        self.unet = UNet2DModel(
            sample_size=config.resolution, in_channels=1, out_channels=1,
            block_out_channels=ch, layers_per_block=config.layers_per_block,
            down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in att),
            up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(att)),
            norm_num_groups=config.norm_groups, attention_head_dim=config.attention_head_dim,
            add_attention=att[-1], time_embedding_type="positional",
        )

    def forward(self, x: Tensor, sigma: Tensor | float) -> Tensor:
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1)
        sigma = sigma.expand(x.shape[0]).clamp_min(1e-8)
        s = (2.0 * sigma).view(-1, 1, 1, 1)             # network-space noise level
        sd = 2.0 * self.config.sigma_data
        c_skip = sd**2 / (s**2 + sd**2)
        c_out = s * sd / (s**2 + sd**2).sqrt()
        c_in = 1.0 / (s**2 + sd**2).sqrt()
        c_noise = s.log().flatten() / 4.0
        u = 2.0 * x - 1.0
        f = self.unet((c_in * u).to(x.dtype), c_noise, return_dict=False)[0]
        u0 = c_skip * u + c_out * f.float()
        return (u0 + 1.0) / 2.0


def write_weights(module: nn.Module, weights_path: Path, metadata: dict[str, str]) -> dict[str, Tensor]:
    """Write ``module``'s state_dict as float32 safetensors, atomically (a temp file, then a rename)
    and readable as the umask allows; returns the tensors written."""
    weights_path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().float().cpu().contiguous() for k, v in module.state_dict().items()}
    tmp = weights_path.with_name(weights_path.name + ".tmp")
    save_file(state, str(tmp), metadata=metadata)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # safetensors creates 0600 files; a model (package data) must be readable
    os.replace(tmp, weights_path)
    return state


def write_card(json_path: Path, text: str) -> None:
    """Write a model card's JSON text atomically (a temp file, then a rename)."""
    tmp = json_path.with_name(json_path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, json_path)


def read_weights(json_path: Path, doc: dict[str, Any], *,
                 error: type[DenoiserLoadError] = DenoiserLoadError) -> tuple[Path, dict[str, Tensor]]:
    """(path, tensors) of the safetensors file the card ``doc`` names, checked by
    :func:`~.model_card.card_weights`; an unreadable file raises ``error`` naming it."""
    weights_path = card_weights(json_path, doc, error=error)
    try:
        return weights_path, load_file(str(weights_path))
    except Exception as err:  # safetensors raises its own error types for bad headers
        raise error(f"{weights_path}: cannot read safetensors ({one_line(err)[:200]})") from err


def save_denoiser(model: Denoiser, path_stem: Path | str, meta: dict[str, Any]) -> tuple[Path, Path]:
    """Write ``<stem>.safetensors`` (float32) and ``<stem>.json``; both written atomically.

    ``meta`` describes the training run (data, command, steps, wall time, machine) and is
    stored under ``"training"``. Returns the (json, safetensors) paths.
    """
    json_path, weights_path = card_paths(path_stem)
    state = write_weights(model, weights_path, {"format": FORMAT})
    cfg = model.config
    doc = {
        "format": FORMAT, "version": FORMAT_VERSION, "config": cfg.to_dict(),
        "resolution": cfg.resolution, "sigma_range": [cfg.sigma_min, cfg.sigma_max],
        "image_space": "[0, 1]; network input 2x-1 (noise level 2 sigma)",
        "weights": weights_path.name, "weights_sha256": file_sha256(weights_path),
        "parameters": sum(int(v.numel()) for v in state.values()), "training": meta,
    }
    write_card(json_path, json.dumps(doc, indent=2, default=str) + "\n")
    return json_path, weights_path


def load_denoiser(path: Path | str, device: str | torch.device = "cpu", *,
                  expect: DenoiserConfig | None = None) -> Denoiser:
    """Load a saved denoiser strictly, in eval mode on ``device``.

    ``path`` is the stem, the ``.json`` or the ``.safetensors``. Raises
    :class:`DenoiserLoadError` (message names the file) when a file is missing or corrupted,
    the weights' checksum, keys or shapes do not match the recorded architecture, or the
    architecture differs from ``expect``.
    """
    json_path = card_paths(path)[0]
    doc = read_model_card(json_path)
    try:
        config = DenoiserConfig.from_dict(doc["config"])
    except (KeyError, TypeError, ValueError) as err:
        raise DenoiserLoadError(f"{json_path}: invalid architecture config ({err})") from err
    if expect is not None and expect != config:
        diff = {k: (v, getattr(config, k)) for k, v in expect.to_dict().items()
                if v != config.to_dict()[k]}
        raise DenoiserLoadError(f"{json_path}: architecture mismatch (expected, found): {diff}")
    weights_path, state = read_weights(json_path, doc)
    model = Denoiser(config)
    want = model.state_dict()
    missing, unexpected = sorted(set(want) - set(state)), sorted(set(state) - set(want))
    if missing or unexpected:
        raise DenoiserLoadError(f"{weights_path}: key mismatch with the architecture in "
                                f"{json_path.name}: missing {missing[:5]} ({len(missing)}), "
                                f"unexpected {unexpected[:5]} ({len(unexpected)})")
    for key, value in want.items():
        if tuple(state[key].shape) != tuple(value.shape):
            raise DenoiserLoadError(f"{weights_path}: shape mismatch for {key}: file "
                                    f"{tuple(state[key].shape)}, architecture {tuple(value.shape)}")
    model.load_state_dict(state, strict=True)
    return model.to(device).eval()


@torch.no_grad()
def denoise_slab(model: Denoiser, x: Tensor, sigma: float, *, batch: int = 32, first_slice: int = 0) -> Tensor:
    """Apply D(., sigma) to every axial slice of a slab ``x`` (Z, H, W); returns float32 (Z, H, W).

    Slices go through in batches with no autograd and the model in eval mode (its previous mode
    is restored). On CUDA it uses bf16 autocast and channels_last. Raises ``ValueError`` if the
    slice size differs from the model's resolution.

    Batches are cut at the *global* slice indices that are multiples of ``batch``, where
    ``first_slice`` is the global index of ``x[0]``. Convolutions on CPU are not batch-invariant
    (a slice denoised in a batch of 24 and in a batch of 16 differs by ~1e-7), so a slice must
    meet the same batch companions whatever the slab split: that holds when every slab boundary
    is a multiple of ``batch``.
    """
    res = model.config.resolution
    if x.dim() != 3 or tuple(x.shape[1:]) != (res, res):
        raise ValueError(f"denoise_slab: slab slices are {tuple(x.shape[1:])} but the denoiser was "
                         f"trained at {res}x{res}; use a model of matching resolution")
    if batch < 1 or first_slice < 0:
        raise ValueError(f"denoise_slab: batch must be >= 1 and first_slice >= 0, got {batch}, {first_slice}")
    if not math.isfinite(float(sigma)) or sigma <= 0:
        raise ValueError(f"denoise_slab: sigma must be positive and finite, got {sigma}")
    device = next(model.parameters()).device
    cuda = device.type == "cuda"
    was_training = model.training
    model.eval()
    if cuda:
        model.to(memory_format=torch.channels_last)
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    try:
        depth = x.shape[0]
        z0 = 0
        while z0 < depth:
            z1 = min(depth, ((first_slice + z0) // batch + 1) * batch - first_slice)
            chunk = x[z0:z1].to(device=device, dtype=torch.float32).unsqueeze(1)
            if cuda:
                chunk = chunk.contiguous(memory_format=torch.channels_last)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
                x0 = model(chunk, float(sigma))
            out[z0:z1] = x0.float().squeeze(1).to(x.device)
            z0 = z1
    finally:
        model.train(was_training)
    return out

