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
  naming the path and leaves every other store untouched.
"""
from __future__ import annotations

import errno
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
from mbir_batch.errors import OutputError

__all__ = [
    "OutputStore",
    "compressor",
    "is_complete",
    "jsonable",
    "open_output",
    "output_status",
    "staged_directory",
    "write_guard",
]

_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS}


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


def output_status(path: str | Path) -> str:
    """``"missing"``, ``"complete"``, ``"incomplete"``, or ``"other"`` (exists, not an mbir output)."""
    path = Path(path)
    if not path.exists():
        return "missing"
    try:
        attrs = zarr.open_group(path, mode="r").attrs.asdict()
    except Exception:  # any unreadable thing at that path is "not an output"
        return "other"
    if "complete" not in attrs:
        return "other"
    return "complete" if attrs["complete"] is True else "incomplete"


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
                                "mbir_batch_version": __version__, "last_complete_step": None})
        return cls(path, zarr.open_group(path, mode="r+"))

    @classmethod
    def open(cls, path: str | Path, *, mode: str = "r+") -> OutputStore:
        """Open an existing output store (``"r+"`` for workers writing their slab, ``"r"`` to read)."""
        path = Path(path)
        if output_status(path) not in ("complete", "incomplete"):
            raise OutputError(f"{path}: not an mbir-batch output store")
        group = zarr.open_group(path, mode=mode)
        volume = group.get("volume")
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
        """Checkpoint one slab after `step`; the group's ``complete`` attr is written last."""
        name = self._state_group(step, slab)
        with write_guard(self.path):
            if name in self._group:  # a rerun after a restart: never leave old arrays under a complete flag
                del self._group[name]
            group = self._group.require_group(name)
            for name, value in arrays.items():
                value = np.asarray(value)
                chunks = (min(8, value.shape[0]), *value.shape[1:]) if value.ndim == 3 else value.shape
                stored = group.create_array(name, shape=value.shape, chunks=chunks if value.ndim else "auto",
                                            dtype=value.dtype, compressors=compressor(), overwrite=True)
                stored[...] = value
            group.attrs.update({"step": int(step), "complete": True})

    def read_state(self, step: int, slab: int | str) -> dict[str, np.ndarray]:
        """The arrays of a complete checkpoint of `slab` at `step`."""
        name = self._state_group(step, slab)
        group = self._group.get(name)
        if not isinstance(group, zarr.Group) or group.attrs.get("complete") is not True:
            raise OutputError(f"{self.path}: no complete checkpoint {name}")
        return {key: np.asarray(array[...]) for key, array in group.arrays()}

    @property
    def last_complete_step(self) -> int | None:
        """The last step every slab has checkpointed (recorded by the driver), or None."""
        return self._group.attrs.get("last_complete_step")

    def set_last_complete_step(self, step: int, *, prune: bool = True) -> None:
        """Record `step` as checkpointed by all slabs; drop older checkpoints."""
        with write_guard(self.path):
            self._group.attrs.update({"last_complete_step": int(step)})
            if prune:
                for _, slab_group in self._group["state"].groups():
                    for key in [k for k, _ in slab_group.groups() if int(k.split("_")[1]) < step]:
                        del slab_group[key]

    def mark_complete(self, attrs: dict[str, Any], *, drop_state: bool = True) -> None:
        """Write provenance `attrs` (method, config, seed, timings, metrics), then ``complete: true``."""
        with write_guard(self.path):
            if drop_state:
                for key in [k for k, _ in self._group["state"].groups()]:
                    del self._group["state"][key]
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
    if status == "incomplete" and not allow_incomplete:
        raise OutputError(f"{path}: output is incomplete (the job has not finished); resubmit to resume it")
    return OutputStore.open(path, mode="r")
