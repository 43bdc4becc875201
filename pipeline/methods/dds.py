"""DDS: Decomposed Diffusion Sampling (Chung, Lee, Ye, ICLR 2024) with the ADMM-TV-z data step.

Per step i (sigma = sigma_i, sigma' = sigma_{i+1}; :func:`~mbir_batch.kernels.diffusion.sample_dds`)::

    x0_hat = D(x, sigma)                                  Tweedie denoised estimate (Eq. 8)
    x0     = ADMM-TV-z(x0_hat)                            cg_iters CG steps, (z, w) carried (Eq. 11)
    x      = x0 + sigma' (sqrt(1 - eta^2) (x - x0_hat) / sigma + eta n_i)   DDIM re-noising (Eq. 9)

with the ADMM-TV-z step of DiffusionMBIR (Chung et al., CVPR 2023, Sec. 3) for
``min 1/2 ||A x - y||^2 + lam ||D_z x||_1``. It starts from ``sigma_max * n_{-1}`` with
``z = w = 0`` and returns the last x0 clamped to [0, 1] (the denoiser's image range).

``lam: auto`` chooses lam before the first step by hold-out cross-validation on the measurements
(:mod:`mbir_batch.kernels.lam_auto`, :func:`~.sampling.resolve_lam`): 5 candidates x 15 steps,
75 extra denoiser evaluations per slice; the choice is carried in the state (checkpoints).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..kernels.comm import Comm
from ..kernels.diffusion import sample_dds
from ..solve import SlabProblem, SlabState, StepEvent
from .adaptation import AdaptSection, parse_adapt
from .base import Method, section, setting
from .sampling import DiffusionConfig, noisy_start_with_admm, run_with_admm


@dataclass(frozen=True)
class DdsConfig(DiffusionConfig):
    """Knobs of DDS (besides those of :class:`~.sampling.DiffusionConfig`).

    Attributes
    ----------
    rho, lam : ADMM penalty and z-TV weight (lam ||D_z x||_1); ``lam: auto`` chooses it per volume.
    eta : DDIM stochasticity (0: deterministic, 1: fully re-noised).
    adapt : test-time adaptation of the prior (the ``adapt:`` section, :mod:`.adaptation`), or None.
    """

    method = "dds"
    rho: float = setting(1.0, above=0)
    lam: float | str = setting(0.1, at_least=0, words=("auto",))
    eta: float = setting(0.85, within=(0, 1))
    adapt: AdaptSection | None = section(parse_adapt)


def run(problem: SlabProblem, cfg: DdsConfig, state: SlabState, *, comm: Comm, denoiser: torch.nn.Module | None,
        device: torch.device, callback: Callable[[StepEvent], None] | None) -> Tensor:
    """DDS steps ``state.step .. steps - 1``; returns the slab clamped to [0, 1] (SolverDivergedError on NaN/inf)."""
    return run_with_admm(problem, cfg, state, sample=functools.partial(sample_dds, eta=cfg.eta), comm=comm,
                         denoiser=denoiser, device=device, callback=callback)


METHOD = Method(name="dds", label="DDS", config_type=DdsConfig, needs_model=True, steps_key="steps",
                initial_state=noisy_start_with_admm, run=run)
