"""The measurement-operator protocol, and the one place an operator is built from a geometry.

An operator acts slice-wise on a slab: ``A: (Z, *domain_shape) -> (Z, *range_shape)`` and its
exact adjoint ``AT`` (for the real inner product ``<u, v> = Re sum conj(u) v``), as tomosipo's and
deepinv's operators do. CG relies on that adjoint (DESIGN.md, "Algorithm"): every operator passes
``tests/kernels/test_operator_contract.py``.

=====================  ==============================  ============================================
geometry ``kind``      operator                        ``A``
=====================  ==============================  ============================================
``parallel`` (CT)      :class:`.radon.ParallelBeam`    astra parallel-beam projection per slice
``cartesian`` (MRI)    :class:`.mri.CartesianMRI`      masked centred orthonormal 2D DFT per slice
=====================  ==============================  ============================================

The geometry is the ``geometry`` mapping of the data contract (DESIGN.md): CT ``{"kind":
"parallel", "angles_deg", "det_count", "det_spacing"}``, MRI ``{"kind": "cartesian", "mask":
"mask"}`` with the mask array passed separately.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor

__all__ = ["Operator", "default_det_count", "operator_from_geometry"]


@runtime_checkable
class Operator(Protocol):
    """A slice-wise linear operator with its exact adjoint.

    Attributes
    ----------
    domain_shape : ``(H, W)`` of one slice of the volume.
    range_shape : the shape of one slice of the measurements (CT ``(n_views, det_count)``, MRI
        ``(H, W)``).
    """

    @property
    def domain_shape(self) -> tuple[int, ...]: ...

    @property
    def range_shape(self) -> tuple[int, ...]: ...

    def A(self, x: Tensor) -> Tensor:
        """``(Z, *domain_shape) -> (Z, *range_shape)``."""
        ...

    def AT(self, y: Tensor) -> Tensor:
        """The exact adjoint of :meth:`A`, ``(Z, *range_shape) -> (Z, *domain_shape)``."""
        ...

    def direct_inverse(self, y: Tensor) -> Tensor:
        """The one-shot reconstruction: FBP for CT, the zero-filled inverse DFT for MRI."""
        ...

    def to(self, device: torch.device | str) -> Operator:
        """Move the operator's tensors to ``device`` (in place) and return it."""
        ...


def default_det_count(shape: Sequence[int], det_spacing: float = 1.0) -> int:
    """Detector bins that cover the diagonal of an ``(H, W)`` slice: ``ceil(hypot(H, W) / det_spacing) + 1``.

    The count simulated CT datasets get (``mbir-batch simulate``, ``import --task svct``).
    """
    height, width = (int(v) for v in shape[-2:])
    return int(math.ceil(math.hypot(height, width) / det_spacing)) + 1


def operator_from_geometry(
    modality: str,
    geometry: Mapping[str, Any],
    volume_shape: Sequence[int],
    *,
    mask: Tensor | np.ndarray | None = None,
    device: torch.device | str = "cpu",
    cache_dir: Path | None = None,
) -> Operator:
    """Build the forward operator of a dataset (or of a slab of it) from its data-contract geometry.

    Parameters
    ----------
    modality : ``"ct"`` or ``"mri"``.
    geometry : the contract's ``geometry`` mapping (see the module docstring).
    volume_shape : ``(Z, H, W)`` or ``(H, W)``; only the slice shape ``(H, W)`` is used.
    mask : MRI only: the bool sampling mask, ``(H, W)`` shared by every slice or ``(Z, H, W)``
        for the slab's slices.
    device : where the operator's tensors live.
    cache_dir : CT only: the system-matrix cache (default :func:`.radon.default_cache_dir`).

    Returns
    -------
    operator : :class:`.radon.ParallelBeam` (CT) or :class:`.mri.CartesianMRI` (MRI).

    Raises
    ------
    ValueError : an unknown modality, a geometry of the wrong kind, or an MRI call without a mask.
    """
    shape = (int(volume_shape[-2]), int(volume_shape[-1]))
    if modality == "ct":
        from .radon import ParallelBeam

        _check_kind(geometry, "parallel", modality)
        return ParallelBeam(shape=shape, angles_deg=list(geometry["angles_deg"]), det_count=int(geometry["det_count"]),
                            det_spacing=float(geometry["det_spacing"]), cache_dir=cache_dir).to(device)
    if modality == "mri":
        from .mri import CartesianMRI

        _check_kind(geometry, "cartesian", modality)
        if mask is None:
            raise ValueError("operator_from_geometry: an MRI operator needs its sampling mask (mask=)")
        if not isinstance(mask, Tensor):
            mask = torch.from_numpy(np.ascontiguousarray(mask))
        return CartesianMRI(mask).to(device)
    raise ValueError(f"operator_from_geometry: unknown modality {modality!r}; expected 'ct' or 'mri'")


def _check_kind(geometry: Mapping[str, Any], kind: str, modality: str) -> None:
    if geometry.get("kind") != kind:
        raise ValueError(f"operator_from_geometry: a {modality} geometry has kind {kind!r}, "
                         f"got {geometry.get('kind')!r}")
