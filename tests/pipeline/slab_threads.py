"""Slabs of one volume solved as threads of one process, each with its own SlabSolver and a
communicator that sums in rank order (as ``tests/kernels/conftest.py``): the distributed runs of
the pipeline tests without Ray or torch.distributed."""
from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch

from mbir_batch.kernels.comm import LocalComm
from mbir_batch.solve import SlabProblem, SlabSolver, SlabState, StepEvent


class ThreadComm:
    """One rank of a world of threads: sums in rank order, halos by slot."""

    def __init__(self, world: dict, rank: int) -> None:
        self.world, self.rank, self.world_size = world, rank, world["size"]

    def all_reduce_sum(self, t):
        self.world["slots"][self.rank] = t.clone()
        self.world["barrier"].wait()
        total = self.world["slots"][0].clone()
        for other in self.world["slots"][1:]:
            total = total + other
        self.world["barrier"].wait()
        return total

    def halo_exchange(self, first, last):
        world = self.world
        world["firsts"][self.rank], world["lasts"][self.rank] = first.clone(), last.clone()
        world["barrier"].wait()
        prev_last = world["lasts"][self.rank - 1] if self.rank > 0 else None
        next_first = world["firsts"][self.rank + 1] if self.rank < self.world_size - 1 else None
        world["barrier"].wait()
        return prev_last, next_first

    def bytes_sent(self) -> int:
        return 0


def run_threads(problems: Sequence[SlabProblem], cfg: Any, denoiser: Any,
                states: Sequence[SlabState] | None = None,
                keep: Callable[[int, StepEvent], None] | None = None) -> tuple[torch.Tensor, list[StepEvent]]:
    """Solve every slab in its own thread (from ``states`` or the initial state); returns the
    volume (slabs concatenated) and each rank's last step event. ``keep(rank, event)`` sees every
    event."""
    pieces = len(problems)
    world = {"size": pieces, "barrier": threading.Barrier(pieces, timeout=120), "slots": [None] * pieces,
             "firsts": [None] * pieces, "lasts": [None] * pieces}
    volumes, events, errors = [None] * pieces, [None] * pieces, []

    def target(rank: int) -> None:
        try:
            comm = LocalComm() if pieces == 1 else ThreadComm(world, rank)
            solver = SlabSolver(problems[rank], cfg, comm=comm, denoiser=denoiser)
            seen: list[StepEvent] = []

            def on_step(event: StepEvent) -> None:
                seen.append(event)
                if keep is not None:
                    keep(rank, event)

            start = solver.initial_state() if states is None else states[rank]
            volumes[rank] = solver.run(start, callback=on_step)
            events[rank] = seen[-1]
        except Exception as error:  # noqa: BLE001 - re-raised below
            errors.append(error)
            world["barrier"].abort()

    threads = [threading.Thread(target=target, args=(rank,)) for rank in range(pieces)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return torch.cat(volumes), events
