"""What every store mbir-batch writes shares: one codec, guarded writes, staged creation, JSON attrs.

* `compressor`: the codec of every array written (blosc zstd, bit-shuffled);
* `write_guard`: a disk-full or permission error while writing becomes one `OutputError` line
  naming the path;
* `staged_directory`: a new store is written into a hidden sibling and renamed into place, so a
  failed write never leaves half a store where the old one was;
* `jsonable`: numpy scalars/arrays, tuples and paths as JSON-ready attribute values.
"""
from __future__ import annotations

import errno
import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from mbir_batch.errors import OutputError

__all__ = ["compressor", "is_zarr_store", "jsonable", "staged_directory", "write_guard"]

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


def is_zarr_store(path: Path) -> bool:
    """Whether `path` holds a Zarr group (v3 ``zarr.json`` or v2 ``.zgroup``)."""
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
    if path.exists() and not is_zarr_store(path):
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
