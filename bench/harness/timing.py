"""Timers of the benchmarks: synchronised wall and process-CPU seconds, peak device memory, a budget.

CPU seconds (all threads of this process) are the fairer figure on a shared, busy CPU; wall
seconds are what a user waits. On CUDA every timer synchronises the device first.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch


def sync(device: str | torch.device) -> None:
    """Wait for the work queued on ``device`` (no-op on the CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def median(values: list[float]) -> float:
    """The median, NaN for no values."""
    return float(statistics.median(values)) if values else float("nan")


def time_call(fn: Callable[[], Any], device: str | torch.device, *, repeats: int,
              warmup: int = 1) -> tuple[list[float], list[float]]:
    """Wall and process-CPU seconds of ``repeats`` calls of ``fn`` after ``warmup`` calls, synchronised."""
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
    """A wrapped function that records the synchronised wall and CPU seconds of each call."""

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


@contextmanager
def stopwatch_on(module: Any, name: str, device: str | torch.device) -> Iterator[Stopwatch]:
    """Replace ``module.name`` by a :class:`Stopwatch` of it for the ``with`` block, then restore it.

    The calls a solver makes through that module attribute are timed where they happen (e.g.
    ``mbir_batch.kernels.denoiser.denoise_slab`` inside a DDS step).
    """
    original = getattr(module, name)
    watch = Stopwatch(original, device)
    setattr(module, name, watch)
    try:
        yield watch
    finally:
        setattr(module, name, original)


def reset_peak(device: str | torch.device) -> None:
    """Start a new :func:`peak_mib` interval (no-op on the CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_mib(device: str | torch.device) -> float | None:
    """``torch.cuda.max_memory_allocated`` in MiB since :func:`reset_peak` (None on the CPU)."""
    if torch.device(device).type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**20


@dataclass
class Deadline:
    """A wall-clock budget of ``seconds`` shared by the sections of a check, started when made."""

    seconds: float
    started: float = field(default_factory=time.perf_counter)

    def left(self) -> float:
        """Seconds of the budget still left (negative when it is spent)."""
        return self.seconds - (time.perf_counter() - self.started)
