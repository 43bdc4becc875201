"""Output stores: the reconstructed ``volume``, its provenance and the ``state/`` checkpoints.

Rules (DESIGN.md, "Data contract"):

* an output is never the input store (nor inside it, nor around it);
* an output is complete only when its attrs say ``"complete": true``, and that
  flag is written last, in its own attrs update, after the volume and every
  other attribute;
* a complete output is replaced only with ``overwrite``; an incomplete one is
  resumed with `OutputStore.open_for_resume` (checkpoints under ``state/``);
* actors write whole chunks along z, so no two processes touch one chunk;
* a write that fails for lack of space or permission raises `OutputError`
  naming the path and leaves every other store untouched;
* a checkpoint is trusted only after it is verified (`OutputStore.verify_state`):
  its group says ``complete``, every chunk of every array is on disk, and each
  array's SHA-256, written with the checkpoint, matches what is read back. The
  newest two recorded steps are kept, so a damaged newest step leaves the
  previous one to resume from.
"""
from __future__ import annotations

import errno
import hashlib
import itertools
import os
import secrets
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from mbir_batch import __version__
from mbir_batch.errors import OutputError, one_line

__all__ = [
    "CheckpointError",
    "OutputStore",
    "array_digest",
    "compressor",
    "damage_of",
    "damaged_output_error",
    "is_complete",
    "jsonable",
    "open_output",
    "output_status",
    "staged_directory",
    "write_guard",
]

_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS}
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


def compressor() -> zarr.codecs.BloscCodec:
    """The codec of every array mbir-batch writes (blosc zstd, bit-shuffled)."""
    return zarr.codecs.BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle")


@contextmanager
def write_guard(path: str | Path) -> Iterator[None]:
    """Turn disk-full and permission errors raised while writing `path` into `OutputError`."""
    try:
        yield
    except OSError as error:
        if error.errno not in _WRITE_ERRNOS:
            raise
        code = errno.errorcode.get(error.errno, str(error.errno))
        raise OutputError(f"{path}: cannot write: {os.strerror(error.errno)} [{code}]") from error


def jsonable(value: Any) -> Any:
    """Convert numpy scalars/arrays, tuples and paths into JSON-ready values (for attrs)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, (np.bool_, bool)):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, Path):
        return str(value)
    return value


def _is_zarr_store(path: Path) -> bool:
    return (path / "zarr.json").is_file() or (path / ".zgroup").is_file()


@contextmanager
def staged_directory(path: Path, *, overwrite: bool) -> Iterator[Path]:
    """Yield a hidden sibling directory to write into; rename it to `path` on success.

    An existing `path` is replaced only with `overwrite` and only when it is a Zarr
    store; the old store is removed after the new one is in place. On failure the
    staging directory is removed and `path` is left as it was.
    """
    if path.exists() and not overwrite:
        raise OutputError(f"{path}: already exists; pass --overwrite to replace it")
    if path.exists() and not _is_zarr_store(path):
        raise OutputError(f"{path}: exists and is not a Zarr store; refusing to replace it")
    token = f"{os.getpid()}-{secrets.token_hex(4)}"
    staging = path.parent / f".{path.name}.tmp-{token}"
    with write_guard(path):
        path.parent.mkdir(parents=True, exist_ok=True)
    try:
        yield staging
        with write_guard(path):
            if path.exists():
                trash = path.parent / f".{path.name}.old-{token}"
                os.rename(path, trash)
                os.rename(staging, path)
                shutil.rmtree(trash, ignore_errors=True)
            else:
                os.rename(staging, path)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


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


def output_status(path: str | Path) -> str:
    """The state of an output path.

    ``"missing"``; ``"complete"`` / ``"incomplete"`` (its attrs say so); ``"damaged"`` (laid out
    like an mbir-batch output, ``volume/`` and ``state/``, but its root ``zarr.json`` cannot be
    read; see `damage_of`); or ``"other"`` (exists, not an mbir-batch output).
    """
    path = Path(path)
    if not path.exists():
        return "missing"
    try:
        attrs = zarr.open_group(path, mode="r").attrs.asdict()
    except Exception:  # any unreadable thing at that path is "not an output", unless it has our layout
        return "damaged" if (path / "volume").is_dir() and (path / "state").is_dir() else "other"
    if "complete" not in attrs:
        return "other"
    return "complete" if attrs["complete"] is True else "incomplete"


def damage_of(path: str | Path) -> str:
    """Why the root ``zarr.json`` of the output at `path` cannot be read (one line; "" if it can)."""
    try:
        zarr.open_group(Path(path), mode="r").attrs.asdict()
    except Exception as error:  # reported to the user, never swallowed
        return f"zarr.json unreadable: {one_line(error)}"
    return ""


def damaged_output_error(path: str | Path, why: str | None = None) -> OutputError:
    """The one-line error for a damaged output store: what is damaged (default: `damage_of`), and --overwrite."""
    return OutputError(f"{path}: output store is damaged ({why or damage_of(path)}); pass --overwrite to start over")


def is_complete(path: str | Path) -> bool:
    """Whether `path` is an output store whose attrs say ``"complete": true``."""
    return output_status(path) == "complete"


def _resolved(path: str | Path) -> Path:
    return Path(path).expanduser().resolve()


class OutputStore:
    """An output store: ``volume`` (Z, H, W) float32 chunked along z, attrs, and ``state/``."""

    def __init__(self, path: Path, group: zarr.Group) -> None:
        self.path = path
        self._group = group
        self.volume: zarr.Array = group["volume"]

    def __repr__(self) -> str:
        return f"OutputStore({str(self.path)!r}, shape={self.shape}, complete={self.complete})"

    @classmethod
    def create(cls, path: str | Path, *, input_path: str | Path, shape: tuple[int, int, int],
               chunk_z: int, overwrite: bool = False) -> OutputStore:
        """Create an empty output for the dataset at `input_path`.

        Refuses an output that is, contains or lies inside the input; refuses to
        replace an existing complete or incomplete output unless `overwrite`
        (an incomplete one can be resumed with `open_for_resume` instead). The
        input's ``mbir`` attribute is copied to ``attrs["dataset"]`` so that
        report and export work without the input.
        """
        path = Path(path)
        out, source = _resolved(path), _resolved(input_path)
        if out == source or source in out.parents or out in source.parents:
            raise OutputError(f"{path}: the output would overwrite the input dataset {input_path}; "
                              f"choose another --out")
        status = output_status(path)
        if status == "complete" and not overwrite:
            raise OutputError(f"{path}: already holds a complete reconstruction; pass --overwrite to replace it")
        if status == "incomplete" and not overwrite:
            raise OutputError(f"{path}: holds an unfinished reconstruction; resume it or pass --overwrite "
                              f"to start over")
        if status == "damaged" and not overwrite:
            raise damaged_output_error(path)
        if status == "other" and path.exists():
            raise OutputError(f"{path}: exists and is not an mbir-batch output; refusing to replace it")
        try:
            dataset_attrs = zarr.open_group(source, mode="r").attrs.get("mbir")
        except Exception:  # the input is validated by open_dataset; here it is provenance only
            dataset_attrs = None
        depth, height, width = (int(v) for v in shape)
        with staged_directory(path, overwrite=overwrite) as staging, write_guard(path):
            group = zarr.open_group(staging, mode="w")
            group.create_array("volume", shape=(depth, height, width), chunks=(min(chunk_z, depth), height, width),
                               dtype="float32", compressors=compressor(), fill_value=0.0)
            group.create_group("state")
            group.attrs.update({"complete": False, "input": str(source), "dataset": dataset_attrs,
                                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                "mbir_batch_version": __version__, "last_complete_step": None,
                                "complete_steps": []})
        return cls(path, zarr.open_group(path, mode="r+"))

    @classmethod
    def open(cls, path: str | Path, *, mode: str = "r+") -> OutputStore:
        """Open an existing output store (``"r+"`` for workers writing their slab, ``"r"`` to read)."""
        path = Path(path)
        status = output_status(path)
        if status == "damaged":
            raise damaged_output_error(path)
        if status not in ("complete", "incomplete"):
            raise OutputError(f"{path}: not an mbir-batch output store")
        group = zarr.open_group(path, mode=mode)
        try:
            volume = group.get("volume")
        except Exception as error:  # e.g. a garbled volume/zarr.json
            raise damaged_output_error(path, f"volume unreadable: {one_line(error)}") from error
        if not isinstance(volume, zarr.Array) or volume.ndim != 3 or volume.dtype != np.float32:
            raise OutputError(f"{path}: output has no float32 (Z, H, W) array 'volume'")
        return cls(path, group)

    @classmethod
    def open_for_resume(cls, path: str | Path, *, input_path: str | Path | None = None) -> OutputStore:
        """Reopen an unfinished output to resume it; refuses complete ones and other inputs."""
        path = Path(path)
        status = output_status(path)
        if status == "complete":
            raise OutputError(f"{path}: already complete; nothing to resume (pass --overwrite to redo it)")
        store = cls.open(path)
        recorded = store.attrs.get("input")
        if input_path is not None and recorded != str(_resolved(input_path)):
            raise OutputError(f"{path}: was started from {recorded}, not {input_path}; pass --overwrite "
                              f"to start over")
        return store

    @property
    def attrs(self) -> dict[str, Any]:
        """A copy of the store's attributes."""
        return self._group.attrs.asdict()

    @property
    def complete(self) -> bool:
        return self._group.attrs.get("complete") is True

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.volume.shape)

    @property
    def chunk_z(self) -> int:
        return int((self.volume.shards or self.volume.chunks)[0])

    def read_volume(self, z0: int = 0, z1: int | None = None) -> np.ndarray:
        """The reconstructed slices ``[z0, z1)`` as float32 (Z, H, W)."""
        return np.asarray(self.volume[z0:self.shape[0] if z1 is None else z1])

    def write_slab(self, z0: int, volume_slab: np.ndarray) -> None:
        """Write slices ``[z0, z0 + len(volume_slab))``; both ends must be chunk-aligned (or the end)."""
        z1 = z0 + volume_slab.shape[0]
        if z0 % self.chunk_z or (z1 % self.chunk_z and z1 != self.shape[0]) or z1 > self.shape[0]:
            raise ValueError(f"slab [{z0}, {z1}) is not aligned to chunks of {self.chunk_z} in depth {self.shape[0]}")
        with write_guard(self.path):
            self.volume[z0:z1] = np.asarray(volume_slab, dtype=np.float32)

    def _state_group(self, step: int, slab: int | str) -> str:
        return f"state/slab_{slab}/step_{int(step):08d}"

    def write_state(self, step: int, slab: int | str, arrays: dict[str, np.ndarray]) -> None:
        """Checkpoint one slab after `step`.

        Every chunk is written, all-zero ones too, so a missing chunk file always means damage. The
        group's attrs come last, in one update: ``step``, ``arrays`` (per array its dtype, shape and
        `array_digest`) and ``complete: true``. A checkpoint already at that place (a rerun after a
        restart, or a damaged one) is removed first.
        """
        name = self._state_group(step, slab)
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

    def verify_state(self, step: int, slab: int | str) -> None:
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

    def read_state(self, step: int, slab: int | str) -> dict[str, np.ndarray]:
        """The arrays of the checkpoint of `slab` at `step`, each verified as by `verify_state`.

        Raises
        ------
        CheckpointError
            As `verify_state`.
        """
        return dict(self._verified_arrays(step, slab))

    def _verified_arrays(self, step: int, slab: int | str) -> Iterator[tuple[str, np.ndarray]]:
        name = self._state_group(step, slab)
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
    def last_complete_step(self) -> int | None:
        """The last step every slab has checkpointed (recorded by the driver), or None."""
        return self._group.attrs.get("last_complete_step")

    @property
    def complete_steps(self) -> list[int]:
        """The recorded steps whose checkpoints are kept, oldest first (at most `KEEP_COMPLETE_STEPS`)."""
        steps = self._group.attrs.get("complete_steps")
        if steps is None:  # a store from before the list was kept
            last = self.last_complete_step
            return [] if last is None else [int(last)]
        return [int(s) for s in steps]

    def set_last_complete_step(self, step: int, *, prune: bool = True) -> None:
        """Record `step` as checkpointed by all slabs; keep it and the previous recorded step.

        Checkpoints older than the kept steps are dropped. Recorded steps at or after `step` (a run
        that fell back to an older checkpoint and has not reached them again) are forgotten: their
        checkpoints are the damaged ones, and the run rewrites them when it gets there.
        """
        kept = ([s for s in self.complete_steps if s < step] + [int(step)])[-KEEP_COMPLETE_STEPS:]
        with write_guard(self.path):
            self._group.attrs.update({"last_complete_step": int(step), "complete_steps": kept})
            if prune:
                self._drop_checkpoints(before=kept[0])

    def _drop_checkpoints(self, before: int | None = None) -> None:
        """Remove the checkpoints of steps below `before` (None: all), on disk, damaged ones too."""
        state = self.path / "state"
        for slab_dir in [d for d in state.iterdir() if d.is_dir()] if state.is_dir() else []:
            if before is None:
                shutil.rmtree(slab_dir)
                continue
            for step_dir in slab_dir.glob("step_*"):
                if step_dir.name[5:].isdigit() and int(step_dir.name[5:]) < before:
                    shutil.rmtree(step_dir)

    def mark_complete(self, attrs: dict[str, Any], *, drop_state: bool = True) -> None:
        """Write provenance `attrs` (method, config, seed, timings, metrics), then ``complete: true``."""
        with write_guard(self.path):
            if drop_state:
                self._drop_checkpoints()
            provenance = {k: v for k, v in jsonable(attrs).items() if k != "complete"}
            provenance.setdefault("finished", time.strftime("%Y-%m-%dT%H:%M:%S%z"))
            self._group.attrs.update(provenance)
            self._group.attrs.update({"complete": True})


def open_output(path: str | Path, *, allow_incomplete: bool = False) -> OutputStore:
    """Open an output read-only for report/export; an unfinished output is refused."""
    path = Path(path)
    status = output_status(path)
    if status == "missing":
        raise OutputError(f"{path}: no such output (path does not exist)")
    if status == "other":
        raise OutputError(f"{path}: not an mbir-batch output store (no 'complete' attribute)")
    if status == "damaged":
        raise damaged_output_error(path)
    if status == "incomplete" and not allow_incomplete:
        raise OutputError(f"{path}: output is incomplete (the job has not finished); resubmit to resume it")
    return OutputStore.open(path, mode="r")
