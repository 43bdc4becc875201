"""ADMM with anisotropic 3D TV: the model-based baseline of DiffusionMBIR (Chung et al., CVPR 2023, Table 1).

Solves ``min_x 1/2 ||A x - y||^2 + lam ||D x||_1`` with ``D x = (lam_xy D_x x, lam_xy D_y x,
D_z x)`` (:class:`~mbir_batch.kernels.tv.Gradient3D`) by the scaled-dual ADMM iteration of
:func:`~mbir_batch.kernels.admm.admm_tv_step`, ``iters`` times::

    x <- CG[(A^T A + rho D^T D) x = A^T y + rho D^T (z - w)]     (cg_iters CG steps)
    z <- soft(D x + w, lam / rho)
    w <- w + D x - z

It starts from the FBP (CT) or zero-filled (MRI) slab with ``z = w = 0``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..kernels.admm import AdmmState, admm_tv_step
from ..kernels.comm import Comm
from ..kernels.tv import Gradient3D
from ..solve import SlabProblem, SlabState, StepEvent, check_finite
from .base import Method, MethodConfig, admm_aux, setting, take_admm


@dataclass(frozen=True)
class AdmmTvConfig(MethodConfig):
    """Knobs of the 3D-TV baseline.

    Attributes
    ----------
    iters : ADMM iterations.
    rho, lam : ADMM penalty and TV weight (lam ||D x||_1).
    lam_xy : in-slice TV weight relative to ``lam``.
    cg_iters : CG iterations per ADMM iteration.
    """

    method = "admm-tv"
    iters: int = setting(100, at_least=1)
    rho: float = setting(1.0, above=0)
    lam: float = setting(0.1, at_least=0)
    lam_xy: float = setting(1.0, at_least=0)
    cg_iters: int = setting(20, at_least=1)

    @property
    def total_steps(self) -> int:
        return self.iters


def initial_state(problem: SlabProblem, cfg: AdmmTvConfig, *, device: torch.device,
                  denoiser: torch.nn.Module | None = None) -> SlabState:
    """The FBP / zero-filled slab, ``z = w = 0`` of shape ``(3, Z, H, W)``."""
    x = problem.operator.direct_inverse(problem.measurements)
    return SlabState(step=0, x=x, aux=admm_aux(AdmmState(z=Gradient3D.zeros(x), w=Gradient3D.zeros(x))))


def run(problem: SlabProblem, cfg: AdmmTvConfig, state: SlabState, *, comm: Comm,
        denoiser: torch.nn.Module | None, device: torch.device,
        callback: Callable[[StepEvent], None] | None) -> Tensor:
    """ADMM iterations ``state.step .. iters - 1``; returns the slab (SolverDivergedError on NaN/inf)."""
    operator, tv = problem.operator, Gradient3D(cfg.lam_xy, comm)
    start = state.step
    x, aux = state.release()
    admm = take_admm(aux, "admm-tv")
    for step in range(start, cfg.iters):
        started = time.perf_counter()
        x, admm, info = admm_tv_step(x, admm, A=operator.A, AT=operator.AT, aty=problem.aty, tv=tv, rho=cfg.rho,
                                     lam=cfg.lam, cg_iters=cfg.cg_iters, comm=comm)
        if callback is not None:
            seconds = time.perf_counter() - started
            callback(StepEvent(step + 1, cfg.iters, SlabState(step + 1, x, admm_aux(admm)), seconds,
                               x.shape[0] / max(seconds, 1e-9), info.as_dict()))
    return check_finite(x, problem, cfg)


METHOD = Method(name="admm-tv", label="ADMM-TV", config_type=AdmmTvConfig, needs_model=False, steps_key="iters",
                initial_state=initial_state, run=run)
