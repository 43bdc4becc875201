"""Real data in and out: import volumes, sinograms and k-space; export reconstructions.

``import_volume`` turns a NIfTI / DICOM / TIFF / npy volume into a dataset.zarr:
the volume is normalised to [0, 1] (explicitly: a CT HU window, an MRI
percentile or the maximum), measurements are simulated from it with the
project's own operators (`simulate_measurements`), and it is stored as the
``reference``. Spacing, affine and orientation go to ``mbir.source`` and the
intensity mapping to ``mbir.normalization``, so `export_volume` can write a
reconstruction back in the original intensity units and geometry.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
from mbir_batch.dataset import DatasetMeta, create_dataset
from mbir_batch.errors import ConfigError, InputFileError, OutputError, one_line
from mbir_batch.output import open_output
from mbir_batch.volume_files import (
    VolumeInfo,
    check_destination,
    read_array,
    read_volume,
    write_nifti,
    write_npy,
    write_tiff,
)

__all__ = [
    "EXPORT_FORMATS",
    "TASKS",
    "Normalization",
    "SimulatedMeasurements",
    "VolumeInfo",
    "choose_normalization",
    "export_volume",
    "import_kspace",
    "import_sinogram",
    "import_volume",
    "read_volume",
    "simulate_measurements",
]

TASKS = ("svct", "lact", "csmri")
EXPORT_FORMATS = {"nifti": ".nii.gz", "tiff": ".tif", "npy": ".npy"}
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class Normalization:
    """Affine intensity map to [0, 1]: ``x01 = clip((x - lo) / (hi - lo), 0, 1)``; inverted on export.

    `kind` records how (lo, hi) were chosen: ``"hu_window"`` (given), ``"percentile"``
    (hi = the `percentile`-th percentile), ``"max"`` (hi = max) or ``"none"`` (already in [0, 1]).
    """

    kind: str
    lo: float
    hi: float
    percentile: float | None = None

    def apply(self, volume: np.ndarray) -> np.ndarray:
        return np.clip((volume - self.lo) / (self.hi - self.lo), 0.0, 1.0).astype(np.float32)

    def invert(self, volume: np.ndarray) -> np.ndarray:
        return (self.lo + np.asarray(volume, np.float32) * (self.hi - self.lo)).astype(np.float32)

    def to_attrs(self) -> dict:
        attrs = {"kind": self.kind, "lo": float(self.lo), "hi": float(self.hi)}
        return attrs | ({"percentile": float(self.percentile)} if self.percentile is not None else {})

    @classmethod
    def from_attrs(cls, attrs: dict | None) -> Normalization:
        if not attrs:
            return cls("none", 0.0, 1.0)
        return cls(attrs["kind"], float(attrs["lo"]), float(attrs["hi"]), attrs.get("percentile"))


def choose_normalization(volume: np.ndarray, where: Path, *, hu_window: tuple[float, float] | None = None,
                         percentile: float | None = None, use_max: bool = False) -> Normalization:
    """The explicit normalisation the user asked for; none given is allowed only for [0, 1] data."""
    if sum(x is not None and x is not False for x in (hu_window, percentile, use_max)) > 1:
        raise ConfigError("--hu-window, --percentile and --max exclude each other; give one")
    lo_data = min(float(volume.min()), 0.0)
    if hu_window is not None:
        lo, hi = (float(v) for v in hu_window)
        if not hi > lo:
            raise ConfigError(f"--hu-window: upper bound {hi} must exceed lower bound {lo}")
        return Normalization("hu_window", lo, hi)
    if percentile is not None:
        if not 0 < percentile <= 100:
            raise ConfigError(f"--percentile: must be in (0, 100], got {percentile}")
        norm = Normalization("percentile", lo_data, float(np.percentile(volume, percentile)), float(percentile))
    elif use_max:
        norm = Normalization("max", lo_data, float(volume.max()))
    elif volume.min() >= 0.0 and volume.max() <= 1.0:
        return Normalization("none", 0.0, 1.0)
    else:
        raise InputFileError(f"{where}: intensities span [{volume.min():.4g}, {volume.max():.4g}], not [0, 1]; "
                             f"choose a normalisation: --hu-window LO HI (CT), --percentile P or --max (MRI)")
    if not norm.hi > norm.lo:
        raise InputFileError(f"{where}: the volume is constant ({norm.hi:.4g}); nothing to reconstruct")
    return norm


class SimulatedMeasurements(NamedTuple):
    """Result of `simulate_measurements`; unpacks as ``(geometry, modality, measurements, mask)``."""

    geometry: dict
    modality: str
    measurements: np.ndarray
    mask: np.ndarray | None

    @property
    def sinogram(self) -> np.ndarray | None:
        return self.measurements if self.modality == "ct" else None

    @property
    def kspace(self) -> np.ndarray | None:
        return self.measurements if self.modality == "mri" else None


def task_angles(task: str, views: int | None, arc: float) -> list[float]:
    """svct: `views` (default 8) angles uniform over [0, 180); lact: `views` (default 1/degree) over [0, arc)."""
    if task == "svct":
        views, arc = (8 if views is None else views), 180.0
    elif not 0 < arc <= 360:
        raise ConfigError(f"--arc: must be in (0, 360] degrees, got {arc}")
    views = max(1, round(arc)) if views is None else views
    if views < 1:
        raise ConfigError(f"--views: must be >= 1, got {views}")
    return [arc * k / views for k in range(views)]


def simulate_measurements(volume: np.ndarray, *, task: str, views: int | None = 8, arc: float = 90.0,
                          accel: float = 4.0, noise: float = 0.0, seed: int = 0, det_spacing: float = 1.0,
                          progress: Progress | None = None) -> SimulatedMeasurements:
    """Measurements of a [0, 1] volume (Z, H, W) with the project's operators (DESIGN.md contract).

    CT (svct, lact): ``y = A x + noise * n`` with `ParallelBeam` and ``det_count =
    ceil(hypot(H, W) / det_spacing) + 1`` bins (`default_det_count`: covers the slice diagonal). MRI (csmri):
    ``y = M (F x + noise * (n_r + i n_i) / sqrt(2))`` with a Gaussian 1D mask of
    acceleration `accel`. ``n`` is standard normal from ``numpy.random.default_rng(seed)``.
    """
    import torch

    if task not in TASKS:
        raise ConfigError(f"--task: unknown task {task!r}; choose one of {', '.join(TASKS)}")
    if noise < 0:
        raise ConfigError(f"--noise: must be >= 0, got {noise}")
    volume = np.asarray(volume, np.float32)
    depth, height, width = volume.shape
    rng = np.random.default_rng(seed)
    from mbir_batch.kernels.operators import default_det_count, operator_from_geometry

    if task == "csmri":
        from mbir_batch.kernels.mri import gaussian_1d_mask

        if not accel >= 1:
            raise ConfigError(f"--accel: must be >= 1, got {accel}")
        mask = gaussian_1d_mask((height, width), accel, seed=seed)
        geometry, modality = {"kind": "cartesian", "mask": "mask"}, "mri"
    else:
        angles = task_angles(task, views, arc)
        det_count = default_det_count((height, width), det_spacing)
        geometry = {"kind": "parallel", "angles_deg": angles, "det_count": det_count, "det_spacing": det_spacing}
        modality, mask = "ct", None
    operator = operator_from_geometry(modality, geometry, volume.shape, mask=mask)
    slabs = []
    with torch.no_grad():
        for z0 in range(0, depth, 16):
            slabs.append(operator.A(torch.from_numpy(volume[z0:z0 + 16])).numpy())
            if progress is not None:
                progress(min(z0 + 16, depth), depth)
    measured = np.concatenate(slabs)
    if noise > 0 and modality == "ct":
        measured = measured + noise * rng.standard_normal(measured.shape, dtype=np.float32)
    elif noise > 0:
        complex_noise = rng.standard_normal(measured.shape) + 1j * rng.standard_normal(measured.shape)
        measured = (measured + noise / math.sqrt(2) * complex_noise) * mask.numpy()
    dtype = np.float32 if modality == "ct" else np.complex64
    return SimulatedMeasurements(geometry, modality, measured.astype(dtype),
                                 None if mask is None else mask.numpy().astype(bool))


def _check_out(src: Path, out: Path, overwrite: bool) -> None:
    """Fail fast, before any heavy work, on an output that would be refused anyway."""
    if out.resolve() == src.resolve() or out.resolve() in src.resolve().parents:
        raise OutputError(f"{out}: the dataset would overwrite its own source {src}")
    if out.exists() and not overwrite:
        raise OutputError(f"{out}: already exists; pass --overwrite to replace it")
    check_destination(out)


def import_volume(src: str | Path, out: str | Path, *, task: str = "svct", views: int | None = None,
                  arc: float = 90.0, accel: float = 4.0, noise: float = 0.0,
                  hu_window: tuple[float, float] | None = None, percentile: float | None = None,
                  use_max: bool = False, seed: int = 0, chunk_z: int = 8, overwrite: bool = False,
                  progress: Progress | None = None) -> Path:
    """Volume file -> dataset.zarr with simulated measurements and the normalised volume as reference."""
    src, out = Path(src), Path(out)
    _check_out(src, out, overwrite)
    volume, info = read_volume(src)
    norm = choose_normalization(volume, src, hu_window=hu_window, percentile=percentile, use_max=use_max)
    reference = norm.apply(volume)
    simulated = simulate_measurements(reference, task=task, views=views, arc=arc, accel=accel, noise=noise,
                                      seed=seed, progress=progress)
    meta = DatasetMeta(modality=simulated.modality, geometry=simulated.geometry, volume_shape=volume.shape,
                       voxel_size_mm=info.spacing, noise_sigma=noise, normalization=norm.to_attrs(),
                       source=info.to_source_attrs() | {"task": task})
    create_dataset(out, meta, sinogram=simulated.sinogram, kspace=simulated.kspace, mask=simulated.mask,
                   reference=reference, chunk_z=chunk_z, overwrite=overwrite)
    return out


_GEOMETRY_FILE_KEYS = {"angles_deg", "views", "arc", "det_spacing", "image_size", "voxel_size_mm", "noise_sigma"}


def load_geometry_file(path: str | Path) -> dict:
    """A CT geometry YAML: ``angles_deg`` (or ``views`` + ``arc``), ``det_spacing``, ``image_size``,
    ``voxel_size_mm``, ``noise_sigma``; unknown keys are errors naming the key."""
    import yaml

    path = Path(path)
    try:
        geometry = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as error:
        raise ConfigError(f"{path}: cannot read the geometry file ({one_line(error)})") from error
    if not isinstance(geometry, dict):
        raise ConfigError(f"{path}: expected a mapping of geometry keys, got {type(geometry).__name__}")
    unknown = sorted(set(geometry) - _GEOMETRY_FILE_KEYS)
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {', '.join(unknown)}; "
                          f"allowed: {', '.join(sorted(_GEOMETRY_FILE_KEYS))}")
    if "angles_deg" not in geometry and "views" not in geometry:
        raise ConfigError(f"{path}: needs 'angles_deg' (a list) or 'views' (+ 'arc', default 180)")
    if "angles_deg" in geometry and not (isinstance(geometry["angles_deg"], list) and all(
            isinstance(a, (int, float)) and not isinstance(a, bool) for a in geometry["angles_deg"])):
        raise ConfigError(f"{path}: angles_deg: expected a list of numbers, got {geometry['angles_deg']!r}")
    for key in ("views", "arc", "det_spacing", "noise_sigma"):
        if key in geometry and (isinstance(geometry[key], bool) or not isinstance(geometry[key], (int, float))):
            raise ConfigError(f"{path}: {key}: expected a number, got {geometry[key]!r}")
    if "angles_deg" not in geometry:
        geometry["angles_deg"] = task_angles("lact", int(geometry.pop("views")), float(geometry.pop("arc", 180.0)))
    return geometry


def import_sinogram(src: str | Path, out: str | Path, *, angles_deg: list[float] | None = None,
                    det_spacing: float | None = None, geometry_file: str | Path | None = None,
                    image_size: int | tuple[int, int] | None = None,
                    voxel_size_mm: tuple[float, float, float] | None = None, noise_sigma: float | None = None,
                    chunk_z: int = 8, overwrite: bool = False) -> Path:
    """Sinogram (Z, views, det) from .npy/.tiff -> dataset.zarr (no reference)."""
    src, out = Path(src), Path(out)
    _check_out(src, out, overwrite)
    geometry = load_geometry_file(geometry_file) if geometry_file is not None else {}
    if angles_deg is not None:
        if geometry_file is not None:
            raise ConfigError("give the angles either in --geometry or with --angles-deg, not both")
        geometry["angles_deg"] = list(angles_deg)
    if "angles_deg" not in geometry:
        raise ConfigError("a sinogram import needs its angles: --geometry FILE.yaml or --angles-deg")
    sinogram = read_array(src)
    if sinogram.ndim == 2:
        sinogram = sinogram[None]
    if sinogram.ndim != 3 or sinogram.dtype.kind not in "iuf" or sinogram.size == 0:
        raise InputFileError(f"{src}: expected a real (Z, views, detector) sinogram, got {sinogram.dtype} "
                             f"{sinogram.shape}")
    if not np.isfinite(sinogram).all():
        raise InputFileError(f"{src}: contains NaN/Inf values")
    depth, views, det_count = sinogram.shape
    if views != len(geometry["angles_deg"]):
        raise InputFileError(f"{src}: has {views} views (axis 1) but the geometry lists "
                             f"{len(geometry['angles_deg'])} angles")
    spacing = float(det_spacing if det_spacing is not None else geometry.get("det_spacing", 1.0))
    if not spacing > 0:
        raise ConfigError(f"det_spacing (--det-spacing or the geometry file): must be > 0, got {spacing}")
    size = image_size if image_size is not None else geometry.get("image_size", int(det_count * spacing / math.sqrt(2)))
    height, width = (size, size) if isinstance(size, int) else tuple(int(v) for v in size)
    if min(height, width) < 1:
        raise ConfigError(f"image_size (--size or the geometry file): must be >= 1, got {size}")
    meta = DatasetMeta(modality="ct", volume_shape=(depth, height, width),
                       voxel_size_mm=tuple(voxel_size_mm or geometry.get("voxel_size_mm", (1.0, 1.0, 1.0))),
                       noise_sigma=float(noise_sigma if noise_sigma is not None else geometry.get("noise_sigma", 0)),
                       geometry={"kind": "parallel", "angles_deg": [float(a) for a in geometry["angles_deg"]],
                                 "det_count": det_count, "det_spacing": spacing},
                       source={"kind": "sinogram", "path": str(src)})
    create_dataset(out, meta, sinogram=sinogram, chunk_z=chunk_z, overwrite=overwrite)
    return out


def _read_kspace(src: Path, key: str, mask_key: str) -> tuple[np.ndarray, np.ndarray | None]:
    if src.suffix.lower() not in (".h5", ".hdf5"):
        return read_array(src), None
    import h5py

    try:
        with h5py.File(src, "r") as handle:
            if key not in handle:
                raise InputFileError(f"{src}: no dataset {key!r} (has {', '.join(handle.keys()) or 'nothing'})")
            return np.asarray(handle[key]), (np.asarray(handle[mask_key]) if mask_key in handle else None)
    except OSError as error:
        raise InputFileError(f"{src}: not a readable HDF5 file ({one_line(error)})") from error


def import_kspace(src: str | Path, out: str | Path, *, mask_path: str | Path | None = None, key: str = "kspace",
                  mask_key: str = "mask", voxel_size_mm: tuple[float, float, float] = (1.0, 1.0, 1.0),
                  noise_sigma: float = 0.0, chunk_z: int = 8, overwrite: bool = False) -> Path:
    """Centred single-coil k-space (Z, H, W) from .npy/.h5 plus a mask -> dataset.zarr.

    The mask may be (W,) (phase-encode lines), (H, W) or (Z, H, W); k-space outside it
    is zeroed (retrospective undersampling of fully sampled data).
    """
    src, out = Path(src), Path(out)
    _check_out(src, out, overwrite)
    kspace, mask = _read_kspace(src, key, mask_key)
    if mask_path is not None:
        mask = read_array(Path(mask_path))
    if mask is None:
        raise ConfigError(f"{src}: a k-space import needs a sampling mask: --mask mask.npy")
    if kspace.ndim == 2:
        kspace = kspace[None]
    if kspace.ndim != 3 or kspace.size == 0 or kspace.dtype.kind not in "fc":
        raise InputFileError(f"{src}: expected complex (Z, H, W) k-space, got {kspace.dtype} {kspace.shape}")
    if not np.isfinite(kspace).all():
        raise InputFileError(f"{src}: contains NaN/Inf values")
    depth, height, width = kspace.shape
    mask = np.asarray(mask) != 0
    if mask.shape == (width,):
        mask = np.broadcast_to(mask, (height, width))
    if mask.shape not in ((height, width), (depth, height, width)):
        raise InputFileError(f"{mask_path or src}: mask shape {mask.shape} does not fit k-space {kspace.shape}")
    meta = DatasetMeta(modality="mri", volume_shape=(depth, height, width), voxel_size_mm=tuple(voxel_size_mm),
                       noise_sigma=noise_sigma, geometry={"kind": "cartesian", "mask": "mask"},
                       source={"kind": "kspace", "path": str(src)})
    create_dataset(out, meta, kspace=kspace * mask, mask=mask, chunk_z=chunk_z, overwrite=overwrite)
    return out


def export_volume(output: str | Path, dest: str | Path | None = None, *, to: str = "nifti",
                  overwrite: bool = False) -> Path:
    """Write a complete reconstruction as NIfTI, TIFF or npy in the source's units and geometry."""
    output = Path(output)
    if to not in EXPORT_FORMATS:
        raise ConfigError(f"--to: unknown format {to!r}; choose one of {', '.join(EXPORT_FORMATS)}")
    store = open_output(output)
    dest = Path(dest) if dest is not None else output.with_name(output.name.removesuffix(".zarr") + EXPORT_FORMATS[to])
    if dest.exists() and not overwrite:
        raise OutputError(f"{dest}: already exists; pass --overwrite to replace it")
    if output.resolve() in dest.resolve().parents or dest.resolve() == output.resolve():
        raise OutputError(f"{dest}: would be written inside the output store {output}")
    check_destination(dest)
    dataset = store.attrs.get("dataset") or {}
    spacing = tuple(dataset.get("voxel_size_mm", (1.0, 1.0, 1.0)))
    norm = Normalization.from_attrs(dataset.get("normalization"))
    volume = norm.invert(store.read_volume())
    info = VolumeInfo.from_source_attrs(dataset.get("source"), spacing)
    if to == "nifti":
        return write_nifti(dest, volume, info)
    if to == "tiff":
        return write_tiff(dest, volume, spacing)
    return write_npy(dest, volume, {"voxel_size_mm": list(spacing), "affine": np.asarray(info.affine).tolist(),
                                    "normalization": norm.to_attrs(), "source": dataset.get("source"),
                                    "output": str(output), "method": store.attrs.get("method")})
