"""One ADMM iteration for ``min_x 1/2 ||A x - y||^2 + lam ||D x||_1`` on a z-slab, any TV operator D.

This is the data-consistency + TV step of DiffusionMBIR (Chung, Ryu, McCann, Klasky, Ye,
CVPR 2023, Sec. 3, Eq. 11-13). With ``D = D_z`` (:class:`.tv.DiffZ`) it is the z-TV step, in the
"fast" form whose splitting variable and scaled dual are carried across diffusion steps instead of
being reset, and which DDS (Chung, Lee, Ye, ICLR 2024) runs with a few CG iterations. With
``D = (lam_xy D_x, lam_xy D_y, D_z)`` (:class:`.tv.Gradient3D`) it is the anisotropic 3D-TV
model-based baseline of the same paper (Table 1, "ADMM-TV").

======  ==============  ================================================
paper   variable        meaning
======  ==============  ================================================
x       ``x``           the slab (Z, H, W)
D       ``tv``          the TV operator (``tv(x)``, ``tv.T(d)``, ``tv.normal(x)``)
z       ``state.z``     splitting variable, z = D x
w       ``state.w``     scaled dual variable (u in Boyd et al. 2011)
rho     ``rho``         ADMM penalty
lam     ``lam``         TV weight
A^T y   ``aty``         back-projected measurements of this slab
======  ==============  ================================================

Updates::

    x <- CG[(A^T A + rho D^T D) x = A^T y + rho D^T (z - w)]   (warm start x)
    z <- soft(D x + w, lam / rho)
    w <- w + D x - z

Residuals (Boyd et al. 2011, Sec. 3.3): primal ``||D x - z||``, dual
``rho ||D^T (z - z_old)||``, both global over all slabs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .cg import conjugate_gradient
from .comm import Comm, make_dot
from .tv import DiffZ, TVOperator, soft_threshold

__all__ = ["AdmmInfo", "AdmmState", "admm_tv_step", "admm_tv_z_step"]


@dataclass
class AdmmState:
    """ADMM variables of one slab, both in the range of ``D`` (slab-shaped for ``D_z``).

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

    @classmethod
    def zeros_for(cls, tv: TVOperator, x: Tensor) -> AdmmState:
        """The cold start ``z = w = 0`` in the range of ``tv`` for slab ``x`` (``tv.zeros(x)``)."""
        return cls(z=tv.zeros(x), w=tv.zeros(x))


@dataclass(frozen=True)
class AdmmInfo:
    """Diagnostics of one ADMM iteration (global over all slabs).

    Attributes
    ----------
    cg_residual : relative residual of the x-update CG solve.
    primal_residual : ``||D x - z||``.
    dual_residual : ``rho ||D^T (z - z_old)||``.
    """

    cg_residual: float
    primal_residual: float
    dual_residual: float

    def as_dict(self) -> dict[str, float]:
        """The three residuals as plain floats (the ``info`` of a solver step event)."""
        return {
            "cg_residual": float(self.cg_residual),
            "primal_residual": float(self.primal_residual),
            "dual_residual": float(self.dual_residual),
        }


def admm_tv_step(
    x: Tensor,
    state: AdmmState,
    *,
    A: Callable[[Tensor], Tensor],
    AT: Callable[[Tensor], Tensor],
    aty: Tensor,
    tv: TVOperator,
    rho: float,
    lam: float,
    cg_iters: int,
    comm: Comm,
    cg_tol: float = 0.0,
) -> tuple[Tensor, AdmmState, AdmmInfo]:
    """Run one ADMM-TV iteration on a slab (see the module docstring for the updates).

    All slabs of a volume must call this together: the CG inner products and the
    residual norms are global sums, and ``D_z`` exchanges halos through ``comm``.

    Parameters
    ----------
    x : current slab ``(Z, H, W)``, the CG warm start (not modified).
    state : ``z`` and ``w`` from the previous iteration, shaped ``tv.output_shape(x.shape)``
        (not modified).
    A, AT : forward operator and its adjoint on a slab (e.g. ``operator.A``, ``operator.AT``).
    aty : ``A^T y`` for this slab, shaped like ``x``.
    tv : the TV operator D: :class:`.tv.DiffZ` or :class:`.tv.Gradient3D` over ``comm``.
    rho : ADMM penalty (> 0).
    lam : TV weight (>= 0).
    cg_iters : CG iterations for the x-update.
    comm : the slab communicator (global sums).
    cg_tol : relative CG tolerance (0: always run ``cg_iters``).

    Returns
    -------
    x : updated slab.
    state : new :class:`AdmmState`.
    info : :class:`AdmmInfo`.
    """
    if rho <= 0:
        raise ValueError(f"admm_tv_step: rho must be > 0, got {rho}")
    if lam < 0:
        raise ValueError(f"admm_tv_step: lam must be >= 0, got {lam}")
    range_shape = tv.output_shape(tuple(x.shape))
    if not (x.shape == aty.shape and tuple(state.z.shape) == tuple(state.w.shape) == range_shape):
        raise ValueError(
            f"admm_tv_step: x and aty must share a shape, and state.z and state.w the range shape {range_shape} "
            f"of D, got {tuple(x.shape)}, {tuple(aty.shape)}, {tuple(state.z.shape)}, {tuple(state.w.shape)}"
        )
    dot = make_dot(comm)

    # 1. x-update: CG on the normal equations, warm-started from the current slab
    def normal(v: Tensor) -> Tensor:
        return AT(A(v)) + rho * tv.normal(v)

    rhs = aty + rho * tv.T(state.z - state.w)
    x, cg_info = conjugate_gradient(normal, rhs, x, dot=dot, iters=cg_iters, tol=cg_tol)

    # 2. z-update: proximal map of (lam / rho) ||.||_1
    dx = tv(x)
    z = soft_threshold(dx + state.w, lam / rho)

    # 3. scaled dual ascent
    w = state.w + dx - z

    # 4. residuals, both norms in one all-reduce
    dual_vec = tv.T(z - state.z)
    local = torch.stack(
        [
            torch.sum(torch.square(dx - z), dtype=torch.float64),
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


def admm_tv_z_step(x: Tensor, state: AdmmState, *, comm: Comm, **kwargs: Any) -> tuple[Tensor, AdmmState, AdmmInfo]:
    """:func:`admm_tv_step` with ``D = D_z`` (:class:`.tv.DiffZ` over ``comm``): the DiffusionMBIR / DDS data step.

    ``state.z`` and ``state.w`` are shaped like the slab; ``kwargs`` (``A``, ``AT``, ``aty``, ``rho``,
    ``lam``, ``cg_iters``, ``cg_tol``) and the results are those of :func:`admm_tv_step`.
    """
    return admm_tv_step(x, state, tv=DiffZ(comm), comm=comm, **kwargs)
