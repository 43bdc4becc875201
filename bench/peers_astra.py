"""ASTRA's own iterative solvers, SIRT and CGLS, on CPU, one axial slice at a time.

ASTRA (van Aarle et al., Opt. Express 2016) is a core dependency of mbir-batch, so this module
needs no extra. ASTRA's CPU algorithms are 2D only (3D needs CUDA), so a volume is a stack of
independent 2D problems in the geometry of DESIGN.md: ``parallel`` beam, angles in radians =
``angles_deg * pi / 180``, a ``linear`` projector (the one :class:`ParallelBeam` is built from),
unit pixels.

- SIRT: x <- x + C A^T R (y - A x), with R and C the inverse row and column sums of A
  (Gregor & Benson, IEEE TMI 2008); ``min_constraint=0`` clips negatives after each iteration.
- CGLS: conjugate gradients on the normal equations A^T A x = A^T y (Hestenes & Stiefel 1952),
  started from zero; early stopping (``iters``) is its only regularisation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["AstraSettings", "astra_reconstruct", "ALGORITHMS"]

ALGORITHMS = {"sirt": "SIRT", "cgls": "CGLS"}


@dataclass(frozen=True)
class AstraSettings:
    """Knobs of one ASTRA run.

    Parameters
    ----------
    iters : iterations per slice.
    min_constraint : SIRT only: lower bound applied after every iteration (``None``: unconstrained).
    """

    iters: int
    min_constraint: float | None = None

    def __post_init__(self) -> None:
        if self.iters < 1:
            raise ValueError(f"AstraSettings: iters must be >= 1, got {self.iters}")
        if self.min_constraint is not None and not math.isfinite(self.min_constraint):
            raise ValueError(f"AstraSettings: min_constraint must be finite or None, got {self.min_constraint}")


def astra_reconstruct(sinogram: np.ndarray, *, angles_deg: Sequence[float], det_count: int, det_spacing: float,
                      shape: tuple[int, int], algorithm: str, settings: AstraSettings) -> np.ndarray:
    """Reconstruct every slice of ``sinogram`` (Z, n_views, det_count) with ASTRA's CPU SIRT or CGLS.

    Parameters
    ----------
    sinogram : float32 (Z, n_views, det_count), the dataset layout.
    angles_deg, det_count, det_spacing : the CT geometry of the dataset.
    shape : (H, W) of one slice.
    algorithm : ``"sirt"`` or ``"cgls"``.
    settings : iterations and (SIRT) the lower bound.

    Returns
    -------
    volume : float32 (Z, H, W).
    """
    import astra

    if algorithm not in ALGORITHMS:
        raise ValueError(f"astra_reconstruct: algorithm must be one of {sorted(ALGORITHMS)}, got {algorithm!r}")
    sinogram = np.asarray(sinogram, dtype=np.float32)
    if sinogram.ndim != 3 or sinogram.shape[1:] != (len(angles_deg), det_count):
        raise ValueError(f"astra_reconstruct: sinogram must be (Z, {len(angles_deg)}, {det_count}), "
                         f"got {sinogram.shape}")
    if settings.min_constraint is not None and algorithm != "sirt":
        raise ValueError("astra_reconstruct: min_constraint is a SIRT option; CGLS has no constraint")
    angles = np.asarray(angles_deg, dtype=np.float64) * (np.pi / 180.0)
    proj_geom = astra.create_proj_geom("parallel", float(det_spacing), int(det_count), angles)
    vol_geom = astra.create_vol_geom(int(shape[0]), int(shape[1]))
    projector = astra.create_projector("linear", proj_geom, vol_geom)
    volume = np.empty((sinogram.shape[0], *shape), dtype=np.float32)
    try:
        for z, slice_sino in enumerate(sinogram):
            volume[z] = _one_slice(astra, slice_sino, proj_geom, vol_geom, projector, ALGORITHMS[algorithm], settings)
    finally:
        astra.projector.delete(projector)
    return volume


def _one_slice(astra, slice_sino: np.ndarray, proj_geom: dict, vol_geom: dict, projector: int, name: str,
               settings: AstraSettings) -> np.ndarray:
    sino_id = astra.data2d.create("-sino", proj_geom, slice_sino)
    recon_id = astra.data2d.create("-vol", vol_geom, 0.0)
    config = astra.astra_dict(name)
    config["ProjectorId"] = projector
    config["ProjectionDataId"] = sino_id
    config["ReconstructionDataId"] = recon_id
    if settings.min_constraint is not None:
        config["option"] = {"MinConstraint": float(settings.min_constraint)}
    algorithm_id = astra.algorithm.create(config)
    try:
        astra.algorithm.run(algorithm_id, int(settings.iters))
        return astra.data2d.get(recon_id).astype(np.float32)
    finally:
        astra.algorithm.delete(algorithm_id)
        astra.data2d.delete([sino_id, recon_id])
