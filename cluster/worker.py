"""SlabWorker: the Ray actor that reconstructs one z-slab of one dataset on one device.

A job is a group of ``world_size`` SlabWorkers, ranked by slab position along z. Each worker

1. opens the input dataset read-only and reads only its slab of the measurements
   (:meth:`mbir_batch.solve.SlabProblem.from_dataset`);
2. loads the denoiser when the job has one (any format :func:`mbir_batch.kernels.priors.load_denoiser`
   reads; the driver checked it before launch);
3. joins the job's process group (:class:`~mbir_batch.cluster.dist_comm.TorchDistComm`; NCCL on GPUs,
   gloo on CPU), whose rendezvous rank 0 provides;
4. runs :meth:`mbir_batch.solve.SlabSolver.run` from the initial state or from the checkpoint of
   the step the driver recorded as complete (verified against its checksums first: a damaged one
   raises :class:`~mbir_batch.checkpoints.CheckpointError`, never a resume from wrong data), every
   ``checkpoint_every`` steps writing its :class:`~mbir_batch.solve.SlabState` to ``state/`` of
   the output store;
5. writes its (chunk-aligned) slab of the output ``volume``; with test-time adaptation, rank 0
   also writes the adapted LoRA weights, ``adapter.safetensors``, into the output store (every
   rank holds the same ones).

The actor runs two threads (``max_concurrency=2``): one executes :meth:`SlabWorker.run`, the other
answers :meth:`SlabWorker.progress` polls from the driver.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray

ACTOR_NAMESPACE = "mbir-batch"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SlabSpec:
    """Everything one worker needs; plain values, so it pickles cheaply to the actor.

    Attributes
    ----------
    dataset, output : input store and output store paths.
    cfg : the method's config (:mod:`mbir_batch.methods`).
    model : the denoiser (own ``.json``, ``.pth``, ``.pt`` or a diffusers folder), else None.
    model_config, model_data_range : how to read it (:func:`mbir_batch.kernels.priors.load_denoiser`).
    rank, world_size, z0, z1 : this slab's place in the shard plan.
    device : ``"cuda"`` or ``"cpu"``.
    threads : torch intra-op threads (the actor's CPUs).
    checkpoint_every : write ``state/`` every K steps (0: never).
    """

    dataset: str
    output: str
    cfg: Any
    model: str | None
    rank: int
    world_size: int
    z0: int
    z1: int
    device: str = "cpu"
    threads: int = 1
    checkpoint_every: int = 0
    model_config: str | None = None
    model_data_range: tuple[float, float] | None = None

    @property
    def dataset_stem(self) -> str:
        return Path(self.dataset).name.removesuffix(".zarr")

    @property
    def slab_key(self) -> str:
        """Key of this slab's checkpoints in ``state/`` (:func:`~mbir_batch.cluster.plan.slab_key`)."""
        from mbir_batch.cluster.plan import slab_key

        return slab_key(self.z0, self.z1)

    def actor_name(self, attempt: int = 0) -> str:
        """The dashboard name: dataset, output and slab, e.g. ``mbir:ct:ct.dds:slab1[z8-16]``.

        Relaunches after a worker died get a ``:restartN`` suffix, so the new group never waits
        for the old names to be released.
        """
        output_stem = Path(self.output).name.removesuffix(".zarr")
        name = f"mbir:{self.dataset_stem}:{output_stem}:slab{self.rank}[z{self.z0}-{self.z1}]"
        return f"{name}:restart{attempt}" if attempt else name


@ray.remote(max_concurrency=2)
class SlabWorker:
    """One slab of one reconstruction job; see the module docstring.

    Create it with :func:`launch_worker` (named for the dashboard, in the ``mbir-batch`` namespace).
    """

    def __init__(self, spec: SlabSpec) -> None:
        import torch

        self.spec = spec
        torch.set_num_threads(spec.threads)
        if not log.handlers:  # the actor's log file (dashboard: Actors -> Logs) names dataset and slab
            handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter(f"%(asctime)s {spec.actor_name()} %(levelname)s %(message)s"))
            log.addHandler(handler)
            log.setLevel(logging.INFO)
        self._progress: dict[str, Any] = {
            "rank": spec.rank, "z0": spec.z0, "z1": spec.z1, "phase": "starting", "step": 0, "total": 0,
            "checkpoint_step": None, "slices_per_s": 0.0,
        }

    def rendezvous(self) -> tuple[str, int]:
        """Address and free port of this worker's node, for the process group (asked of rank 0)."""
        from mbir_batch.cluster.dist_comm import free_port, node_ip

        return node_ip(), free_port()

    def progress(self) -> dict[str, Any]:
        """A snapshot of this worker's progress (answered while :meth:`run` is busy)."""
        return dict(self._progress)

    def run(self, addr: str, port: int, resume_step: int | None) -> dict[str, Any]:
        """Reconstruct the slab and write it; return timings and final residuals.

        Parameters
        ----------
        addr, port : the process-group rendezvous (unused when ``world_size == 1``).
        resume_step : resume from the checkpoint of this step (recorded complete by the driver), or
            None to start from the method's initial state.

        Raises
        ------
        CheckpointError
            The checkpoint of ``resume_step`` is missing or fails verification (a user error: the
            driver reports it in one line).
        """
        import torch

        from mbir_batch.cluster.telemetry import SlabMetrics, slab_tag
        from mbir_batch.dataset import open_dataset
        from mbir_batch.output import OutputStore
        from mbir_batch.solve import SlabProblem, SlabSolver, SlabState

        spec = self.spec
        torch.set_num_threads(spec.threads)  # OpenMP threads are per OS thread; this is the run thread
        device = self._device()
        started = time.perf_counter()
        metrics = SlabMetrics(spec.dataset_stem, slab_tag(spec.rank, spec.z0, spec.z1))
        self._progress["phase"] = "loading"
        dataset = open_dataset(spec.dataset, verify_data=False)
        store = OutputStore.open(spec.output)
        problem = SlabProblem.from_dataset(dataset, spec.z0, spec.z1, device)
        denoiser = None
        if spec.model is not None:
            from mbir_batch.kernels.priors import load_denoiser

            denoiser = load_denoiser(spec.model, config=spec.model_config, data_range=spec.model_data_range,
                                     device=device)
        comm = self._join(addr, port, device)
        loaded = time.perf_counter()
        log.info("slices [%d, %d) of %s on %s, rank %d/%d, %s from %s", spec.z0, spec.z1, spec.dataset, device,
                 spec.rank, spec.world_size, spec.cfg.method,
                 "the start" if resume_step is None else f"step {resume_step}")
        try:
            solver = SlabSolver(problem, spec.cfg, comm=comm, denoiser=denoiser, device=device)
            if resume_step is None:
                state = solver.initial_state()
            else:
                state = SlabState.from_numpy(store.checkpoints.read(resume_step, spec.slab_key), device)
            self._progress.update(phase="running", step=state.step, total=solver.total_steps,
                                  checkpoint_step=resume_step)
            last_info: dict[str, Any] = {}
            kept: dict[str, Any] = {}

            def on_step(event) -> None:
                last_info.update(event.info)
                if event.adapter is not None:
                    kept["adapter"] = event.adapter
                self._progress.update(step=event.step, total=event.total, slices_per_s=event.slices_per_s,
                                      **event.info)
                if spec.checkpoint_every and event.step % spec.checkpoint_every == 0 and event.step < event.total:
                    store.checkpoints.write(event.step, spec.slab_key, event.state.to_numpy())
                    self._progress["checkpoint_step"] = event.step
                metrics.record(self._progress)

            volume = solver.run(state, callback=on_step)
            solved = time.perf_counter()
            self._progress["phase"] = "writing"
            store.write_slab(spec.z0, volume.numpy())
            if spec.rank == 0 and "adapter" in kept:  # every rank holds the same adapter; rank 0 keeps it
                last_info["adapter"] = self._write_adapter(kept["adapter"])
            bytes_sent = comm.bytes_sent()
            log.info("wrote slices [%d, %d) of %s: solve %.1f s, %d bytes sent", spec.z0, spec.z1, spec.output,
                     solved - loaded, bytes_sent)
        finally:
            close = getattr(comm, "close", None)
            if close is not None:
                close()
        self._progress["phase"] = "done"
        return {
            "rank": spec.rank, "z0": spec.z0, "z1": spec.z1, "device": str(device),
            "resumed_from": resume_step, "steps": self._progress["step"], "bytes_sent": int(bytes_sent),
            "load_s": loaded - started, "solve_s": solved - loaded, "write_s": time.perf_counter() - solved,
            **last_info,
        }

    def _write_adapter(self, snapshot) -> dict[str, Any]:
        """``adapter.safetensors`` in the output store, beside ``volume``; its record for the attrs."""
        from mbir_batch.methods.adaptation import weights_sha256, write_adapter

        spec = self.spec
        provenance = {"dataset": spec.dataset, "output": spec.output, "method": spec.cfg.method,
                      "model": spec.model, "seed": spec.cfg.seed, "steps": getattr(spec.cfg, "steps", None)}
        return write_adapter(Path(spec.output) / "adapter.safetensors", snapshot,
                             base_sha256=weights_sha256(spec.model), provenance=provenance)

    def _device(self):
        import torch

        if self.spec.device == "cuda":
            if not torch.cuda.is_available():
                raise RuntimeError(f"{self.spec.actor_name()}: a GPU was requested but torch sees no CUDA device "
                                   f"(CUDA_VISIBLE_DEVICES={ray.get_gpu_ids()!r}); refusing to run on CPU")
            torch.cuda.set_device(0)  # Ray sets CUDA_VISIBLE_DEVICES to this actor's GPU
            return torch.device("cuda", 0)
        return torch.device("cpu")

    def _join(self, addr: str, port: int, device):
        from mbir_batch.cluster.dist_comm import TorchDistComm, default_backend
        from mbir_batch.kernels.comm import LocalComm

        if self.spec.world_size == 1:
            return LocalComm()
        return TorchDistComm(self.spec.rank, self.spec.world_size, default_backend(device), addr=addr, port=port)


def launch_worker(spec: SlabSpec, *, num_cpus: float, num_gpus: float, attempt: int = 0) -> Any:
    """Create the actor of one slab, named for the dashboard, in the ``mbir-batch`` namespace."""
    return SlabWorker.options(
        name=spec.actor_name(attempt), namespace=ACTOR_NAMESPACE, num_cpus=num_cpus, num_gpus=num_gpus,
        max_restarts=0, max_task_retries=0,
    ).remote(spec)
