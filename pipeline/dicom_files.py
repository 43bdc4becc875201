"""Reading DICOM: a series folder or a single ``.dcm`` file as one float32 (Z, H, W) volume.

Slices are ordered along the slice normal ``row_cos x col_cos`` by their
``ImagePositionPatient``; RescaleSlope/Intercept are applied; the affine (RAS, as NIfTI; sform and
qform codes 1, scanner) is built from position, orientation and spacing. A lone slice's z spacing
is its SliceThickness (else SpacingBetweenSlices, else 1 mm). A folder must hold one series of
single-frame slices of one size, orientation and spacing, evenly spaced without gaps; anything
else is an `InputFileError` naming the file and the problem.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from mbir_batch.errors import InputFileError, one_line
from mbir_batch.volume_files import NiftiGeometry, VolumeInfo, checked_volume, read_errors

__all__ = ["read_dicom"]

SCANNER_CODE = 1
"""NIfTI xform code "scanner": scanner-based anatomical coordinates."""


def read_dicom(path: Path) -> tuple[np.ndarray, VolumeInfo]:
    """The volume and geometry of the DICOM series folder or single DICOM file at `path`."""
    return _stack_slices(_dicom_datasets(path), path)


def _dicom_datasets(path: Path) -> list:
    """(file, pydicom dataset) of the image files of one series: a folder, or a single file."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    else:
        files = [path]
    datasets = []
    for file in files:
        try:
            datasets.append((file, pydicom.dcmread(file)))
        except InvalidDicomError as error:
            if file == path:
                raise InputFileError(f"{file}: not a DICOM file ({one_line(error)})") from error
            continue  # README, DICOMDIR companions and other non-DICOM files in a folder are ignored
        except read_errors() as error:
            raise InputFileError(f"{file}: unreadable DICOM file ({one_line(error)})") from error
    datasets = [(f, ds) for f, ds in datasets if "PixelData" in ds]
    if not datasets:
        raise InputFileError(f"{path}: no DICOM image found (no file with pixel data)")
    series = {str(ds.get("SeriesInstanceUID", "")) for _, ds in datasets}
    if len(series) > 1:
        raise InputFileError(f"{path}: holds {len(series)} DICOM series; point to a folder with one series")
    return datasets


def _stack_slices(datasets: list, where: Path) -> tuple[np.ndarray, VolumeInfo]:
    """Stack (file, pydicom dataset) slices of one series into a volume; `where` names the input."""
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
    if len(datasets) == 1:
        dz = _single_slice_spacing(first_file, first)
    else:
        dz = _check_slice_spacing([f for f, _ in datasets], positions @ normal, where)
    slices = []
    for file, ds in datasets:
        try:
            pixels = ds.pixel_array.astype(np.float32)
        except read_errors() + (RuntimeError, NotImplementedError) as error:
            raise InputFileError(f"{file}: cannot decode pixel data ({one_line(error)})") from error
        slope, intercept = float(ds.get("RescaleSlope", 1.0)), float(ds.get("RescaleIntercept", 0.0))
        slices.append(pixels * slope + intercept)
    dy, dx = (float(v) for v in first.PixelSpacing)
    step = (positions[-1] - positions[0]) / (len(positions) - 1) if len(positions) > 1 else normal * dz
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2], lps[:3, 3] = row_cos * dx, col_cos * dy, step, positions[0]
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    from nibabel.orientations import aff2axcodes

    scanner = NiftiGeometry(affine, SCANNER_CODE, affine, SCANNER_CODE, "mm")
    info = VolumeInfo(spacing=(dz, dy, dx), affine=affine, orientation=tuple(aff2axcodes(affine)), kind="dicom",
                      path=str(where), nifti=scanner)
    return checked_volume(where, np.stack(slices)), info


def _single_slice_spacing(file: Path, dataset) -> float:
    """z spacing of a lone slice: SliceThickness, else SpacingBetweenSlices, else 1 mm (both empty or 0)."""
    for key in ("SliceThickness", "SpacingBetweenSlices"):
        raw = dataset.get(key)
        if raw is None or str(raw).strip() == "":
            continue
        try:
            value = float(raw)
        except (TypeError, ValueError) as error:
            raise InputFileError(f"{file}: {key} {str(raw)!r} is not a number") from error
        if value == 0:
            continue  # some writers put 0 for "not known"
        if not (np.isfinite(value) and value > 0):
            raise InputFileError(f"{file}: {key} must be a positive length in mm, got {value}")
        return value
    return 1.0


def _check_slice_spacing(files: list[Path], heights: np.ndarray, folder: Path) -> float:
    """Slice spacing along the normal; errors on duplicates, gaps (missing slices) or uneven spacing."""
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
