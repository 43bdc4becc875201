"""Slabs of one volume solved as threads of one process, each with its own SlabSolver, over the
thread communicator of the kernel tests (``tests/kernels/conftest.py``: sums in rank order): the
distributed runs of the pipeline tests without Ray or torch.distributed."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from mbir_batch.kernels.comm import LocalComm
from mbir_batch.solve import SlabProblem, SlabSolver, SlabState, StepEvent
from tests.kernels.conftest import run_sharded


def run_threads(problems: Sequence[SlabProblem], cfg: Any, denoiser: Any,
                states: Sequence[SlabState] | None = None,
                keep: Callable[[int, StepEvent], None] | None = None) -> tuple[torch.Tensor, list[StepEvent]]:
    """Solve every slab in its own thread (from ``states`` or the initial state); returns the
    volume (slabs concatenated) and each rank's last step event. ``keep(rank, event)`` sees every
    event. One slab runs on a :class:`LocalComm`."""
    def solve(comm) -> tuple[torch.Tensor, StepEvent]:
        rank = comm.rank
        solver = SlabSolver(problems[rank], cfg, comm=comm if len(problems) > 1 else LocalComm(), denoiser=denoiser)
        seen: list[StepEvent] = []

        def on_step(event: StepEvent) -> None:
            seen.append(event)
            if keep is not None:
                keep(rank, event)

        volume = solver.run(solver.initial_state() if states is None else states[rank], callback=on_step)
        return volume, seen[-1]

    results = run_sharded(solve, len(problems))
    return torch.cat([volume for volume, _ in results]), [event for _, event in results]
