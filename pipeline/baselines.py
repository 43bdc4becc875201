"""Compatibility names for the 3D-TV ADMM step, which now lives in :mod:`mbir_batch.kernels`.

``admm_tv_3d_step`` is :func:`~mbir_batch.kernels.admm.admm_tv_step` with
:class:`~mbir_batch.kernels.tv.Gradient3D`; the ``admm-tv`` method is
:mod:`mbir_batch.methods.admm_tv`. Kept only until ``tests/cluster/test_scaling_bytes.py`` imports
from the kernels; then this module goes.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from .kernels.admm import AdmmInfo, AdmmState, admm_tv_step
from .kernels.comm import Comm
from .kernels.tv import Gradient3D

__all__ = ["admm_tv_3d_step", "zeros_state_3d"]


def admm_tv_3d_step(x: Tensor, state: AdmmState, *, lam_xy: float, comm: Comm,
                    **kwargs: Any) -> tuple[Tensor, AdmmState, AdmmInfo]:
    """``admm_tv_step(x, state, tv=Gradient3D(lam_xy, comm), comm=comm, **kwargs)``."""
    return admm_tv_step(x, state, tv=Gradient3D(lam_xy, comm), comm=comm, **kwargs)


def zeros_state_3d(x: Tensor) -> AdmmState:
    """``z = w = 0`` of shape ``(3, *x.shape)``."""
    return AdmmState.zeros_for(Gradient3D, x)  # type: ignore[arg-type]
