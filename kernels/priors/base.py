"""The one denoiser interface every pretrained prior is loaded into.

Every network, whatever it was trained to predict, becomes the same map

    D(x, sigma) -> x0        x: (B, 1, H, W) float32 in image space [0, 1],
                             sigma: noise std on that scale, a float or a (B,) tensor,

the denoiser of Karras et al., "Elucidating the Design Space of Diffusion-Based Generative
Models" (NeurIPS 2022), as k-diffusion's ``external.py`` wraps eps-, v- and score-networks.
The samplers of :mod:`mbir_batch.kernels.diffusion` only ever see D.

Spaces. A network was trained on data in its own range ``data_range = (lo, hi)``: [0, 1] for
the CT priors of DiffusionMBIR and DDS, [-1, 1] for most diffusers models. With
``scale = hi - lo`` the adapter maps

    x_model = lo + scale x,   sigma_model = scale sigma,   x0 = (x0_model - lo) / scale,

so a noise std sigma in image space is the std ``scale sigma`` the network was trained with.
The network-specific part, D_model(x_model, sigma_model), lives in the subclasses
(:mod:`.adapters`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..denoiser import DenoiserLoadError
from ..model_card import JsonRecord

__all__ = ["PretrainedDenoiser", "PriorConfig", "PriorLoadError"]


class PriorLoadError(DenoiserLoadError):
    """A pretrained model that cannot be loaded: missing, truncated, unmapped or mismatched.

    The message is one line that names the file first, then the problem and the first
    offending keys. It is a :class:`~mbir_batch.kernels.denoiser.DenoiserLoadError`, so code
    that already handles the project's own models handles these too.
    """


@dataclass(frozen=True)
class PriorConfig(JsonRecord):
    """What a loaded prior reports about itself (every sigma in image space).

    Attributes
    ----------
    format : the file format it came from: ``"score_sde"``, ``"adm"``, ``"diffusers"`` or ``"own"``.
    architecture : ``"ncsnpp"``, ``"adm"``, ``"diffusers-unet2d"`` or ``"edm"``.
    parameterization : what the network predicts: ``"ve-score"``, ``"vp-epsilon"``, ``"vp-v"``,
        ``"vp-sample"`` or ``"edm"``.
    resolution : the slice size H = W it was trained at.
    sigma_min, sigma_max : the noise range the model supports, image space. A sampler should
        clip its schedule to it.
    data_range : (lo, hi), the range the network was trained in.
    weights : which weights were loaded, e.g. ``"ema"`` or ``"raw"``.
    source : the path it was loaded from.
    """

    format: str
    architecture: str
    parameterization: str
    resolution: int
    sigma_min: float
    sigma_max: float
    data_range: tuple[float, float]
    weights: str
    source: str


def check_data_range(data_range: Any, where: str) -> tuple[float, float]:
    """``(lo, hi)`` as floats with lo < hi; a bad value raises :class:`PriorLoadError`."""
    try:
        lo, hi = (float(v) for v in data_range)
    except (TypeError, ValueError) as err:
        raise PriorLoadError(f"{where}: data_range must be two numbers (lo, hi), got {data_range!r}") from err
    if not lo < hi:
        raise PriorLoadError(f"{where}: data_range needs lo < hi, got ({lo}, {hi})")
    return lo, hi


class PretrainedDenoiser(nn.Module):
    """D(x, sigma) -> x0 in image space around a network ``net`` (see the module docstring).

    Subclasses implement :meth:`denoise_model_space`, :meth:`discrete_sigmas`,
    :meth:`model_schedule` and :meth:`adapter_spec`. ``net_config`` is the network's
    architecture as a JSON-able dict (what :func:`~.inspect.convert_model` records).
    """

    def __init__(self, net: nn.Module, config: PriorConfig, net_config: dict[str, Any]) -> None:
        super().__init__()
        self.net = net
        self.config = config
        self.net_config = net_config
        lo, hi = config.data_range
        self._lo, self._scale = float(lo), float(hi - lo)

    # -- the uniform attributes -------------------------------------------------------------
    @property
    def format(self) -> str:
        return self.config.format

    @property
    def resolution(self) -> int:
        return self.config.resolution

    @property
    def sigma_min(self) -> float:
        return self.config.sigma_min

    @property
    def sigma_max(self) -> float:
        return self.config.sigma_max

    @property
    def data_range(self) -> tuple[float, float]:
        return self.config.data_range

    # -- D(x, sigma) ---------------------------------------------------------------------------
    def forward(self, x: Tensor, sigma: Tensor | float) -> Tensor:
        """x0 = D(x, sigma) for x (B, 1, H, W) in image space; sigma a float or a (B,) tensor."""
        if x.dim() != 4 or x.shape[1] != 1:
            raise ValueError(f"{type(self).__name__}: x must be (B, 1, H, W), got {tuple(x.shape)}")
        sigma = torch.as_tensor(sigma, dtype=torch.float64, device=x.device).reshape(-1)
        if sigma.numel() not in (1, x.shape[0]):
            raise ValueError(f"{type(self).__name__}: sigma has {sigma.numel()} entries for a batch of {x.shape[0]}")
        sigma = sigma.expand(x.shape[0])
        x_model = self._lo + self._scale * x.float()
        x0_model = self.denoise_model_space(x_model, self._scale * sigma)
        return ((x0_model - self._lo) / self._scale).to(x.dtype)

    def denoise_model_space(self, x: Tensor, sigma: Tensor) -> Tensor:
        """D in the network's own data range: x (B, 1, H, W) float32, sigma (B,) float64."""
        raise NotImplementedError

    # -- the model's own noise levels ----------------------------------------------------------
    def discrete_sigmas(self) -> Tensor | None:
        """The model's discrete noise levels, ascending, image space, float64; None if continuous."""
        raise NotImplementedError

    def model_schedule(self, steps: int) -> Tensor:
        """The sampling schedule of the original code: ``steps`` sigmas, descending, then 0.

        Image space, float64, ``steps + 1`` entries (the convention of
        :func:`mbir_batch.kernels.diffusion.get_sigmas_karras`).
        """
        raise NotImplementedError

    def adapter_spec(self) -> dict[str, Any]:
        """The adapter's parameters as a JSON-able dict (recorded by the own format v2)."""
        raise NotImplementedError

    def to_image_sigma(self, sigma_model: Tensor) -> Tensor:
        """A model-space noise std expressed in image space."""
        return sigma_model / self._scale
