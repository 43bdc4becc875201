"""slice2d: DDS without the z coupling, the 2D baseline (each slice on its own prior).

Per step i, as :mod:`.dds` but with plain CG on the data term instead of ADMM-TV-z::

    x0_hat = D(x, sigma)
    x0     = CG[A^T A x = A^T y]   (cg_iters steps from x0_hat; Chung, Lee, Ye, ICLR 2024, Eq. 11
                                    with lam = 0)
    x      = x0 + sigma' (sqrt(1 - eta^2) (x - x0_hat) / sigma + eta n_i)

It starts from ``sigma_max * n_{-1}`` and returns the last x0 clamped to [0, 1].
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..kernels.cg import conjugate_gradient
from ..kernels.comm import Comm, make_dot
from ..kernels.diffusion import sample_dds
from ..solve import SlabProblem, SlabState, StepEvent, check_finite
from .base import Method, setting
from .sampling import DiffusionConfig, noisy_start, run_sampler


@dataclass(frozen=True)
class Slice2dConfig(DiffusionConfig):
    """Knobs of slice2d (besides those of :class:`~.sampling.DiffusionConfig`).

    Attributes
    ----------
    eta : DDIM stochasticity (0: deterministic, 1: fully re-noised).
    """

    method = "slice2d"
    eta: float = setting(0.85, within=(0, 1))


class PlainCG:
    """The data step ``x -> CG[A^T A x = A^T y]`` from ``x``, ``cg_iters`` iterations; carries nothing."""

    def __init__(self, problem: SlabProblem, cfg: Slice2dConfig, comm: Comm) -> None:
        self.problem, self.cfg, self.dot = problem, cfg, make_dot(comm)
        self.info: dict[str, float] = {}

    def __call__(self, x: Tensor) -> Tensor:
        operator = self.problem.operator
        x, cg_info = conjugate_gradient(lambda v: operator.AT(operator.A(v)), self.problem.aty, x, dot=self.dot,
                                        iters=self.cfg.cg_iters)
        self.info.update(cg_residual=cg_info.residual)
        return x

    def aux(self) -> dict[str, Tensor]:
        return {}


def initial_state(problem: SlabProblem, cfg: Slice2dConfig, *, device: torch.device,
                  denoiser: torch.nn.Module | None = None) -> SlabState:
    """Pure noise ``sigma_0 * n_{-1}`` (:func:`~.sampling.noisy_start`)."""
    return SlabState(step=0, x=noisy_start(problem, cfg, device=device, denoiser=denoiser))


def run(problem: SlabProblem, cfg: Slice2dConfig, state: SlabState, *, comm: Comm,
        denoiser: torch.nn.Module | None, device: torch.device,
        callback: Callable[[StepEvent], None] | None) -> Tensor:
    """slice2d steps ``state.step .. steps - 1``; returns the slab clamped to [0, 1]
    (SolverDivergedError on NaN/inf)."""
    start = state.step
    x, _ = state.release()
    x = run_sampler(problem, cfg, x, start=start, sample=functools.partial(sample_dds, eta=cfg.eta),
                    data_step=PlainCG(problem, cfg, comm), denoiser=denoiser, device=device, callback=callback)
    return check_finite(x, problem, cfg).clamp(0.0, 1.0)


METHOD = Method(name="slice2d", label="slice2d", config_type=Slice2dConfig, needs_model=True,
                steps_key="steps", initial_state=initial_state, run=run)
