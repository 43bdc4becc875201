"""Model-based baselines: FBP / zero-filled inverse, and ADMM with anisotropic 3D TV.

ADMM-TV is the model-based baseline of DiffusionMBIR (Chung et al., CVPR 2023, Table 1):

    min_x 1/2 ||A x - y||^2 + lam ||D x||_1,   D x = (lam_xy D_x x, lam_xy D_y x, D_z x)

solved with the scaled-dual ADMM iteration

    x <- CG[(A^T A + rho D^T D) x = A^T y + rho D^T (z - w)]
    z <- soft(D x + w, lam / rho)
    w <- w + D x - z

D_z needs the neighbouring slabs' boundary slices (halo exchange through ``comm``); D_x and D_y
are in-slice. The same code runs on one process and on N actors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from .kernels.admm import AdmmInfo, AdmmState
from .kernels.cg import conjugate_gradient
from .kernels.comm import Comm, make_dot
from .kernels.tv import diff_xy, diff_xy_adjoint, diff_z_adjoint_comm, diff_z_comm, soft_threshold


def fbp_or_zero_filled(operator, measurements: Tensor) -> Tensor:
    """FBP (ramp filter + backprojection) for CT, the zero-filled inverse for MRI."""
    if hasattr(operator, "fbp"):
        return operator.fbp(measurements)
    return operator.zero_filled(measurements)


@dataclass
class Gradient3D:
    """The stacked anisotropic gradient D = (lam_xy D_x, lam_xy D_y, D_z) over a slab, with halos."""

    lam_xy: float
    comm: Comm

    def __call__(self, x: Tensor) -> Tensor:
        dx, dy = diff_xy(x)
        return torch.stack((self.lam_xy * dx, self.lam_xy * dy, diff_z_comm(x, self.comm)))

    def T(self, d: Tensor) -> Tensor:
        return self.lam_xy * diff_xy_adjoint(d[0], d[1]) + diff_z_adjoint_comm(d[2], self.comm)


def admm_tv_3d_step(
    x: Tensor,
    state: AdmmState,
    *,
    A: Callable[[Tensor], Tensor],
    AT: Callable[[Tensor], Tensor],
    aty: Tensor,
    rho: float,
    lam: float,
    lam_xy: float,
    cg_iters: int,
    comm: Comm,
) -> tuple[Tensor, AdmmState, AdmmInfo]:
    """One ADMM iteration for anisotropic 3D TV; ``state.z``/``state.w`` have shape (3, Z, H, W)."""
    grad = Gradient3D(lam_xy, comm)
    dot = make_dot(comm)
    # 1. x-update: the normal equations of the augmented Lagrangian, warm-started at x.
    rhs = aty + rho * grad.T(state.z - state.w)
    x, cg_info = conjugate_gradient(lambda v: AT(A(v)) + rho * grad.T(grad(v)), rhs, x, dot=dot, iters=cg_iters)
    # 2. z-update: soft threshold of D x + w; 3. scaled dual ascent.
    dx = grad(x)
    z_new = soft_threshold(dx + state.w, lam / rho)
    w_new = state.w + dx - z_new
    primal_gap = dx - z_new
    dual_gap = grad.T(z_new - state.z)  # one adjoint (and one halo exchange), used twice
    primal = torch.sqrt(dot(primal_gap, primal_gap)).item()
    dual = rho * torch.sqrt(dot(dual_gap, dual_gap)).item()
    info = AdmmInfo(cg_residual=cg_info.residual, primal_residual=primal, dual_residual=dual)
    return x, AdmmState(z=z_new, w=w_new), info


def zeros_state_3d(x: Tensor) -> AdmmState:
    shape = (3, *x.shape)
    return AdmmState(z=x.new_zeros(shape), w=x.new_zeros(shape))
