"""mbirjax (Purdue; model-based iterative reconstruction with a qGGMRF prior) on our CT datasets.

mbirjax solves x = argmin_x 1/2 ||y - A x||^2_Lambda / sigma_y^2 + qGGMRF(x) with vectorised
coordinate descent (Bouman & Sauer, IEEE TIP 1993; Thibault et al., Med. Phys. 2007). Its knobs
are ``sharpness`` (prior strength, higher = sharper), ``snr_db`` (assumed data SNR, which sets
sigma_y) and ``positivity_flag``; the iteration cap is ``max_iterations``, and its stopping rule
(``stop_threshold_change_pct``) may end earlier.

Our dataset maps onto its ``ParallelBeamModel`` with no correction (measured: the forward
projection of a phantom agrees with our sinogram to correlation > 0.999, see
``tests/bench/test_peers.py``):

- angles: our degrees in radians;
- sinogram: ours (Z, views, det) -> mbirjax (views, rows = Z, channels);
- volume: ours (Z, H, W) -> mbirjax (H, W, Z) (rows, columns, slices);
- ``delta_det_channel = det_spacing``, ``delta_voxel = 1``, ``det_channel_offset = 0``.

mbirjax (and jax) are imported inside the functions: set ``JAX_PLATFORMS=cpu`` and
``MBIRJAX_NUM_CPU_DEVICES=1`` before the first call (``bench/peers.py`` does).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["MbirjaxSettings", "to_mbirjax_sinogram", "to_mbirjax_volume", "from_mbirjax_volume",
           "make_model", "forward_project", "mbirjax_reconstruct"]


@dataclass(frozen=True)
class MbirjaxSettings:
    """mbirjax recon parameters (its names)."""

    sharpness: float = 0.0
    snr_db: float = 30.0
    max_iterations: int = 50
    positivity_flag: bool = True
    stop_threshold_change_pct: float = 0.2


def to_mbirjax_sinogram(sinogram: np.ndarray) -> np.ndarray:
    """Our (Z, views, det) -> mbirjax's (views, rows = Z, channels)."""
    return np.ascontiguousarray(np.transpose(np.asarray(sinogram, dtype=np.float32), (1, 0, 2)))


def to_mbirjax_volume(volume: np.ndarray) -> np.ndarray:
    """Our (Z, H, W) -> mbirjax's (H, W, Z)."""
    return np.ascontiguousarray(np.transpose(np.asarray(volume, dtype=np.float32), (1, 2, 0)))


def from_mbirjax_volume(volume) -> np.ndarray:
    """mbirjax's (H, W, Z) -> our (Z, H, W), float32 numpy."""
    return np.ascontiguousarray(np.transpose(np.asarray(volume, dtype=np.float32), (2, 0, 1)))


def make_model(*, depth: int, shape: tuple[int, int], angles_deg: Sequence[float], det_count: int,
               det_spacing: float):
    """A ``mbirjax.ParallelBeamModel`` for our geometry (mapping in the module docstring)."""
    import mbirjax

    sinogram_shape = (len(angles_deg), int(depth), int(det_count))
    angles = np.asarray(angles_deg, dtype=np.float64) * (np.pi / 180.0)
    model = mbirjax.ParallelBeamModel(sinogram_shape, angles)
    model.set_params(recon_shape=(int(shape[0]), int(shape[1]), int(depth)), delta_det_channel=float(det_spacing),
                     delta_voxel=1.0, det_channel_offset=0.0, verbose=0)
    return model


def forward_project(volume: np.ndarray, *, angles_deg: Sequence[float], det_count: int,
                    det_spacing: float) -> np.ndarray:
    """mbirjax's projection of our (Z, H, W) volume, returned in our (Z, views, det) layout."""
    depth, height, width = volume.shape
    model = make_model(depth=depth, shape=(height, width), angles_deg=angles_deg, det_count=det_count,
                       det_spacing=det_spacing)
    projected = np.asarray(model.forward_project(to_mbirjax_volume(volume)), dtype=np.float32)
    return np.ascontiguousarray(np.transpose(projected, (1, 0, 2)))


def mbirjax_reconstruct(sinogram: np.ndarray, *, angles_deg: Sequence[float], det_count: int, det_spacing: float,
                        shape: tuple[int, int], settings: MbirjaxSettings,
                        repeat_warm: bool = True) -> tuple[np.ndarray, dict]:
    """Reconstruct our (Z, views, det) sinogram with mbirjax; returns ((Z, H, W), info).

    The first recon of a geometry in a process includes JAX's compilation. With ``repeat_warm``
    the same recon runs a second time in the same process (same shapes: compiled code reused);
    ``info`` then holds ``wall_s`` (warm) and ``wall_s_first`` (cold, with compilation). The warm
    result is returned (mbirjax is deterministic: both runs give the same volume). ``iters`` is
    the number of iterations its stopping rule ran.
    """
    depth = sinogram.shape[0]
    model = make_model(depth=depth, shape=shape, angles_deg=angles_deg, det_count=det_count, det_spacing=det_spacing)
    model.set_params(sharpness=float(settings.sharpness), snr_db=float(settings.snr_db),
                     positivity_flag=bool(settings.positivity_flag))
    data = to_mbirjax_sinogram(sinogram)
    walls = []
    for _ in range(2 if repeat_warm else 1):
        started = time.perf_counter()
        recon, recon_dict = model.recon(data, max_iterations=int(settings.max_iterations),
                                        stop_threshold_change_pct=float(settings.stop_threshold_change_pct),
                                        print_logs=False, logfile_path=None)
        recon = np.asarray(recon)  # jax dispatch is asynchronous: wait for the result inside the timer
        walls.append(time.perf_counter() - started)
    info = {"wall_s_first": walls[0], "wall_s": walls[-1], "iters": _iterations(recon_dict, settings)}
    return from_mbirjax_volume(recon), info


def _iterations(recon_dict: dict, settings: MbirjaxSettings) -> int | None:
    params = recon_dict.get("recon_params", {}) if isinstance(recon_dict, dict) else {}
    for key in ("num_iterations", "num_iters", "iterations"):
        if key in params:
            return int(params[key])
    return None
