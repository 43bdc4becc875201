"""One ADMM iteration for ``min_x 1/2 ||A x - y||^2 + lam ||D_z x||_1`` on a z-slab.

This is the data-consistency + z-TV step of DiffusionMBIR (Chung, Ryu, McCann,
Klasky, Ye, CVPR 2023, Sec. 3, Eq. 11-13), in the "fast" form whose splitting
variable and scaled dual are carried across diffusion steps instead of being
reset, and which DDS (Chung, Lee, Ye, ICLR 2024) runs with a few CG iterations.

======  ==============  ================================================
paper   variable        meaning
======  ==============  ================================================
x       ``x``           the slab (Z, H, W)
z       ``state.z``     splitting variable, z = D_z x
w       ``state.w``     scaled dual variable (u in Boyd et al. 2011)
rho     ``rho``         ADMM penalty
lam     ``lam``         z-TV weight
A^T y   ``aty``         back-projected measurements of this slab
======  ==============  ================================================

Updates::

    x <- CG[(A^T A + rho D_z^T D_z) x = A^T y + rho D_z^T (z - w)]   (warm start x)
    z <- soft(D_z x + w, lam / rho)
    w <- w + D_z x - z

Residuals (Boyd et al. 2011, Sec. 3.3): primal ``||D_z x - z||``, dual
``rho ||D_z^T (z - z_old)||``, both global over all slabs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .cg import conjugate_gradient
from .comm import Comm, make_dot
from .tv import diff_z_adjoint_comm, diff_z_comm, diff_z_normal_comm, soft_threshold

__all__ = ["AdmmInfo", "AdmmState", "admm_tv_z_step"]


@dataclass
class AdmmState:
    """ADMM variables of one slab, both shaped like the slab (the range of ``D_z``).

    Attributes
    ----------
    z : splitting variable (``z = D_z x`` at convergence).
    w : scaled dual variable.
    """

    z: Tensor
    w: Tensor

    @classmethod
    def zeros_like(cls, x: Tensor) -> AdmmState:
        """The cold start: ``z = w = 0`` with the shape, dtype and device of ``x``."""
        return cls(z=torch.zeros_like(x), w=torch.zeros_like(x))


@dataclass(frozen=True)
class AdmmInfo:
    """Diagnostics of one ADMM iteration (global over all slabs).

    Attributes
    ----------
    cg_residual : relative residual of the x-update CG solve.
    primal_residual : ``||D_z x - z||``.
    dual_residual : ``rho ||D_z^T (z - z_old)||``.
    """

    cg_residual: float
    primal_residual: float
    dual_residual: float


def admm_tv_z_step(
    x: Tensor,
    state: AdmmState,
    *,
    A: Callable[[Tensor], Tensor],
    AT: Callable[[Tensor], Tensor],
    aty: Tensor,
    rho: float,
    lam: float,
    cg_iters: int,
    comm: Comm,
    cg_tol: float = 0.0,
) -> tuple[Tensor, AdmmState, AdmmInfo]:
    """Run one ADMM-TV-z iteration on a slab (see the module docstring for the updates).

    All slabs of a volume must call this together: the CG inner products and the
    residual norms are global sums, and ``D_z`` exchanges halos through ``comm``.

    Parameters
    ----------
    x : current slab ``(Z, H, W)``, the CG warm start (not modified).
    state : ``z`` and ``w`` from the previous iteration (not modified).
    A, AT : forward operator and its adjoint on a slab (e.g. ``operator.A``, ``operator.AT``).
    aty : ``A^T y`` for this slab, shaped like ``x``.
    rho : ADMM penalty (> 0).
    lam : z-TV weight (>= 0).
    cg_iters : CG iterations for the x-update.
    comm : the slab communicator.
    cg_tol : relative CG tolerance (0: always run ``cg_iters``).

    Returns
    -------
    x : updated slab.
    state : new :class:`AdmmState`.
    info : :class:`AdmmInfo`.
    """
    if rho <= 0:
        raise ValueError(f"admm_tv_z_step: rho must be > 0, got {rho}")
    if lam < 0:
        raise ValueError(f"admm_tv_z_step: lam must be >= 0, got {lam}")
    if not (x.shape == aty.shape == state.z.shape == state.w.shape):
        raise ValueError(
            "admm_tv_z_step: x, aty, state.z and state.w must share a shape, got "
            f"{tuple(x.shape)}, {tuple(aty.shape)}, {tuple(state.z.shape)}, {tuple(state.w.shape)}"
        )
    dot = make_dot(comm)

    # 1. x-update: CG on the normal equations, warm-started from the current slab
    def normal(v: Tensor) -> Tensor:
        return AT(A(v)) + rho * diff_z_normal_comm(v, comm)

    rhs = aty + rho * diff_z_adjoint_comm(state.z - state.w, comm)
    x, cg_info = conjugate_gradient(normal, rhs, x, dot=dot, iters=cg_iters, tol=cg_tol)

    # 2. z-update: proximal map of (lam / rho) ||.||_1
    dzx = diff_z_comm(x, comm)
    z = soft_threshold(dzx + state.w, lam / rho)

    # 3. scaled dual ascent
    w = state.w + dzx - z

    # 4. residuals, both norms in one all-reduce
    dual_vec = diff_z_adjoint_comm(z - state.z, comm)
    local = torch.stack(
        [
            torch.sum(torch.square(dzx - z), dtype=torch.float64),
            torch.sum(torch.square(dual_vec), dtype=torch.float64),
        ]
    )
    primal_sq, dual_sq = comm.all_reduce_sum(local).tolist()
    info = AdmmInfo(
        cg_residual=cg_info.residual,
        primal_residual=math.sqrt(max(primal_sq, 0.0)),
        dual_residual=rho * math.sqrt(max(dual_sq, 0.0)),
    )
    return x, AdmmState(z=z, w=w), info
