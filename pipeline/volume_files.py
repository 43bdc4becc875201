"""Reading and writing volume files: NIfTI, DICOM series, TIFF stacks and ``.npy``.

Every reader returns ``(volume, info)``: a float32 ``(Z, H, W)`` stack of axial
slices and a `VolumeInfo` that records what export needs to restore the file's
geometry exactly:

* NIfTI: the image is reoriented to the closest canonical (RAS+) orientation
  (``nib.as_closest_canonical``) and its last axis becomes z, so
  ``volume[k, j, i] = canonical[i, j, k]``. The original affine (in mm), the
  orientation transform back to the original array layout and the header's
  sform/qform with their codes and unit (`NiftiGeometry`) are recorded.
* DICOM (a series folder or one file): :mod:`mbir_batch.dicom_files`.
* TIFF / npy: spacing from ImageJ tags or a JSON sidecar; the affine is diagonal.

A file that cannot be read raises `InputFileError` naming the file and the problem.
"""
from __future__ import annotations

import json
import os
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from mbir_batch.errors import InputFileError, OutputError, one_line
from mbir_batch.zarr_store import write_guard

__all__ = ["NiftiGeometry", "VolumeInfo", "check_destination", "checked_volume", "read_array", "read_errors",
           "read_volume", "write_nifti", "write_npy", "write_tiff"]

_IDENTITY_ORNT = [[0.0, 1.0], [1.0, 1.0], [2.0, 1.0]]
_TIFF_SUFFIXES = (".tif", ".tiff")
_DICOM_SUFFIXES = (".dcm", ".dicom")
_NIFTI_UNIT_MM = {"meter": 1000.0, "mm": 1.0, "micron": 1e-3}


def read_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "this file is unreadable or malformed" in the readers we use."""
    from nibabel.filebasedimages import ImageFileError
    from nibabel.spatialimages import HeaderDataError
    from pydicom.errors import InvalidDicomError
    from tifffile import TiffFileError

    return (OSError, EOFError, ValueError, TypeError, KeyError, AttributeError, zlib.error, struct.error,
            ImageFileError, HeaderDataError, InvalidDicomError, TiffFileError)


@dataclass(frozen=True)
class NiftiGeometry:
    """The spatial part of a NIfTI header, kept so that export writes it back unchanged.

    Parameters
    ----------
    sform, qform : 4x4 matrices as stored in the header (``srow_*``; quaternion + offset + pixdim).
    sform_code, qform_code : their xform codes (0 unknown, 1 scanner, 2 aligned, 3 Talairach, 4 MNI, 5 template).
    unit : spatial unit of the header (``"mm"``, ``"meter"``, ``"micron"`` or ``"unknown"``).
    """

    sform: np.ndarray
    sform_code: int
    qform: np.ndarray
    qform_code: int
    unit: str = "mm"

    @classmethod
    def of_header(cls, header) -> NiftiGeometry:
        return cls(sform=np.asarray(header.get_sform(), np.float64), sform_code=int(header["sform_code"]),
                   qform=np.asarray(header.get_qform(), np.float64), qform_code=int(header["qform_code"]),
                   unit=str(header.get_xyzt_units()[0]))

    def to_attrs(self) -> dict:
        return {"sform": self.sform.tolist(), "sform_code": self.sform_code, "qform": self.qform.tolist(),
                "qform_code": self.qform_code, "unit": self.unit}

    @classmethod
    def from_attrs(cls, attrs: dict) -> NiftiGeometry:
        return cls(sform=np.asarray(attrs["sform"], np.float64), sform_code=int(attrs["sform_code"]),
                   qform=np.asarray(attrs["qform"], np.float64), qform_code=int(attrs["qform_code"]),
                   unit=str(attrs.get("unit", "mm")))


@dataclass(frozen=True)
class VolumeInfo:
    """Geometry of an imported volume file.

    Parameters
    ----------
    spacing : (dz, dy, dx) in mm (converted from the NIfTI header's unit).
    affine : 4x4 voxel-to-world (RAS mm) affine of the *source* array layout.
    to_source : nibabel orientation transform (3x2) from the layout ``volume.transpose(2, 1, 0)``
        to the source array layout (identity except for reoriented NIfTI).
    orientation : axis codes of the source affine, e.g. ``("L", "P", "S")``.
    kind : ``"nifti"``, ``"dicom"``, ``"tiff"`` or ``"npy"``.
    path : the file it came from.
    nifti : header geometry (sform/qform and codes) that NIfTI export writes; None: nibabel's defaults.
    """

    spacing: tuple[float, float, float]
    affine: np.ndarray = field(default_factory=lambda: np.eye(4))
    to_source: np.ndarray = field(default_factory=lambda: np.array(_IDENTITY_ORNT))
    orientation: tuple[str, str, str] = ("R", "A", "S")
    kind: str = "npy"
    path: str = ""
    nifti: NiftiGeometry | None = None

    @classmethod
    def diagonal(cls, spacing: tuple[float, float, float], kind: str, path: str | Path) -> VolumeInfo:
        dz, dy, dx = spacing
        return cls(spacing=tuple(float(v) for v in spacing), affine=np.diag([dx, dy, dz, 1.0]), kind=kind,
                   path=str(path))

    def to_source_attrs(self) -> dict:
        """The ``source`` entry of the dataset's ``mbir`` attribute."""
        attrs = {"kind": self.kind, "path": self.path, "affine": np.asarray(self.affine).tolist(),
                 "to_source": np.asarray(self.to_source).tolist(), "orientation": list(self.orientation),
                 "spacing_mm": list(self.spacing)}
        return attrs | ({"nifti": self.nifti.to_attrs()} if self.nifti is not None else {})

    @classmethod
    def from_source_attrs(cls, source: dict | None, spacing: tuple[float, float, float]) -> VolumeInfo:
        """Inverse of `to_source_attrs`; a missing source gives a diagonal affine from `spacing`."""
        if not source or "affine" not in source:
            return cls.diagonal(spacing, (source or {}).get("kind", "npy"), (source or {}).get("path", ""))
        return cls(spacing=tuple(spacing), affine=np.asarray(source["affine"], dtype=np.float64),
                   to_source=np.asarray(source.get("to_source", _IDENTITY_ORNT), dtype=np.float64),
                   orientation=tuple(source.get("orientation", ("R", "A", "S"))), kind=source.get("kind", ""),
                   path=source.get("path", ""),
                   nifti=NiftiGeometry.from_attrs(source["nifti"]) if source.get("nifti") else None)


def checked_volume(path: Path, data: np.ndarray, *, allow_2d: bool = False) -> np.ndarray:
    """Common checks: real numbers, non-empty, 3D, finite; returns float32."""
    if data.dtype.kind not in "biuf":
        raise InputFileError(f"{path}: expected real numbers, got dtype {data.dtype}")
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if allow_2d and data.ndim == 2:
        data = data[None]
    if data.ndim != 3:
        raise InputFileError(f"{path}: expected a 3D volume, got {data.ndim} dimension(s) {data.shape}")
    if data.size == 0:
        raise InputFileError(f"{path}: the volume is empty (shape {data.shape})")
    data = np.asarray(data, dtype=np.float32)
    bad = int(np.count_nonzero(~np.isfinite(data)))
    if bad:
        raise InputFileError(f"{path}: contains {bad} NaN/Inf value(s)")
    return data


def read_volume(path: str | Path) -> tuple[np.ndarray, VolumeInfo]:
    """Read a NIfTI file, DICOM series folder or file, TIFF stack (file or folder) or ``.npy`` file."""
    from mbir_batch.dicom_files import read_dicom

    path = Path(path)
    if not path.exists():
        raise InputFileError(f"{path}: no such file or directory")
    name = path.name.lower()
    if path.is_dir():
        if any(p.suffix.lower() in _TIFF_SUFFIXES for p in path.iterdir()):
            return _read_tiff(path)
        return read_dicom(path)
    if name.endswith((".nii", ".nii.gz")):
        return _read_nifti(path)
    if name.endswith(_TIFF_SUFFIXES):
        return _read_tiff(path)
    if name.endswith(".npy"):
        data = read_array(path)
        return checked_volume(path, data), VolumeInfo.diagonal(_sidecar_spacing(path), "npy", path)
    if name.endswith(_DICOM_SUFFIXES) or _has_dicom_preamble(path):
        return read_dicom(path)
    raise InputFileError(f"{path}: unknown volume format; expected .nii, .nii.gz, .tif, .tiff, .npy, .dcm "
                         f"or a DICOM series folder")


def _has_dicom_preamble(path: Path) -> bool:
    """DICOM Part 10 files (whatever their name) hold ``DICM`` after a 128-byte preamble."""
    try:
        with path.open("rb") as handle:
            return handle.read(132)[128:] == b"DICM"
    except OSError:
        return False


def read_array(path: Path) -> np.ndarray:
    """A raw array from ``.npy`` or a TIFF file (for sinograms and k-space), unchecked."""
    try:
        if path.suffix.lower() in _TIFF_SUFFIXES:
            import tifffile

            return tifffile.imread(path)
        return np.load(path, allow_pickle=False)
    except read_errors() as error:
        raise InputFileError(f"{path}: cannot read ({one_line(error)})") from error


def _sidecar_spacing(path: Path) -> tuple[float, float, float]:
    sidecar = path.with_suffix(".json")
    if not sidecar.is_file():
        return (1.0, 1.0, 1.0)
    try:
        spacing = json.loads(sidecar.read_text())["voxel_size_mm"]
        return tuple(float(v) for v in spacing[:3])
    except (ValueError, KeyError, TypeError, IndexError) as error:
        raise InputFileError(f"{sidecar}: not a valid sidecar (needs 'voxel_size_mm': [dz, dy, dx]): "
                             f"{one_line(error)}") from error


def _read_nifti(path: Path) -> tuple[np.ndarray, VolumeInfo]:
    import nibabel as nib
    from nibabel.orientations import aff2axcodes, axcodes2ornt, io_orientation, ornt_transform

    try:
        image = nib.load(path)
        if len(image.shape) not in (3, 4) or (len(image.shape) == 4 and image.shape[3] != 1):
            raise InputFileError(f"{path}: expected a 3D volume, got shape {image.shape}")
        canonical = nib.as_closest_canonical(nib.funcs.squeeze_image(image))
        data = np.asarray(canonical.get_fdata(dtype=np.float32))
    except read_errors() as error:
        raise InputFileError(f"{path}: not a readable NIfTI file ({one_line(error)})") from error
    volume = checked_volume(path, data).transpose(2, 1, 0)
    geometry = NiftiGeometry.of_header(image.header)
    to_mm = _NIFTI_UNIT_MM.get(geometry.unit, 1.0)  # "unknown" is read as mm
    zooms = [float(f"{float(v) * to_mm:.6g}") for v in canonical.header.get_zooms()[:3]]  # float32 noise
    to_source = ornt_transform(axcodes2ornt(("R", "A", "S")), io_orientation(image.affine))
    affine_mm = np.diag([to_mm, to_mm, to_mm, 1.0]) @ np.asarray(image.affine, dtype=np.float64)
    info = VolumeInfo(spacing=(zooms[2], zooms[1], zooms[0]), affine=affine_mm, to_source=to_source,
                      orientation=tuple(aff2axcodes(image.affine)), kind="nifti", path=str(path), nifti=geometry)
    return np.ascontiguousarray(volume), info


def _read_tiff(path: Path) -> tuple[np.ndarray, VolumeInfo]:
    import tifffile

    files = sorted(p for p in path.iterdir() if p.suffix.lower() in _TIFF_SUFFIXES) if path.is_dir() else [path]
    slices, spacing = [], (1.0, 1.0, 1.0)
    for file in files:
        try:
            with tifffile.TiffFile(file) as tif:
                if not tif.pages:
                    raise InputFileError(f"{file}: empty TIFF (no pages)")
                if "S" in tif.series[0].axes:
                    raise InputFileError(f"{file}: colour (RGB) TIFF; expected grayscale slices")
                data = tif.asarray()
                if file == files[0]:
                    spacing = _tiff_spacing(tif)
        except read_errors() as error:
            raise InputFileError(f"{file}: empty or not a TIFF file ({one_line(error)})") from error
        if slices and data.shape[-2:] != slices[0].shape[-2:]:
            raise InputFileError(f"{file}: slice size {data.shape[-2:]} differs from {files[0].name}'s "
                                 f"{slices[0].shape[-2:]} (mixed sizes)")
        slices.append(data)
    volume = np.concatenate([s[None] if s.ndim == 2 else s for s in slices]) if len(files) > 1 else slices[0]
    return checked_volume(path, volume, allow_2d=True), VolumeInfo.diagonal(spacing, "tiff", path)


def _tiff_spacing(tif) -> tuple[float, float, float]:
    """(dz, dy, dx) in mm from ImageJ ``spacing``/``unit`` and the X/YResolution tags."""
    meta = tif.imagej_metadata or {}
    scale = {"mm": 1.0, "cm": 10.0, "micron": 1e-3, "um": 1e-3, "\\u00B5m": 1e-3, "µm": 1e-3}.get(
        str(meta.get("unit", "mm")), 1.0)
    page = tif.pages[0]

    def resolution(tag: str) -> float:
        value = page.tags.get(tag)
        if value is None:
            return 1.0
        numerator, denominator = value.value
        return float(denominator) / float(numerator) * scale if numerator else 1.0

    return (float(meta.get("spacing", 1.0 / scale)) * scale, resolution("YResolution"), resolution("XResolution"))


def check_destination(dest: Path) -> None:
    """Refuse, before any work, a destination below an existing file (it could never be created)."""
    for folder in Path(dest).parents:
        if folder.exists():
            if not folder.is_dir():
                raise OutputError(f"{dest}: cannot write: {folder} is a file, not a folder")
            return


def _atomic(dest: Path, write) -> Path:
    """Write through a hidden temporary sibling, then rename into place; missing parent folders are made."""
    check_destination(dest)
    staging = dest.parent / f".tmp-{os.getpid()}-{dest.name}"  # keeps the suffix writers look at
    with write_guard(dest):
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            write(staging)
            os.replace(staging, dest)
        finally:
            if staging.exists():  # False when it was never created (read-only folder, disk full at open)
                staging.unlink()
    return dest


def write_nifti(dest: Path, volume: np.ndarray, info: VolumeInfo) -> Path:
    """Write `volume` (Z, H, W) back in the source's array layout with the source's affine.

    With ``info.nifti`` the header gets the source's sform and qform with their codes and its
    spatial unit; without it (TIFF, npy sources) nibabel's defaults: sform code 2 (aligned),
    qform code 0, unit mm.
    """
    import nibabel as nib
    from nibabel.orientations import apply_orientation

    data = apply_orientation(np.asarray(volume, np.float32).transpose(2, 1, 0), np.asarray(info.to_source))
    image = nib.Nifti1Image(np.ascontiguousarray(data), np.asarray(info.affine))
    if info.nifti is None:
        image.header.set_xyzt_units("mm")
    else:
        image.set_qform(info.nifti.qform, code=info.nifti.qform_code)  # also sets pixdim (zooms)
        image.set_sform(info.nifti.sform, code=info.nifti.sform_code)
        image.header.set_xyzt_units(info.nifti.unit)
    return _atomic(dest, lambda tmp: nib.save(image, tmp))


def write_tiff(dest: Path, volume: np.ndarray, spacing: tuple[float, float, float]) -> Path:
    """ImageJ-style float32 TIFF stack with spacing (z) and resolution (y, x) in mm."""
    import tifffile

    dz, dy, dx = spacing
    return _atomic(dest, lambda tmp: tifffile.imwrite(tmp, np.asarray(volume, np.float32), imagej=True,
                                                      resolution=(1.0 / dx, 1.0 / dy),
                                                      metadata={"spacing": dz, "unit": "mm", "axes": "ZYX"}))


def write_npy(dest: Path, volume: np.ndarray, sidecar: dict) -> Path:
    """``.npy`` plus a JSON sidecar (``voxel_size_mm``, affine, normalisation) next to it."""
    _atomic(dest, lambda tmp: np.save(tmp, np.asarray(volume, np.float32)))
    _atomic(dest.with_suffix(".json"), lambda tmp: tmp.write_text(json.dumps(sidecar, indent=1)))
    return dest
