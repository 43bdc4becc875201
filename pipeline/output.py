"""Output stores: the output contract, in one place.

An output store holds the reconstructed ``volume`` (Z, H, W) float32 chunked along z, its root
attrs and ``state/`` (checkpoints, :mod:`mbir_batch.checkpoints`). Every attribute is written
through `OutputStore`: the input's ``mbir`` record, the creation stamp and the job's plan
(`OutputStore.create`), the checkpoint record (`OutputStore.checkpoints`), and the provenance
with its metrics followed by ``complete`` (`OutputStore.mark_complete`).

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

import time
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from mbir_batch import __version__
from mbir_batch.checkpoints import Checkpoints
from mbir_batch.errors import OutputError, one_line
from mbir_batch.zarr_store import compressor, jsonable, staged_directory, write_guard

__all__ = ["OutputStore", "damage_of", "damaged_output_error", "is_complete", "open_output", "output_status"]


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
        self.checkpoints = Checkpoints(path, group)

    def __repr__(self) -> str:
        return f"OutputStore({str(self.path)!r}, shape={self.shape}, complete={self.complete})"

    @classmethod
    def create(cls, path: str | Path, *, input_path: str | Path, shape: tuple[int, int, int],
               chunk_z: int, dataset_attrs: dict[str, Any] | None = None, plan: dict[str, Any] | None = None,
               overwrite: bool = False) -> OutputStore:
        """Create an empty output for the dataset at `input_path`.

        Refuses an output that is, contains or lies inside the input; refuses to
        replace an existing complete or incomplete output unless `overwrite`
        (an incomplete one can be resumed with `open_for_resume` instead). The
        input's ``mbir`` attribute is copied to ``attrs["dataset"]`` so that
        report and export work without the input; a caller that has the input
        open already passes it as `dataset_attrs` (``DatasetMeta.to_attrs()``).
        The job's `plan` (method, config, model, slabs: what a resumed or repeated
        run must match, read back as `plan`) is recorded in ``attrs["job"]`` in
        the same staged write, so no output exists without it.
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
        if dataset_attrs is None:
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
            if plan is not None:
                group.attrs.update({"job": jsonable(plan)})
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

    @property
    def plan(self) -> dict[str, Any]:
        """The job's plan recorded by `create` (method, config, model, slabs), or ``{}``."""
        return self._group.attrs.get("job") or {}

    def mark_complete(self, attrs: dict[str, Any], *, drop_state: bool = True) -> None:
        """Write provenance `attrs` (method, config, seed, timings, metrics), then ``complete: true``."""
        with write_guard(self.path):
            if drop_state:
                self.checkpoints.drop()
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
