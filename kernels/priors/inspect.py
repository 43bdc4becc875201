"""What a model file is (``mbir-batch model inspect``) and its conversion to the own format
(``mbir-batch model convert``).

Both load the model through :func:`~mbir_batch.kernels.priors.load_denoiser`, so what inspect
reports is what a reconstruction would use, and a file inspect accepts is loadable.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..model_card import JsonRecord
from . import load_denoiser
from .adapters import EDMDenoiser, VEScoreDenoiser, VPDenoiser
from .base import PretrainedDenoiser
from .files import sha256_file
from .load_diffusers import WEIGHTS
from .load_own import own_paths, save_own

__all__ = ["ModelReport", "convert_model", "inspect_model"]


@dataclass(frozen=True)
class ModelReport(JsonRecord):
    """The facts ``model inspect`` prints (sigmas in image space)."""

    path: str
    format: str
    architecture: str
    parameterization: str
    parameters: int
    resolution: int
    schedule: str
    sigma_min: float
    sigma_max: float
    data_range: tuple[float, float]
    weights: str
    sha256: str
    sha256_of: str

    def lines(self) -> list[str]:
        """``name: value`` lines for a terminal."""
        lo, hi = self.data_range
        return [f"path: {self.path}", f"format: {self.format}", f"architecture: {self.architecture}",
                f"predicts: {self.parameterization}", f"parameters: {self.parameters:,}",
                f"resolution: {self.resolution}x{self.resolution}", f"schedule: {self.schedule}",
                f"sigma range (image space [0, 1]): {self.sigma_min:.6g} .. {self.sigma_max:.6g}",
                f"data range: [{lo:g}, {hi:g}]", f"weights: {self.weights}",
                f"sha256 ({self.sha256_of}): {self.sha256}"]


def describe_schedule(model: PretrainedDenoiser) -> str:
    """One phrase for the noise schedule, in the model's own terms."""
    if isinstance(model, VPDenoiser):
        grid = model.discrete_sigmas()
        return (f"VP discrete, T = {model.num_timesteps} timesteps, {model.prediction} prediction"
                f"{' + learned variance (dropped)' if model.learn_sigma else ''}"
                f"{f', x0 clipped to +-{model.clip_sample:g} (scheduler clip_sample)' if model.clip_sample else ''}; sigma_t "
                f"{float(grid[0]):.6g} .. {float(grid[-1]):.6g} (image space)")
    if isinstance(model, VEScoreDenoiser):
        return (f"VE continuous, sigma_model {model.sigma_min_model:g} .. {model.sigma_max_model:g}, "
                f"sampler grid of {model.num_scales} scales")
    if isinstance(model, EDMDenoiser):
        return "EDM continuous (Karras et al. 2022 preconditioning)"
    return type(model).__name__


def _hashed_file(path: Path, fmt: str) -> Path:
    """The file whose sha256 identifies the weights: the checkpoint, or the weights inside a folder."""
    if fmt == "own":
        return own_paths(path)[1]
    if fmt == "diffusers":
        unet_dir = path / "unet" if (path / "unet").is_dir() else path
        return next((unet_dir / name for name in WEIGHTS if (unet_dir / name).is_file()), unet_dir / WEIGHTS[0])
    return path


def inspect_model(path: Path | str, *, config: Path | str | Mapping[str, Any] | None = None,
                  data_range: tuple[float, float] | None = None) -> ModelReport:
    """Load ``path`` (on CPU) and report format, size, schedule, ranges, weights and sha256."""
    path = Path(path)
    model = load_denoiser(path, config=config, data_range=data_range)
    cfg = model.config
    hashed = _hashed_file(path, cfg.format)
    return ModelReport(path=str(path), format=cfg.format, architecture=cfg.architecture,
                       parameterization=cfg.parameterization,
                       parameters=sum(int(p.numel()) for p in model.net.parameters()),
                       resolution=cfg.resolution, schedule=describe_schedule(model), sigma_min=cfg.sigma_min,
                       sigma_max=cfg.sigma_max, data_range=cfg.data_range, weights=cfg.weights,
                       sha256=sha256_file(hashed), sha256_of=hashed.name)


def convert_model(path: Path | str, out: Path | str, *, config: Path | str | Mapping[str, Any] | None = None,
                  data_range: tuple[float, float] | None = None) -> tuple[Path, Path]:
    """Convert any loadable model to the own format v2 at ``out`` (a stem); returns (json, safetensors).

    The result reloads through ``load_denoiser(out)`` with identical outputs (same float32
    weights, same adapter parameters).
    """
    path = Path(path)
    model = load_denoiser(path, config=config, data_range=data_range)
    hashed = _hashed_file(path, model.config.format)
    source = {"path": str(path), "format": model.config.format, "sha256": sha256_file(hashed),
              "sha256_of": hashed.name, "weights": model.config.weights}
    return save_own(model, out, source=source)
