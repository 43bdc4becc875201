"""One dataset's group of slab workers, as the driver sees it: launch, poll, kill, progress events.

A :class:`WorkerGroup` holds one attempt at a time. :meth:`~WorkerGroup.launch` creates one
:class:`~mbir_batch.cluster.worker.SlabWorker` per slab and asks rank 0 for the process group's
rendezvous; :meth:`~WorkerGroup.poll` then starts every worker's ``run`` with it, collects results
and errors without blocking, and reads the workers' progress; a worker that died (its process,
its node) is told apart from one whose code raised. :meth:`~WorkerGroup.event` summarises the
group as a :class:`ProgressEvent`. What to do about a death (restart, give up) and about a
finished group is the driver's (:mod:`mbir_batch.cluster.job`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray

from mbir_batch.cluster.plan import JobSpec, Slab
from mbir_batch.cluster.worker import SlabSpec, launch_worker

__all__ = ["FAILURE_GRACE_S", "WORKER_DIED", "ProgressEvent", "WorkerGroup"]

log = logging.getLogger("mbir_batch.cluster.job")

#: Errors that mean a worker (process, node) died, as opposed to an exception raised by its code.
WORKER_DIED = (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError,
               ray.exceptions.OutOfMemoryError, ray.exceptions.ObjectLostError)
#: After one worker's task fails, how long to wait for the others before deciding died vs. raised.
FAILURE_GRACE_S = 5.0


@dataclass
class ProgressEvent:
    """What the driver reports of one job after each poll (the CLI draws its bars from these).

    Attributes
    ----------
    dataset, output : the job's input and output store.
    phase : ``launching`` (its workers are being created), ``running``, ``done`` or ``failed``.
    step, total : the slowest slab's step, of the run's total (0 before the first report).
    checkpoint_step : the step recorded as checkpointed by every slab, or None.
    restarts : relaunches of the group after a worker died.
    workers : each slab's last progress report (``slices_per_s``, residuals, ...).
    method, slabs : the method and the number of slab workers.
    """

    dataset: str
    output: str
    phase: str
    step: int
    total: int
    checkpoint_step: int | None
    restarts: int
    workers: list[dict[str, Any]] = field(default_factory=list)
    method: str = ""
    slabs: int = 0

    @property
    def label(self) -> str:
        """``<dataset file name> <method> x<slabs>``, e.g. ``ct.zarr dds x2``."""
        return f"{Path(self.dataset).name} {self.method} x{self.slabs}"


class WorkerGroup:
    """Driver-side state of one dataset's worker group, one attempt at a time (see the module docstring)."""

    def __init__(self, spec: JobSpec, slabs: list[Slab], resume_step: int | None, create: bool, *, cpus: int,
                 gpus: float, checkpoint_every: int, max_restarts: int) -> None:
        self.spec, self.slabs, self.recorded, self.create = spec, slabs, resume_step, create
        self.cpus, self.gpus = cpus, gpus
        self.checkpoint_every, self.max_restarts = checkpoint_every, max_restarts
        self.name = Path(spec.dataset).name
        self.restarts = 0
        self.actors: list[Any] = []
        self.refs: list[Any] = []
        self.rendezvous_ref: Any = None
        self.progress_refs: list[Any] = []
        self.progress: list[dict[str, Any]] = [{} for _ in slabs]
        self.results: dict[Any, Any] = {}
        self.errors: list[BaseException] = []
        self.first_error_at = 0.0
        self.started = self.attempt_started = 0.0
        self.summary: dict[str, Any] = {}

    @property
    def need(self) -> tuple[int, float]:
        return self.cpus * len(self.slabs), self.gpus * len(self.slabs)

    def specs(self) -> list[SlabSpec]:
        """What each slab's worker needs (plain values, pickled to the actor)."""
        spec = self.spec
        device = "cuda" if self.gpus > 0 else "cpu"
        model = None if spec.model is None else str(spec.model)
        model_config = None if spec.model_config is None else str(spec.model_config)
        return [SlabSpec(dataset=str(spec.dataset), output=str(spec.output), cfg=spec.cfg, model=model,
                         model_config=model_config, model_data_range=spec.model_data_range, rank=s.rank,
                         world_size=len(self.slabs), z0=s.z0, z1=s.z1, device=device, threads=self.cpus,
                         checkpoint_every=self.checkpoint_every) for s in self.slabs]

    def launch(self) -> None:
        """Create the group's actors (old ones must be dead or dying) and ask rank 0 for a rendezvous."""
        self.attempt_started = time.perf_counter()
        self.started = self.started or self.attempt_started
        self.actors = [launch_worker(s, num_cpus=self.cpus, num_gpus=self.gpus, attempt=self.restarts)
                       for s in self.specs()]
        self.rendezvous_ref = self.actors[0].rendezvous.remote()
        self.refs, self.results, self.errors, self.progress_refs = [self.rendezvous_ref], {}, [], []
        # the previous attempt's progress must not count: its checkpoint steps were verified (or
        # found damaged) before this launch, and recording them again would undo that
        self.progress = [{} for _ in self.slabs]

    def kill(self) -> None:
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors, self.refs, self.progress_refs = [], [], []

    def poll(self) -> str:
        """Advance the attempt without blocking; return running | done | died | failed."""
        ready, _ = ray.wait(self.refs, num_returns=len(self.refs), timeout=0) if self.refs else ([], [])
        for ref in ready:
            try:
                self.results[ref] = ray.get(ref)
            except Exception as error:  # a worker died or its code raised: classified below
                self.errors.append(error)
                self.first_error_at = self.first_error_at or time.perf_counter()
            self.refs.remove(ref)
        if self.errors:
            if any(isinstance(e, WORKER_DIED) for e in self.errors):
                return "died"
            if self.refs and time.perf_counter() - self.first_error_at < FAILURE_GRACE_S:
                return "running"  # a dead peer makes the others raise first; wait to see who died
            return "failed"
        if self.rendezvous_ref is not None and self.rendezvous_ref in self.results:
            addr, port = self.results.pop(self.rendezvous_ref)
            self.rendezvous_ref = None
            self.refs = [actor.run.remote(addr, port, self.recorded) for actor in self.actors]
        self._poll_progress()
        if self.rendezvous_ref is None and not self.refs:
            for result in self.results.values():  # the final count, even when no poll saw a step
                self.progress[result["rank"]].update(step=result["steps"], total=result["steps"], phase="done")
            return "done"
        return "running"

    def _poll_progress(self) -> None:
        if self.progress_refs:
            ready, _ = ray.wait(self.progress_refs, num_returns=len(self.progress_refs), timeout=0)
            if len(ready) < len(self.progress_refs):
                return
            for rank, ref in enumerate(self.progress_refs):
                try:
                    self.progress[rank] = ray.get(ref)
                except Exception as error:  # a dead worker; its run() reference reports why
                    log.debug("%s: progress of rank %d unavailable: %s", self.name, rank, error)
        self.progress_refs = [actor.progress.remote() for actor in self.actors] if self.refs else []

    def checkpoint_ready(self) -> int | None:
        """A step every slab has checkpointed and the driver has not recorded yet, or None."""
        steps = [p.get("checkpoint_step") for p in self.progress]
        if not steps or any(s is None for s in steps):
            return None
        step = min(steps)
        return step if self.recorded is None or step > self.recorded else None

    def event(self, phase: str) -> ProgressEvent:
        steps = [p.get("step", 0) for p in self.progress] or [0]
        totals = [p.get("total", 0) for p in self.progress] or [0]
        return ProgressEvent(dataset=str(self.spec.dataset), output=str(self.spec.output), phase=phase,
                             step=min(steps), total=max(totals), checkpoint_step=self.recorded,
                             restarts=self.restarts, workers=[dict(p) for p in self.progress],
                             method=self.spec.cfg.method, slabs=len(self.slabs))
