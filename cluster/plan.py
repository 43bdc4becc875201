"""Shard plan: the split of a volume's z-range into one contiguous slab per worker.

Slab boundaries fall on z-chunk boundaries of the stores (DESIGN.md, "Distribution"), so every
worker reads and writes whole chunks and no two processes ever touch the same chunk. Chunks are
dealt out as evenly as possible: slab sizes differ by at most one chunk, and the larger slabs come
first. Only the last slab may end in a partial chunk (when the depth is not a multiple of the
chunk size).

More workers than chunks is an error, not a silent reduction: a job's resources (and the
restart / resume bookkeeping, which is per slab) then match what was asked for, and the message
says how many workers the volume allows.
"""

from __future__ import annotations

from dataclasses import dataclass

from mbir_batch.errors import UserError


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
