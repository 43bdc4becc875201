"""diffusers model folders (``save_pretrained``): a ``UNet2DModel`` plus its scheduler config.

Accepted layouts (``path`` is the folder):

* flat: ``config.json`` + ``diffusion_pytorch_model.safetensors`` (or ``.bin``) +
  ``scheduler_config.json``, i.e. ``unet.save_pretrained(d)`` and ``scheduler.save_pretrained(d)``;
* pipeline: ``unet/`` and ``scheduler/`` subfolders (``pipeline.save_pretrained(d)``).

``config=`` may name the scheduler config when it is elsewhere.

The scheduler decides the adapter: a VP scheduler (DDPM, DDIM and any diffusers scheduler with
``alphas_cumprod``) gives D around eps / v / x0 prediction (``prediction_type``), keeping the
eps half when ``variance_type`` is learned; ``ScoreSdeVeScheduler`` gives the VE score adapter
(the UNet's Fourier embedding divides its output by sigma, so its output is the score).

Data range: (-1, 1) for VP models (diffusers' DDPM pipelines map samples by x / 2 + 0.5),
(0, 1) for ScoreSdeVe (its pipeline clamps to [0, 1]). A ``mbir_batch_training.json`` card in
the folder (written by ``mbir-batch train --objective ddpm``) may state ``data_range``; an
explicit ``data_range=`` wins over both.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import diffusers
import torch
from diffusers import UNet2DModel
from safetensors.torch import load_file

from .adapters import PREDICTIONS, VEScoreDenoiser, VPDenoiser
from .base import PretrainedDenoiser, PriorConfig, PriorLoadError, check_data_range
from .files import build_strict, one_line, read_json, read_torch_file

__all__ = ["CARD_NAME", "load_diffusers", "unet_from_dict"]

CARD_NAME = "mbir_batch_training.json"
WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


def find_parts(path: Path, config: Any) -> tuple[Path, Path]:
    """(unet folder, scheduler config file) of a diffusers folder."""
    if not path.is_dir():
        raise PriorLoadError(f"{path}: diffusers model folder not found")
    unet_dir = path / "unet" if (path / "unet").is_dir() else path
    if not (unet_dir / "config.json").is_file():
        raise PriorLoadError(f"{path}: not a diffusers model folder (no config.json, no unet/config.json)")
    if config is not None:
        return unet_dir, Path(config)
    for candidate in (path / "scheduler" / "scheduler_config.json", path / "scheduler_config.json",
                      unet_dir / "scheduler_config.json"):
        if candidate.is_file():
            return unet_dir, candidate
    raise PriorLoadError(f"{path}: no scheduler_config.json (scheduler/ or beside config.json); the noise "
                         f"schedule is needed; save the scheduler with save_pretrained or pass config=")


def read_weights(unet_dir: Path) -> tuple[dict[str, Any], Path]:
    """The UNet's state dict from ``diffusion_pytorch_model.safetensors`` (or ``.bin``)."""
    for name in WEIGHTS:
        file = unet_dir / name
        if file.is_file():
            if file.suffix == ".bin":
                return read_torch_file(file), file
            try:
                return load_file(str(file)), file
            except Exception as err:  # safetensors raises its own error types for bad headers
                raise PriorLoadError(f"{file}: cannot read safetensors (truncated or corrupted?): "
                                     f"{one_line(err)[:200]}") from err
    if any(unet_dir.glob("diffusion_pytorch_model*.index.json")):
        raise PriorLoadError(f"{unet_dir}: sharded diffusers weights are not supported; save unsharded")
    raise PriorLoadError(f"{unet_dir}: no {WEIGHTS[0]} or {WEIGHTS[1]}")


def make_scheduler(file: Path) -> Any:
    """The diffusers scheduler object of a ``scheduler_config.json``."""
    doc = read_json(file, "scheduler config")
    name = doc.get("_class_name", "")
    cls = getattr(diffusers, name, None) if str(name).endswith("Scheduler") else None
    if cls is None:
        raise PriorLoadError(f"{file}: unknown scheduler class {name!r}")
    try:
        return cls.from_config(doc)
    except Exception as err:  # diffusers validates its configs with assorted exception types
        raise PriorLoadError(f"{file}: cannot build {name}: {one_line(err)[:200]}") from err


def unet_from_dict(net_config: dict[str, Any]) -> UNet2DModel:
    """A ``UNet2DModel`` (on the current default device) from its config dict."""
    return UNet2DModel.from_config(net_config)


def _resolution(net: UNet2DModel, where: Path) -> int:
    size = net.config.sample_size
    if isinstance(size, list | tuple):
        size = size[0] if len(set(size)) == 1 else None
    if not isinstance(size, int):
        raise PriorLoadError(f"{where}: sample_size {net.config.sample_size!r} is not one square size")
    return size


def _card(path: Path) -> dict[str, Any]:
    card_path = path / CARD_NAME
    return read_json(card_path, "training card") if card_path.is_file() else {}


def load_diffusers(path: Path, *, config: Any = None,
                   data_range: tuple[float, float] | None = None) -> PretrainedDenoiser:
    """A diffusers ``UNet2DModel`` + scheduler folder as D(x, sigma) (see the module docstring)."""
    if isinstance(config, Mapping):
        raise PriorLoadError(f"{path}: for a diffusers folder, config= is the path of a scheduler_config.json")
    unet_dir, scheduler_file = find_parts(path, config)
    unet_cfg = read_json(unet_dir / "config.json", "UNet config")
    if unet_cfg.get("_class_name") != "UNet2DModel":
        raise PriorLoadError(f"{unet_dir / 'config.json'}: model class {unet_cfg.get('_class_name')!r}; "
                             f"only UNet2DModel is supported")
    scheduler = make_scheduler(scheduler_file)
    state, weights_file = read_weights(unet_dir)
    try:
        with torch.device("meta"):
            UNet2DModel.from_config(unet_cfg)
    except Exception as err:  # a config diffusers itself rejects
        raise PriorLoadError(f"{unet_dir / 'config.json'}: cannot build UNet2DModel: {one_line(err)[:200]}") from err
    net = build_strict(weights_file, lambda: UNet2DModel.from_config(unet_cfg), state)
    resolution = _resolution(net, unet_dir / "config.json")
    in_ch, out_ch = int(net.config.in_channels), int(net.config.out_channels)
    if in_ch != 1:
        raise PriorLoadError(f"{unet_dir / 'config.json'}: in_channels is {in_ch}; slices have 1 channel")
    net_config = json.loads(json.dumps(dict(net.config), default=list))
    card = _card(path)
    ve = type(scheduler).__name__ == "ScoreSdeVeScheduler"
    default_range = card.get("data_range", (0.0, 1.0) if ve else (-1.0, 1.0))
    lo, hi = check_data_range(default_range if data_range is None else data_range, str(path))
    weights = str(card.get("weights", "as saved"))
    embedding = net.config.time_embedding_type
    if ve:
        if embedding != "fourier":
            raise PriorLoadError(f"{unet_dir / 'config.json'}: a ScoreSdeVe UNet needs time_embedding_type "
                                 f"'fourier' (sigma-conditioned), got {embedding!r}")
        sc = scheduler.config
        info = PriorConfig(format="diffusers", architecture="diffusers-unet2d", parameterization="ve-score",
                           resolution=resolution, sigma_min=float(sc.sigma_min) / (hi - lo),
                           sigma_max=float(sc.sigma_max) / (hi - lo), data_range=(lo, hi), weights=weights,
                           source=str(path))
        return VEScoreDenoiser(net, info, net_config, sigma_min_model=sc.sigma_min, sigma_max_model=sc.sigma_max,
                               num_scales=sc.num_train_timesteps, diffusers_output=True)
    abar = getattr(scheduler, "alphas_cumprod", None)
    if abar is None:
        raise PriorLoadError(f"{scheduler_file}: {type(scheduler).__name__} has no discrete noise schedule "
                             f"(alphas_cumprod); supported: DDPM/DDIM-style and ScoreSdeVe schedulers")
    prediction = scheduler.config.get("prediction_type", "epsilon")
    if prediction not in PREDICTIONS:
        raise PriorLoadError(f"{scheduler_file}: prediction_type {prediction!r} is not supported "
                             f"(supported: {sorted(PREDICTIONS)})")
    learn_sigma = scheduler.config.get("variance_type") in ("learned", "learned_range")
    if out_ch != (2 if learn_sigma else 1):
        raise PriorLoadError(f"{unet_dir / 'config.json'}: out_channels is {out_ch} but the scheduler's "
                             f"variance_type {scheduler.config.get('variance_type')!r} needs {2 if learn_sigma else 1}")
    if embedding not in ("positional", "learned"):
        raise PriorLoadError(f"{unet_dir / 'config.json'}: time_embedding_type {embedding!r} does not take "
                             f"VP timesteps")
    sig = ((1.0 - abar.double()) / abar.double()).sqrt() / (hi - lo)
    info = PriorConfig(format="diffusers", architecture="diffusers-unet2d", parameterization=PREDICTIONS[prediction],
                       resolution=resolution, sigma_min=float(sig[0]), sigma_max=float(sig[-1]),
                       data_range=(lo, hi), weights=weights, source=str(path))
    clip = float(scheduler.config.get("clip_sample_range", 1.0)) if scheduler.config.get("clip_sample") else None
    return VPDenoiser(net, info, net_config, alphas_cumprod=abar, prediction=prediction, learn_sigma=learn_sigma,
                      integer_timesteps=embedding == "learned", diffusers_output=True, clip_sample=clip)
