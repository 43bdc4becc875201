"""DiffusionMBIR (Chung, Ryu, McCann, Klasky, Ye, CVPR 2023, Algorithm 2) with a denoiser prior.

Per step i (sigma = sigma_i, sigma' = sigma_{i+1}; :func:`~mbir_batch.kernels.diffusion.sample_mbir`),
with the score s(x, sigma) = (D(x, sigma) - x) / sigma^2::

    x = x + (sigma^2 - sigma'^2) s(x, sigma) + sqrt(sigma^2 - sigma'^2) n_{2i}     VE predictor
    x = x + e s(x, sigma') + sqrt(2 e) n_{2i+1},  e = 2 (snr ||n|| / ||s||)^2        Langevin corrector
    x = ADMM-TV-z(x)                              cg_iters CG steps, (z, w) carried (Sec. 3.2)

The corrector's norms are global over all slabs (a comm dot), so the step size does not depend on
the split. It starts from ``sigma_max * n_{-1}`` with ``z = w = 0`` and returns the result
clamped to [0, 1]. Two denoiser evaluations per step. ``lam: auto`` chooses lam as in ``dds``
(:func:`~.sampling.resolve_lam`, short runs of this sampler: 5 x 15 steps, 150 NFE per slice).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..kernels.comm import Comm, make_dot
from ..kernels.diffusion import sample_mbir
from ..solve import SlabProblem, SlabState, StepEvent
from .adaptation import AdaptSection, parse_adapt
from .base import Method, section, setting
from .sampling import DiffusionConfig, noisy_start_with_admm, run_with_admm


@dataclass(frozen=True)
class MbirConfig(DiffusionConfig):
    """Knobs of DiffusionMBIR (besides those of :class:`~.sampling.DiffusionConfig`).

    Attributes
    ----------
    rho, lam : ADMM penalty and z-TV weight (lam ||D_z x||_1); ``lam: auto`` chooses it per volume.
    snr : Langevin corrector signal-to-noise ratio (Song et al., ICLR 2021).
    adapt : test-time adaptation of the prior (the ``adapt:`` section, :mod:`.adaptation`), or None.
    """

    method = "mbir"
    nfe_per_step = 2
    rho: float = setting(1.0, above=0)
    lam: float | str = setting(0.1, at_least=0, words=("auto",))
    snr: float = setting(0.16, at_least=0)
    adapt: AdaptSection | None = section(parse_adapt)


def run(problem: SlabProblem, cfg: MbirConfig, state: SlabState, *, comm: Comm, denoiser: torch.nn.Module | None,
        device: torch.device, callback: Callable[[StepEvent], None] | None) -> Tensor:
    """DiffusionMBIR steps ``state.step .. steps - 1``; returns the slab clamped to [0, 1]
    (SolverDivergedError on NaN/inf)."""
    dot = make_dot(comm)

    def norm(v: Tensor) -> Tensor:
        return torch.sqrt(dot(v, v))

    sample = functools.partial(sample_mbir, snr=cfg.snr, norm=norm)
    return run_with_admm(problem, cfg, state, sample=sample, comm=comm, denoiser=denoiser, device=device,
                         callback=callback)


METHOD = Method(name="mbir", label="DiffusionMBIR", config_type=MbirConfig, needs_model=True, steps_key="steps",
                initial_state=noisy_start_with_admm, run=run)
