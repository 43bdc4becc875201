"""Finite differences for total variation, with halos for z-sharded slabs.

The z-TV prior of DiffusionMBIR (Chung et al., CVPR 2023, Sec. 3) is
``lam ||D_z x||_1`` with ``D_z`` the forward difference along z. A slab holds
slices ``[z0, z1)`` of a volume of ``depth`` slices; ``D_z x`` has the slab's
shape. The boundary condition is Neumann: the last difference of the *volume*
is 0, so

    (D_z x)[k] = x[k+1] - x[k]          for k < depth - 1,
    (D_z x)[depth - 1] = 0.

Inside a slab, the last difference needs the next slab's first slice
(``next_first``); the adjoint needs the previous slab's last difference
(``prev_last``). ``diff_z_comm`` / ``diff_z_adjoint_comm`` /
``diff_z_normal_comm`` do that halo exchange through a :class:`~.comm.Comm`.

``diff_xy`` and its adjoint are the in-slice differences of anisotropic 3D TV,
also with Neumann boundaries (the last row/column difference is 0).

The ADMM step (:func:`.admm.admm_tv_step`) takes its TV operator as an object:

==============  ============================================  =====================
object          D                                             used by
==============  ============================================  =====================
``DiffZ``       ``D_z`` (z-only coupling)                     ``dds``, ``mbir``
``Gradient3D``  ``(lam_xy D_x, lam_xy D_y, D_z)`` (3D TV)     ``admm-tv``
==============  ============================================  =====================

Both have ``D x`` (``__call__`` / ``A``), ``D^T d`` (``T`` / ``AT``), ``D^T D x`` (``normal``),
the shape of ``D x`` for a slab (``output_shape``) and a zero element of that range (``zeros``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from .comm import Comm

__all__ = [
    "DiffZ",
    "Gradient3D",
    "diff_xy",
    "diff_xy_adjoint",
    "diff_z",
    "diff_z_adjoint",
    "diff_z_adjoint_comm",
    "diff_z_comm",
    "diff_z_normal",
    "diff_z_normal_comm",
    "soft_threshold",
    "TVOperator",
]


def _check_slab(x: Tensor, name: str) -> None:
    if x.dim() < 1 or x.shape[0] == 0:
        raise ValueError(f"{name}: expected a slab (Z, ...) with Z >= 1, got shape {tuple(x.shape)}")


def diff_z(x: Tensor, next_first: Tensor | None) -> Tensor:
    """Forward difference along z of a slab, ``D_z x``.

    Parameters
    ----------
    x : slab ``(Z, H, W)``.
    next_first : first slice ``(H, W)`` of the next slab, or ``None`` when this slab
        ends the volume (then the last difference is 0, Neumann).

    Returns
    -------
    d : ``(Z, H, W)`` with ``d[k] = x[k+1] - x[k]`` and ``d[Z-1] = next_first - x[Z-1]`` (or 0).
    """
    _check_slab(x, "diff_z")
    d = torch.empty_like(x)
    d[:-1] = x[1:] - x[:-1]
    if next_first is None:
        d[-1] = 0
    else:
        d[-1] = next_first - x[-1]
    return d


def diff_z_adjoint(d: Tensor, prev_last: Tensor | None, *, volume_end: bool = False) -> Tensor:
    """Adjoint of :func:`diff_z` on a slab, ``D_z^T d``.

    ``(D_z^T d)[k] = d[k-1] - d[k]`` with ``d[-1] = prev_last`` (the previous slab's last
    difference) or 0 at the start of the volume.

    Parameters
    ----------
    d : slab-shaped differences ``(Z, H, W)``.
    prev_last : the previous slab's last difference ``(H, W)``, or ``None`` at the start
        of the volume.
    volume_end : this slab ends the volume. The volume's last difference is identically
        0 in the range of ``D_z``, so its entry of ``d`` is then ignored; that makes the
        pair exact adjoints for any ``d``. With the default ``False`` the formula above
        is applied literally, which is the same whenever ``d[-1]`` of the volume is 0.

    Returns
    -------
    g : ``(Z, H, W)``.
    """
    _check_slab(d, "diff_z_adjoint")
    if volume_end:
        d = d.clone()
        d[-1] = 0
    g = -d
    g[1:] += d[:-1]
    if prev_last is not None:
        g[0] += prev_last
    return g


def diff_z_normal(x: Tensor, prev_last: Tensor | None, next_first: Tensor | None) -> Tensor:
    """``D_z^T D_z x`` on a slab from one halo of ``x`` on each side.

    The previous slab's last difference is ``x[0] - prev_last``, so a single exchange of
    ``x``'s boundary slices is enough (instead of one for ``D_z`` and one for ``D_z^T``).

    Parameters
    ----------
    x : slab ``(Z, H, W)``.
    prev_last, next_first : last slice of the previous slab and first slice of the next
        slab, ``None`` at the ends of the volume.

    Returns
    -------
    g : ``(Z, H, W)``, the negative discrete Laplacian along z (Neumann).
    """
    d = diff_z(x, next_first)
    prev_diff = None if prev_last is None else x[0] - prev_last
    return diff_z_adjoint(d, prev_diff)


def diff_z_comm(x: Tensor, comm: Comm) -> Tensor:
    """:func:`diff_z` with the halo (the next slab's first slice) fetched through ``comm``."""
    _check_slab(x, "diff_z_comm")
    _, next_first = comm.halo_exchange(x[0], x[-1])
    return diff_z(x, next_first)


def diff_z_adjoint_comm(d: Tensor, comm: Comm) -> Tensor:
    """:func:`diff_z_adjoint` with the halo (the previous slab's last difference) fetched
    through ``comm``; the last rank ignores the volume's last difference (exact adjoint)."""
    _check_slab(d, "diff_z_adjoint_comm")
    prev_last, _ = comm.halo_exchange(d[0], d[-1])
    return diff_z_adjoint(d, prev_last, volume_end=comm.rank == comm.world_size - 1)


def diff_z_normal_comm(x: Tensor, comm: Comm) -> Tensor:
    """:func:`diff_z_normal` (``D_z^T D_z x``) with one halo exchange through ``comm``."""
    _check_slab(x, "diff_z_normal_comm")
    prev_last, next_first = comm.halo_exchange(x[0], x[-1])
    return diff_z_normal(x, prev_last, next_first)


def diff_xy(x: Tensor) -> tuple[Tensor, Tensor]:
    """In-slice forward differences, Neumann boundary.

    Parameters
    ----------
    x : ``(..., H, W)``.

    Returns
    -------
    (dx, dy) : ``dx[..., i, j] = x[..., i, j+1] - x[..., i, j]`` (along W, last column 0) and
        ``dy[..., i, j] = x[..., i+1, j] - x[..., i, j]`` (along H, last row 0).
    """
    if x.dim() < 2:
        raise ValueError(f"diff_xy: expected (..., H, W), got shape {tuple(x.shape)}")
    dx = torch.zeros_like(x)
    dy = torch.zeros_like(x)
    dx[..., :, :-1] = x[..., :, 1:] - x[..., :, :-1]
    dy[..., :-1, :] = x[..., 1:, :] - x[..., :-1, :]
    return dx, dy


def diff_xy_adjoint(dx: Tensor, dy: Tensor) -> Tensor:
    """Exact adjoint of :func:`diff_xy` (a negative divergence); the last column of ``dx``
    and the last row of ``dy`` are outside the range and are ignored.

    Parameters
    ----------
    dx, dy : ``(..., H, W)``.

    Returns
    -------
    g : ``(..., H, W)``.
    """
    if dx.shape != dy.shape or dx.dim() < 2:
        raise ValueError(f"diff_xy_adjoint: need equal (..., H, W) shapes, got {tuple(dx.shape)} and {tuple(dy.shape)}")
    g = torch.zeros_like(dx)
    g[..., :, :-1] -= dx[..., :, :-1]
    g[..., :, 1:] += dx[..., :, :-1]
    g[..., :-1, :] -= dy[..., :-1, :]
    g[..., 1:, :] += dy[..., :-1, :]
    return g


def soft_threshold(v: Tensor, thresh: float) -> Tensor:
    """Proximal map of ``thresh * ||.||_1``: ``sign(v) * max(|v| - thresh, 0)``."""
    if thresh < 0:
        raise ValueError(f"soft_threshold: thresh must be >= 0, got {thresh}")
    return torch.sign(v) * torch.clamp(v.abs() - thresh, min=0)


# -- TV operators as objects ------------------------------------------------------------


class TVOperator(Protocol):
    """A (sharded) TV operator ``D`` over a slab, as :func:`.admm.admm_tv_step` uses it."""

    def __call__(self, x: Tensor) -> Tensor:
        """``D x``."""
        ...

    def T(self, d: Tensor) -> Tensor:
        """``D^T d``."""
        ...

    def normal(self, x: Tensor) -> Tensor:
        """``D^T D x``."""
        ...

    def output_shape(self, slab_shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape of ``D x`` for a slab of ``slab_shape``."""
        ...

    def zeros(self, x: Tensor) -> Tensor:
        """A zero element of the range of ``D`` for slab ``x`` (the ADMM cold start of z and w)."""
        ...


class _SlabTV:
    """What :class:`DiffZ` and :class:`Gradient3D` share: the operator names and the range zeros."""

    def A(self, x: Tensor) -> Tensor:
        """``D x`` (the same as calling the operator)."""
        return self(x)  # type: ignore[operator]

    def AT(self, d: Tensor) -> Tensor:
        """``D^T d`` (the same as :meth:`T`)."""
        return self.T(d)  # type: ignore[attr-defined]

    @classmethod
    def zeros(cls, x: Tensor) -> Tensor:
        """Zeros of ``D``'s range for slab ``x`` (shape :meth:`output_shape`, ``x``'s dtype and device).

        A class method: the range does not depend on ``comm`` or the weights.
        """
        return x.new_zeros(cls.output_shape(tuple(x.shape)))  # type: ignore[attr-defined]

    def to(self, device: torch.device | str) -> _SlabTV:
        """Return ``self``: the operator holds no tensors (it acts on whatever device ``x`` is on)."""
        return self


@dataclass(frozen=True)
class DiffZ(_SlabTV):
    """``D_z`` over a z-sharded slab (halos through ``comm``), the z-TV of DiffusionMBIR.

    ``normal`` is the fused :func:`diff_z_normal_comm` (one halo exchange instead of two).
    """

    comm: Comm

    def __call__(self, x: Tensor) -> Tensor:
        """``D_z x`` (:func:`diff_z_comm`)."""
        return diff_z_comm(x, self.comm)

    def T(self, d: Tensor) -> Tensor:
        """``D_z^T d`` (:func:`diff_z_adjoint_comm`)."""
        return diff_z_adjoint_comm(d, self.comm)

    def normal(self, x: Tensor) -> Tensor:
        """``D_z^T D_z x`` (:func:`diff_z_normal_comm`)."""
        return diff_z_normal_comm(x, self.comm)

    @staticmethod
    def output_shape(slab_shape: tuple[int, ...]) -> tuple[int, ...]:
        """``D_z x`` has the slab's shape."""
        return tuple(slab_shape)


@dataclass(frozen=True)
class Gradient3D(_SlabTV):
    """The anisotropic 3D gradient ``D x = (lam_xy D_x x, lam_xy D_y x, D_z x)``, stacked ``(3, Z, H, W)``.

    The TV of the model-based baseline (DiffusionMBIR, Chung et al., CVPR 2023, Table 1):
    ``||D x||_1 = lam_xy (||D_x x||_1 + ||D_y x||_1) + ||D_z x||_1``. ``D_z`` exchanges halos
    through ``comm``; ``D_x``, ``D_y`` are in-slice.
    """

    lam_xy: float
    comm: Comm

    def __call__(self, x: Tensor) -> Tensor:
        """``D x``, shape ``(3, *x.shape)``."""
        dx, dy = diff_xy(x)
        return torch.stack((self.lam_xy * dx, self.lam_xy * dy, diff_z_comm(x, self.comm)))

    def T(self, d: Tensor) -> Tensor:
        """``D^T d = lam_xy (D_x^T d[0] + D_y^T d[1]) + D_z^T d[2]``."""
        return self.lam_xy * diff_xy_adjoint(d[0], d[1]) + diff_z_adjoint_comm(d[2], self.comm)

    def normal(self, x: Tensor) -> Tensor:
        """``D^T D x`` (two halo exchanges: one in ``D``, one in ``D^T``)."""
        return self.T(self(x))

    @staticmethod
    def output_shape(slab_shape: tuple[int, ...]) -> tuple[int, ...]:
        """``(3, *slab_shape)``."""
        return (3, *slab_shape)
