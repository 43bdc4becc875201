"""The ADM UNet of guided-diffusion (Dhariwal & Nichol, "Diffusion Models Beat GANs on Image
Synthesis", NeurIPS 2021), the eps-network of DDS's AAPM prior, with guided-diffusion's
parameter names so that a ``state_dict`` loads 1:1.

    emb = MLP([cos(t f_k), sin(t f_k)]),  f_k = 10000^(-k / half)           (cos first)
    ResBlock:  h = conv(SiLU(GN(x)));  h = GN(h) (1 + scale) + shift;  out = skip(x) + conv(SiLU(h))
               (scale-shift norm, "FiLM"; without it h = GN(h + emb) ...)
    Attention: qkv = Conv1d(GN(x)); per head, softmax((q c^-1/4)^T (k c^-1/4)) v; x + proj_out(.)

The legacy QKV layout (``use_new_attention_order: false``, DDS and most released checkpoints)
groups the 3C qkv channels per head, each head's block holding its q, then k, then v; the new
order holds all q, then all k, then all v. GroupNorm runs in float32 (32 groups, eps 1e-5).
With ``resblock_updown`` the resampling happens inside ResBlocks (GN -> SiLU -> resample ->
conv, skip resampled too: 2x2 average pool / nearest x2); otherwise by a strided conv / nearest
upsample + conv. diffusers' ``UNet2DModel`` does not map exactly (it folds the two c^-1/4
factors into one scale and needs the legacy qkv rows permuted), hence this module.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..model_card import JsonRecord

__all__ = ["ADMConfig", "ADMUNet", "timestep_embedding"]


@dataclass(frozen=True)
class ADMConfig(JsonRecord):
    """The arguments of guided-diffusion's ``UNetModel`` (after ``create_model``'s parsing).

    ``attention_ds`` are downsample factors (image_size // resolution), ``channel_mult`` may
    hold 0.5 (the 512 model).
    """

    image_size: int
    in_channels: int
    model_channels: int
    out_channels: int
    num_res_blocks: int
    attention_ds: tuple[int, ...]
    channel_mult: tuple[float, ...]
    conv_resample: bool = True
    num_heads: int = 1
    num_head_channels: int = -1
    num_heads_upsample: int = -1
    use_scale_shift_norm: bool = False
    resblock_updown: bool = False
    use_new_attention_order: bool = False
    dropout: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "attention_ds", tuple(int(v) for v in self.attention_ds))
        object.__setattr__(self, "channel_mult", tuple(float(v) for v in self.channel_mult))


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding [cos(t f), sin(t f)], f_k = exp(-ln(max_period) k / half); t may be fractional."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(start=0, end=half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs.to(t.device)[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class GroupNorm32(nn.GroupNorm):
    """GroupNorm(32, C) computed in float32 whatever the input dtype."""

    def __init__(self, channels: int) -> None:
        super().__init__(32, channels)

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.float()).type(x.dtype)


class Resample(nn.Module):
    """Nearest x2 upsampling or 2x2 downsampling, optionally with a 3x3 conv (``conv`` / ``op``)."""

    def __init__(self, channels: int, up: bool, use_conv: bool) -> None:
        super().__init__()
        self.up, self.use_conv = up, use_conv
        if use_conv and up:
            self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        elif use_conv:
            self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)
        elif not up:
            self.op = nn.AvgPool2d(kernel_size=2, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        if self.up:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
            return self.conv(x) if self.use_conv else x
        return self.op(x)


class ResBlock(nn.Module):
    """guided-diffusion ``ResBlock`` (see the module docstring); keys in_layers / emb_layers / out_layers."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int | None, *, scale_shift: bool,
                 dropout: float, up: bool = False, down: bool = False) -> None:
        super().__init__()
        out_channels = out_channels or channels
        self.in_layers = nn.Sequential(GroupNorm32(channels), nn.SiLU(),
                                       nn.Conv2d(channels, out_channels, 3, padding=1))
        self.updown = up or down
        if self.updown:
            self.h_upd, self.x_upd = Resample(channels, up, False), Resample(channels, up, False)
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels if scale_shift
                                                              else out_channels))
        self.out_layers = nn.Sequential(GroupNorm32(out_channels), nn.SiLU(), nn.Dropout(p=dropout),
                                        nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip_connection = (nn.Identity() if out_channels == channels
                                else nn.Conv2d(channels, out_channels, 1))
        self.scale_shift = scale_shift

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        if self.updown:
            h = self.in_layers[:-1](x)
            h, x = self.h_upd(h), self.x_upd(x)
            h = self.in_layers[-1](h)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).type(h.dtype)[..., None, None]
        if self.scale_shift:
            scale, shift = torch.chunk(emb_out, 2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    """guided-diffusion ``AttentionBlock``: multi-head self-attention over pixels, legacy or new qkv order."""

    def __init__(self, channels: int, num_heads: int, num_head_channels: int, new_order: bool) -> None:
        super().__init__()
        if num_head_channels != -1:
            if channels % num_head_channels:
                raise ValueError(f"attention channels {channels} not divisible by "
                                 f"num_head_channels {num_head_channels}")
            num_heads = channels // num_head_channels
        self.num_heads, self.new_order = num_heads, new_order
        self.norm = GroupNorm32(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv1d(channels, channels, 1)

    def attention(self, qkv: Tensor) -> Tensor:
        bs, width, length = qkv.shape
        ch = width // (3 * self.num_heads)
        scale = 1 / math.sqrt(math.sqrt(ch))
        if self.new_order:
            q, k, v = (part.reshape(bs * self.num_heads, ch, length) for part in qkv.chunk(3, dim=1))
        else:
            q, k, v = qkv.reshape(bs * self.num_heads, ch * 3, length).split(ch, dim=1)
        weight = torch.einsum("bct,bcs->bts", q * scale, k * scale)
        weight = torch.softmax(weight.float(), dim=-1).type(weight.dtype)
        return torch.einsum("bts,bcs->bct", weight, v).reshape(bs, -1, length)

    def forward(self, x: Tensor) -> Tensor:
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        h = self.proj_out(self.attention(self.qkv(self.norm(x))))
        return (x + h).reshape(b, c, *spatial)


class EmbedSequential(nn.Sequential):
    """A Sequential that hands the timestep embedding to its ResBlocks."""

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


class ADMUNet(nn.Module):
    """guided-diffusion ``UNetModel`` (unconditional); ``forward(x, t)`` returns (B, out_channels, H, W)."""

    def __init__(self, config: ADMConfig) -> None:
        super().__init__()
        self.cfg = cfg = config
        mc, emb_dim = cfg.model_channels, 4 * cfg.model_channels
        heads_up = cfg.num_heads if cfg.num_heads_upsample == -1 else cfg.num_heads_upsample

        def res(c_in: int, c_out: int | None = None, **kw: bool) -> ResBlock:
            return ResBlock(c_in, emb_dim, c_out, scale_shift=cfg.use_scale_shift_norm, dropout=cfg.dropout, **kw)

        def attn(c: int, heads: int) -> AttentionBlock:
            return AttentionBlock(c, heads, cfg.num_head_channels, cfg.use_new_attention_order)

        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        ch = input_ch = int(cfg.channel_mult[0] * mc)
        self.input_blocks = nn.ModuleList([EmbedSequential(nn.Conv2d(cfg.in_channels, ch, 3, padding=1))])
        skip_chans, ds = [ch], 1
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers: list[nn.Module] = [res(ch, int(mult * mc))]
                ch = int(mult * mc)
                if ds in cfg.attention_ds:
                    layers.append(attn(ch, cfg.num_heads))
                self.input_blocks.append(EmbedSequential(*layers))
                skip_chans.append(ch)
            if level != len(cfg.channel_mult) - 1:
                down = res(ch, ch, down=True) if cfg.resblock_updown else Resample(ch, False, cfg.conv_resample)
                self.input_blocks.append(EmbedSequential(down))
                skip_chans.append(ch)
                ds *= 2
        self.middle_block = EmbedSequential(res(ch), attn(ch, cfg.num_heads), res(ch))
        self.output_blocks = nn.ModuleList([])
        for level, mult in list(enumerate(cfg.channel_mult))[::-1]:
            for i in range(cfg.num_res_blocks + 1):
                layers = [res(ch + skip_chans.pop(), int(mc * mult))]
                ch = int(mc * mult)
                if ds in cfg.attention_ds:
                    layers.append(attn(ch, heads_up))
                if level and i == cfg.num_res_blocks:
                    layers.append(res(ch, ch, up=True) if cfg.resblock_updown
                                  else Resample(ch, True, cfg.conv_resample))
                    ds //= 2
                self.output_blocks.append(EmbedSequential(*layers))
        self.out = nn.Sequential(GroupNorm32(ch), nn.SiLU(), nn.Conv2d(input_ch, cfg.out_channels, 3, padding=1))

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        emb = self.time_embed(timestep_embedding(t, self.cfg.model_channels))
        hs, h = [], x
        for module in self.input_blocks:
            h = module(h, emb)
            hs.append(h)
        h = self.middle_block(h, emb)
        for module in self.output_blocks:
            h = module(torch.cat([h, hs.pop()], dim=1), emb)
        return self.out(h)
