"""The ``state/`` checkpoints of an output store: written per slab, verified before they are trusted.

Layout: ``state/slab_<key>/step_<NNNNNNNN>/`` holds one slab's state after a step (x, the ADMM
variables, ...), one array each. The driver records a step once every slab has written it
(``last_complete_step`` and ``complete_steps`` in the output's root attrs); the newest
`KEEP_COMPLETE_STEPS` recorded steps are kept, so a damaged newest step leaves the previous one to
resume from.

A checkpoint is trusted only after it is verified (`Checkpoints.verify`): its group says
``complete``, every chunk of every array is on disk (zarr would silently read a missing chunk as
the fill value), and each array's SHA-256, written with the checkpoint, matches what is read back.
"""
from __future__ import annotations

import hashlib
import itertools
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from mbir_batch.errors import OutputError, one_line
from mbir_batch.zarr_store import compressor, write_guard

__all__ = ["KEEP_COMPLETE_STEPS", "CheckpointError", "Checkpoints", "array_digest"]

KEEP_COMPLETE_STEPS = 2
"""Recorded checkpoint steps kept in ``state/``: the newest, and the one to fall back to if it is damaged."""


class CheckpointError(OutputError):
    """A checkpoint under ``state/`` that is missing, unfinished or damaged.

    The message is ``"<output>/<checkpoint>: <problem>"``; ``checkpoint`` (the group inside the
    store, e.g. ``state/slab_z0-16/step_00000036``) and ``problem`` are also kept as attributes.
    """

    checkpoint: str = ""
    problem: str = ""


def _checkpoint_error(path: Path, checkpoint: str, problem: str) -> CheckpointError:
    error = CheckpointError(f"{path}/{checkpoint}: {problem}")
    error.checkpoint, error.problem = checkpoint, problem  # kept in __dict__, so it pickles (Ray)
    return error


def array_digest(value: np.ndarray) -> str:
    """SHA-256 (hex) of an array's dtype, shape and C-ordered little-endian bytes."""
    canonical = np.asarray(value, dtype=value.dtype.newbyteorder("<"), order="C")  # keeps 0-d arrays 0-d
    digest = hashlib.sha256(f"{canonical.dtype.str}{canonical.shape}".encode())
    digest.update(canonical.data)
    return digest.hexdigest()


def _missing_chunks(array: zarr.Array, directory: Path) -> list[str]:
    """The chunk keys (``c/1/0/0``) of `array`, stored in `directory`, that have no file."""
    if array.nchunks_initialized == array.nchunks:
        return []
    keys = (array.metadata.encode_chunk_key(coords) for coords in itertools.product(*map(range, array.cdata_shape)))
    return [key for key in keys if not (directory / key).is_file()]


class Checkpoints:
    """The checkpoints of the output store at `path` (root group `group`), and the record of them.

    Parameters
    ----------
    path : the output store (messages name it).
    group : its root group, opened ``"r+"`` to write or ``"r"`` to read and verify.
    """

    def __init__(self, path: Path, group: zarr.Group) -> None:
        self.path = path
        self._group = group

    @staticmethod
    def _name(step: int, slab: int | str) -> str:
        return f"state/slab_{slab}/step_{int(step):08d}"

    def write(self, step: int, slab: int | str, arrays: dict[str, np.ndarray]) -> None:
        """Checkpoint one slab after `step`.

        Every chunk is written, all-zero ones too, so a missing chunk file always means damage. The
        group's attrs come last, in one update: ``step``, ``arrays`` (per array its dtype, shape and
        `array_digest`) and ``complete: true``. A checkpoint already at that place (a rerun after a
        restart, or a damaged one) is removed first.
        """
        name = self._name(step, slab)
        manifest: dict[str, dict[str, Any]] = {}
        with write_guard(self.path):
            shutil.rmtree(self.path / name, ignore_errors=True)  # on disk: also when its zarr.json is garbled
            group = self._group.require_group(name)
            for key, value in arrays.items():
                value = np.asarray(value, order="C")
                chunks = (min(8, value.shape[0]), *value.shape[1:]) if value.ndim == 3 else value.shape
                stored = group.create_array(key, shape=value.shape, chunks=chunks if value.ndim else "auto",
                                            dtype=value.dtype, compressors=compressor(), overwrite=True,
                                            config={"write_empty_chunks": True})
                stored[...] = value
                manifest[key] = {"dtype": value.dtype.str, "shape": list(value.shape), "sha256": array_digest(value)}
            group.attrs.update({"step": int(step), "arrays": manifest, "complete": True})

    def verify(self, step: int, slab: int | str) -> None:
        """Check the checkpoint of `slab` at `step` before it is trusted, one array in memory at a time.

        Raises
        ------
        CheckpointError
            Naming the checkpoint and its first problem: absent or unfinished, a garbled
            ``zarr.json``, no checksums, a chunk file missing, chunk data that does not decode,
            or an array whose SHA-256 differs from the one written with it.
        """
        for _ in self._verified_arrays(step, slab):
            pass

    def read(self, step: int, slab: int | str) -> dict[str, np.ndarray]:
        """The arrays of the checkpoint of `slab` at `step`, each verified as by `verify`.

        Raises
        ------
        CheckpointError
            As `verify`.
        """
        return dict(self._verified_arrays(step, slab))

    def _verified_arrays(self, step: int, slab: int | str) -> Iterator[tuple[str, np.ndarray]]:
        name = self._name(step, slab)
        try:
            group = self._group.get(name)
            attrs = group.attrs.asdict() if isinstance(group, zarr.Group) else {}
        except Exception as error:  # a garbled zarr.json of the checkpoint or of a group above it
            raise _checkpoint_error(self.path, name, f"zarr.json unreadable: {one_line(error)}") from error
        if not isinstance(group, zarr.Group) and (self.path / name / "zarr.json").is_file():
            raise _checkpoint_error(self.path, name, "zarr.json is not a checkpoint group")
        if attrs.get("complete") is not True:
            raise _checkpoint_error(self.path, name, "no complete checkpoint here")
        manifest = attrs.get("arrays")
        if not isinstance(manifest, dict) or not manifest:
            raise _checkpoint_error(self.path, name, "no checksums (written by an older mbir-batch)")
        for key, expected in manifest.items():
            yield key, self._verified_array(group, f"{name}/{key}", expected)

    def _verified_array(self, group: zarr.Group, where: str, expected: dict[str, Any]) -> np.ndarray:
        """Read the checkpoint array at `where` and prove it is the one `expected` (its manifest) describes."""
        if not (self.path / where / "zarr.json").is_file():
            raise _checkpoint_error(self.path, where, "array missing (no zarr.json)")
        try:
            array = group[where.rsplit("/", 1)[1]]
            missing = _missing_chunks(array, self.path / where)
        except Exception as error:  # garbled metadata: JSON, codecs, shape
            raise _checkpoint_error(self.path, where, f"zarr.json unreadable: {one_line(error)}") from error
        if missing:  # zarr would read a missing chunk as the fill value, silently
            raise _checkpoint_error(self.path, where, f"chunk {missing[0]} missing ({len(missing)} of "
                                                      f"{array.nchunks} chunks)")
        if [array.dtype.str, list(array.shape)] != [expected.get("dtype"), expected.get("shape")]:
            raise _checkpoint_error(self.path, where, f"is {array.dtype.str} {list(array.shape)}, but "
                                                      f"{expected.get('dtype')} {expected.get('shape')} was written")
        try:
            values = np.asarray(array[...])
        except Exception as error:  # a truncated or garbled chunk that the codec rejects
            raise _checkpoint_error(self.path, where, f"chunk data unreadable: {one_line(error)}") from error
        if array_digest(values) != expected.get("sha256"):
            raise _checkpoint_error(self.path, where, "checksum mismatch (the data read back is not the data "
                                                      "written)")
        return values

    @property
    def last_recorded(self) -> int | None:
        """The last step every slab has checkpointed (recorded by the driver), or None."""
        return self._group.attrs.get("last_complete_step")

    @property
    def recorded(self) -> list[int]:
        """The recorded steps whose checkpoints are kept, oldest first (at most `KEEP_COMPLETE_STEPS`)."""
        steps = self._group.attrs.get("complete_steps")
        if steps is None:  # a store from before the list was kept
            last = self.last_recorded
            return [] if last is None else [int(last)]
        return [int(s) for s in steps]

    def record(self, step: int, *, prune: bool = True) -> None:
        """Record `step` as checkpointed by all slabs; keep it and the previous recorded step.

        Checkpoints older than the kept steps are dropped. Recorded steps at or after `step` (a run
        that fell back to an older checkpoint and has not reached them again) are forgotten: their
        checkpoints are the damaged ones, and the run rewrites them when it gets there.
        """
        kept = ([s for s in self.recorded if s < step] + [int(step)])[-KEEP_COMPLETE_STEPS:]
        with write_guard(self.path):
            self._group.attrs.update({"last_complete_step": int(step), "complete_steps": kept})
            if prune:
                self.drop(before=kept[0])

    def drop(self, before: int | None = None) -> None:
        """Remove the checkpoints of steps below `before` (None: all), on disk, damaged ones too."""
        state = self.path / "state"
        for slab_dir in [d for d in state.iterdir() if d.is_dir()] if state.is_dir() else []:
            if before is None:
                shutil.rmtree(slab_dir)
                continue
            for step_dir in slab_dir.glob("step_*"):
                if step_dir.name[5:].isdigit() and int(step_dir.name[5:]) < before:
                    shutil.rmtree(step_dir)
