"""Conjugate gradient with an injected inner product.

Hestenes & Stiefel (1952); the data-consistency solver of DiffusionMBIR
(Chung et al., CVPR 2023, Sec. 3) and DDS (Chung et al., ICLR 2024, Sec. 3.2).
The inner product is passed in (``dot``), so one call solves a system whose
unknown is sharded over slabs: ``dot`` all-reduces, everything else is local.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["CGInfo", "conjugate_gradient"]

#: Relative residual, in units of the dtype's epsilon, below which CG takes no further step.
_ROUNDING = 10.0


@dataclass(frozen=True)
class CGInfo:
    """Outcome of one CG solve.

    Attributes
    ----------
    iters : iterations run (0 when the start already met ``tol``).
    residual : relative residual ``||b - M x|| / ||b||`` of the recursion (``||b - M x||``
        when ``b = 0``).
    """

    iters: int
    residual: float


def conjugate_gradient(
    apply: Callable[[Tensor], Tensor],
    rhs: Tensor,
    x0: Tensor,
    *,
    dot: Callable[[Tensor, Tensor], Tensor],
    iters: int,
    tol: float = 0.0,
) -> tuple[Tensor, CGInfo]:
    """Solve ``M x = b`` for symmetric positive (semi-)definite ``M`` by CG.

    ======  ===========  ==========================================
    symbol  variable     meaning
    ======  ===========  ==========================================
    M       ``apply``    the operator, ``apply(x) = M x``
    b       ``rhs``      right-hand side
    x_0     ``x0``       warm start (not modified)
    r       ``r``        residual ``b - M x``
    p       ``p``        search direction
    ======  ===========  ==========================================

    Parameters
    ----------
    apply : ``x -> M x``, same shape in and out.
    rhs : ``b``.
    x0 : initial guess.
    dot : global inner product returning a 0-dim tensor (see ``comm.make_dot``).
    iters : maximum number of iterations (>= 0).
    tol : stop once ``||r|| <= tol * ||b||``. With ``tol = 0`` exactly ``iters`` iterations
        run and the loop never synchronises with the host.

    Returns
    -------
    x : the solution estimate.
    info : :class:`CGInfo`.
    """
    if iters < 0:
        raise ValueError(f"conjugate_gradient: iters must be >= 0, got {iters}")
    if tol < 0:
        raise ValueError(f"conjugate_gradient: tol must be >= 0, got {tol}")
    if rhs.shape != x0.shape:
        raise ValueError(f"conjugate_gradient: rhs {tuple(rhs.shape)} and x0 {tuple(x0.shape)} differ")

    rhs_sq = float(dot(rhs, rhs))
    scale = math.sqrt(rhs_sq) if rhs_sq > 0 else 1.0

    x = x0.clone()
    r = rhs - apply(x)
    rs = dot(r, r)
    # Below this squared residual the recursion is at rounding level (float error in M x is
    # ~eps * max(||b||, ||r_0||)). On a singular M (MRI: Re F^H P F) r then lies mostly in the
    # null space, where the curvature p^T M p is ~0 and rs / curvature blows x up: no more steps.
    floor = (_ROUNDING * torch.finfo(x0.dtype).eps) ** 2 * torch.maximum(rs, torch.as_tensor(rhs_sq, dtype=rs.dtype))
    if tol > 0 and math.sqrt(float(rs)) <= tol * scale:
        return x, CGInfo(0, math.sqrt(float(rs)) / scale)
    p = r.clone()
    done = 0
    for _ in range(iters):
        # 1. step length along p; a zero curvature or a residual at rounding level gives a
        #    zero step, not NaN
        mp = apply(p)
        curvature = dot(p, mp)
        #    (written so that a NaN in rs or the curvature propagates instead of becoming a zero step;
        #    cast to x's dtype, so the split-dependent last float64 bits of the dots stay out of x:
        #    see comm.make_dot)
        alpha = torch.where((curvature <= 0) | (rs <= floor), torch.zeros_like(rs), rs / curvature).to(x.dtype)
        x = x + alpha * p
        r = r - alpha * mp
        rs_new = dot(r, r)
        done += 1
        if tol > 0 and math.sqrt(float(rs_new)) <= tol * scale:
            rs = rs_new
            break
        # 2. next conjugate direction
        beta = torch.where(rs == 0, torch.zeros_like(rs), rs_new / rs).to(x.dtype)
        p = r + beta * p
        rs = rs_new
    return x, CGInfo(done, math.sqrt(max(float(rs), 0.0)) / scale)
