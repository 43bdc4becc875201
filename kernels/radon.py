"""Parallel-beam CT as a matched pair of sparse matrices (A, A^T).

The system matrix comes from astra-toolbox's 2D CPU projectors (van Aarle et
al., Opt. Express 2016) for the ``parallel`` geometry of DESIGN.md: each axial
slice is an astra volume of ``H`` rows and ``W`` columns with unit pixels, the
angle in radians is ``angles_deg * pi / 180``, sinogram rows are views and
columns are detector bins. A^T is the exact transpose, unlike the grid_sample
Radon of the DiffusionMBIR reference code, so CG sees a symmetric system.

All slices of a slab are projected by one sparse-dense matmul: the slab
``(Z, H, W)`` is reshaped to ``(H*W, Z)``. The matrix is built once per
geometry and cached on disk as ``radon-<sha>.npz``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import uuid
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch
from torch import Tensor

__all__ = ["ParallelBeam", "build_system_matrix", "default_cache_dir"]

PROJECTORS = ("line", "strip", "linear")
_CACHE_VERSION = 1


def default_cache_dir() -> Path:
    """``$MBIR_CACHE`` if set, else ``~/.cache/mbir-batch``."""
    env = os.environ.get("MBIR_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "mbir-batch"


def build_system_matrix(
    shape: tuple[int, int], angles_deg: Sequence[float], det_count: int, det_spacing: float, projector: str
) -> sp.csr_matrix:
    """Build the astra system matrix (rows: view * det_count + bin; columns: row * W + col).

    Returns
    -------
    matrix : scipy CSR, float64, shape ``(n_views * det_count, H * W)``.
    """
    import astra

    angles_rad = np.asarray(angles_deg, dtype=np.float64) * (np.pi / 180.0)
    proj_geom = astra.create_proj_geom("parallel", float(det_spacing), int(det_count), angles_rad)
    vol_geom = astra.create_vol_geom(int(shape[0]), int(shape[1]))
    proj_id = astra.create_projector(projector, proj_geom, vol_geom)
    try:
        matrix_id = astra.projector.matrix(proj_id)
        try:
            matrix = astra.matrix.get(matrix_id).tocsr()
        finally:
            astra.matrix.delete(matrix_id)
    finally:
        astra.projector.delete(proj_id)
    return matrix.astype(np.float64)


def _to_torch_csr(matrix: sp.csr_matrix) -> Tensor:
    matrix = matrix.tocsr()
    matrix.sort_indices()
    index_dtype = torch.int32 if matrix.nnz < 2**31 - 1 else torch.int64
    with warnings.catch_warnings():
        # torch flags all of sparse CSR as "beta"; matmul with a dense matrix is all we use
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly disabled")
        return torch.sparse_csr_tensor(
            torch.from_numpy(matrix.indptr.astype(np.int64)).to(index_dtype),
            torch.from_numpy(matrix.indices.astype(np.int64)).to(index_dtype),
            torch.from_numpy(matrix.data.astype(np.float32)),
            size=matrix.shape,
            check_invariants=False,
        )


def _view_weights(angles_deg: np.ndarray) -> np.ndarray:
    """Quadrature weights (radians) of the views for the FBP integral over [0, pi).

    Each view gets half the angular gap to each neighbour (mod 180 deg), each gap capped
    at the median gap so that the missing wedge of a limited arc gets no weight.
    Uniform views over 180 deg get ``pi / n_views`` each.
    """
    n = angles_deg.size
    if n == 1:
        return np.array([np.pi])
    theta = np.mod(angles_deg * (np.pi / 180.0), np.pi)
    order = np.argsort(theta, kind="stable")
    sorted_theta = theta[order]
    gaps = np.diff(np.concatenate([sorted_theta, sorted_theta[:1] + np.pi]))
    cap = float(np.median(gaps))
    gaps = np.minimum(gaps, cap)
    weights_sorted = 0.5 * (gaps + np.roll(gaps, 1))
    weights = np.empty(n)
    weights[order] = weights_sorted
    return weights


def _ramp_filter(det_count: int) -> tuple[int, np.ndarray]:
    """Frequency response of the band-limited ramp (Kak & Slaney 1988, Eq. 3.61), unit spacing.

    Built in the spatial domain and then transformed, which avoids the DC offset of a
    sampled ``|f|``. Returns the padded length and the rfft of the kernel.
    """
    n_pad = max(64, 1 << math.ceil(math.log2(2 * det_count)))
    n = np.concatenate([np.arange(0, n_pad // 2 + 1), np.arange(-n_pad // 2 + 1, 0)])
    kernel = np.zeros(n_pad)
    kernel[0] = 0.25
    odd = n % 2 == 1
    kernel[odd] = -1.0 / (np.pi * n[odd]) ** 2
    return n_pad, np.real(np.fft.rfft(kernel))


class ParallelBeam:
    """Slice-wise 2D parallel-beam projector, ``A: (Z, H, W) -> (Z, n_views, det_count)``.

    Parameters
    ----------
    shape : ``(H, W)`` of one slice.
    angles_deg : projection angles in degrees (any list: sparse, limited arc, ...).
    det_count : detector bins.
    det_spacing : bin width in pixel units.
    cache_dir : where the matrix is cached; default :func:`default_cache_dir`.
    projector : astra projector kind, one of ``"line"``, ``"strip"``, ``"linear"``.
    """

    def __init__(
        self,
        *,
        shape: tuple[int, int],
        angles_deg: Sequence[float],
        det_count: int,
        det_spacing: float = 1.0,
        cache_dir: Path | None = None,
        projector: str = "linear",
    ) -> None:
        if len(shape) != 2 or min(shape) < 1:
            raise ValueError(f"ParallelBeam: shape must be (H, W) with H, W >= 1, got {shape}")
        angles = np.asarray(list(angles_deg), dtype=np.float64)
        if angles.ndim != 1 or angles.size == 0 or not np.all(np.isfinite(angles)):
            raise ValueError("ParallelBeam: angles_deg must be a non-empty list of finite degrees")
        if det_count < 1:
            raise ValueError(f"ParallelBeam: det_count must be >= 1, got {det_count}")
        if not det_spacing > 0:
            raise ValueError(f"ParallelBeam: det_spacing must be > 0, got {det_spacing}")
        if projector not in PROJECTORS:
            raise ValueError(f"ParallelBeam: projector must be one of {PROJECTORS}, got {projector!r}")
        self.shape = (int(shape[0]), int(shape[1]))
        self.angles_deg = angles
        self.det_count = int(det_count)
        self.det_spacing = float(det_spacing)
        self.projector = projector
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.cache_path = self.cache_dir / f"radon-{self.geometry_hash()}.npz"
        matrix = self._load_or_build()
        self._matrix = _to_torch_csr(matrix)
        self._matrix_t = _to_torch_csr(matrix.T.tocsr())
        self._view_weights = torch.from_numpy(_view_weights(angles).astype(np.float32))
        n_pad, response = _ramp_filter(self.det_count)
        self._n_pad = n_pad
        self._ramp = torch.from_numpy(response.astype(np.float32))
        self._normal_norm: float | None = None

    # -- geometry ---------------------------------------------------------------
    @property
    def domain_shape(self) -> tuple[int, int]:
        """``(H, W)`` of one slice."""
        return self.shape

    @property
    def range_shape(self) -> tuple[int, int]:
        """``(n_views, det_count)`` of one sinogram."""
        return (int(self.angles_deg.size), self.det_count)

    @property
    def device(self) -> torch.device:
        """Device the matrices live on."""
        return self._matrix.device

    def geometry_hash(self) -> str:
        """SHA-256 (hex, 16 chars) of everything that determines the matrix."""
        key = {
            "version": _CACHE_VERSION,
            "shape": list(self.shape),
            "angles_deg": self.angles_deg.tobytes().hex(),
            "det_count": self.det_count,
            "det_spacing": repr(self.det_spacing),
            "projector": self.projector,
        }
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]

    def __repr__(self) -> str:
        return (
            f"ParallelBeam(shape={self.shape}, n_views={self.range_shape[0]}, det_count={self.det_count}, "
            f"det_spacing={self.det_spacing}, projector={self.projector!r}, device={self.device})"
        )

    # -- cache ------------------------------------------------------------------
    def _load_or_build(self) -> sp.csr_matrix:
        expected = (self.range_shape[0] * self.det_count, self.shape[0] * self.shape[1])
        if self.cache_path.exists():
            try:
                with np.load(self.cache_path) as f:
                    matrix = sp.csr_matrix((f["data"], f["indices"], f["indptr"]), shape=tuple(f["shape"]))
            except (OSError, KeyError, ValueError) as err:
                raise OSError(f"ParallelBeam: cached matrix {self.cache_path} is unreadable ({err}); delete it") from err
            if matrix.shape != expected:
                raise OSError(f"ParallelBeam: cached matrix {self.cache_path} has shape {matrix.shape}, expected {expected}")
            return matrix
        matrix = build_system_matrix(self.shape, self.angles_deg, self.det_count, self.det_spacing, self.projector)
        try:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            # write-then-rename: concurrent workers never see a half-written file
            tmp = self.cache_dir / f".{self.cache_path.stem}.{os.getpid()}.{uuid.uuid4().hex}.npz"
            np.savez(tmp, data=matrix.data, indices=matrix.indices, indptr=matrix.indptr, shape=np.array(matrix.shape))
            os.replace(tmp, self.cache_path)
        except OSError as err:
            raise OSError(
                f"ParallelBeam: cannot write the matrix cache {self.cache_path} ({err}); "
                "pass cache_dir= or set MBIR_CACHE to a writable folder"
            ) from err
        return matrix

    # -- linear algebra ---------------------------------------------------------
    def _check(self, t: Tensor, trailing: tuple[int, int], name: str) -> tuple[Tensor, bool]:
        if t.dtype != torch.float32:
            raise TypeError(f"ParallelBeam.{name}: expected float32, got {t.dtype}")
        if t.dim() not in (2, 3) or tuple(t.shape[-2:]) != trailing:
            raise ValueError(f"ParallelBeam.{name}: expected (Z, {trailing[0]}, {trailing[1]}) or {trailing}, got {tuple(t.shape)}")
        if t.dim() == 2:
            return t.unsqueeze(0), True
        return t, False

    def _apply(self, matrix: Tensor, t: Tensor, out_shape: tuple[int, int]) -> Tensor:
        columns = t.reshape(t.shape[0], -1).T
        return (matrix @ columns).T.reshape(t.shape[0], *out_shape)

    def A(self, x: Tensor) -> Tensor:
        """Project: ``(Z, H, W)`` or ``(H, W)`` -> ``(Z, n_views, det_count)`` or ``(n_views, det_count)``."""
        slab, single = self._check(x, self.domain_shape, "A")
        sino = self._apply(self._matrix, slab, self.range_shape)
        return sino[0] if single else sino

    def AT(self, y: Tensor) -> Tensor:
        """Back-project (the exact adjoint of :meth:`A`): ``(Z, n_views, det_count)`` -> ``(Z, H, W)``."""
        sino, single = self._check(y, self.range_shape, "AT")
        vol = self._apply(self._matrix_t, sino, self.domain_shape)
        return vol[0] if single else vol

    T = AT

    def to(self, device: torch.device | str) -> ParallelBeam:
        """Move both matrices (and the FBP filter) to ``device``, in place; returns ``self``."""
        self._matrix = self._matrix.to(device)
        self._matrix_t = self._matrix_t.to(device)
        self._view_weights = self._view_weights.to(device)
        self._ramp = self._ramp.to(device)
        return self

    def ramp_filter(self, sinogram: Tensor) -> Tensor:
        """Ramp-filter each detector row (zero-padded FFT) and weight each view by its
        angular quadrature weight; ``fbp = AT(ramp_filter(.))``."""
        sino, single = self._check(sinogram, self.range_shape, "ramp_filter")
        spectrum = torch.fft.rfft(sino, n=self._n_pad, dim=-1) * self._ramp
        filtered = torch.fft.irfft(spectrum, n=self._n_pad, dim=-1)[..., : self.det_count]
        filtered = filtered * self._view_weights[:, None]
        return filtered[0] if single else filtered.contiguous()

    def fbp(self, sinogram: Tensor) -> Tensor:
        """Filtered back-projection (Kak & Slaney 1988, Ch. 3), scaled so ``fbp(A x) ~ x``.

        The astra matrix sums to ``1 / det_spacing`` over the bins of one view for each
        pixel, and the unit-spacing ramp carries a ``1 / det_spacing`` the other way, so
        ``fbp(y) = A^T (w_view * (h * y))`` with ``w_view`` the angular weights (``pi / V``
        for ``V`` uniform views over 180 deg).
        """
        return self.AT(self.ramp_filter(sinogram))

    direct_inverse = fbp
    """The one-shot reconstruction of the :class:`~.operators.Operator` protocol: :meth:`fbp`."""

    def normal_norm_estimate(self, iters: int = 30, seed: int = 0) -> float:
        """Estimate ``||A^T A||_2`` by power iteration on one slice (cached after the first call).

        The estimate is from below; multiply by a small margin (e.g. 1.05) for step sizes.
        """
        if self._normal_norm is None:
            gen = torch.Generator().manual_seed(seed)
            v = torch.rand(self.domain_shape, generator=gen).to(self.device)
            v = v / torch.linalg.vector_norm(v)
            estimate = 0.0
            for _ in range(iters):
                u = self.AT(self.A(v))
                estimate = float(torch.linalg.vector_norm(u))
                if estimate == 0.0:
                    break
                v = u / estimate
            self._normal_norm = estimate
        return self._normal_norm
