"""The Zarr data contract: open, validate and create ``dataset.zarr`` stores.

A dataset is a Zarr group (v3 by default, v2 readable) whose ``mbir``
attribute is described by `DatasetMeta` and whose arrays are

* CT: ``sinogram`` float32 ``(Z, n_views, det_count)``, astra 2D ``parallel``
  geometry (angle in radians = ``angles_deg * pi / 180``);
* MRI: ``kspace`` complex64 ``(Z, H, W)`` with
  ``kspace[z] = fftshift(fft2(ifftshift(volume[z]), norm="ortho")) * mask``
  and ``mask`` bool ``(H, W)`` or ``(Z, H, W)``;
* optional ``reference`` float32 ``(Z, H, W)``, used only for scoring.

All arrays are chunked along z only. The input store is only ever opened
read-only. Output stores live in `mbir_batch.output`. Every violation of the
contract raises `DatasetError` naming the path.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from mbir_batch.errors import DatasetError, one_line
from mbir_batch.zarr_store import compressor, jsonable, staged_directory, write_guard

__all__ = [
    "FORMAT_VERSION",
    "Dataset",
    "DatasetError",
    "DatasetMeta",
    "create_dataset",
    "open_dataset",
]

FORMAT_VERSION = 1
_REQUIRED_KEYS = ("version", "modality", "geometry", "volume_shape", "voxel_size_mm", "noise_sigma")
_OPTIONAL_KEYS = ("normalization", "source")
_GEOMETRY_KEYS = {"ct": {"kind", "angles_deg", "det_count", "det_spacing"}, "mri": {"kind", "mask"}}
_GEOMETRY_KIND = {"ct": "parallel", "mri": "cartesian"}


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_real(value: Any) -> bool:
    return (_is_int(value) or isinstance(value, (float, np.floating))) and math.isfinite(float(value))


@dataclass(frozen=True)
class DatasetMeta:
    """The ``mbir`` group attribute of a dataset (DESIGN.md, "Data contract").

    Parameters
    ----------
    modality : "ct" or "mri".
    geometry : CT ``{"kind": "parallel", "angles_deg": [...], "det_count": int,
        "det_spacing": float > 0}``; MRI ``{"kind": "cartesian", "mask": "mask"}``.
    volume_shape : (Z, H, W) of the volume to reconstruct.
    voxel_size_mm : (dz, dy, dx).
    noise_sigma : standard deviation of the measurement noise (0 if unknown).
    normalization : optional record of the intensity mapping to [0, 1] (see `mbir_batch.io`).
    source : optional record of the imported file (affine, orientation, kind).
    version : format version, always `FORMAT_VERSION`.
    """

    modality: str
    geometry: dict
    volume_shape: tuple[int, int, int]
    voxel_size_mm: tuple[float, float, float] = (1.0, 1.0, 1.0)
    noise_sigma: float = 0.0
    normalization: dict | None = None
    source: dict | None = None
    version: int = FORMAT_VERSION

    def to_attrs(self) -> dict:
        """The JSON-ready ``mbir`` attribute."""
        attrs = {
            "version": int(self.version),
            "modality": self.modality,
            "geometry": jsonable(self.geometry),
            "volume_shape": [int(v) for v in self.volume_shape],
            "voxel_size_mm": [float(v) for v in self.voxel_size_mm],
            "noise_sigma": float(self.noise_sigma),
        }
        for key in _OPTIONAL_KEYS:
            if getattr(self, key) is not None:
                attrs[key] = jsonable(getattr(self, key))
        return attrs

    @classmethod
    def from_attrs(cls, attrs: Any, where: str | Path) -> DatasetMeta:
        """Validate an ``mbir`` attribute; raise `DatasetError` naming `where` and the key."""

        def fail(problem: str) -> DatasetError:
            return DatasetError(f"{where}: {problem}")

        if not isinstance(attrs, dict):
            raise fail(f"attribute 'mbir' must be a mapping, got {type(attrs).__name__}")
        if "version" not in attrs:
            raise fail("attribute 'mbir' has no 'version'")
        if not _is_int(attrs["version"]) or attrs["version"] != FORMAT_VERSION:
            raise fail(f"unsupported mbir format version {attrs['version']!r}; "
                       f"this mbir-batch reads version {FORMAT_VERSION}")
        missing = [k for k in _REQUIRED_KEYS if k not in attrs]
        if missing:
            raise fail(f"attribute 'mbir' is missing {', '.join(repr(k) for k in missing)}")
        unknown = sorted(set(attrs) - set(_REQUIRED_KEYS) - set(_OPTIONAL_KEYS))
        if unknown:
            raise fail(f"attribute 'mbir' has unknown key(s) {', '.join(repr(k) for k in unknown)}")
        modality = attrs["modality"]
        if modality not in _GEOMETRY_KIND:
            raise fail(f"unknown modality {modality!r}; expected 'ct' or 'mri'")
        shape = attrs["volume_shape"]
        if not (isinstance(shape, (list, tuple)) and len(shape) == 3 and all(_is_int(v) and v > 0 for v in shape)):
            raise fail(f"volume_shape must be 3 positive integers [Z, H, W], got {shape!r}")
        voxel = attrs["voxel_size_mm"]
        if not (isinstance(voxel, (list, tuple)) and len(voxel) == 3 and all(_is_real(v) and v > 0 for v in voxel)):
            raise fail(f"voxel_size_mm must be 3 positive numbers (dz, dy, dx), got {voxel!r}")
        if not (_is_real(attrs["noise_sigma"]) and attrs["noise_sigma"] >= 0):
            raise fail(f"noise_sigma must be a number >= 0, got {attrs['noise_sigma']!r}")
        for key in _OPTIONAL_KEYS:
            if key in attrs and not isinstance(attrs[key], dict):
                raise fail(f"'{key}' must be a mapping, got {type(attrs[key]).__name__}")
        _check_geometry(modality, attrs["geometry"], fail)
        return cls(modality=modality, geometry=dict(attrs["geometry"]),
                   volume_shape=tuple(int(v) for v in shape), voxel_size_mm=tuple(float(v) for v in voxel),
                   noise_sigma=float(attrs["noise_sigma"]), normalization=attrs.get("normalization"),
                   source=attrs.get("source"), version=int(attrs["version"]))

    @property
    def measurement_name(self) -> str:
        """Name of the measurement array: ``sinogram`` (CT) or ``kspace`` (MRI)."""
        return "sinogram" if self.modality == "ct" else "kspace"

    @property
    def measurement_shape(self) -> tuple[int, int, int]:
        """Expected shape of the measurement array."""
        depth, height, width = self.volume_shape
        if self.modality == "ct":
            return (depth, len(self.geometry["angles_deg"]), int(self.geometry["det_count"]))
        return (depth, height, width)


def _check_geometry(modality: str, geometry: Any, fail) -> None:
    if not isinstance(geometry, dict):
        raise fail(f"geometry must be a mapping, got {type(geometry).__name__}")
    kind = _GEOMETRY_KIND[modality]
    if geometry.get("kind") != kind:
        raise fail(f"geometry.kind must be {kind!r} for modality {modality!r}, got {geometry.get('kind')!r}")
    allowed = _GEOMETRY_KEYS[modality]
    missing = sorted(allowed - set(geometry))
    unknown = sorted(set(geometry) - allowed)
    if missing or unknown:
        raise fail(f"geometry: missing {missing} / unknown {unknown} key(s); expected exactly {sorted(allowed)}")
    if modality == "mri":
        if geometry["mask"] != "mask":
            raise fail(f"geometry.mask must be 'mask' (the mask array's name), got {geometry['mask']!r}")
        return
    angles = geometry["angles_deg"]
    if not (isinstance(angles, (list, tuple)) and angles and all(_is_real(a) for a in angles)):
        raise fail("geometry.angles_deg must be a non-empty list of finite numbers")
    if not (_is_int(geometry["det_count"]) and geometry["det_count"] > 0):
        raise fail(f"geometry.det_count must be a positive integer, got {geometry['det_count']!r}")
    if not (_is_real(geometry["det_spacing"]) and geometry["det_spacing"] > 0):
        raise fail(f"geometry.det_spacing must be a positive number, got {geometry['det_spacing']!r}")


_AXIS_LABELS = {
    "sinogram": (("slices", "volume_shape[0]"), ("views", "len(geometry.angles_deg)"),
                 ("detector bins", "geometry.det_count")),
    "kspace": (("slices", "volume_shape[0]"), ("rows", "volume_shape[1]"), ("columns", "volume_shape[2]")),
    "reference": (("slices", "volume_shape[0]"), ("rows", "volume_shape[1]"), ("columns", "volume_shape[2]")),
}
_DTYPES = {"sinogram": np.dtype("float32"), "kspace": np.dtype("complex64"),
           "reference": np.dtype("float32"), "mask": np.dtype("bool")}


def _check_shape(name: str, shape: tuple, dtype: np.dtype, meta: DatasetMeta, fail) -> None:
    """Check one array's dtype and shape against `meta` (arrays on disk and in memory alike)."""
    if dtype != _DTYPES[name]:
        raise fail(f"array '{name}' has dtype {dtype}, expected {_DTYPES[name]}")
    if name == "mask":
        depth, height, width = meta.volume_shape
        if tuple(shape) not in ((height, width), (depth, height, width)):
            raise fail(f"array 'mask' has shape {tuple(shape)}, expected {(height, width)} or {(depth, height, width)}")
        return
    expected = meta.measurement_shape if name in ("sinogram", "kspace") else meta.volume_shape
    if len(shape) != 3:
        raise fail(f"array '{name}' has {len(shape)} dimensions {tuple(shape)}, expected 3 {expected}")
    for axis, ((label, source), got, want) in enumerate(zip(_AXIS_LABELS[name], shape, expected)):
        if got != want:
            raise fail(f"array '{name}' has {got} {label} (axis {axis}) but {source} is {want}")


class Dataset:
    """A validated, read-only dataset store (see `open_dataset`)."""

    def __init__(self, path: Path, group: zarr.Group, meta: DatasetMeta) -> None:
        self.path = path
        self.meta = meta
        self._group = group

    def __repr__(self) -> str:
        return f"Dataset({str(self.path)!r}, modality={self.meta.modality!r}, shape={self.meta.volume_shape})"

    @property
    def depth(self) -> int:
        """Number of axial slices Z."""
        return self.meta.volume_shape[0]

    @property
    def chunk_z(self) -> int:
        """z-extent of one chunk (or shard) of the measurement array; slabs align to it."""
        array = self._group[self.meta.measurement_name]
        return int((array.shards or array.chunks)[0])

    @property
    def has_reference(self) -> bool:
        """Whether the store holds a ``reference`` volume."""
        return "reference" in self._group

    def _read(self, name: str, z0: int, z1: int) -> np.ndarray:
        if not 0 <= z0 < z1 <= self.depth:
            raise ValueError(f"slice range [{z0}, {z1}) is outside [0, {self.depth})")
        array = self._group[name]
        if array.ndim == 2:  # a 2D mask, shared by every slice
            return np.broadcast_to(_read_block(self.path, name, array, ...), (z1 - z0, *array.shape)).copy()
        block = _read_block(self.path, name, array, slice(z0, z1))
        if name != "mask" and not np.isfinite(block).all():
            bad = z0 + int(np.argwhere(~np.isfinite(block))[0][0])
            raise DatasetError(f"{self.path}: array '{name}' contains NaN or Inf values (first at slice {bad})")
        return block

    def read_measurements(self, z0: int, z1: int) -> np.ndarray:
        """Sinogram float32 ``(z1-z0, V, D)`` (CT) or k-space complex64 ``(z1-z0, H, W)`` (MRI)."""
        return self._read(self.meta.measurement_name, z0, z1)

    def read_mask(self, z0: int, z1: int) -> np.ndarray:
        """MRI sampling mask as bool ``(z1-z0, H, W)`` (a 2D mask is broadcast)."""
        if self.meta.modality != "mri":
            raise ValueError(f"{self.path}: a CT dataset has no sampling mask")
        return self._read("mask", z0, z1)

    @property
    def reference_array(self):
        """The ``reference`` zarr array itself (read-only), for block-wise scoring; None if absent."""
        return self._group["reference"] if self.has_reference else None

    def read_reference(self, z0: int, z1: int) -> np.ndarray | None:
        """Reference volume float32 ``(z1-z0, H, W)``, or None when the store has none."""
        return self._read("reference", z0, z1) if self.has_reference else None

    def operator(self, z0: int, z1: int, device: str = "cpu"):
        """Forward operator for slices ``[z0, z1)``: `ParallelBeam` (CT) or `CartesianMRI` (MRI).

        Built by `mbir_batch.kernels.operators.operator_from_geometry` from the geometry (and, for
        MRI, the mask: a 2D one whole, a 3D one for the slices ``[z0, z1)``).
        """
        from mbir_batch.kernels.operators import operator_from_geometry

        mask = None
        if self.meta.modality == "mri":
            mask_array = self._group["mask"]
            mask = (_read_block(self.path, "mask", mask_array, ...) if mask_array.ndim == 2
                    else self._read("mask", z0, z1))
        return operator_from_geometry(self.meta.modality, self.meta.geometry, self.meta.volume_shape, mask=mask,
                                      device=device)


def _read_block(path: Path, name: str, array: zarr.Array, index) -> np.ndarray:
    """Read ``array[index]``; a chunk that fails to decode becomes a `DatasetError` naming it."""
    try:
        return np.asarray(array[index])
    except (RuntimeError, ValueError, TypeError, OSError, EOFError) as error:
        where = "" if index is ... else f" slices {index.start}-{index.stop}"
        raise DatasetError(f"{path}: array '{name}'{where} cannot be read (corrupted chunk?): "
                           f"{one_line(error)}") from error


def _scan_finite(path: Path, name: str, array: zarr.Array) -> None:
    """Decode `array` chunk by chunk along z; name the first unreadable chunk or non-finite slice."""
    chunk = int((array.shards or array.chunks)[0])
    for index, z0 in enumerate(range(0, array.shape[0], chunk)):
        z1 = min(z0 + chunk, array.shape[0])
        try:
            block = np.asarray(array[z0:z1])
        except (RuntimeError, ValueError, TypeError, OSError, EOFError) as error:
            raise DatasetError(f"{path}: array '{name}' chunk {index} (slices {z0}-{z1}) cannot be read "
                               f"(corrupted chunk?): {one_line(error)}") from error
        if name != "mask" and not np.isfinite(block).all():
            bad = z0 + int(np.argwhere(~np.isfinite(block))[0][0])
            raise DatasetError(f"{path}: array '{name}' contains NaN or Inf values (first at slice {bad})")


def open_dataset(path: str | Path, *, verify_data: bool = True) -> Dataset:
    """Open a dataset store read-only and validate it against the data contract.

    Parameters
    ----------
    path : the ``dataset.zarr`` directory.
    verify_data : decode every chunk of every array once (streaming, one z-chunk at a
        time) to find corrupted chunks and NaN/Inf values. Workers that only read
        their own slab pass False; reads are still checked slab by slab.

    Raises
    ------
    DatasetError
        ``"<path>: <problem>"`` for every violation of the contract.
    """
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"{path}: no such dataset (path does not exist)")
    try:
        group = zarr.open_group(path, mode="r")
    except Exception as error:  # zarr raises many types for "not a group"; all mean the same to a user
        raise DatasetError(f"{path}: not a Zarr group ({one_line(error)})") from error
    if "mbir" not in group.attrs:
        raise DatasetError(f"{path}: no 'mbir' group attribute; not an mbir-batch dataset")
    meta = DatasetMeta.from_attrs(group.attrs["mbir"], where=path)

    def fail(problem: str) -> DatasetError:
        return DatasetError(f"{path}: {problem}")

    names = [meta.measurement_name] + (["mask"] if meta.modality == "mri" else [])
    for name in names + (["reference"] if "reference" in group else []):
        if name not in group:
            raise fail(f"missing array '{name}' (required for modality {meta.modality!r})")
        array = group[name]
        if not isinstance(array, zarr.Array):
            raise fail(f"'{name}' is a group, expected an array")
        _check_shape(name, array.shape, array.dtype, meta, fail)
        if verify_data:
            _scan_finite(path, name, array)
    return Dataset(path, group, meta)


def create_dataset(path: str | Path, meta: DatasetMeta, *, sinogram: np.ndarray | None = None,
                   kspace: np.ndarray | None = None, mask: np.ndarray | None = None,
                   reference: np.ndarray | None = None, chunk_z: int = 8, overwrite: bool = False) -> Dataset:
    """Write a dataset store that satisfies the data contract and return it opened.

    The store is written next to `path` under a temporary name and renamed into
    place when complete, so a failed write (disk full) never leaves a half
    dataset and never touches an existing one.

    Raises
    ------
    DatasetError
        when the arrays do not match `meta` (shape, missing array, NaN).
    OutputError
        when `path` exists (and not `overwrite`) or cannot be written.
    """
    path = Path(path)
    DatasetMeta.from_attrs(meta.to_attrs(), where=path)

    def fail(problem: str) -> DatasetError:
        return DatasetError(f"{path}: {problem}")

    if meta.modality == "ct":
        given = {"sinogram": sinogram}
        wrong = [n for n, v in (("kspace", kspace), ("mask", mask)) if v is not None]
    else:
        given = {"kspace": kspace, "mask": mask}
        wrong = ["sinogram"] if sinogram is not None else []
    if wrong:
        raise fail(f"{', '.join(wrong)} given for a {meta.modality!r} dataset")
    arrays: dict[str, np.ndarray] = {}
    for name, value in {**given, "reference": reference}.items():
        if value is None:
            if name == "reference":
                continue
            raise fail(f"array '{name}' is required for modality {meta.modality!r}")
        value = np.asarray(value)
        if name == "mask" and value.dtype != np.bool_:
            value = value != 0
        array = np.ascontiguousarray(value, dtype=_DTYPES[name])
        _check_shape(name, array.shape, array.dtype, meta, fail)
        if name != "mask" and not np.isfinite(array).all():
            raise fail(f"array '{name}' contains NaN or Inf values")
        arrays[name] = array
    with staged_directory(path, overwrite=overwrite) as staging, write_guard(path):
        group = zarr.open_group(staging, mode="w")
        for name, array in arrays.items():
            chunks = (min(chunk_z, array.shape[0]), *array.shape[1:]) if array.ndim == 3 else array.shape
            stored = group.create_array(name, shape=array.shape, chunks=chunks, dtype=array.dtype,
                                        compressors=compressor())
            stored[...] = array
        group.attrs["mbir"] = meta.to_attrs()
    return open_dataset(path, verify_data=False)
