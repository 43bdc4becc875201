"""Test-time adaptation of the diffusion prior to the measured volume (D3IP), on a slab.

Chung and Ye, "Deep Diffusion Image Prior for Efficient OOD Adaptation in 3D Inverse
Problems", ECCV 2024 (arXiv 2407.10641), Alg. 1: while sampling, in a window of noise levels,
a few AdamW steps tune LoRA weights theta (:mod:`.lora`, Hu et al. 2022) shared by the whole
volume on the measurement loss, and sampling continues with the adapted denoiser. Here one
adaptation round, before the denoiser of sampler step i runs, takes ``steps`` AdamW steps on

    L(theta) = 1/|S| sum_{z in S} mean_m (A_z CG_K(D_theta(x_z, sigma)) - y_z)_m^2
             + reg/|S| sum_{z in S} mean_p (D_theta(b_z + sigma n_z, sigma) - b_z)_p^2

==========  ======================  ======================================================
paper       variable                meaning
==========  ======================  ======================================================
theta       LoRA B, A [, delta_b]   the only trainable parameters (:func:`.lora.inject_lora`)
D_theta     ``model``               denoiser D(x (B, 1, H, W), sigma) -> x0, image space
x_t         ``x``                   the slab (Z_local, H, W) at noise level ``sigma``
A, y        ``operator``, ``y``     slice-wise forward operator, this slab's measurements
S           :func:`choose_slices`   ``cfg.slices`` GLOBAL slice indices per AdamW step
CG_K        ``cfg.cg``              K conjugate-gradient steps on A^T A v = A^T y from D (K=0: none)
b_z, n_z    ``bank``, noise         an in-distribution slice and its noise (regulariser)
gamma       ``cfg.reg``             weight of the denoising regulariser (0: off)
==========  ======================  ======================================================

CG_K is differentiable (DDIP adapts through one CG step); |r|^2 of complex (MRI k-space)
residuals sums the real and imaginary parts.

Distribution. Every rank evaluates the same :func:`choose_slices` (a hash of (seed, draw,
global z)) and works on the chosen slices inside its slab. Each chosen slice goes through the
network alone (batch 1: CPU convolutions are not batch-invariant), and its gradient (and its
two loss terms) fill its own row of a (|S|, P + 2) buffer, zero elsewhere. ``all_reduce`` sums
that buffer over the ranks (one non-zero contributor per row, and g + 0 = g exactly), and every
rank adds the rows in the same order. So any split gives bit-identical LoRA weights, for
4 |S| (P + 2) bytes per AdamW step and rank, independent of the depth. A local sum before the
all-reduce (4 P bytes) was measured on the prototype and rejected: after 3 steps with 2 workers
the weights differed by up to 3.2e-3, because AdamW's first steps are about lr * sign(g), which
flips for gradients near zero.

Measured with the prototype (64x64x16, 8-view CT, bundled model): on an out-of-distribution
ellipsoid phantom DDS went from 25.7 to 29.5 dB (lr 3e-3, 5 steps every 2 sampler steps, sigma
1.0 -> 0.05, 4 slices, rank 4, CG 1, bias deltas) at about 1.8x the sampling wall time; in
distribution lr 1e-2 cost about 2 dB, so presets need a lower lr or ``reg``.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .diffusion import slice_noise, slice_seed
from .lora import AdapterLoadError, LoraConfig, load_lora_state_dict, lora_parameters, lora_state_dict, set_lora_active
from .mri import CartesianMRI
from .operators import Operator

__all__ = ["AdaptConfig", "RoundInfo", "adapt_round", "adapt_state", "adaptation_steps", "cg_steps", "choose_slices",
           "load_adapt_state", "make_optimizer", "slab_share", "slice_operator"]

AllReduce = Callable[[Tensor], Tensor]
_CHOICE_TAG = 0x5EED_AD4A  # separates the slice-choice stream from the sampler's noise stream
_REG_TAG = 0x5EED_4E61     # ... and the regulariser's noise


def _identity(t: Tensor) -> Tensor:
    return t


@dataclass(frozen=True)
class AdaptConfig:
    """The ``adapt:`` section of a method preset (the loss is in the module docstring).

    Attributes
    ----------
    lr : AdamW learning rate (> 0).
    steps : AdamW steps per adaptation round (>= 1).
    every : a round at every ``every``-th sampler step inside the window (>= 1).
    sigma_start, sigma_end : the window, ``sigma_end <= sigma <= sigma_start`` (image space).
    slices : |S|, slices per AdamW step, drawn from the whole volume (>= 1).
    cg : K, CG steps between D_theta and A in the loss (>= 0; DDIP uses 1).
    reg : gamma, weight of the in-distribution denoising loss (>= 0; > 0 needs a bank).
    weight_decay : AdamW's decoupled weight decay (>= 0).
    seed : seed of the slice choice and of the regulariser's noise (>= 0).
    lora : rank, targets and initialisation of the adapters.
    """

    lr: float = 3e-3
    steps: int = 5
    every: int = 2
    sigma_start: float = 1.0
    sigma_end: float = 0.05
    slices: int = 4
    cg: int = 1
    reg: float = 0.0
    weight_decay: float = 0.0
    seed: int = 0
    lora: LoraConfig = field(default_factory=LoraConfig)

    def __post_init__(self) -> None:
        for key, least in (("steps", 1), ("every", 1), ("slices", 1), ("cg", 0), ("seed", 0)):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"adapt.{key}: must be an integer >= {least}, got {value!r}")
        for key, positive in (("lr", True), ("sigma_start", True), ("sigma_end", True), ("reg", False),
                              ("weight_decay", False)):
            value = getattr(self, key)
            if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
                    or value < 0 or (positive and value == 0)):
                raise ValueError(f"adapt.{key}: must be a finite number {'> 0' if positive else '>= 0'}, got {value!r}")
        if self.sigma_end > self.sigma_start:
            raise ValueError(f"adapt: sigma_end {self.sigma_end} is above sigma_start {self.sigma_start}")
        if not isinstance(self.lora, LoraConfig):
            raise ValueError(f"adapt.lora: must be a LoraConfig, got {type(self.lora).__name__}")


def adaptation_steps(sigmas: Tensor | Sequence[float], cfg: AdaptConfig) -> list[int]:
    """Sampler step indices i that start with an adaptation round.

    ``sigmas`` is the schedule (the last entry, the final 0, is no step). The window holds the
    steps with ``sigma_end <= sigmas[i] <= sigma_start``; every ``every``-th of them, counting
    from the first, adapts.
    """
    values = [float(s) for s in sigmas][:-1]
    window = [i for i, s in enumerate(values) if cfg.sigma_end <= s <= cfg.sigma_start]
    return window[::cfg.every]


def choose_slices(seed: int, draw: int, depth: int, count: int) -> list[int]:
    """The ``min(count, depth)`` global slice indices of AdamW step ``draw``, ascending.

    Slice z gets the key ``slice_seed(seed ^ tag, draw, z)`` (splitmix64) and the ``count``
    smallest keys win: a function of (seed, draw, z) alone, which every rank evaluates for the
    whole volume without communication, so the choice does not depend on the slab split.
    """
    if depth < 1 or count < 1 or draw < 0:
        raise ValueError(f"choose_slices: need depth >= 1, count >= 1, draw >= 0; got {depth}, {count}, {draw}")
    keys = sorted((slice_seed(seed ^ _CHOICE_TAG, draw, z), z) for z in range(depth))
    return sorted(z for _, z in keys[:min(count, depth)])


def slab_share(chosen: Sequence[int], first_slice: int, slab_depth: int) -> list[tuple[int, int]]:
    """(row in ``chosen``, local index) of the chosen slices in the slab [first, first + slab_depth)."""
    return [(row, z - first_slice) for row, z in enumerate(chosen) if first_slice <= z < first_slice + slab_depth]


def slice_operator(operator: Operator, local: int) -> Operator:
    """The operator of the slab's slice ``local`` alone: ``operator`` itself when it is the same for
    every slice, a :class:`~.mri.CartesianMRI` of that slice's mask when the mask is (Z, H, W)."""
    if isinstance(operator, CartesianMRI) and operator.mask.dim() == 3:
        return CartesianMRI(operator.mask[local])
    return operator


def make_optimizer(model: nn.Module, cfg: AdaptConfig) -> torch.optim.AdamW:
    """One AdamW over the LoRA parameters for the whole run (its state belongs in the checkpoint)."""
    params = [p for _, p in lora_parameters(model)]
    if not params:
        raise ValueError("make_optimizer: the model has no LoRA layers; call inject_lora first")
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def adapt_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Tensor]:
    """Everything a resumed run needs, as flat CPU tensors (one copy per run: all ranks agree).

    ``lora.<name>``: the LoRA parameters (float32); after the first AdamW step also
    ``exp_avg.<name>``, ``exp_avg_sq.<name>`` and ``adam_step`` (AdamW's moments and step count).
    """
    out = {f"lora.{k}": v for k, v in lora_state_dict(model).items()}
    steps = set()
    for name, param in lora_parameters(model):
        moments = optimizer.state.get(param, {})
        if moments:
            out[f"exp_avg.{name}"] = moments["exp_avg"].detach().cpu().clone()
            out[f"exp_avg_sq.{name}"] = moments["exp_avg_sq"].detach().cpu().clone()
            steps.add(float(moments["step"]))
    if steps:
        if len(steps) > 1:
            raise ValueError(f"adapt_state: the LoRA parameters have taken different numbers of steps {sorted(steps)}")
        out["adam_step"] = torch.tensor(steps.pop(), dtype=torch.float32)
    return out


def load_adapt_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Tensor], *,
                     source: str = "checkpoint") -> None:
    """Restore :func:`adapt_state` into an injected model and its :func:`make_optimizer` (exact resume).

    Raises :class:`~.lora.AdapterLoadError` (message starts with ``source``) when the tensors do not
    fit the model.
    """
    load_lora_state_dict(model, {k[5:]: v for k, v in state.items() if k.startswith("lora.")}, source=source)
    if "adam_step" not in state:
        return
    saved = optimizer.state_dict()
    moments = {}
    for index, (name, param) in enumerate(lora_parameters(model)):
        try:
            moments[index] = {"step": state["adam_step"].clone(), "exp_avg": state[f"exp_avg.{name}"],
                              "exp_avg_sq": state[f"exp_avg_sq.{name}"]}
        except KeyError as err:
            raise AdapterLoadError(f"{source}: no AdamW moment {err} for the LoRA parameter {name}") from None
    optimizer.load_state_dict({"state": moments, "param_groups": saved["param_groups"]})


def cg_steps(v: Tensor, operator: Operator, aty: Tensor, steps: int) -> Tensor:
    """``steps`` CG iterations on A^T A v = A^T y for one slice stack (Z, H, W), differentiable.

    Each slice has its own step sizes (the Z stack is Z independent problems; ``adapt_round``
    passes one slice at a time).
    """
    def normal(u: Tensor) -> Tensor:
        return operator.AT(operator.A(u))

    def dot(a: Tensor, b: Tensor) -> Tensor:
        return (a * b).sum()

    r = aty - normal(v)
    p, rr = r, dot(r, r)
    for k in range(steps):
        ap = normal(p)
        alpha = rr / dot(p, ap).clamp_min(1e-30)
        v = v + alpha * p
        if k + 1 < steps:
            r = r - alpha * ap
            rr_next = dot(r, r)
            p, rr = r + (rr_next / rr.clamp_min(1e-30)) * p, rr_next
    return v


@dataclass(frozen=True)
class RoundInfo:
    """What one adaptation round did.

    Attributes
    ----------
    losses : the global data term of L before each AdamW step (all ranks agree).
    reg_losses : the global denoising term (unweighted) before each step; zeros when reg = 0.
    forwards, backwards : slice forwards / backwards with autograd on this rank.
    bytes_reduced : bytes this rank handed to ``all_reduce``.
    """

    losses: tuple[float, ...]
    reg_losses: tuple[float, ...]
    forwards: int
    backwards: int
    bytes_reduced: int


def adapt_round(model: nn.Module, optimizer: torch.optim.Optimizer, x: Tensor, sigma: float, *,
                step: int, first_slice: int, depth: int, operator: Operator, y: Tensor, cfg: AdaptConfig,
                bank: Tensor | None = None, all_reduce: AllReduce = _identity) -> RoundInfo:
    """One adaptation round at sampler step ``step``: ``cfg.steps`` AdamW steps on L (module docstring).

    Parameters
    ----------
    model : denoiser with LoRA injected, ``model(x (B, 1, H, W), sigma) -> x0``; run in eval
        mode (its mode is restored); its LoRA branches are active afterwards.
    optimizer : from :func:`make_optimizer`, the same object for the whole run.
    x : this slab's current sample (Z_local, H, W) at noise level ``sigma`` (not modified).
    sigma : the noise level of ``x``, image space.
    step : the sampler step index; AdamW step j of the round draws with ``step * cfg.steps + j``.
    first_slice, depth : the global index of ``x[0]`` and the volume's slice count.
    operator : the slab's slice-wise A and its adjoint AT, built from differentiable torch
        operations; each slice uses :func:`slice_operator`.
    y : this slab's measurements (Z_local, *range_shape).
    cfg : the adaptation settings.
    bank : (N, H, W) in-distribution slices for ``cfg.reg`` (slice z uses ``bank[z % N]``).
    all_reduce : sum of a tensor over the ranks (``comm.all_reduce_sum``); every rank calls it
        once per AdamW step, also when it owns none of the chosen slices.

    Returns
    -------
    RoundInfo
    """
    if cfg.reg > 0 and bank is None:
        raise ValueError("adapt_round: reg > 0 needs a bank of in-distribution slices")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"adapt_round: x has {x.shape[0]} slices but y has {y.shape[0]}")
    params = [p for _, p in lora_parameters(model)]
    sizes = [p.numel() for p in params]
    losses: list[float] = []
    reg_losses: list[float] = []
    forwards = bytes_reduced = 0
    was_training = model.training
    model.eval()
    set_lora_active(model, True)   # B receives a gradient only through a computed branch
    try:
        for j in range(cfg.steps):
            draw = step * cfg.steps + j
            chosen = choose_slices(cfg.seed, draw, depth, cfg.slices)
            rows = torch.zeros((len(chosen), sum(sizes)), dtype=torch.float32, device=x.device)
            terms = torch.zeros((len(chosen), 2), dtype=torch.float32, device=x.device)
            for row, local in slab_share(chosen, first_slice, x.shape[0]):
                optimizer.zero_grad(set_to_none=True)
                pair = None if bank is None or cfg.reg == 0 else _reg_pair(bank, cfg, draw, first_slice + local)
                data, reg = _slice_loss(model, x[local], sigma, slice_operator(operator, local), y[local], cfg, pair)
                loss = (data + cfg.reg * reg) / len(chosen)
                loss.backward()
                forwards += 1 + (cfg.reg > 0)
                terms[row] = torch.stack([data.detach(), reg.detach()]).float() / len(chosen)
                rows[row] = torch.cat([p.grad.reshape(-1) if p.grad is not None else p.new_zeros(p.numel())
                                       for p in params])
            packed = all_reduce(torch.cat([rows, terms], dim=1))
            bytes_reduced += packed.numel() * packed.element_size()
            summed = packed.sum(dim=0)
            losses.append(float(summed[-2]))
            reg_losses.append(float(summed[-1]))
            grad = summed[:-2]
            for param, g in zip(params, torch.split(grad, sizes)):
                param.grad = g.view_as(param).to(param.dtype).clone()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    finally:
        model.train(was_training)
    return RoundInfo(losses=tuple(losses), reg_losses=tuple(reg_losses), forwards=forwards, backwards=forwards,
                     bytes_reduced=bytes_reduced)


def _reg_pair(bank: Tensor, cfg: AdaptConfig, draw: int, z: int) -> tuple[Tensor, Tensor]:
    """(clean b_z, noise n_z) of the regulariser for global slice z at AdamW step ``draw``."""
    clean = bank[z % bank.shape[0]]
    noise = slice_noise(cfg.seed ^ _REG_TAG, draw, [z], tuple(clean.shape), device=clean.device)[0]
    return clean, noise


def _slice_loss(model: nn.Module, xt: Tensor, sigma: float, operator: Operator, y: Tensor, cfg: AdaptConfig,
                reg_pair: tuple[Tensor, Tensor] | None) -> tuple[Tensor, Tensor]:
    """(data term, denoising term) of L for ONE slice xt (H, W), with autograd."""
    x0 = model(xt.detach().reshape(1, 1, *xt.shape), sigma)[:, 0]
    if cfg.cg:
        x0 = cg_steps(x0, operator, operator.AT(y.unsqueeze(0)), cfg.cg)
    residual = operator.A(x0)[0] - y
    if residual.is_complex():
        residual = torch.view_as_real(residual)
    data = residual.pow(2).mean()
    if reg_pair is None:
        return data, data.new_zeros(())
    clean, noise = (t.to(xt.device) for t in reg_pair)
    denoised = model((clean + sigma * noise).reshape(1, 1, *clean.shape), sigma)[0, 0]
    return data, (denoised - clean).pow(2).mean()
