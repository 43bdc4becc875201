"""Simulated problems of the benchmarks: volumes, the sparse-view CT operator, slab problems, datasets.

Every operator is built by :func:`mbir_batch.kernels.operators.operator_from_geometry` from a
data-contract geometry, with the one detector count ``default_det_count`` (the count
``mbir-batch simulate`` gives a dataset). In memory, :func:`svct_problem` needs neither zarr nor
astra (the radon matrices come from the cache); :func:`simulate_problem` runs the datasets' own
simulation (:func:`mbir_batch.io.simulate_measurements`, any task, zarr installed) and
:func:`simulate_dataset` writes a dataset with the CLI.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .results import BENCH_DIR

RADON_CACHE = BENCH_DIR / ".radon-cache"


def radon_cache() -> Path:
    """Where the benchmarks keep radon system matrices: ``$MBIR_CACHE``, else ``bench/.radon-cache``."""
    return Path(os.environ.get("MBIR_CACHE", RADON_CACHE))


def make_volume(size: int, depth: int, seed: int = 9001) -> Tensor:
    """A test volume (Z, H, W) in [0, 1]: the procedural phantom ``seed`` up to 64^3 voxels, else
    nested ellipsoids (timings do not depend on the content, and the phantom takes ~1 min at 256^3)."""
    if size * size * depth <= 64**3:
        from mbir_batch.phantoms import make_phantom

        return torch.from_numpy(np.ascontiguousarray(make_phantom(seed, size, depth)))
    z = torch.linspace(-1, 1, depth).view(-1, 1, 1)
    y = torch.linspace(-1, 1, size).view(1, -1, 1)
    x = torch.linspace(-1, 1, size).view(1, 1, -1)
    vol = torch.zeros(depth, size, size)
    for (cx, cy, cz, ax, ay, az, value) in [(0, 0, 0, 0.85, 0.7, 1.2, 0.45), (-0.35, 0, 0, 0.25, 0.4, 0.9, -0.3),
                                            (0.35, 0.05, 0.1, 0.2, 0.35, 0.8, -0.3), (0, -0.45, 0, 0.1, 0.1, 2, 0.4),
                                            (0.1, 0.3, -0.2, 0.12, 0.08, 0.5, 0.15)]:
        inside = ((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2 + ((z - cz) / az) ** 2 <= 1
        vol += value * inside
    return vol.clamp(0, 1)


def svct_geometry(size: int, views: int) -> dict[str, Any]:
    """The sparse-view CT geometry ``mbir-batch simulate --task svct`` gives a ``size^2`` volume:
    ``views`` angles ``180 k / views``, ``default_det_count`` unit bins."""
    from mbir_batch.kernels.operators import default_det_count

    return {"kind": "parallel", "angles_deg": [180.0 * k / views for k in range(views)],
            "det_count": default_det_count((size, size)), "det_spacing": 1.0}


def svct_operator(size: int, views: int, device: str | torch.device = "cpu", cache_dir: Path | None = None):
    """The :class:`~mbir_batch.kernels.radon.ParallelBeam` of :func:`svct_geometry`, on ``device``."""
    from mbir_batch.kernels.operators import operator_from_geometry

    return operator_from_geometry("ct", svct_geometry(size, views), (size, size), device=device,
                                  cache_dir=cache_dir if cache_dir is not None else radon_cache())


def svct_problem(volume: Tensor, views: int, device: str | torch.device = "cpu", *, z0: int = 0,
                 z1: int | None = None):
    """The :class:`~mbir_batch.solve.SlabProblem` of the slices ``[z0, z1)`` of ``volume`` (Z, H, W):
    its sparse-view CT operator and noiseless sinogram ``y = A x``, on ``device``."""
    from mbir_batch.solve import SlabProblem

    depth, size = volume.shape[0], volume.shape[-1]
    z1 = depth if z1 is None else z1
    operator = svct_operator(size, views, device)
    measurements = operator.A(volume[z0:z1].to(device))
    return SlabProblem(z0=z0, z1=z1, depth=depth, operator=operator, measurements=measurements)


def make_problem(size: int, depth: int, views: int, device: str | torch.device):
    """``(problem, volume)``: :func:`svct_problem` of the whole :func:`make_volume` on ``device``."""
    volume = make_volume(size, depth)
    return svct_problem(volume, views, device), volume.to(device)


def prepare_radon_cache(sizes: tuple[int, ...], views: int, cache_dir: Path) -> list[str]:
    """Build (with astra) the sparse-view radon matrices of ``sizes`` into ``cache_dir``; one line each."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    lines, total = [], 0
    for size in sizes:
        path = svct_operator(size, views, cache_dir=cache_dir).cache_path
        total += path.stat().st_size
        lines.append(f"{size}^2 x {views} views: {path.name} {path.stat().st_size / 2**20:.2f} MiB")
    return lines + [f"radon cache {cache_dir}: {total / 2**20:.2f} MiB in {len(sizes)} files"]


def missing_radon_matrices(sizes: list[int], views: int) -> list[str]:
    """The sizes whose matrices are neither in :func:`radon_cache` nor buildable here (no astra)."""
    missing = []
    for size in sizes:
        try:
            svct_operator(size, views)
        except ImportError as error:
            missing.append(f"{size}^2 x {views} views ({error})")
    return missing


def simulate_problem(volume: np.ndarray, *, task: str, views: int | None = 8, arc: float = 90.0,
                     accel: float = 4.0, noise: float = 0.0, seed: int = 0,
                     device: str | torch.device = "cpu"):
    """The whole-volume :class:`~mbir_batch.solve.SlabProblem` of a dataset ``mbir-batch simulate``
    would write: ``task`` ``svct``, ``lact`` or ``csmri``, measurement noise ``noise`` drawn from
    ``seed`` (:func:`mbir_batch.io.simulate_measurements`)."""
    from mbir_batch.io import simulate_measurements
    from mbir_batch.kernels.operators import operator_from_geometry
    from mbir_batch.solve import SlabProblem

    sim = simulate_measurements(volume, task=task, views=views, arc=arc, accel=accel, noise=noise, seed=seed)
    depth = volume.shape[0]
    operator = operator_from_geometry(sim.modality, sim.geometry, volume.shape, mask=sim.mask, device=device)
    measurements = torch.as_tensor(np.asarray(sim.measurements)).to(device)
    return SlabProblem(z0=0, z1=depth, depth=depth, operator=operator, measurements=measurements)


def cli_path() -> Path:
    """The ``mbir-batch`` entry point beside this Python."""
    return Path(sys.executable).with_name("mbir-batch")


def simulate_dataset(path: Path, *, size: int, depth: int, phantom: int, views: int = 8,
                     env: dict[str, str] | None = None) -> dict[str, Any]:
    """Write a sparse-view CT dataset with ``mbir-batch simulate`` (replacing ``path``).

    Returns ``{"path", "size", "depth", "phantom", "simulate_s", "simulate_command"}``.
    """
    command = [str(cli_path()), "simulate", "--phantom", str(phantom), "--size", str(size), "--depth", str(depth),
               "--task", "svct", "--views", str(views), "--out", str(path), "--overwrite"]
    started = time.perf_counter()
    done = subprocess.run(command, check=False, capture_output=True, text=True, env=env)
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return {"path": str(path), "size": size, "depth": depth, "phantom": phantom,
            "simulate_s": time.perf_counter() - started, "simulate_command": " ".join(["mbir-batch", *command[1:]])}
