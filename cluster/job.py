"""The batch driver: shard plan, launch, checkpoints, restart, resume and the finished output.

For every dataset the driver

1. decides what to do with the output store: create it, resume it (an incomplete output with the
   same input and config continues from its last complete checkpoint step, logging
   ``resuming <dataset> from step N``), skip it (already complete with the same config) or refuse
   (a different config without ``overwrite``);
2. splits the volume into chunk-aligned slabs (:mod:`mbir_batch.cluster.plan`), one
   :class:`~mbir_batch.cluster.worker.SlabWorker` each, and launches the group once its CPUs/GPUs
   are free, so several datasets run at once where the cluster allows;
3. polls the workers' progress, reports it to the ``progress`` callback (as
   :class:`~mbir_batch.cluster.group.ProgressEvent` objects), and records a checkpoint step as
   complete (``last_complete_step``) once every slab has written it;
4. when a worker dies, kills the whole group and relaunches it from the last complete step, at
   most ``max_restarts`` times;
5. writes ``complete: true`` last, after every slab is written, together with the provenance
   (method, config, seed, version, slabs, timings, and PSNR/SSIM when the dataset has a reference).

Each input dataset is opened once (the caller may hand it over opened and verified, in
:attr:`JobSpec.opened`) and every plan, output and score reads that one. Before any lock, output or
Ray, every method that needs a denoiser has one, and every model is checked once against the
slice size of its datasets (:func:`mbir_batch.model_check.check_models`). The driver draws nothing:
its messages (resuming, restarts, completion with PSNR/SSIM) go to the log and to the ``message``
callback, its progress to the ``progress`` callback. Ray is embedded (``ray.init(address="local")``,
a small object store) unless ``address`` names a running cluster, e.g. the one
``slurm/mbir-ray.sbatch`` starts (:mod:`mbir_batch.cluster.session`: quiet, bounded, private
token). SIGINT and SIGTERM stop the driver cleanly at its next poll: the workers are killed, Ray is
shut down, the output keeps its last complete checkpoint, and
:class:`~mbir_batch.cluster.session.Interrupted` says which step
each job reached and that the same command resumes it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import ray

from mbir_batch import __version__
from mbir_batch.checkpoints import CheckpointError
from mbir_batch.cluster.group import WORKER_DIED, ProgressEvent, WorkerGroup
from mbir_batch.cluster.plan import JobSpec, create_output, plan_output, usable_step
from mbir_batch.cluster.session import (
    DEFAULT_CONNECT_TIMEOUT_S,
    Interrupted,
    StopSignals,
    connect,
    driver_log_path,
    logs_to_file,
)
from mbir_batch.cluster.telemetry import record_restart
from mbir_batch.errors import UserError
from mbir_batch.locking import OutputLock
from mbir_batch.methods import get as get_method
from mbir_batch.metrics import psnr_ssim_per_axis, scores_line
from mbir_batch.model_check import ModelUse, check_adapter, check_models
from mbir_batch.output import OutputStore

__all__ = ["JobError", "run_jobs"]

log = logging.getLogger(__name__)


class JobError(UserError):
    """One or more datasets could not be reconstructed (the message names each and why)."""


def run_jobs(
    specs: list[JobSpec], *, workers: int = 1, gpus_per_worker: float = 0.0, cpus_per_worker: int = 1,
    address: str | None = None, checkpoint_every: int = 10, max_restarts: int = 3, overwrite: bool = False,
    dashboard: bool = False, progress: Callable[[ProgressEvent], None] | None = None,
    message: Callable[[str], None] | None = None, num_cpus: int | None = None,
    object_store_memory: int = 80 * 1024 * 1024, poll_s: float = 0.25,
    connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
) -> list[dict[str, Any]]:
    """Reconstruct every dataset of ``specs``; return one summary per dataset.

    Parameters
    ----------
    specs : the reconstructions (dataset, output, config, model); a spec's ``opened`` dataset is
        used as it is, any other dataset is opened once here.
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
    progress : called with a :class:`~mbir_batch.cluster.group.ProgressEvent` when a job's group is
        launched and after every poll of it.
    message : called with each line the driver has for a user (also logged), e.g. ``resuming ...``,
        a restart, the dashboard's address, ``<output>: complete (...)``.
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

    def say(line: str) -> None:
        log.info(line)
        if message is not None:
            message(line)

    specs = [spec.with_input() for spec in specs]
    _check_models(specs)
    jobs, summaries = [], []
    report = progress or (lambda event: None)
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
            jobs.append(WorkerGroup(spec, *plan, cpus=cpus_per_worker, gpus=gpus_per_worker,
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
            summaries += _schedule(jobs, say, report, poll_s, signals)
        finally:
            for job in jobs:
                job.kill()
            if not ray_was_up:  # also after a failure or signal inside connect(), when ray.init had started
                ray.shutdown()  # processes but not finished (is_initialized() still False); a no-op otherwise
    return summaries


def _check_models(specs: list[JobSpec]) -> None:
    """Every method that needs a denoiser has one, and every model fits its slices (once per model)."""
    for spec in specs:
        if get_method(spec.cfg.method).needs_model and spec.model is None:
            raise UserError(f"{spec.dataset}: method {spec.cfg.method!r} needs a denoiser model")
    check_models(ModelUse(model=Path(spec.model), config=spec.model_config, data_range=spec.model_data_range,
                          slice_shape=tuple(spec.input().meta.volume_shape[1:]), dataset=str(spec.dataset))
                 for spec in specs if spec.model is not None)
    for spec in specs:  # submit --adapter FILE: made for this model?
        section = getattr(spec.cfg, "adapt", None)
        if section is not None and section.adapter is not None and spec.model is not None:
            check_adapter(section.adapter, spec.model)


def _check_resources(jobs: list[WorkerGroup]) -> None:
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


def _schedule(jobs: list[WorkerGroup], say: Callable[[str], None], progress: Callable[[ProgressEvent], None],
              poll_s: float, signals: StopSignals) -> list[dict]:
    """Run the jobs, several at once where the cluster's CPUs/GPUs allow; stop at a signal."""
    total = ray.cluster_resources()
    cpus, gpus = total.get("CPU", 0.0), total.get("GPU", 0.0)
    pending, running, summaries, failures = list(jobs), [], [], []
    with signals.deferred():
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
                    progress(job.event("launching"))
            for job in list(running):
                outcome = _advance(job, say)
                if outcome != "running":
                    running.remove(job)
                    job.kill()
                    if outcome == "done":
                        summaries.append(job.summary)
                    else:
                        failures.append((job, outcome))
                progress(job.event(outcome if outcome in ("running", "done") else "failed"))
            time.sleep(poll_s)
    if failures:
        message = "; ".join(f"{job.spec.dataset}: {outcome}" for job, outcome in failures)
        bugs = [e for job, _ in failures for e in job.errors
                if not _is_user_error(e) and not isinstance(e, WORKER_DIED)]
        if bugs:  # an exception in worker code is a bug: keep the remote traceback
            raise RuntimeError(f"{message}\nworker traceback:\n{getattr(bugs[0], 'traceback_str', bugs[0])}")
        raise JobError(message)
    return summaries


def _interrupted_message(running: list[WorkerGroup], pending: list[WorkerGroup]) -> str:
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


def _advance(job: WorkerGroup, say: Callable[[str], None]) -> str:
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


def _finish(job: WorkerGroup, say: Callable[[str], None]) -> None:
    """All slabs are written: score against the reference, write provenance, then ``complete``."""
    results = sorted(job.results.values(), key=lambda r: r["rank"])
    store = OutputStore.open(job.spec.output)
    dataset = job.spec.input()
    metrics, metrics_note = None, None
    scoring_started = time.perf_counter()
    if dataset.has_reference:
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
             "model": None if job.spec.model is None else str(job.spec.model),
             "model_config": None if job.spec.model_config is None else str(job.spec.model_config),
             "model_data_range": job.spec.model_data_range, "timings": timings,
             "metrics": metrics, "metrics_note": metrics_note, "workers": len(job.slabs),
             "slabs": [[s.z0, s.z1] for s in job.slabs],
             "device": results[0]["device"], "restarts": job.restarts, "resumed_from": results[0]["resumed_from"],
             "bytes_sent": [r["bytes_sent"] for r in results]}
    chosen = {key: value for key, value in results[0].items() if key.startswith("lam")}
    if chosen:  # lam: auto (pipeline/methods/sampling.py): the weight chosen, its CV errors and cost
        attrs["lam_auto"] = {**chosen, "lam_auto_s": max(r["lam_auto_s"] for r in results)}
    adapter = results[0].get("adapter")
    if adapter is not None:  # test-time adaptation (pipeline/methods/adaptation.py): the adapter kept
        attrs["adapter"] = {**adapter, "adapt_s": max(r.get("adapt_s", 0.0) for r in results)}
    store.mark_complete(attrs)
    job.summary = {"dataset": str(job.spec.dataset), "output": str(job.spec.output), "status": "done", **attrs}
    lam_note = f", lam {chosen['lam']:.4g} chosen by lam: auto" if chosen else ""
    if adapter is not None:
        lam_note += (f", prior adapted in {adapter['rounds']} rounds, {adapter['file']} kept" if adapter["rounds"]
                     else f", prior adapted by {adapter['start']}")
    say(f"{job.spec.output}: complete ({timings['total_s']:.1f} s, {len(job.slabs)} workers, "
        f"{job.restarts} restarts{lam_note}){scores_line(metrics)}")
