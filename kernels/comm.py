"""Injected communication for slab-parallel kernels.

The kernels never talk to a process group themselves: they take a ``comm``
(or a ``dot`` built from one) and call it for the two things a z-sharded
reconstruction needs (DESIGN.md, "Distribution"):

* a global sum (every CG inner product and every residual norm), and
* a halo exchange of one boundary slice with each neighbouring slab (D_z).

:class:`LocalComm` is the single-slab implementation; the torch.distributed
one (``mbir_batch.cluster.dist_comm.TorchDistComm``) satisfies the same
:class:`Comm` protocol.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

__all__ = ["Comm", "LocalComm", "make_dot"]


@runtime_checkable
class Comm(Protocol):
    """What a slab kernel may ask of its communicator.

    Attributes
    ----------
    rank : index of this slab, counted from the top of the volume (z = 0).
    world_size : number of slabs.
    """

    rank: int
    world_size: int

    def all_reduce_sum(self, t: Tensor) -> Tensor:
        """Return the sum of ``t`` over all slabs (a new tensor is allowed)."""
        ...

    def halo_exchange(self, first: Tensor, last: Tensor) -> tuple[Tensor | None, Tensor | None]:
        """Send ``first`` to the previous slab and ``last`` to the next slab.

        Returns
        -------
        (prev_last, next_first) : the previous slab's last slice and the next slab's
            first slice; ``None`` at the ends of the volume.
        """
        ...

    def bytes_sent(self) -> int:
        """Running count of bytes this rank has sent (for benchmarks)."""
        ...


class LocalComm:
    """The communicator of a volume held as one slab: sums are the identity, no neighbours."""

    rank: int = 0
    world_size: int = 1

    def all_reduce_sum(self, t: Tensor) -> Tensor:
        """Return ``t`` unchanged (the local sum is the global sum)."""
        return t

    def halo_exchange(self, first: Tensor, last: Tensor) -> tuple[Tensor | None, Tensor | None]:
        """Return ``(None, None)``: both neighbours are the ends of the volume."""
        return None, None

    def bytes_sent(self) -> int:
        """Return 0: nothing is ever sent."""
        return 0

    def __repr__(self) -> str:
        return "LocalComm()"


def make_dot(comm: Comm) -> Callable[[Tensor, Tensor], Tensor]:
    """Build the global real inner product ``<a, b> = sum_slabs sum_i a_i b_i``.

    The local products are accumulated in float64, then summed over slabs with
    ``comm.all_reduce_sum``, so CG sees the same scalar on every rank.

    The order of that float64 sum depends on the slab split, so the value can differ between
    splits in its last bits (measured: about a third of the dots of a run differ by an ulp).
    The solvers only use it through float32 (CG's step sizes ``alpha``, ``beta`` and the
    corrector step of ``mbir`` are cast to the iterate's dtype), where such a difference changes
    the rounding only if the value lies within ~1e-16 (relative) of a float32 rounding boundary:
    about 2**-29 per dot. In measured runs (thousands of dots, 1 to 5 slabs) no float32 step
    ever differed, and ``admm-tv`` volumes were bit-identical for any split. This is measured,
    not guaranteed: a fixed-order sum would need the per-slice partial sums of every slab
    (O(Z) scalars per dot instead of one).

    Parameters
    ----------
    comm : the slab communicator.

    Returns
    -------
    dot : ``dot(a, b) -> Tensor``, a 0-dim float64 tensor on the device of ``a``.
    """

    def dot(a: Tensor, b: Tensor) -> Tensor:
        if a.shape != b.shape:
            raise ValueError(f"dot: shapes differ, {tuple(a.shape)} vs {tuple(b.shape)}")
        local = torch.sum(a * b, dtype=torch.float64)
        return comm.all_reduce_sum(local).reshape(())

    return dot
