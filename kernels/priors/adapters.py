"""Adapters that turn a score, eps-, v- or x0-network into D(x, sigma) (k-diffusion ``external.py``).

All formulas below are in the network's data range ("model space"; :mod:`.base` maps image
space to it and back). x is the VE-form noisy sample x = x0 + sigma n.

VE score network (Song et al., "Score-Based Generative Modeling through SDEs", ICLR 2021):

    D(x, sigma) = x + sigma^2 s(x, sigma)                                     (Tweedie)

VP network with a discrete schedule abar_t = prod_{s<=t} (1 - beta_s) (Ho et al., NeurIPS 2020):

    sigma_t = sqrt((1 - abar_t) / abar_t),   abar = 1 / (1 + sigma^2)
    x_vp = sqrt(abar) x                       (= sqrt(abar) x0 + sqrt(1 - abar) n, the VP sample)
    eps:    x0 = (x_vp - sqrt(1 - abar) eps_theta(x_vp, t)) / sqrt(abar)      (DDS's Tweedie step)
    v:      x0 = sqrt(abar) x_vp - sqrt(1 - abar) v_theta(x_vp, t)            (Salimans & Ho 2022)
    sample: x0 = x0_theta(x_vp, t)

For a sigma between two grid values, t is fractional, found by linear interpolation of
log sigma_t over the integer grid (k-diffusion's ``sigma_to_t``); outside the grid t is clamped
to [0, T - 1]. With ``learn_sigma`` the network returns [eps, v_var]; only the first half is
used (DDS does the same). For a sigma on the grid (relative difference < 1e-6) the table's
abar_t is used, so the original code's own steps are reproduced exactly; off the grid
abar = 1 / (1 + sigma^2), which keeps x_vp at unit noise variance even beyond sigma_{T-1}.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..diffusion import get_sigmas_karras
from .base import PretrainedDenoiser, PriorConfig, PriorLoadError

__all__ = ["EDMDenoiser", "VEScoreDenoiser", "VPDenoiser", "beta_schedule", "vp_alphas_cumprod"]

PREDICTIONS = {"epsilon": "vp-epsilon", "v_prediction": "vp-v", "sample": "vp-sample"}


def beta_schedule(name: str, *, beta_start: float, beta_end: float, steps: int) -> np.ndarray:
    """The discrete betas of DDPM / DDIM / DDS (``get_beta_schedule``), float64, shape (steps,).

    ``linear``: linspace(beta_start, beta_end); ``quad``: linspace(sqrt(start), sqrt(end))^2;
    ``const``: beta_end; ``jsd``: 1 / linspace(T, 1); ``sigmoid``: sigmoid(linspace(-6, 6))
    scaled into [beta_start, beta_end].
    """
    if name == "linear":
        return np.linspace(beta_start, beta_end, steps, dtype=np.float64)
    if name == "quad":
        return np.linspace(beta_start**0.5, beta_end**0.5, steps, dtype=np.float64) ** 2
    if name == "const":
        return beta_end * np.ones(steps, dtype=np.float64)
    if name == "jsd":
        return 1.0 / np.linspace(steps, 1, steps, dtype=np.float64)
    if name == "sigmoid":
        return 1.0 / (np.exp(-np.linspace(-6, 6, steps)) + 1.0) * (beta_end - beta_start) + beta_start
    raise ValueError(f"unknown beta schedule {name!r} (known: linear, quad, const, jsd, sigmoid)")


def vp_alphas_cumprod(betas: np.ndarray) -> Tensor:
    """abar_t = prod_{s<=t} (1 - beta_s) in float32, as DDS's ``compute_alpha`` computes it."""
    return (1.0 - torch.from_numpy(np.asarray(betas)).float()).cumprod(dim=0)


def _call_net(net: nn.Module, x: Tensor, labels: Tensor, diffusers_output: bool) -> Tensor:
    """``net(x, labels)`` with float32 labels on x's device; a diffusers model's output tuple unwrapped."""
    labels = labels.to(device=x.device, dtype=torch.float32)
    if diffusers_output:
        return net(x, labels, return_dict=False)[0]
    return net(x, labels)


class VEScoreDenoiser(PretrainedDenoiser):
    """D = x + sigma^2 s(x, sigma) around a VE score network ``net(x, sigma) -> s``.

    ``net`` takes the noise std itself as its label (score_sde's continuous VE models,
    diffusers' ScoreSdeVe UNets). ``num_scales`` is the discrete grid of the original sampler:
    sigma_i = exp(linspace(log sigma_max, log sigma_min, num_scales)), model space.
    """

    def __init__(self, net: nn.Module, config: PriorConfig, net_config: dict[str, Any], *,
                 sigma_min_model: float, sigma_max_model: float, num_scales: int,
                 diffusers_output: bool = False) -> None:
        super().__init__(net, config, net_config)
        self.sigma_min_model, self.sigma_max_model = float(sigma_min_model), float(sigma_max_model)
        self.num_scales = int(num_scales)
        self._diffusers_output = diffusers_output

    def score(self, x: Tensor, sigma: Tensor) -> Tensor:
        """s(x, sigma) in model space: the network's output for float32 labels sigma (B,)."""
        return _call_net(self.net, x, sigma, self._diffusers_output)

    def denoise_model_space(self, x: Tensor, sigma: Tensor) -> Tensor:
        s = self.score(x, sigma)
        sigma32 = sigma.to(device=x.device, dtype=torch.float32).view(-1, 1, 1, 1)
        return x + sigma32**2 * s

    def discrete_sigmas(self) -> Tensor:
        grid = torch.exp(torch.linspace(math.log(self.sigma_min_model), math.log(self.sigma_max_model),
                                        self.num_scales, dtype=torch.float64))
        return self.to_image_sigma(grid)

    def model_schedule(self, steps: int) -> Tensor:
        """score_sde's sampler grid: t = linspace(1, 1e-5, steps), sigma = sigma_min (sigma_max / sigma_min)^t."""
        if steps < 1:
            raise ValueError(f"need at least one step, got {steps}")
        t = torch.linspace(1.0, 1e-5, steps, dtype=torch.float64)
        sigmas = self.sigma_min_model * (self.sigma_max_model / self.sigma_min_model) ** t
        return torch.cat([self.to_image_sigma(sigmas), sigmas.new_zeros(1)])

    def adapter_spec(self) -> dict[str, Any]:
        return {"kind": "ve-score", "data_range": list(self.data_range), "sigma_min": self.sigma_min_model,
                "sigma_max": self.sigma_max_model, "num_scales": self.num_scales}


class VPDenoiser(PretrainedDenoiser):
    """D around a VP network ``net(x_vp, t)`` with a discrete schedule (see the module docstring).

    Parameters
    ----------
    alphas_cumprod : (T,) float32 tensor, abar_t of the training schedule.
    prediction : ``"epsilon"``, ``"v_prediction"`` or ``"sample"`` (diffusers' names).
    learn_sigma : the network returns 2 channels per image channel; the first half is kept.
    integer_timesteps : round t to the nearest integer (networks with a learned embedding table).
    clip_sample : clamp the predicted x0 to [-clip_sample, clip_sample] in the model's data space,
        as the model's own sampler does (diffusers schedulers' ``clip_sample``/``clip_sample_range``,
        on by default for DDPM/DDIM); None: no clamp (guided-diffusion as DDS samples it).
    """

    def __init__(self, net: nn.Module, config: PriorConfig, net_config: dict[str, Any], *,
                 alphas_cumprod: Tensor, prediction: str = "epsilon", learn_sigma: bool = False,
                 integer_timesteps: bool = False, diffusers_output: bool = False,
                 clip_sample: float | None = None) -> None:
        super().__init__(net, config, net_config)
        if prediction not in PREDICTIONS:
            raise PriorLoadError(f"{config.source}: unknown prediction type {prediction!r} "
                                 f"(known: {sorted(PREDICTIONS)})")
        abar = torch.as_tensor(alphas_cumprod, dtype=torch.float32).flatten()
        self.register_buffer("alphas_cumprod", abar, persistent=False)
        sig = ((1.0 - abar.double()) / abar.double()).sqrt()
        if not bool((sig[1:] > sig[:-1]).all()):
            raise PriorLoadError(f"{config.source}: the noise schedule is not strictly increasing")
        self.register_buffer("log_sigmas", sig.log(), persistent=False)
        self.prediction, self.learn_sigma = prediction, bool(learn_sigma)
        self.integer_timesteps = bool(integer_timesteps)
        self.clip_sample = None if clip_sample is None else float(clip_sample)
        self._diffusers_output = diffusers_output

    @property
    def num_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    def sigma_to_t(self, sigma: Tensor) -> Tensor:
        """Fractional timestep of a model-space sigma: linear in log sigma between grid points.

        A sigma within a relative 1e-6 of a grid value (float32 rounding) gives that integer t.
        """
        return self._locate(sigma)[0]

    def _locate(self, sigma: Tensor) -> tuple[Tensor, Tensor]:
        """(t, on_grid) of model-space sigmas (B,)."""
        log_sig = self.log_sigmas.to(sigma.device)
        ls = sigma.double().clamp_min(1e-30).log()
        hi = torch.searchsorted(log_sig, ls).clamp(1, log_sig.shape[0] - 1)
        lo = hi - 1
        w = (ls - log_sig[lo]) / (log_sig[hi] - log_sig[lo])
        t = (lo.double() + w).clamp(0.0, log_sig.shape[0] - 1.0)
        nearest = t.round()
        on_grid = (ls - log_sig[nearest.long()]).abs() < 1e-6
        t = torch.where(on_grid, nearest, t)
        return (t.round() if self.integer_timesteps else t), on_grid

    def network_output(self, x_vp: Tensor, t: Tensor) -> Tensor:
        """The raw network output for a VP sample x_vp and timesteps t (B,) (float32 labels)."""
        return _call_net(self.net, x_vp, t, self._diffusers_output)

    def denoise_model_space(self, x: Tensor, sigma: Tensor) -> Tensor:
        t, on_grid = self._locate(sigma)
        table = self.alphas_cumprod.to(sigma.device)[t.round().long()].double()
        abar = torch.where(on_grid, table, 1.0 / (1.0 + sigma.double() ** 2))
        c_signal = abar.sqrt().float().view(-1, 1, 1, 1).to(x.device)
        c_noise = (1.0 - abar).sqrt().float().view(-1, 1, 1, 1).to(x.device)
        x_vp = c_signal * x
        out = self.network_output(x_vp, t).float()
        channels = x.shape[1]
        expected = 2 * channels if self.learn_sigma else channels
        if out.shape[1] != expected:
            raise ValueError(f"{self.config.source}: network returned {out.shape[1]} channels, "
                             f"expected {expected} for {channels}-channel input")
        out = out[:, :channels]
        if self.prediction == "epsilon":
            x0 = (x_vp - c_noise * out) / c_signal
        elif self.prediction == "v_prediction":
            x0 = c_signal * x_vp - c_noise * out
        else:
            x0 = out
        return x0 if self.clip_sample is None else x0.clamp(-self.clip_sample, self.clip_sample)

    def discrete_sigmas(self) -> Tensor:
        return self.to_image_sigma(self.log_sigmas.exp().cpu())

    def model_schedule(self, steps: int) -> Tensor:
        """DDS / DDIM uniform skip: t = (steps - 1) k, ..., k, 0 with k = T // steps, then sigma 0.

        For T = 1000 and 50 steps this is DDS's 980, 960, ..., 20, 0.
        """
        if not 1 <= steps <= self.num_timesteps:
            raise ValueError(f"steps must be in [1, {self.num_timesteps}], got {steps}")
        t = torch.arange(steps - 1, -1, -1, dtype=torch.long) * (self.num_timesteps // steps)
        sigmas = self.discrete_sigmas()[t]
        return torch.cat([sigmas, sigmas.new_zeros(1)])

    def adapter_spec(self) -> dict[str, Any]:
        return {"kind": "vp", "data_range": list(self.data_range), "prediction": self.prediction,
                "learn_sigma": self.learn_sigma, "integer_timesteps": self.integer_timesteps,
                "clip_sample": self.clip_sample, "alphas_cumprod": [float(v) for v in self.alphas_cumprod.cpu()]}


class EDMDenoiser(PretrainedDenoiser):
    """The project's own EDM model (:class:`mbir_batch.kernels.denoiser.Denoiser`), unchanged.

    ``net`` already works in image space (it applies 2x - 1 itself), so ``data_range`` is (0, 1)
    and D is ``net(x, sigma)``.
    """

    def denoise_model_space(self, x: Tensor, sigma: Tensor) -> Tensor:
        return self.net(x, sigma.to(device=x.device, dtype=torch.float32))

    def discrete_sigmas(self) -> None:
        return None

    def model_schedule(self, steps: int) -> Tensor:
        """EDM's schedule (Karras et al. 2022, Eq. 5) over the model's sigma range."""
        return get_sigmas_karras(steps, self.sigma_min, self.sigma_max)

    def adapter_spec(self) -> dict[str, Any]:
        return {"kind": "edm", "data_range": [0.0, 1.0]}
