"""The plan of a job: which slabs, and which output store to write from which step.

Shard plan: the split of a volume's z-range into one contiguous slab per worker.

Slab boundaries fall on z-chunk boundaries of the stores (DESIGN.md, "Distribution"), so every
worker reads and writes whole chunks and no two processes ever touch the same chunk. Chunks are
dealt out as evenly as possible: slab sizes differ by at most one chunk, and the larger slabs come
first. Only the last slab may end in a partial chunk (when the depth is not a multiple of the
chunk size).

More workers than chunks is an error, not a silent reduction: a job's resources (and the
restart / resume bookkeeping, which is per slab) then match what was asked for, and the message
says how many workers the volume allows.

Output plan (:func:`plan_output`): a missing output is created with a fresh shard plan, recorded
in ``attrs["job"]`` with the method, config and model (:func:`create_output`). An incomplete
output with the same job attributes is resumed with its recorded slabs from its last complete
checkpoint step; a complete one is skipped; one written with another config is refused unless
``overwrite``. Both read the input dataset the driver opened once (:meth:`JobSpec.input`).

A checkpoint is verified before it is trusted (:meth:`~mbir_batch.checkpoints.Checkpoints.verify`:
every chunk present, every array's checksum): when a slab's checkpoint of the newest recorded step
is damaged, the job resumes from the previous recorded step, whose checkpoints all verify, and says
so; when no recorded step is usable it is refused with one line that suggests ``--overwrite``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mbir_batch.checkpoints import CheckpointError
from mbir_batch.dataset import Dataset, open_dataset
from mbir_batch.errors import OutputError, UserError
from mbir_batch.output import OutputStore, damaged_output_error, output_status
from mbir_batch.zarr_store import jsonable


class ShardPlanError(UserError, ValueError):
    """The requested split is impossible (message names the volume and the limit)."""


@dataclass(frozen=True)
class Slab:
    """One worker's share of the volume: global slices ``[z0, z1)``, ranked by position along z."""

    rank: int
    z0: int
    z1: int

    @property
    def depth(self) -> int:
        return self.z1 - self.z0

    @property
    def key(self) -> str:
        """Key of this slab's checkpoints in ``state/``: its slice range, so a plan change is caught."""
        return slab_key(self.z0, self.z1)


def slab_key(z0: int, z1: int) -> str:
    """The ``state/`` key of the slab of slices ``[z0, z1)``, e.g. ``z0-16``."""
    return f"z{z0}-{z1}"


def max_workers(depth: int, chunk_z: int) -> int:
    """The most workers a volume of ``depth`` slices in chunks of ``chunk_z`` can be split over."""
    return -(-depth // chunk_z)


def plan_slabs(depth: int, chunk_z: int, workers: int, *, name: str = "volume") -> list[Slab]:
    """Split ``[0, depth)`` into ``workers`` contiguous, chunk-aligned, non-empty slabs.

    Parameters
    ----------
    depth : number of slices Z of the volume.
    chunk_z : z-chunk (or shard) size of the stores; slab boundaries are multiples of it.
    workers : number of slabs.
    name : how errors refer to the volume (e.g. the dataset path).

    Returns
    -------
    list of :class:`Slab`, ordered by ``z0`` (= by rank).

    Raises
    ------
    ShardPlanError
        If ``workers`` exceeds the number of chunks, or an argument is not positive.
    """
    if depth < 1 or chunk_z < 1 or workers < 1:
        raise ShardPlanError(f"{name}: depth ({depth}), chunk_z ({chunk_z}) and workers ({workers}) must be >= 1")
    n_chunks = max_workers(depth, chunk_z)
    if workers > n_chunks:
        raise ShardPlanError(
            f"{name}: {workers} workers asked for, but {depth} slices in z-chunks of {chunk_z} "
            f"allow at most {n_chunks} (one chunk per worker); use --workers {n_chunks} or fewer")
    base, extra = divmod(n_chunks, workers)
    slabs: list[Slab] = []
    chunk = 0
    for rank in range(workers):
        n = base + (rank < extra)
        z0, z1 = chunk * chunk_z, min((chunk + n) * chunk_z, depth)
        slabs.append(Slab(rank, z0, z1))
        chunk += n
    return slabs


@dataclass(frozen=True)
class JobSpec:
    """One reconstruction: input dataset, output store, method config and (diffusion) denoiser.

    Attributes
    ----------
    dataset, output : the input store and the output store.
    cfg : the method's config (:mod:`mbir_batch.methods`).
    model : the denoiser, for the methods that need one (any format
        :func:`mbir_batch.kernels.priors.load_denoiser` reads).
    workers : overrides the slab count of :func:`~mbir_batch.cluster.job.run_jobs` for this one
        dataset (e.g. fewer workers for a thin volume).
    model_config, model_data_range : how to read ``model`` (``--model-config``, ``--model-data-range``).
    opened : the input dataset, opened (and verified) already by the caller, e.g. the CLI; the
        driver opens it once when it is None.
    """

    dataset: Path
    output: Path
    cfg: Any
    model: Path | None = None
    workers: int | None = None
    model_config: Path | None = None
    model_data_range: tuple[float, float] | None = None
    opened: Dataset | None = dataclasses.field(default=None, compare=False, repr=False)

    def input(self) -> Dataset:
        """The input dataset: the one opened already, else opened now (read-only, data not scanned)."""
        return self.opened if self.opened is not None else open_dataset(self.dataset, verify_data=False)

    def with_input(self) -> JobSpec:
        """This spec holding its opened input dataset, so that it is opened only once."""
        return self if self.opened is not None else dataclasses.replace(self, opened=self.input())


def plan_output(spec: JobSpec, workers: int, overwrite: bool,
                say: Callable[[str], None]) -> tuple[list[Slab], int | None, bool] | None:
    """Decide, without writing anything, what to do with one output store.

    Returns
    -------
    ``(slabs, resume_step, create)``: the shard plan, the checkpoint step to resume from (None: from
    the start), and whether the output must be created (:func:`create_output`); or None when the
    output is complete already with the same job attributes.

    Raises
    ------
    ShardPlanError, OutputError, DatasetError
    """
    status = output_status(spec.output)
    if status == "damaged" and not overwrite:
        raise damaged_output_error(spec.output)
    if status in ("complete", "incomplete") and not overwrite:
        store = OutputStore.open(spec.output, mode="r")
        recorded = store.plan
        wanted = job_attrs(spec)
        if {k: recorded.get(k) for k in wanted} != wanted:
            raise OutputError(f"{spec.output}: was written with another method/config/model; pass --overwrite "
                              f"to replace it")
        if status == "complete":
            say(f"{spec.output}: already complete; skipping (pass --overwrite to redo it)")
            return None
        store = OutputStore.open_for_resume(spec.output, input_path=spec.dataset)
        slabs = [Slab(rank, z0, z1) for rank, (z0, z1) in enumerate(recorded["slabs"])]
        if len(slabs) != workers:
            say(f"{spec.dataset}: resuming with the {len(slabs)} slab{'s' if len(slabs) != 1 else ''} it was "
                f"started with (not --workers {workers})")
        step = usable_step(store, slabs, spec, say)
        say(f"resuming {spec.dataset} from step {step}" if step is not None
            else f"restarting {spec.dataset} from the start (no complete checkpoint)")
        return slabs, step, False
    dataset = spec.input()
    return plan_slabs(dataset.depth, dataset.chunk_z, workers, name=str(spec.dataset)), None, True


def usable_step(store: OutputStore, slabs: list[Slab], spec: JobSpec, say: Callable[[str], None]) -> int | None:
    """The newest recorded checkpoint step at which every slab's checkpoint verifies.

    Returns None when no step was ever recorded (the job starts from the beginning). When the
    newest recorded step is damaged, ``say`` names the damage and the step resumed from instead.

    Raises
    ------
    CheckpointError
        Steps were recorded but none is usable; the one line names each damage and suggests
        ``--overwrite``.
    """
    damaged: list[int] = []
    damage: list[str] = []
    for step in reversed(store.checkpoints.recorded):
        try:
            for slab in slabs:
                store.checkpoints.verify(step, slab.key)
        except CheckpointError as error:
            damaged.append(step)
            damage.append(f"{error.checkpoint}: {error.problem}")
            continue
        if damaged:
            say(f"{spec.output}: the checkpoint of step {', '.join(map(str, damaged))} is damaged "
                f"({'; '.join(damage)}); resuming from step {step}, the previous complete one")
        return step
    if not damage:
        return None
    raise CheckpointError(f"{spec.output}: no usable checkpoint ({'; '.join(damage)}); pass --overwrite "
                          f"to start over")


def job_attrs(spec: JobSpec) -> dict[str, Any]:
    """What must match for an existing output to be resumed or kept."""
    return {"method": spec.cfg.method, "config": jsonable(spec.cfg.to_dict()),
            "model": None if spec.model is None else str(Path(spec.model).resolve()),
            "model_config": None if spec.model_config is None else str(Path(spec.model_config).resolve()),
            "model_data_range": None if spec.model_data_range is None else list(spec.model_data_range)}


def create_output(spec: JobSpec, slabs: list[Slab], overwrite: bool) -> None:
    """A fresh output store, chunked like the input along z, with the job's plan in ``attrs["job"]``."""
    dataset = spec.input()
    OutputStore.create(spec.output, input_path=spec.dataset, shape=dataset.meta.volume_shape,
                       chunk_z=dataset.chunk_z, dataset_attrs=dataset.meta.to_attrs(),
                       plan={**job_attrs(spec), "slabs": [[s.z0, s.z1] for s in slabs]}, overwrite=overwrite)
