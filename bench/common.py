"""Shared helpers of the benchmarks: problems, denoisers, timers and report files.

Benchmarks are scripts, not tests: they live outside the package and import ``mbir_batch``
as installed (editable here; ``bench/gpu_check.sh`` assembles it on a machine without an
install). Nothing here imports zarr, ray or astra; astra is needed only to *build* a radon
matrix that is not in the cache (``python bench/gpu_check.py --prepare-cache``).
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
RADON_CACHE = BENCH_DIR / ".radon-cache"

# Song et al. NCSN++ at 256^2 (score_sde configs: nf 128, ch_mult (1,1,2,2,2,2,2), 2 res blocks,
# attention at 16^2): a diffusers UNet2DModel with the same widths, attention at 16^2 and below.
PAPER_CHANNELS = (128, 128, 256, 256, 256, 256, 256)
PAPER_ATTENTION = (False, False, False, False, True, True, True)


def svct_geometry(size: int, views: int) -> dict[str, Any]:
    """Sparse-view CT geometry of the tests and datasets: uniform views over 180 deg,
    ``ceil(sqrt(2) size)`` unit detector bins."""
    angles = [float(a) for a in np.linspace(0.0, 180.0, views, endpoint=False)]
    return {"angles_deg": angles, "det_count": int(np.ceil(size * np.sqrt(2))), "det_spacing": 1.0}


def svct_operator(size: int, views: int, device: str | torch.device = "cpu", cache_dir: Path | None = None):
    """A :class:`ParallelBeam` for ``size^2`` slices and ``views`` views, on ``device``."""
    from mbir_batch.kernels.radon import ParallelBeam

    geometry = svct_geometry(size, views)
    cache = Path(cache_dir) if cache_dir is not None else Path(os.environ.get("MBIR_CACHE", RADON_CACHE))
    op = ParallelBeam(shape=(size, size), angles_deg=geometry["angles_deg"], det_count=geometry["det_count"],
                      det_spacing=geometry["det_spacing"], cache_dir=cache)
    return op.to(device)


def make_volume(size: int, depth: int, seed: int = 9001) -> Tensor:
    """A test volume (Z, H, W) in [0, 1]: the procedural phantom up to 64^3 voxels, else
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


def paper_config(resolution: int = 256):
    """The paper-size denoiser (NCSN++-like widths, ~61 M parameters at any resolution)."""
    from mbir_batch.kernels.denoiser import DenoiserConfig

    return DenoiserConfig(resolution=resolution, channels=PAPER_CHANNELS, layers_per_block=2,
                          attention_levels=PAPER_ATTENTION, attention_head_dim=64)


def build_denoiser(spec: str, resolution: int, device: str | torch.device, seed: int = 0):
    """Return ``(model, label)`` for ``--model``: ``bundled``, ``paper``, ``random-small`` or a path.

    ``paper`` and ``random-small`` have random weights (seeded) and say so in the label; a
    missing bundled model is an error naming the file, never a silent random fallback.
    """
    from mbir_batch.kernels.denoiser import (
        Denoiser,
        DenoiserConfig,
        bundled_model_path,
        load_denoiser,
    )

    if spec in ("paper", "random-small"):
        torch.manual_seed(seed)
        config = paper_config(resolution) if spec == "paper" else DenoiserConfig(resolution=resolution)
        model = Denoiser(config).to(device).eval()
        kind = "paper-size NCSN++-like" if spec == "paper" else "bundled architecture (DenoiserConfig defaults)"
        return model, f"{spec}: {kind}, RANDOM weights, {parameter_count(model) / 1e6:.1f} M params"
    path = bundled_model_path() if spec == "bundled" else Path(spec)
    if spec == "bundled" and not path.is_file():
        raise SystemExit(f"bundled denoiser {path} does not exist yet; pass --model random-small "
                         "(random weights, same architecture) or --model PATH")
    model = load_denoiser(path, device=device)
    if model.config.resolution != resolution:
        raise SystemExit(f"{path}: model resolution {model.config.resolution} != --size {resolution}")
    return model, f"{path.name}: trained, {parameter_count(model) / 1e6:.1f} M params"


def parameter_count(model: torch.nn.Module) -> int:
    """Number of parameters of ``model``."""
    return sum(int(p.numel()) for p in model.parameters())


def make_problem(size: int, depth: int, views: int, device: str | torch.device):
    """A single-slab :class:`SlabProblem` (no zarr): volume, ParallelBeam and its sinogram."""
    from mbir_batch.solve import SlabProblem

    op = svct_operator(size, views, device)
    volume = make_volume(size, depth).to(device)
    sinogram = op.A(volume)
    return SlabProblem(z0=0, z1=depth, depth=depth, operator=op, measurements=sinogram), volume


def sync(device: str | torch.device) -> None:
    """Wait for queued work on ``device`` (no-op on CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], Any], device: str | torch.device, *, repeats: int,
              warmup: int = 1) -> tuple[list[float], list[float]]:
    """Wall and process-CPU seconds of ``repeats`` calls of ``fn`` after ``warmup`` calls, synchronised.

    CPU seconds (all threads of this process) are the fairer figure on a shared, busy CPU.
    """
    for _ in range(warmup):
        fn()
    sync(device)
    wall, cpu = [], []
    for _ in range(repeats):
        started, cpu_started = time.perf_counter(), time.process_time()
        fn()
        sync(device)
        wall.append(time.perf_counter() - started)
        cpu.append(time.process_time() - cpu_started)
    return wall, cpu


class Stopwatch:
    """Accumulates synchronised wall and CPU seconds of the calls of a wrapped function."""

    def __init__(self, fn: Callable[..., Any], device: str | torch.device) -> None:
        self.fn, self.device = fn, device
        self.wall: list[float] = []
        self.cpu: list[float] = []

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        sync(self.device)
        started, cpu_started = time.perf_counter(), time.process_time()
        out = self.fn(*args, **kwargs)
        sync(self.device)
        self.wall.append(time.perf_counter() - started)
        self.cpu.append(time.process_time() - cpu_started)
        return out


def median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def reset_peak(device: str | torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_mib(device: str | torch.device) -> float | None:
    """``torch.cuda.max_memory_allocated`` in MiB since the last :func:`reset_peak` (None on CPU)."""
    if torch.device(device).type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**20


@dataclass
class Deadline:
    """A wall-clock budget shared by the sections of a check."""

    seconds: float
    started: float = 0.0

    def __post_init__(self) -> None:
        self.started = time.perf_counter()

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.started)


def environment(device: str | torch.device) -> dict[str, Any]:
    """Versions and hardware, for the report header."""
    env: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                           "threads": torch.get_num_threads(), "machine": platform.machine()}
    try:
        import diffusers

        env["diffusers"] = diffusers.__version__
    except ImportError:
        env["diffusers"] = "NOT INSTALLED"
    if torch.device(device).type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, gpu_mem_gib=round(props.total_memory / 2**30, 1),
                   cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                   tf32_matmul=torch.backends.cuda.matmul.allow_tf32, tf32_cudnn=torch.backends.cudnn.allow_tf32,
                   cudnn_benchmark=torch.backends.cudnn.benchmark)
    try:
        env["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=BENCH_DIR, capture_output=True,
                                       text=True, timeout=5, check=False).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        env["commit"] = "unknown"
    return env


def today() -> str:
    return date.today().isoformat()


def write_report(stem: Path, markdown: str, data: Any, *, also_to_out: bool = True) -> list[Path]:
    """Write ``<stem>.md`` and ``<stem>.json`` (and copies into ``$OUT`` when set); returns the paths."""
    folders = [stem.parent]
    out = os.environ.get("OUT")
    if also_to_out and out:
        folders.append(Path(out))
    written = []
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
        md, js = folder / f"{stem.name}.md", folder / f"{stem.name}.json"
        md.write_text(markdown)
        js.write_text(json.dumps(data, indent=2, default=_jsonable) + "\n")
        written += [md, js]
    return written


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return str(value)


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    """A GitHub markdown table; floats get 4 significant digits."""
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return "-" if not math.isfinite(v) else f"{v:.4g}"
        return "-" if v is None else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


from mbir_batch.kernels.diffusion import NoisePrefetch  # noqa: E402,F401  (re-exported for the benches)
