"""NCSN++ (Song et al., "Score-Based Generative Modeling through SDEs", ICLR 2021, App. H),
the score network of DiffusionMBIR's AAPM prior, with score_sde's parameter names.

The variant implemented is the one score_sde's continuous VE configs and DiffusionMBIR use:
Gaussian Fourier embedding of log sigma, BigGAN residual blocks with FIR [1, 3, 3, 1]
resampling (StyleGAN2's ``upfirdn2d``), the residual input pyramid, no output pyramid,
single-head attention, ``skip_rescale`` (every residual sum divided by sqrt 2) and
``scale_by_sigma`` (output divided by sigma, so net(x, sigma) ~ -n / sigma, the score).

Layout. Modules are held in one ``all_modules`` list in the order of score_sde's ``NCSNpp``,
so a checkpoint's keys (without ``module.``) load 1:1:

    0 Fourier(W)  1 Linear  2 Linear  3 conv3x3(in)
    per level: num_res_blocks x [ResBlock (+ Attn at attn resolutions)],
               then (not the last level) ResBlock(down) + pyramid FIR-conv downsample
    middle: ResBlock, Attn, ResBlock
    per level, reversed: (num_res_blocks + 1) x ResBlock(skip concat), Attn at attn
               resolutions, ResBlock(up) except at level 0
    GroupNorm, conv3x3(out)

diffusers building blocks that compute exactly the same thing are used for the FIR
resampling (``upsample_2d``, ``downsample_2d``) and the pyramid downsample
(``FirDownsample2D``, whose parameters are also named ``Conv2d_0``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.models.downsampling import FirDownsample2D, downsample_2d
from diffusers.models.upsampling import upsample_2d
from torch import Tensor, nn

from ..model_card import JsonRecord

__all__ = ["NCSNpp", "NCSNppConfig"]

_SQRT2 = math.sqrt(2.0)
_ACTIVATIONS = {"swish": nn.SiLU, "elu": nn.ELU, "relu": nn.ReLU, "lrelu": lambda: nn.LeakyReLU(0.2)}
# option -> the values this port implements (score_sde / DiffusionMBIR continuous VE models)
SUPPORTED = {
    "name": ("ncsnpp",), "embedding_type": ("fourier",), "resblock_type": ("biggan",),
    "progressive": ("none",), "progressive_input": ("residual", "none"), "fir": (True,),
    "conditional": (True,), "resamp_with_conv": (True,), "normalization": ("GroupNorm",),
}


@dataclass(frozen=True)
class NCSNppConfig(JsonRecord):
    """The architecture options of score_sde's ``config.model`` / ``config.data`` that NCSN++ reads."""

    image_size: int
    num_channels: int
    centered: bool
    nf: int
    ch_mult: tuple[int, ...]
    num_res_blocks: int
    attn_resolutions: tuple[int, ...]
    fir_kernel: tuple[int, ...] = (1, 3, 3, 1)
    fourier_scale: float = 16.0
    skip_rescale: bool = True
    scale_by_sigma: bool = True
    progressive_input: str = "residual"
    nonlinearity: str = "swish"
    dropout: float = 0.0

    def __post_init__(self) -> None:
        for key in ("ch_mult", "attn_resolutions", "fir_kernel"):
            object.__setattr__(self, key, tuple(int(v) for v in getattr(self, key)))
        if self.nonlinearity.lower() not in _ACTIVATIONS:
            raise ValueError(f"model.nonlinearity {self.nonlinearity!r} unknown (known: {sorted(_ACTIVATIONS)})")
        if self.image_size % 2 ** (len(self.ch_mult) - 1):
            raise ValueError(f"data.image_size {self.image_size} is not divisible by 2**{len(self.ch_mult) - 1}")

    @classmethod
    def from_score_sde(cls, config: dict[str, Any]) -> NCSNppConfig:
        """From score_sde's ``ConfigDict.to_dict()``; an unsupported option raises ``ValueError``."""
        model, data = config["model"], config["data"]
        for key, allowed in SUPPORTED.items():
            if model.get(key) not in allowed:
                raise ValueError(f"model.{key} = {model.get(key)!r} is not supported (supported: {list(allowed)})")
        return cls(image_size=int(data["image_size"]), num_channels=int(data["num_channels"]),
                   centered=bool(data["centered"]), nf=int(model["nf"]), ch_mult=model["ch_mult"],
                   num_res_blocks=int(model["num_res_blocks"]), attn_resolutions=model["attn_resolutions"],
                   fir_kernel=model["fir_kernel"], fourier_scale=float(model["fourier_scale"]),
                   skip_rescale=bool(model["skip_rescale"]), scale_by_sigma=bool(model["scale_by_sigma"]),
                   progressive_input=str(model["progressive_input"]),
                   nonlinearity=str(model["nonlinearity"]), dropout=float(model["dropout"]))


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=min(channels // 4, 32), num_channels=channels, eps=1e-6)


def _conv3x3(c_in: int, c_out: int) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel_size=3, padding=1)


class FourierEmbedding(nn.Module):
    """[sin(2 pi W log sigma), cos(2 pi W log sigma)] (Tancik et al. 2020); W is never trained."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.W = nn.Parameter(torch.empty(size), requires_grad=False)

    def forward(self, log_sigma: Tensor) -> Tensor:
        proj = log_sigma[:, None] * self.W[None, :] * 2 * math.pi
        return torch.cat([torch.sin(proj), torch.cos(proj)], dim=-1)


def nin(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """score_sde's ``NIN`` as a function: (B, C, H, W) -> (B, C', H, W), ``weight`` (C, C'), ``bias`` (C',)."""
    y = torch.einsum("abci,io->abco", x.permute(0, 2, 3, 1), weight) + bias
    return y.permute(0, 3, 1, 2)


class NIN(nn.Module):
    """A 1x1 layer over channels stored as ``W`` (in, out) and ``b`` (score_sde's ``NIN``)."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.W = nn.Parameter(torch.empty(c_in, c_out))
        self.b = nn.Parameter(torch.empty(c_out))

    def forward(self, x: Tensor) -> Tensor:
        return nin(x, self.W, self.b)


class AttnBlock(nn.Module):
    """Single-head self-attention over pixels, scores scaled by C^(-1/2) (score_sde ``AttnBlockpp``)."""

    def __init__(self, channels: int, skip_rescale: bool) -> None:
        super().__init__()
        self.GroupNorm_0 = _group_norm(channels)
        self.NIN_0, self.NIN_1 = NIN(channels, channels), NIN(channels, channels)
        self.NIN_2, self.NIN_3 = NIN(channels, channels), NIN(channels, channels)
        self.skip_rescale = skip_rescale

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        normed = self.GroupNorm_0(x)
        q, k, v = self.NIN_0(normed), self.NIN_1(normed), self.NIN_2(normed)
        scores = torch.einsum("bchw,bcij->bhwij", q, k) * (int(c) ** (-0.5))
        weights = torch.softmax(scores.reshape(b, h, w, h * w), dim=-1).reshape(b, h, w, h, w)
        out = self.NIN_3(torch.einsum("bhwij,bcij->bchw", weights, v))
        return (x + out) / _SQRT2 if self.skip_rescale else x + out


class ResBlockBigGAN(nn.Module):
    """BigGAN residual block (score_sde ``ResnetBlockBigGANpp``) with optional FIR up/down.

    h = Conv_1(drop(act(GN_1(Conv_0(resample(act(GN_0(x)))) + Dense_0(act(temb)))))),
    out = (resample(x) [-> Conv_2] + h) / sqrt 2.
    """

    def __init__(self, act: nn.Module, c_in: int, c_out: int | None, temb_dim: int, *, up: bool = False,
                 down: bool = False, fir_kernel: tuple[int, ...], skip_rescale: bool, dropout: float) -> None:
        super().__init__()
        c_out = c_out or c_in
        self.GroupNorm_0 = _group_norm(c_in)
        self.Conv_0 = _conv3x3(c_in, c_out)
        self.Dense_0 = nn.Linear(temb_dim, c_out)
        self.GroupNorm_1 = _group_norm(c_out)
        self.Dropout_0 = nn.Dropout(dropout)
        self.Conv_1 = _conv3x3(c_out, c_out)
        if c_in != c_out or up or down:
            self.Conv_2 = nn.Conv2d(c_in, c_out, kernel_size=1)
        self.act, self.up, self.down = act, up, down
        self.fir_kernel, self.skip_rescale = fir_kernel, skip_rescale

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        h = self.act(self.GroupNorm_0(x))
        if self.up:
            h = upsample_2d(h, self.fir_kernel, factor=2)
            x = upsample_2d(x, self.fir_kernel, factor=2)
        elif self.down:
            h = downsample_2d(h, self.fir_kernel, factor=2)
            x = downsample_2d(x, self.fir_kernel, factor=2)
        h = self.Conv_0(h)
        h = h + self.Dense_0(self.act(temb))[:, :, None, None]
        h = self.Conv_1(self.Dropout_0(self.act(self.GroupNorm_1(h))))
        if hasattr(self, "Conv_2"):
            x = self.Conv_2(x)
        return (x + h) / _SQRT2 if self.skip_rescale else x + h


class NCSNpp(nn.Module):
    """NCSN++ score network s(x, sigma); ``forward(x, sigma)`` with x in the data range, sigma (B,)."""

    def __init__(self, config: NCSNppConfig) -> None:
        super().__init__()
        self.cfg = cfg = config
        self.act = act = _ACTIVATIONS[cfg.nonlinearity.lower()]()
        nf, levels = cfg.nf, len(cfg.ch_mult)
        temb_dim = 4 * nf
        self.level_has_attn = [cfg.image_size // 2**i in cfg.attn_resolutions for i in range(levels)]

        def block(c_in: int, c_out: int | None = None, **kw: bool) -> ResBlockBigGAN:
            return ResBlockBigGAN(act, c_in, c_out, temb_dim, fir_kernel=cfg.fir_kernel,
                                  skip_rescale=cfg.skip_rescale, dropout=cfg.dropout, **kw)

        mods: list[nn.Module] = [FourierEmbedding(nf), nn.Linear(2 * nf, temb_dim), nn.Linear(temb_dim, temb_dim),
                                 _conv3x3(cfg.num_channels, nf)]
        skip_channels, c, pyramid_c = [nf], nf, cfg.num_channels
        for level in range(levels):
            for _ in range(cfg.num_res_blocks):
                mods.append(block(c, nf * cfg.ch_mult[level]))
                c = nf * cfg.ch_mult[level]
                if self.level_has_attn[level]:
                    mods.append(AttnBlock(c, cfg.skip_rescale))
                skip_channels.append(c)
            if level != levels - 1:
                mods.append(block(c, down=True))
                if cfg.progressive_input == "residual":
                    mods.append(FirDownsample2D(pyramid_c, c, use_conv=True, fir_kernel=cfg.fir_kernel))
                    pyramid_c = c
                skip_channels.append(c)
        mods += [block(c), AttnBlock(c, cfg.skip_rescale), block(c)]
        for level in reversed(range(levels)):
            for _ in range(cfg.num_res_blocks + 1):
                mods.append(block(c + skip_channels.pop(), nf * cfg.ch_mult[level]))
                c = nf * cfg.ch_mult[level]
            if self.level_has_attn[level]:
                mods.append(AttnBlock(c, cfg.skip_rescale))
            if level != 0:
                mods.append(block(c, up=True))
        mods += [_group_norm(c), _conv3x3(c, cfg.num_channels)]
        self.all_modules = nn.ModuleList(mods)

    def forward(self, x: Tensor, sigma: Tensor) -> Tensor:
        cfg, levels = self.cfg, len(self.cfg.ch_mult)
        mods = iter(self.all_modules)
        temb = next(mods)(torch.log(sigma))
        temb = next(mods)(temb)
        temb = next(mods)(self.act(temb))
        if not cfg.centered:
            x = 2 * x - 1.0  # the network was trained on [0, 1] data and centres it itself
        pyramid = x
        hs = [next(mods)(x)]
        for level in range(levels):
            for _ in range(cfg.num_res_blocks):
                h = next(mods)(hs[-1], temb)
                if self.level_has_attn[level]:
                    h = next(mods)(h)
                hs.append(h)
            if level != levels - 1:
                h = next(mods)(hs[-1], temb)
                if cfg.progressive_input == "residual":
                    pyramid = next(mods)(pyramid)
                    pyramid = (pyramid + h) / _SQRT2 if cfg.skip_rescale else pyramid + h
                    h = pyramid
                hs.append(h)
        h = next(mods)(hs[-1], temb)
        h = next(mods)(h)
        h = next(mods)(h, temb)
        for level in reversed(range(levels)):
            for _ in range(cfg.num_res_blocks + 1):
                h = next(mods)(torch.cat([h, hs.pop()], dim=1), temb)
            if self.level_has_attn[level]:
                h = next(mods)(h)
            if level != 0:
                h = next(mods)(h, temb)
        h = self.act(next(mods)(h))
        h = next(mods)(h)
        if cfg.scale_by_sigma:
            h = h / sigma.reshape(x.shape[0], 1, 1, 1)
        return h
