"""Reading and writing volume files: NIfTI, DICOM series, TIFF stacks and ``.npy``.

Every reader returns ``(volume, info)``: a float32 ``(Z, H, W)`` stack of axial
slices and a `VolumeInfo` that records what export needs to restore the file's
geometry exactly:

* NIfTI: the image is reoriented to the closest canonical (RAS+) orientation
  (``nib.as_closest_canonical``) and its last axis becomes z, so
  ``volume[k, j, i] = canonical[i, j, k]``. The original affine and the
  orientation transform back to the original array layout are recorded.
* DICOM: slices are ordered along the slice normal ``row_cos x col_cos`` by
  their ``ImagePositionPatient``, RescaleSlope/Intercept are applied, and an
  affine (RAS, as NIfTI) is built from position, orientation and spacing.
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
from mbir_batch.errors import InputFileError, one_line
from mbir_batch.output import write_guard

__all__ = ["VolumeInfo", "read_array", "read_volume", "write_nifti", "write_npy", "write_tiff"]

_IDENTITY_ORNT = [[0.0, 1.0], [1.0, 1.0], [2.0, 1.0]]
_TIFF_SUFFIXES = (".tif", ".tiff")


def _read_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "this file is unreadable or malformed" in the readers we use."""
    from nibabel.filebasedimages import ImageFileError
    from nibabel.spatialimages import HeaderDataError
    from pydicom.errors import InvalidDicomError
    from tifffile import TiffFileError

    return (OSError, EOFError, ValueError, TypeError, KeyError, AttributeError, zlib.error, struct.error,
            ImageFileError, HeaderDataError, InvalidDicomError, TiffFileError)


@dataclass(frozen=True)
class VolumeInfo:
    """Geometry of an imported volume file.

    Parameters
    ----------
    spacing : (dz, dy, dx) in mm.
    affine : 4x4 voxel-to-world (RAS mm) affine of the *source* array layout.
    to_source : nibabel orientation transform (3x2) from the layout ``volume.transpose(2, 1, 0)``
        to the source array layout (identity except for reoriented NIfTI).
    orientation : axis codes of the source affine, e.g. ``("L", "P", "S")``.
    kind : ``"nifti"``, ``"dicom"``, ``"tiff"`` or ``"npy"``.
    path : the file it came from.
    """

    spacing: tuple[float, float, float]
    affine: np.ndarray = field(default_factory=lambda: np.eye(4))
    to_source: np.ndarray = field(default_factory=lambda: np.array(_IDENTITY_ORNT))
    orientation: tuple[str, str, str] = ("R", "A", "S")
    kind: str = "npy"
    path: str = ""

    @classmethod
    def diagonal(cls, spacing: tuple[float, float, float], kind: str, path: str | Path) -> VolumeInfo:
        dz, dy, dx = spacing
        return cls(spacing=tuple(float(v) for v in spacing), affine=np.diag([dx, dy, dz, 1.0]), kind=kind,
                   path=str(path))

    def to_source_attrs(self) -> dict:
        """The ``source`` entry of the dataset's ``mbir`` attribute."""
        return {"kind": self.kind, "path": self.path, "affine": np.asarray(self.affine).tolist(),
                "to_source": np.asarray(self.to_source).tolist(), "orientation": list(self.orientation),
                "spacing_mm": list(self.spacing)}

    @classmethod
    def from_source_attrs(cls, source: dict | None, spacing: tuple[float, float, float]) -> VolumeInfo:
        """Inverse of `to_source_attrs`; a missing source gives a diagonal affine from `spacing`."""
        if not source or "affine" not in source:
            return cls.diagonal(spacing, (source or {}).get("kind", "npy"), (source or {}).get("path", ""))
        return cls(spacing=tuple(spacing), affine=np.asarray(source["affine"], dtype=np.float64),
                   to_source=np.asarray(source.get("to_source", _IDENTITY_ORNT), dtype=np.float64),
                   orientation=tuple(source.get("orientation", ("R", "A", "S"))), kind=source.get("kind", ""),
                   path=source.get("path", ""))


def _checked(path: Path, data: np.ndarray, *, allow_2d: bool = False) -> np.ndarray:
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
    """Read a NIfTI file, DICOM series folder, TIFF stack (file or folder) or ``.npy`` file."""
    path = Path(path)
    if not path.exists():
        raise InputFileError(f"{path}: no such file or directory")
    name = path.name.lower()
    if path.is_dir():
        if any(p.suffix.lower() in _TIFF_SUFFIXES for p in path.iterdir()):
            return _read_tiff(path)
        return _read_dicom_series(path)
    if name.endswith((".nii", ".nii.gz")):
        return _read_nifti(path)
    if name.endswith(_TIFF_SUFFIXES):
        return _read_tiff(path)
    if name.endswith(".npy"):
        data = read_array(path)
        return _checked(path, data), VolumeInfo.diagonal(_sidecar_spacing(path), "npy", path)
    raise InputFileError(f"{path}: unknown volume format; expected .nii, .nii.gz, .tif, .tiff, .npy "
                         f"or a DICOM series folder")


def read_array(path: Path) -> np.ndarray:
    """A raw array from ``.npy`` or a TIFF file (for sinograms and k-space), unchecked."""
    try:
        if path.suffix.lower() in _TIFF_SUFFIXES:
            import tifffile

            return tifffile.imread(path)
        return np.load(path, allow_pickle=False)
    except _read_errors() as error:
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
    except _read_errors() as error:
        raise InputFileError(f"{path}: not a readable NIfTI file ({one_line(error)})") from error
    volume = _checked(path, data).transpose(2, 1, 0)
    zooms = [float(f"{float(v):.6g}") for v in canonical.header.get_zooms()[:3]]  # float32 header noise
    to_source = ornt_transform(axcodes2ornt(("R", "A", "S")), io_orientation(image.affine))
    info = VolumeInfo(spacing=(zooms[2], zooms[1], zooms[0]), affine=np.asarray(image.affine, dtype=np.float64),
                      to_source=to_source, orientation=tuple(aff2axcodes(image.affine)), kind="nifti",
                      path=str(path))
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
        except _read_errors() as error:
            raise InputFileError(f"{file}: empty or not a TIFF file ({one_line(error)})") from error
        if slices and data.shape[-2:] != slices[0].shape[-2:]:
            raise InputFileError(f"{file}: slice size {data.shape[-2:]} differs from {files[0].name}'s "
                                 f"{slices[0].shape[-2:]} (mixed sizes)")
        slices.append(data)
    volume = np.concatenate([s[None] if s.ndim == 2 else s for s in slices]) if len(files) > 1 else slices[0]
    return _checked(path, volume, allow_2d=True), VolumeInfo.diagonal(spacing, "tiff", path)


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


def _read_dicom_series(folder: Path) -> tuple[np.ndarray, VolumeInfo]:
    import pydicom
    from pydicom.errors import InvalidDicomError

    datasets = []
    for file in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
        try:
            datasets.append((file, pydicom.dcmread(file)))
        except InvalidDicomError:
            continue  # README, DICOMDIR companions and other non-DICOM files are ignored
        except _read_errors() as error:
            raise InputFileError(f"{file}: unreadable DICOM file ({one_line(error)})") from error
    datasets = [(f, ds) for f, ds in datasets if "PixelData" in ds]
    if not datasets:
        raise InputFileError(f"{folder}: no DICOM image files found")
    series = {str(ds.get("SeriesInstanceUID", "")) for _, ds in datasets}
    if len(series) > 1:
        raise InputFileError(f"{folder}: holds {len(series)} DICOM series; point to a folder with one series")
    first_file, first = datasets[0]
    for file, ds in datasets:
        if int(ds.get("NumberOfFrames", 1) or 1) > 1:
            raise InputFileError(f"{file}: multi-frame DICOM is not supported; use one file per slice")
        for key in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
            if key not in ds:
                raise InputFileError(f"{file}: has no {key}; cannot place the slice")
        if (ds.Rows, ds.Columns) != (first.Rows, first.Columns):
            raise InputFileError(f"{file}: slice size {ds.Rows}x{ds.Columns} differs from {first_file.name}'s "
                                 f"{first.Rows}x{first.Columns} (mixed sizes)")
        if not np.allclose([float(v) for v in ds.ImageOrientationPatient],
                           [float(v) for v in first.ImageOrientationPatient], atol=1e-4) or \
                not np.allclose([float(v) for v in ds.PixelSpacing], [float(v) for v in first.PixelSpacing]):
            raise InputFileError(f"{file}: orientation or pixel spacing differs from {first_file.name}")
    orientation = np.array([float(v) for v in first.ImageOrientationPatient])
    row_cos, col_cos = orientation[:3], orientation[3:]
    normal = np.cross(row_cos, col_cos)
    positions = np.array([[float(v) for v in ds.ImagePositionPatient] for _, ds in datasets])
    order = np.argsort(positions @ normal)
    datasets, positions = [datasets[i] for i in order], positions[order]
    dz = _check_slice_spacing([f for f, _ in datasets], positions @ normal, folder)
    slices = []
    for file, ds in datasets:
        try:
            pixels = ds.pixel_array.astype(np.float32)
        except _read_errors() + (RuntimeError, NotImplementedError) as error:
            raise InputFileError(f"{file}: cannot decode pixel data ({one_line(error)})") from error
        slope, intercept = float(ds.get("RescaleSlope", 1.0)), float(ds.get("RescaleIntercept", 0.0))
        slices.append(pixels * slope + intercept)
    dy, dx = (float(v) for v in first.PixelSpacing)
    step = (positions[-1] - positions[0]) / (len(positions) - 1) if len(positions) > 1 else normal * dz
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2], lps[:3, 3] = row_cos * dx, col_cos * dy, step, positions[0]
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    from nibabel.orientations import aff2axcodes

    info = VolumeInfo(spacing=(dz, dy, dx), affine=affine, orientation=tuple(aff2axcodes(affine)), kind="dicom",
                      path=str(folder))
    return _checked(folder, np.stack(slices)), info


def _check_slice_spacing(files: list[Path], heights: np.ndarray, folder: Path) -> float:
    """Slice spacing along the normal; errors on duplicates, gaps (missing slices) or uneven spacing."""
    if len(heights) == 1:
        return 1.0
    gaps = np.diff(heights)
    dup = int(np.argmin(gaps))
    if gaps[dup] < 1e-3:
        raise InputFileError(f"{files[dup + 1]}: same slice position as {files[dup].name} (duplicate slice)")
    spacing = float(gaps.min())
    if gaps.max() - spacing > 0.01 * spacing + 1e-4:
        worst = int(np.argmax(gaps))
        problem = "missing slice(s)" if gaps[worst] > 1.5 * spacing else "uneven slice spacing"
        raise InputFileError(f"{folder}: {problem}: gap of {gaps[worst]:.3g} mm between {files[worst].name} and "
                             f"{files[worst + 1].name}, expected {spacing:.3g} mm")
    return float(np.mean(gaps))


def _atomic(dest: Path, write) -> Path:
    """Write through a hidden temporary sibling, then rename into place."""
    staging = dest.parent / f".tmp-{os.getpid()}-{dest.name}"  # keeps the suffix writers look at
    try:
        with write_guard(dest):
            dest.parent.mkdir(parents=True, exist_ok=True)
            write(staging)
            os.replace(staging, dest)
    finally:
        staging.unlink(missing_ok=True)
    return dest


def write_nifti(dest: Path, volume: np.ndarray, info: VolumeInfo) -> Path:
    """Write `volume` (Z, H, W) back in the source's array layout with the source's affine."""
    import nibabel as nib
    from nibabel.orientations import apply_orientation

    data = apply_orientation(np.asarray(volume, np.float32).transpose(2, 1, 0), np.asarray(info.to_source))
    image = nib.Nifti1Image(np.ascontiguousarray(data), np.asarray(info.affine))
    image.header.set_xyzt_units("mm")
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
