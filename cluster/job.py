"""The batch driver: shard plan, launch, checkpoints, restart, resume and the finished output.

For every dataset the driver

1. decides what to do with the output store: create it, resume it (an incomplete output with the
   same input and config continues from its last complete checkpoint step, logging
   ``resuming <dataset> from step N``), skip it (already complete with the same config) or refuse
   (a different config without ``overwrite``);
2. splits the volume into chunk-aligned slabs (:mod:`mbir_batch.cluster.plan`), one
   :class:`~mbir_batch.cluster.worker.SlabWorker` each, and launches the group once its CPUs/GPUs
   are free, so several datasets run at once where the cluster allows;
3. polls the workers' progress, feeds the progress bar / callback, and records a checkpoint step as
   complete (``last_complete_step``) once every slab has written it;
4. when a worker dies, kills the whole group and relaunches it from the last complete step, at
   most ``max_restarts`` times;
5. writes ``complete: true`` last, after every slab is written, together with the provenance
   (method, config, seed, version, slabs, timings, and PSNR/SSIM when the dataset has a reference).

Before any lock, output or Ray, every model is checked against the slice size of its datasets
(:func:`mbir_batch.model_check.check_model`). Ray is embedded (``ray.init(address="local")``, a
small object store) unless ``address`` names a running cluster, e.g. the one
``slurm/mbir-ray.sbatch`` starts (:mod:`mbir_batch.cluster.session`: quiet, bounded, private
token). SIGINT and SIGTERM stop the driver cleanly at its next poll: the workers are killed, Ray is
shut down, the output keeps its last complete checkpoint, and :class:`Interrupted` says which step
each job reached and that the same command resumes it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray

from mbir_batch import __version__
from mbir_batch.cluster.metrics import ConsoleReporter, format_scores, record_restart
from mbir_batch.cluster.plan import JobSpec, Slab, create_output, plan_output, usable_step
from mbir_batch.cluster.session import (
    DEFAULT_CONNECT_TIMEOUT_S,
    Interrupted,
    StopSignals,
    connect,
    driver_log_path,
    logs_to_file,
)
from mbir_batch.cluster.worker import SlabSpec, launch_worker
from mbir_batch.checkpoints import CheckpointError
from mbir_batch.dataset import open_dataset
from mbir_batch.errors import UserError
from mbir_batch.locking import OutputLock
from mbir_batch.model_check import check_models
from mbir_batch.output import OutputStore

__all__ = ["Interrupted", "JobError", "JobSpec", "ProgressEvent", "run_jobs"]

log = logging.getLogger(__name__)

#: Errors that mean a worker (process, node) died, as opposed to an exception raised by its code.
WORKER_DIED = (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError,
               ray.exceptions.OutOfMemoryError, ray.exceptions.ObjectLostError)
#: After one worker's task fails, how long to wait for the others before deciding died vs. raised.
FAILURE_GRACE_S = 5.0


class JobError(UserError):
    """One or more datasets could not be reconstructed (the message names each and why)."""


@dataclass
class ProgressEvent:
    """What the progress callback receives after each poll of a job."""

    dataset: str
    output: str
    phase: str  # launching | running | done | skipped | failed
    step: int
    total: int
    checkpoint_step: int | None
    restarts: int
    workers: list[dict[str, Any]] = field(default_factory=list)


class _Job:
    """Driver-side state of one dataset's worker group (one attempt at a time)."""

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
        device = "cuda" if self.gpus > 0 else "cpu"
        model = None if self.spec.model is None else str(self.spec.model)
        return [SlabSpec(dataset=str(self.spec.dataset), output=str(self.spec.output), cfg=self.spec.cfg,
                         model=model, rank=s.rank, world_size=len(self.slabs), z0=s.z0, z1=s.z1, device=device,
                         threads=self.cpus, checkpoint_every=self.checkpoint_every) for s in self.slabs]

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
                             restarts=self.restarts, workers=[dict(p) for p in self.progress])


def run_jobs(
    specs: list[JobSpec], *, workers: int = 1, gpus_per_worker: float = 0.0, cpus_per_worker: int = 1,
    address: str | None = None, checkpoint_every: int = 10, max_restarts: int = 3, overwrite: bool = False,
    dashboard: bool = False, console: Any = None, progress: Callable[[ProgressEvent], None] | None = None,
    num_cpus: int | None = None, object_store_memory: int = 80 * 1024 * 1024, poll_s: float = 0.25,
    connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
) -> list[dict[str, Any]]:
    """Reconstruct every dataset of ``specs``; return one summary per dataset.

    Parameters
    ----------
    specs : the reconstructions (dataset, output, config, model).
    workers : slab actors per dataset (at most one per z-chunk; see :mod:`~mbir_batch.cluster.plan`).
    gpus_per_worker : GPUs per actor; > 0 runs on CUDA and fails if the cluster has no GPUs (never
        silently on CPU). Fractions below 1 are allowed only with ``workers == 1`` (NCCL cannot put two
        ranks of one group on one GPU).
    cpus_per_worker : CPUs (torch threads) per actor.
    address : a running Ray cluster (``"ip:port"``); default: an embedded local Ray.
    checkpoint_every : every K steps each slab writes its state to ``state/`` (0: never).
    max_restarts : relaunches of a dataset's group after a worker died.
    overwrite : replace complete or incomplete outputs instead of skipping / resuming them.
    dashboard : start the Ray dashboard with the embedded Ray.
    console : a ``rich.console.Console`` for the progress bars and messages (None: logging only).
    progress : called with a :class:`ProgressEvent` after every poll of a running job.
    num_cpus, object_store_memory : resources of the embedded Ray (default: all cores, 80 MB store).
    connect_timeout_s : how long to wait for a cluster at ``address`` to answer.

    Raises
    ------
    UserError
        A dataset, model, output or resource request that cannot work (before anything is
        launched), or :class:`JobError` naming each dataset that failed.
    Interrupted
        SIGINT or SIGTERM; the message names the step each running job reached. Its outputs stay
        resumable from their last complete checkpoint.
    """
    if workers < 1 or cpus_per_worker < 1 or gpus_per_worker < 0 or checkpoint_every < 0 or max_restarts < 0:
        raise UserError("--workers and --cpus-per-worker must be >= 1; --gpus-per-worker, --checkpoint-every "
                        "and --max-restarts >= 0")
    if 0 < gpus_per_worker < 1 and workers > 1:
        raise UserError(f"--gpus-per-worker {gpus_per_worker} with --workers {workers}: NCCL needs one whole GPU "
                        f"per rank; use --gpus-per-worker 1 (fractions only with --workers 1)")
    outputs = [Path(spec.output).resolve() for spec in specs]
    if len(set(outputs)) < len(outputs):
        raise UserError("the same output store is named twice; give each dataset its own output")
    say = ConsoleReporter(console)
    check_models((spec.model, spec.dataset) for spec in specs)
    jobs, summaries = [], []
    with ExitStack() as locks:
        signals = locks.enter_context(StopSignals())
        locks.enter_context(logs_to_file(driver_log_path()))
        for spec in specs:
            lock = OutputLock(spec.output)
            lock.acquire()
            locks.callback(lock.release)
            lock.start_heartbeat()
            plan = plan_output(spec, spec.workers or workers, overwrite, say)
            if plan is None:
                summaries.append({"dataset": str(spec.dataset), "output": str(spec.output), "status": "skipped"})
                continue
            jobs.append(_Job(spec, *plan, cpus=cpus_per_worker, gpus=gpus_per_worker,
                             checkpoint_every=checkpoint_every, max_restarts=max_restarts))
        if not jobs:
            return summaries
        largest = max(job.need[0] for job in jobs)
        ray_was_up = ray.is_initialized()
        try:
            connect(address, num_cpus=num_cpus, largest=largest, dashboard=dashboard, say=say, signals=signals,
                    object_store_memory=object_store_memory, connect_timeout_s=connect_timeout_s)
            _check_resources(jobs)
            for job in jobs:
                if job.create:
                    create_output(job.spec, job.slabs, overwrite)
            summaries += _schedule(jobs, say, progress, poll_s, signals)
        finally:
            for job in jobs:
                job.kill()
            if not ray_was_up and ray.is_initialized():  # also after a failure or signal inside connect()
                ray.shutdown()
    return summaries


def _check_resources(jobs: list[_Job]) -> None:
    """Refuse, before anything is written or launched, a group the cluster can never hold."""
    total = ray.cluster_resources()
    cpus, gpus = total.get("CPU", 0.0), total.get("GPU", 0.0)
    for job in jobs:
        need_cpu, need_gpu = job.need
        if job.gpus > 0 and gpus == 0:
            raise UserError(f"{job.spec.dataset}: GPUs were requested (--gpus-per-worker {job.gpus:g}) but the Ray "
                            f"cluster has none; use --gpus-per-worker 0 to run on CPU")
        if need_cpu > cpus or need_gpu > gpus:
            raise UserError(f"{job.spec.dataset}: {len(job.slabs)} workers need {need_cpu} CPUs and {need_gpu:g} "
                            f"GPUs, but the Ray cluster has {cpus:g} CPUs and {gpus:g} GPUs")


def _schedule(jobs: list[_Job], say: ConsoleReporter, progress: Callable | None, poll_s: float,
              signals: StopSignals) -> list[dict]:
    """Run the jobs, several at once where the cluster's CPUs/GPUs allow; stop at a signal."""
    total = ray.cluster_resources()
    cpus, gpus = total.get("CPU", 0.0), total.get("GPU", 0.0)
    pending, running, summaries, failures = list(jobs), [], [], []
    with say.bars() as bars, signals.deferred():
        while pending or running:
            if signals.received is not None:
                raise Interrupted(signals.received, _interrupted_message(running, pending))
            used_cpu = sum(j.need[0] for j in running)
            used_gpu = sum(j.need[1] for j in running)
            for job in list(pending):
                if job.need[0] <= cpus - used_cpu and job.need[1] <= gpus - used_gpu:
                    pending.remove(job)
                    running.append(job)
                    used_cpu, used_gpu = used_cpu + job.need[0], used_gpu + job.need[1]
                    job.launch()
                    bars.add(id(job), f"{job.name} {job.spec.cfg.method} x{len(job.slabs)}")
            for job in list(running):
                outcome = _advance(job, say)
                if outcome != "running":
                    running.remove(job)
                    job.kill()
                    if outcome == "done":
                        summaries.append(job.summary)
                    else:
                        failures.append((job, outcome))
                phase = {"running": "running"}.get(outcome, "done" if outcome == "done" else "failed")
                bars.update(id(job), job.event(phase))
                if progress is not None:
                    progress(job.event(phase))
            time.sleep(poll_s)
    if failures:
        message = "; ".join(f"{job.spec.dataset}: {outcome}" for job, outcome in failures)
        bugs = [e for job, _ in failures for e in job.errors if not _is_user_error(e) and not isinstance(e, WORKER_DIED)]
        if bugs:  # an exception in worker code is a bug: keep the remote traceback
            raise RuntimeError(f"{message}\nworker traceback:\n{getattr(bugs[0], 'traceback_str', bugs[0])}")
        raise JobError(message)
    return summaries


def _interrupted_message(running: list[_Job], pending: list[_Job]) -> str:
    """``<output>: interrupted at step N; ...`` for each job, and how to resume."""
    parts = []
    for job in running:
        event = job.event("running")
        start = job.recorded if job.recorded is not None else 0
        parts.append(f"{job.spec.output}: interrupted at step {event.step} (resumes from step {start})")
    parts += [f"{job.spec.output}: not started" for job in pending]
    return "; ".join(parts) + "; run the same command to resume"


def _is_user_error(error: BaseException) -> bool:
    return isinstance(getattr(error, "cause", None), UserError) or isinstance(error, UserError)


def _advance(job: _Job, say: ConsoleReporter) -> str:
    """Poll one job; record checkpoints, restart after a death, finish; return running|done|<error>."""
    state = job.poll()
    step = job.checkpoint_ready()
    if step is not None:
        OutputStore.open(job.spec.output).checkpoints.record(step)
        job.recorded = step
        log.info("%s: checkpoint step %d recorded", job.name, step)
    if state == "running":
        return "running"
    if state == "done":
        _finish(job, say)
        return "done"
    reason = "; ".join(_describe(e) for e in job.errors)
    if state == "died" and job.restarts < job.max_restarts:
        job.kill()
        job.restarts += 1
        record_restart(job.name)
        try:  # the recorded step is verified again; a damaged one falls back to the previous one
            job.recorded = usable_step(OutputStore.open(job.spec.output, mode="r"), job.slabs, job.spec, say)
        except CheckpointError as error:
            return f"a worker died ({reason}) and {error}"
        say(f"{job.name}: a worker died ({reason}); restart {job.restarts}/{job.max_restarts} from step "
            f"{job.recorded if job.recorded is not None else 0}")
        job.launch()
        return "running"
    if state == "died":
        return f"gave up after {job.restarts} restarts: {reason}"
    return reason


def _describe(error: BaseException) -> str:
    cause = getattr(error, "cause", None)
    if isinstance(error, ray.exceptions.RayTaskError) and cause is not None:
        return f"{type(cause).__name__}: {cause}"
    return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"


def _finish(job: _Job, say: ConsoleReporter) -> None:
    """All slabs are written: score against the reference, write provenance, then ``complete``."""
    results = sorted(job.results.values(), key=lambda r: r["rank"])
    store = OutputStore.open(job.spec.output)
    dataset = open_dataset(job.spec.dataset, verify_data=False)
    metrics, metrics_note = None, None
    scoring_started = time.perf_counter()
    if dataset.has_reference:
        from mbir_batch.metrics import psnr_ssim_per_axis

        try:  # the volume is written already: a scoring problem must never lose it
            metrics = psnr_ssim_per_axis(dataset.reference_array, store.volume)  # block-wise, never whole
        except ValueError as error:
            metrics_note = f"not scored: {error}"
            say(f"{job.spec.output}: {metrics_note}")
    cfg = job.spec.cfg
    timings = {"total_s": time.perf_counter() - job.started, "last_attempt_s": scoring_started - job.attempt_started,
               "load_s": max(r["load_s"] for r in results), "solve_s": max(r["solve_s"] for r in results),
               "write_s": max(r["write_s"] for r in results), "score_s": time.perf_counter() - scoring_started}
    attrs = {"method": cfg.method, "config": cfg.to_dict(), "seed": cfg.seed, "version": __version__,
             "model": None if job.spec.model is None else str(job.spec.model), "timings": timings,
             "metrics": metrics, "metrics_note": metrics_note, "workers": len(job.slabs),
             "slabs": [[s.z0, s.z1] for s in job.slabs],
             "device": results[0]["device"], "restarts": job.restarts, "resumed_from": results[0]["resumed_from"],
             "bytes_sent": [r["bytes_sent"] for r in results]}
    store.mark_complete(attrs)
    job.summary = {"dataset": str(job.spec.dataset), "output": str(job.spec.output), "status": "done", **attrs}
    say(f"{job.spec.output}: complete ({timings['total_s']:.1f} s, {len(job.slabs)} workers, "
        f"{job.restarts} restarts){format_scores(metrics)}")
