"""Low-rank adapters (LoRA) on a denoiser's convolutions and linears, and the adapter file.

Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022 (arXiv 2106.09685),
Eq. (3), as Chung and Ye apply it to a diffusion prior (DDIP / D3IP, ECCV 2024, arXiv
2407.10641). A target layer with frozen weight W and bias b becomes

    h = W x + b + s B (A x) + delta_b,        s = alpha / r,

==========  ====================  =====================================================
paper       variable              shape (Linear; a ConvNd uses the same kernel in ``down``)
==========  ====================  =====================================================
W, b        ``layer.base``        frozen, (out, in[, k...]), (out,)
A           ``layer.down``        (r, in[, k...]), same stride / padding / dilation as W
B           ``layer.up``          (out, r[, 1...]), a 1x1 map
r           ``LoraConfig.rank``   inner dimension
s           ``LoraConfig.scale``  alpha / r
delta_b     ``layer.bias_delta``  (out,), only with ``train_bias`` (DDIP also tunes biases)
==========  ====================  =====================================================

B starts at zero and A is Gaussian with std 1 / sqrt(fan_in), drawn from a generator seeded by
(seed, layer index), so every rank builds the same A. On top of the zero B, a layer's branch is
*not computed* until :func:`set_lora_active` turns it on (the first adaptation round or a
loaded adapter does): an unadapted run executes exactly the base network's operations, at the
same cost, and is bit-identical to a run without LoRA.

Two ways to compute an active layer, equal up to rounding:

- with autograd (the adaptation loss): ``base(x) + s * up(down(x)) + delta_b``, so the backward
  pass computes the small gradients of A, B and delta_b and never a full weight gradient;
- without it (the sampler's denoising, after a round or with a loaded adapter): one call of the
  base operation with the merged ``W + s B A`` and ``b + delta_b``. Merging costs one (out x r) by
  (r x in k...) product per layer and call, next to nothing; the branch costs a second, rank-r
  convolution over the whole input, which made every denoiser call 1.3-1.4x slower (bundled
  model, batch 32, one CPU thread; merged: 0.9-1.0x; ``bench/results/lora-speed-cpu-2026-12-03.md``).

Why not ``peft``. diffusers itself uses peft for LoRA, but peft 0.21.2 requires
``transformers``, ``accelerate`` and (through transformers) ``tokenizers``, none of which the
project needs otherwise: measured with ``pip install --report`` against this environment, that
is 4 new distributions, 18 MB of wheels (transformers 13.5 MB, tokenizers 3.4 MB, peft 0.8 MB,
accelerate 0.4 MB) and 152 MB installed (transformers alone 129 MB). It also wraps only what its
target list names by module path and ties adapters to its own config files. The wrapper here is
one small class for Linear / Conv1d / Conv2d (Conv1d: the attention of the ADM port) and
NCSN++'s ``NIN`` (a 1x1 layer over channels, the projections of its attention; its branch is a
pair of 1x1 convolutions), and covers every network :mod:`mbir_batch.kernels.priors` loads:
diffusers ``UNet2DModel`` (own format v1 and diffusers folders), the ADM port and the NCSN++ port.

The adapter file (``adapter.safetensors``) is :mod:`mbir_batch.kernels.adapter_file`.
"""
from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .diffusion import slice_seed
from .model_card import DenoiserLoadError

__all__ = ["AdapterLoadError", "LoraConfig", "LoraLayer", "inject_lora", "load_lora_state_dict", "lora_active",
           "lora_layers", "lora_parameters", "lora_state_dict", "set_lora_active"]

DEFAULT_BLOCKS = ("ResnetBlock2D", "Attention", "ResBlock", "AttentionBlock", "ResBlockBigGAN", "AttnBlock")
_INIT_TAG = 0x5EED_1017  # separates the A-initialisation stream from the sampler's noise stream


def _wrappable() -> tuple[type[nn.Module], ...]:
    """The layer types LoRA wraps. NIN is imported here, not at the top: its module imports
    diffusers (2.4 s), which parsing an ``adapt:`` section or reading an adapter does not need."""
    from .priors.ncsnpp import NIN
    return (nn.Linear, nn.Conv1d, nn.Conv2d, NIN)


class AdapterLoadError(DenoiserLoadError):
    """An adapter file that is missing, truncated, not an adapter, or made for another model.

    A :class:`~mbir_batch.kernels.model_card.DenoiserLoadError`, so the driver's model checks
    turn it into a ``ModelError`` (one line, exit 2) like any other model file problem.
    """


@dataclass(frozen=True)
class LoraConfig:
    """Which layers get a LoRA branch and how it is built.

    Attributes
    ----------
    rank : r >= 1, the inner dimension of B A.
    alpha : the branch is scaled by s = alpha / r; None means alpha = r (s = 1).
    blocks : class names of the blocks whose Linear / Conv1d / Conv2d / NIN layers (at any depth below
        the block) are wrapped, as DDIP wraps ADM's ResBlock and AttentionBlock. The default
        covers diffusers (``ResnetBlock2D``, ``Attention``), ADM (``ResBlock``,
        ``AttentionBlock``) and NCSN++ (``ResBlockBigGAN``, ``AttnBlock``).
    targets : regular expressions on qualified layer names (``re.search``); when given they
        replace ``blocks``.
    train_bias : also learn delta_b for every wrapped layer.
    seed : seed of the random A (per layer index, identical on every rank).
    """

    rank: int = 4
    alpha: float | None = None
    blocks: tuple[str, ...] = DEFAULT_BLOCKS
    targets: tuple[str, ...] = ()
    train_bias: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "blocks", tuple(str(b) for b in self.blocks))
        object.__setattr__(self, "targets", tuple(str(t) for t in self.targets))
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"lora.rank: must be an integer >= 1, got {self.rank!r}")
        if self.alpha is not None and not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha)
                                           and self.alpha > 0):
            raise ValueError(f"lora.alpha: must be a positive number or None, got {self.alpha!r}")
        if not isinstance(self.train_bias, bool):
            raise ValueError(f"lora.train_bias: must be true or false, got {self.train_bias!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"lora.seed: must be an integer >= 0, got {self.seed!r}")
        if not self.blocks and not self.targets:
            raise ValueError("lora: blocks and targets are both empty, so no layer would be adapted")
        for pattern in self.targets:
            try:
                re.compile(pattern)
            except re.error as err:
                raise ValueError(f"lora.targets: {pattern!r} is not a regular expression ({err})") from None

    @property
    def scale(self) -> float:
        """s = alpha / r."""
        return float(self.alpha if self.alpha is not None else self.rank) / self.rank

    def to_metadata(self) -> dict[str, str]:
        """The fields as safetensors metadata (string values)."""
        return {"rank": str(self.rank), "alpha": json.dumps(self.alpha), "blocks": json.dumps(list(self.blocks)),
                "targets": json.dumps(list(self.targets)), "train_bias": json.dumps(self.train_bias),
                "seed": str(self.seed)}

    @classmethod
    def from_metadata(cls, meta: Mapping[str, str]) -> LoraConfig:
        """Inverse of :meth:`to_metadata`; ``KeyError`` / ``ValueError`` on a bad field."""
        return cls(rank=int(meta["rank"]), alpha=json.loads(meta["alpha"]), blocks=tuple(json.loads(meta["blocks"])),
                   targets=tuple(json.loads(meta["targets"])), train_bias=json.loads(meta["train_bias"]),
                   seed=int(meta["seed"]))


class LoraLayer(nn.Module):
    """``base(x) + s * up(down(x)) [+ bias_delta]``; only ``base(x)`` while ``active`` is False."""

    def __init__(self, base: nn.Module, cfg: LoraConfig, generator: torch.Generator) -> None:
        super().__init__()
        from .priors.ncsnpp import NIN, nin

        if not isinstance(base, _wrappable()):
            raise TypeError(f"LoRA: cannot wrap {type(base).__name__} (only Linear, Conv1d, Conv2d, NIN)")
        down: nn.Module
        up: nn.Module
        if isinstance(base, nn.Linear):
            out_features, weight, spatial = base.out_features, base.weight, 0
            down = nn.Linear(base.in_features, cfg.rank, bias=False)
            up = nn.Linear(cfg.rank, out_features, bias=False)
        elif isinstance(base, NIN):                 # (B, C, H, W) -> (B, C', H, W), weights W (C, C')
            (in_features, out_features), weight, spatial = base.W.shape, base.W, 2
            down = nn.Conv2d(in_features, cfg.rank, 1, bias=False)
            up = nn.Conv2d(cfg.rank, out_features, 1, bias=False)
        else:
            if base.groups != 1 or base.padding_mode != "zeros":
                raise ValueError(f"LoRA: grouped or non-zero-padded convolutions are not supported ({base})")
            out_features, weight, spatial = base.out_channels, base.weight, base.weight.dim() - 2
            conv = type(base)
            down = conv(base.in_channels, cfg.rank, base.kernel_size, stride=base.stride, padding=base.padding,
                        dilation=base.dilation, bias=False)
            up = conv(cfg.rank, out_features, 1, bias=False)
        self.base = base
        self._nin = nin if isinstance(base, NIN) else None    # NIN's forward as a function of (x, W, b)
        self.scale = cfg.scale
        self.active = False
        self._bias_shape = (out_features,) + (1,) * spatial
        self.down = down.to(device=weight.device, dtype=weight.dtype)
        self.up = up.to(device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            fan_in = self.down.weight[0].numel()
            noise = torch.randn(self.down.weight.shape, generator=generator, dtype=torch.float32)
            self.down.weight.copy_(noise / math.sqrt(fan_in))
            self.up.weight.zero_()
        self.bias_delta = (nn.Parameter(torch.zeros(out_features, device=weight.device, dtype=weight.dtype))
                           if cfg.train_bias else None)

    def forward(self, x: Tensor) -> Tensor:
        if not self.active:
            return self.base(x)
        if torch.is_grad_enabled():
            out = self.base(x) + self.scale * self.up(self.down(x))
            if self.bias_delta is not None:
                out = out + self.bias_delta.view(self._bias_shape)
            return out
        weight, bias = self.merged()
        if self._nin is not None:
            return self._nin(x, weight, bias)
        if isinstance(self.base, nn.Linear):
            return nn.functional.linear(x, weight, bias)
        return self.base._conv_forward(x, weight, bias)

    def merged(self) -> tuple[Tensor, Tensor | None]:
        """``(W + s B A, b + delta_b)`` in the base layer's layout (NIN: W is (in, out))."""
        up, down = self.up.weight.flatten(1), self.down.weight    # (out, r), (r, in[, k...])
        delta = self.scale * torch.einsum("or,ri...->oi...", up, down)
        if self._nin is not None:                                  # NIN: W (in, out), b (out,)
            weight, bias = self.base.W + delta.flatten(1).T, self.base.b
        else:
            weight, bias = self.base.weight + delta, self.base.bias
        if self.bias_delta is not None:
            bias = self.bias_delta if bias is None else bias + self.bias_delta
        return weight, bias


def inject_lora(model: nn.Module, cfg: LoraConfig) -> list[str]:
    """Wrap the target layers of ``model`` in :class:`LoraLayer`, in place, and freeze the rest.

    Parameters
    ----------
    model : the denoiser (wrap what :func:`mbir_batch.kernels.priors.load_denoiser` returns,
        so adapter keys carry the same prefix in every run).
    cfg : which layers and which rank.

    Returns
    -------
    names : qualified names of the wrapped layers, in ``named_modules`` order. Layer k's A is
        drawn with seed ``slice_seed(cfg.seed ^ tag, k, 0)``.

    Raises
    ------
    ValueError
        The model already holds LoRA layers, or no layer matches ``cfg``.
    """
    if lora_layers(model):
        raise ValueError("inject_lora: the model already has LoRA layers")
    patterns = [re.compile(p) for p in cfg.targets]
    inside = {name for block, module in model.named_modules() if type(module).__name__ in cfg.blocks
              for name, _ in module.named_modules(prefix=block)}
    wrappable = _wrappable()
    names = [name for name, module in model.named_modules() if isinstance(module, wrappable)
             and (any(p.search(name) for p in patterns) if patterns else name in inside)]
    if not names:
        raise ValueError(f"inject_lora: no Linear/Conv/NIN layer of {type(model).__name__} matches "
                         f"blocks {list(cfg.blocks)} / targets {list(cfg.targets)}")
    model.requires_grad_(False)
    generator = torch.Generator(device="cpu")
    for index, name in enumerate(names):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        generator.manual_seed(slice_seed(cfg.seed ^ _INIT_TAG, index, 0))
        setattr(parent, child, LoraLayer(getattr(parent, child), cfg, generator))
    for _, param in lora_parameters(model):
        param.requires_grad_(True)
    return names


def lora_layers(model: nn.Module) -> list[tuple[str, LoraLayer]]:
    """(qualified name, layer) of every :class:`LoraLayer` in ``model``."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoraLayer)]


def lora_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The trainable parameters ``<layer>.down.weight``, ``.up.weight`` [, ``.bias_delta``], in a fixed order."""
    out: list[tuple[str, nn.Parameter]] = []
    for name, layer in lora_layers(model):
        out += [(f"{name}.down.weight", layer.down.weight), (f"{name}.up.weight", layer.up.weight)]
        if layer.bias_delta is not None:
            out.append((f"{name}.bias_delta", layer.bias_delta))
    return out


def set_lora_active(model: nn.Module, active: bool) -> None:
    """Compute (True) or skip (False) every LoRA branch of ``model``."""
    for _, layer in lora_layers(model):
        layer.active = bool(active)


def lora_active(model: nn.Module) -> bool:
    """Whether ``model`` has LoRA layers and all of them are computed."""
    layers = lora_layers(model)
    return bool(layers) and all(layer.active for _, layer in layers)


def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The adapter alone, ``{name: contiguous float32 CPU copy}``."""
    return {name: p.detach().float().cpu().contiguous().clone() for name, p in lora_parameters(model)}


def load_lora_state_dict(model: nn.Module, state: Mapping[str, Tensor], *, source: str = "adapter") -> None:
    """Copy an adapter into an injected model (same names and shapes, strictly) and activate it.

    Raises :class:`AdapterLoadError` (message starts with ``source``) naming the missing or
    unexpected keys or the first mismatched shape; the model is unchanged then.
    """
    params = dict(lora_parameters(model))
    missing, unexpected = sorted(set(params) - set(state)), sorted(set(state) - set(params))
    if missing or unexpected:
        raise AdapterLoadError(f"{source}: does not fit the model: missing {missing[:3]} ({len(missing)}), "
                               f"unexpected {unexpected[:3]} ({len(unexpected)})")
    for name, param in params.items():
        if tuple(state[name].shape) != tuple(param.shape):
            raise AdapterLoadError(f"{source}: {name} has shape {tuple(state[name].shape)}, "
                                   f"the model's is {tuple(param.shape)}")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(state[name].to(device=param.device, dtype=param.dtype))
    set_lora_active(model, True)
