"""Single-coil Cartesian MRI: undersampled centred orthonormal 2D DFT, and sampling masks.

Forward model (DESIGN.md, data contract), per slice::

    kspace = fftshift(fft2(ifftshift(x), norm="ortho")) * mask

``F = fftshift o fft2 o ifftshift`` is unitary, so with real images and the
real inner product ``<u, v> = Re sum conj(u) v`` the exact adjoint is
``A^T y = Re(F^H (mask * y))``. Compressed-sensing MRI as in DiffusionMBIR
(Chung et al., CVPR 2023, Sec. 4.3); masks follow the fastMRI conventions
(Zbontar et al. 2018): whole phase-encode lines along the last axis (W), a
fully sampled centre, and a sampled fraction of about ``1 / accel``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["CartesianMRI", "gaussian_1d_mask", "random_2d_mask", "uniform_1d_mask"]

_DIMS = (-2, -1)


class CartesianMRI:
    """Slice-wise undersampled Fourier operator, ``A: real (Z, H, W) -> complex64 (Z, H, W)``.

    Parameters
    ----------
    mask : bool ``(H, W)`` (same for every slice) or ``(Z, H, W)`` (one per slice);
        True = sampled.
    """

    def __init__(self, mask: Tensor) -> None:
        if not isinstance(mask, Tensor):
            mask = torch.as_tensor(np.asarray(mask))
        if mask.dim() not in (2, 3):
            raise ValueError(f"CartesianMRI: mask must be (H, W) or (Z, H, W), got shape {tuple(mask.shape)}")
        if mask.dtype != torch.bool:
            raise TypeError(f"CartesianMRI: mask must be bool, got {mask.dtype}")
        self.mask = mask
        self._weights = mask.to(torch.complex64)

    @property
    def domain_shape(self) -> tuple[int, int]:
        """``(H, W)`` of one slice."""
        return (int(self.mask.shape[-2]), int(self.mask.shape[-1]))

    range_shape = domain_shape

    @property
    def device(self) -> torch.device:
        """Device of the mask."""
        return self.mask.device

    def __repr__(self) -> str:
        fraction = float(self.mask.float().mean())
        return f"CartesianMRI(mask={tuple(self.mask.shape)}, sampled={fraction:.3f}, device={self.device})"

    def _check(self, t: Tensor, name: str) -> None:
        if t.dim() not in (2, 3) or tuple(t.shape[-2:]) != self.domain_shape:
            raise ValueError(f"CartesianMRI.{name}: expected (Z, H, W) or (H, W) = {self.domain_shape}, got {tuple(t.shape)}")
        if self.mask.dim() == 3 and (t.dim() != 3 or t.shape[0] != self.mask.shape[0]):
            raise ValueError(
                f"CartesianMRI.{name}: the mask has {self.mask.shape[0]} slices, the input has shape {tuple(t.shape)}"
            )

    def A(self, x: Tensor) -> Tensor:
        """Undersampled k-space of a real image stack, complex64."""
        self._check(x, "A")
        if x.is_complex():
            raise TypeError("CartesianMRI.A: expected a real image, got a complex tensor")
        spectrum = torch.fft.fft2(torch.fft.ifftshift(x.to(torch.float32), dim=_DIMS), norm="ortho")
        return torch.fft.fftshift(spectrum, dim=_DIMS) * self._weights

    def AT(self, y: Tensor) -> Tensor:
        """Exact adjoint of :meth:`A` for the real inner product: ``Re(F^H (mask * y))``, float32."""
        self._check(y, "AT")
        image = torch.fft.ifft2(torch.fft.ifftshift(y.to(torch.complex64) * self._weights, dim=_DIMS), norm="ortho")
        return torch.fft.fftshift(image, dim=_DIMS).real.contiguous()

    T = AT

    def zero_filled(self, kspace: Tensor) -> Tensor:
        """Zero-filled reconstruction, the real part of the inverse DFT (equals :meth:`AT`)."""
        return self.AT(kspace)

    direct_inverse = zero_filled
    """The one-shot reconstruction of the :class:`~.operators.Operator` protocol: :meth:`zero_filled`."""

    def to(self, device: torch.device | str) -> CartesianMRI:
        """Move the mask to ``device``, in place; returns ``self``."""
        self.mask = self.mask.to(device)
        self._weights = self._weights.to(device)
        return self

    def slab(self, z0: int, z1: int) -> CartesianMRI:
        """The operator for slices ``[z0, z1)``: a (Z, H, W) mask is sliced, an (H, W) one shared."""
        if self.mask.dim() == 2:
            return CartesianMRI(self.mask)
        depth = self.mask.shape[0]
        if not 0 <= z0 < z1 <= depth:
            raise ValueError(f"CartesianMRI.slab: need 0 <= z0 < z1 <= {depth}, got [{z0}, {z1})")
        return CartesianMRI(self.mask[z0:z1])

    def normal_norm_estimate(self) -> float:
        """``||A^T A||_2``: 1 when anything is sampled (a masked unitary map), else 0."""
        return 1.0 if bool(self.mask.any()) else 0.0


# -- masks -----------------------------------------------------------------------------


def _check_mask_args(shape: Sequence[int], accel: float, center_fraction: float) -> tuple[int, ...]:
    shape = tuple(int(s) for s in shape)
    if len(shape) not in (2, 3) or min(shape) < 1:
        raise ValueError(f"mask shape must be (H, W) or (Z, H, W) with positive sizes, got {shape}")
    if not accel >= 1:
        raise ValueError(f"mask accel must be >= 1, got {accel}")
    if not 0 <= center_fraction <= 1:
        raise ValueError(f"mask center_fraction must be in [0, 1], got {center_fraction}")
    return shape


def _center(n: int, center_fraction: float) -> np.ndarray:
    """Indices of the fully sampled centre band; DC sits at ``n // 2`` after fftshift."""
    count = min(n, max(1, round(n * center_fraction))) if center_fraction > 0 else 0
    start = n // 2 - count // 2
    return np.arange(start, start + count)


def _stack(shape: tuple[int, ...], seed: int, make_2d) -> Tensor:
    if len(shape) == 2:
        return torch.from_numpy(make_2d(shape, np.random.default_rng(seed)))
    slices = [make_2d(shape[1:], np.random.default_rng([seed, z])) for z in range(shape[0])]
    return torch.from_numpy(np.stack(slices))


def _line_mask(shape: tuple[int, int], columns: np.ndarray) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[:, columns] = True
    return mask


def _line_split(width: int, accel: float, center_fraction: float) -> tuple[np.ndarray, np.ndarray, int]:
    """``(centre lines, the other lines, how many of those to sample)`` for ``round(W / accel)`` in all."""
    center = _center(width, center_fraction)
    outside = np.setdiff1d(np.arange(width), center)
    count = int(np.clip(round(width / accel) - center.size, 0, width - center.size))
    return center, outside, count


def uniform_1d_mask(shape: Sequence[int], accel: float, center_fraction: float = 0.08, seed: int = 0) -> Tensor:
    """Equispaced phase-encode lines plus a fully sampled centre (fastMRI "equispaced").

    Whole columns (along H) are sampled. Outside the centre band, ``round(W / accel)`` minus
    the centre lines are spread evenly, with a random offset drawn from ``seed``.

    Parameters
    ----------
    shape : ``(H, W)``, or ``(Z, H, W)`` for one mask per slice (seeded by ``(seed, z)``).
    accel : acceleration; the sampled fraction is about ``1 / accel``.
    center_fraction : fraction of the lines that form the fully sampled centre.
    seed : random seed; the same seed gives the same mask.

    Returns
    -------
    mask : bool tensor of ``shape``.
    """
    shape = _check_mask_args(shape, accel, center_fraction)

    def make(hw: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
        center, outside, count = _line_split(hw[1], accel, center_fraction)
        if count == 0:
            return _line_mask(hw, center)
        step = outside.size / count
        offset = rng.uniform(0, step)
        picks = np.minimum((offset + step * np.arange(count)).astype(int), outside.size - 1)
        return _line_mask(hw, np.concatenate([center, outside[picks]]))

    return _stack(shape, seed, make)


def gaussian_1d_mask(shape: Sequence[int], accel: float, center_fraction: float = 0.08, seed: int = 0) -> Tensor:
    """Phase-encode lines drawn without replacement from a Gaussian density around k = 0.

    The density has standard deviation ``W / 4`` lines; the centre band is always sampled and
    ``round(W / accel)`` lines are sampled in all. Arguments as in :func:`uniform_1d_mask`.
    """
    shape = _check_mask_args(shape, accel, center_fraction)

    def make(hw: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
        width = hw[1]
        center, outside, count = _line_split(width, accel, center_fraction)
        density = np.exp(-0.5 * ((outside - width // 2) / (width / 4)) ** 2)
        picks = rng.choice(outside, size=count, replace=False, p=density / density.sum()) if count else []
        return _line_mask(hw, np.concatenate([center, np.asarray(picks, dtype=int)]))

    return _stack(shape, seed, make)


def random_2d_mask(shape: Sequence[int], accel: float, center_fraction: float = 0.08, seed: int = 0) -> Tensor:
    """Variable-density random 2D sampling (Lustig et al. 2007): a fully sampled centre square
    plus points drawn without replacement from a 2D Gaussian density (std ``H / 4``, ``W / 4``),
    ``round(H * W / accel)`` points in all. Arguments as in :func:`uniform_1d_mask`."""
    shape = _check_mask_args(shape, accel, center_fraction)

    def make(hw: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
        height, width = hw
        mask = np.zeros(hw, dtype=bool)
        rows, cols = _center(height, center_fraction), _center(width, center_fraction)
        mask[np.ix_(rows, cols)] = True
        target = round(height * width / accel)
        count = int(np.clip(target - mask.sum(), 0, mask.size - mask.sum()))
        if count:
            ky, kx = np.mgrid[:height, :width]
            density = np.exp(-0.5 * (((ky - height // 2) / (height / 4)) ** 2 + ((kx - width // 2) / (width / 4)) ** 2))
            free = np.flatnonzero(~mask.ravel())
            weights = density.ravel()[free]
            picks = rng.choice(free, size=count, replace=False, p=weights / weights.sum())
            mask.ravel()[picks] = True
        return mask

    return _stack(shape, seed, make)
