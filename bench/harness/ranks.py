"""The one multi-rank launcher of the benchmarks: a function over N spawned processes.

``run_ranks(target, world, *args)`` starts ``world`` processes (``spawn``: a fresh interpreter
each, safe with CUDA), calls ``target(ctx, *args)`` in each with a :class:`RankContext` (rank,
world size and a free rendezvous port on 127.0.0.1, for
:class:`~mbir_batch.cluster.dist_comm.TorchDistComm`), and returns the values the ranks return,
by rank. With ``world=1`` it runs a function in one fresh process (e.g. a peak-memory measurement
that must not see this process's allocations).

``target`` must be a module-level function (it is pickled by name); its arguments and return
value must pickle. A rank that raises, dies or overruns ``timeout_s`` stops the launch with a
:class:`RankError` naming the rank and carrying its traceback; the other ranks are terminated.
"""

from __future__ import annotations

import multiprocessing
import os
import queue as queue_module
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


@dataclass(frozen=True)
class RankContext:
    """What a rank knows of the launch: its ``rank`` in ``0 .. world - 1`` and the rendezvous ``port``."""

    rank: int
    world: int
    port: int
    addr: str = "127.0.0.1"


class RankError(RuntimeError):
    """A rank raised, died or did not finish in time; the message names it (and has its traceback)."""


def _rank_entry(target: Callable[..., Any], ctx: RankContext, args: tuple, threads: int | None, results) -> None:
    """What each spawned process runs: ``target(ctx, *args)``, its value or traceback into ``results``."""
    try:
        if threads is not None:
            import torch

            torch.set_num_threads(threads)
        results.put((ctx.rank, True, target(ctx, *args)))
    except BaseException:  # noqa: BLE001 - hand every failure to the parent, never hang it
        results.put((ctx.rank, False, traceback.format_exc()))


@contextmanager
def _thread_environment(threads: int | None) -> Iterator[None]:
    """``OMP_NUM_THREADS``/``MKL_NUM_THREADS`` set for the children while they start (spawn copies it)."""
    if threads is None:
        yield
        return
    before = {name: os.environ.get(name) for name in THREAD_VARIABLES}
    os.environ.update(dict.fromkeys(THREAD_VARIABLES, str(threads)))
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def run_ranks(target: Callable[..., Any], world: int, *args: Any, timeout_s: float = 900.0,
              threads: int | None = None) -> list[Any]:
    """Run ``target(RankContext(rank, world, port), *args)`` in ``world`` spawned processes.

    Parameters
    ----------
    target : a module-level function; what it returns comes back (pickled).
    world : the number of processes (ranks).
    *args : passed to every rank after its context.
    timeout_s : wall seconds for all ranks together.
    threads : torch / OpenMP threads per rank (None: the library defaults).

    Returns
    -------
    The ranks' return values, by rank.

    Raises
    ------
    RankError : a rank raised (its traceback is in the message), exited without a result, or the
        launch ran past ``timeout_s``.
    """
    from mbir_batch.cluster.dist_comm import free_port

    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    port = free_port()
    procs = [context.Process(target=_rank_entry, name=f"rank{rank}",
                             args=(target, RankContext(rank, world, port), args, threads, results))
             for rank in range(world)]
    values: dict[int, Any] = {}
    try:
        with _thread_environment(threads):
            for proc in procs:
                proc.start()
        _collect(procs, results, values, time.perf_counter() + timeout_s)
    finally:
        for proc in procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=10)
    return [values[rank] for rank in range(world)]


def _collect(procs: list, results, values: dict[int, Any], deadline: float) -> None:
    """Fill ``values`` by rank from ``results`` until every rank answered; RankError otherwise."""
    while len(values) < len(procs):
        try:
            rank, ok, value = results.get(timeout=1.0)
        except queue_module.Empty:
            if time.perf_counter() > deadline:
                waiting = [rank for rank in range(len(procs)) if rank not in values]
                raise RankError(f"ranks {waiting} did not finish in time") from None
            dead = [rank for rank, proc in enumerate(procs)
                    if rank not in values and proc.exitcode is not None and proc.exitcode != 0]
            if dead:
                raise RankError(f"rank {dead[0]} exited with code {procs[dead[0]].exitcode} and no result") from None
            continue
        if not ok:
            raise RankError(f"rank {rank} of {len(procs)} failed:\n{value}")
        values[rank] = value
