"""Shared fixtures for the pipeline tests: tiny datasets, file hashing, the CLI runner, a tiny denoiser and
the 8-slice CT problem of the solver tests."""
from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from mbir_batch.dataset import DatasetMeta, create_dataset, open_dataset
from mbir_batch.output import OutputStore


def hash_tree(path: Path) -> dict[str, str]:
    """sha256 of every file under `path` (or of `path` itself), keyed by relative path."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p.relative_to(path.parent)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.fixture
def tree_hash() -> Callable[[Path], dict[str, str]]:
    """`hash_tree` as a fixture: compare before/after to prove a store was not written."""
    return hash_tree


def copy_reference_as_output(dataset: Path, out: Path) -> Path:
    """Stand-in for a job: copy the dataset's reference into an output store and mark it complete."""
    ds = open_dataset(dataset)
    store = OutputStore.create(out, input_path=dataset, shape=ds.meta.volume_shape, chunk_z=ds.chunk_z)
    for z0 in range(0, ds.depth, ds.chunk_z):
        store.write_slab(z0, ds.read_reference(z0, min(z0 + ds.chunk_z, ds.depth)))
    store.mark_complete({"method": "copy"})
    return out


@pytest.fixture
def fake_reconstruction() -> Callable[[Path, Path], Path]:
    """`copy_reference_as_output` as a fixture: a complete output without running a job."""
    return copy_reference_as_output


@pytest.fixture
def ct_meta() -> Callable[..., DatasetMeta]:
    """Factory for the `DatasetMeta` of the tiny CT datasets of `make_ct_dataset`."""
    return tiny_ct_meta


def tiny_ct_meta(depth: int = 12, size: int = 8, views: int = 4, det_count: int = 13) -> DatasetMeta:
    angles = [180.0 * k / views for k in range(views)]
    return DatasetMeta(modality="ct", volume_shape=(depth, size, size), voxel_size_mm=(2.0, 0.5, 0.5),
                       geometry={"kind": "parallel", "angles_deg": angles, "det_count": det_count,
                                 "det_spacing": 1.0})


@pytest.fixture
def make_ct_dataset(tmp_path: Path) -> Callable[..., Path]:
    """Factory for a tiny CT dataset (random sinogram, no projector needed); returns its path."""

    def make(name: str = "ct.zarr", *, depth: int = 12, chunk_z: int = 4, reference: bool = True) -> Path:
        meta = tiny_ct_meta(depth=depth)
        rng = np.random.default_rng(0)
        sinogram = rng.random(meta.measurement_shape, dtype=np.float32)
        volume = rng.random(meta.volume_shape, dtype=np.float32) if reference else None
        create_dataset(tmp_path / name, meta, sinogram=sinogram, reference=volume, chunk_z=chunk_z)
        return tmp_path / name

    return make


@pytest.fixture
def make_mri_dataset(tmp_path: Path) -> Callable[..., Path]:
    """Factory for a tiny MRI dataset with a 2D (or 3D) mask; returns its path."""

    def make(name: str = "mri.zarr", *, depth: int = 6, size: int = 8, mask_3d: bool = False) -> Path:
        meta = DatasetMeta(modality="mri", volume_shape=(depth, size, size),
                           geometry={"kind": "cartesian", "mask": "mask"})
        rng = np.random.default_rng(1)
        mask = rng.random((depth, size, size) if mask_3d else (size, size)) < 0.4
        kspace = (rng.standard_normal((depth, size, size)) + 1j * rng.standard_normal((depth, size, size))) * mask
        create_dataset(tmp_path / name, meta, kspace=kspace, mask=mask, chunk_z=4)
        return tmp_path / name

    return make


@pytest.fixture
def run_cli() -> Callable[..., tuple[int, str]]:
    """Run ``mbir-batch ARGS`` in-process; returns (exit code, stderr)."""
    from mbir_batch.cli import app
    from typer.testing import CliRunner

    runner = CliRunner()

    def run(*args: str) -> tuple[int, str]:
        result = runner.invoke(app, [str(a) for a in args])
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            raise result.exception
        return result.exit_code, result.stderr

    return run


def write_dicom_series(folder: Path, volume_hu: np.ndarray, *, spacing=(2.5, 0.8, 0.6), origin=(-10.0, 20.0, 5.0),
                       positions: list[float] | None = None, slope: float = 1.0, intercept: float = -1024.0,
                       sizes: list[tuple[int, int]] | None = None) -> list[Path]:
    """Write a synthetic axial CT series (uint16 pixels, rescale slope/intercept) in shuffled file order.

    `positions` overrides the slice heights (mm along z) to make gaps; `sizes` the (rows, cols) per slice.
    """
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    dz, dy, dx = spacing
    series = generate_uid()
    heights = positions if positions is not None else [origin[2] + k * dz for k in range(len(volume_hu))]
    files = []
    for k, height in enumerate(heights):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        file = folder / f"img{(k * 7) % len(heights):03d}_{k}.dcm"  # names do not follow slice order
        ds = FileDataset(str(file), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.SeriesInstanceUID, ds.Modality = series, "CT"
        pixels = volume_hu[k] if sizes is None else np.zeros(sizes[k])
        ds.Rows, ds.Columns = pixels.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.ImagePositionPatient = [origin[0], origin[1], float(height)]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [dy, dx]
        ds.SliceThickness = dz
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        ds.PixelData = np.round((pixels - intercept) / slope).astype(np.uint16).tobytes()
        ds.save_as(file, enforce_file_format=True)
        files.append(file)
    return files


@pytest.fixture
def dicom_series() -> Callable[..., list[Path]]:
    """`write_dicom_series` as a fixture."""
    return write_dicom_series


@pytest.fixture(scope="module")
def tiny_denoiser():
    """A random-init 16^2 network: a test fixture to exercise the plumbing, never a fallback."""
    from mbir_batch.kernels.denoiser import Denoiser, DenoiserConfig

    torch.manual_seed(0)
    return Denoiser(DenoiserConfig(resolution=16, channels=(8, 16), norm_groups=4)).eval()


@pytest.fixture(scope="module")
def ct(tmp_path_factory):
    """The operator and 8-view sinogram of an 8 x 16 x 16 phantom (slabs cut from it by the solver tests)."""
    from mbir_batch.io import simulate_measurements
    from mbir_batch.kernels.operators import operator_from_geometry
    from mbir_batch.phantoms import make_phantom

    volume = make_phantom(3, 16, 8)
    sim = simulate_measurements(volume, seed=1, task="svct", views=8)
    operator = operator_from_geometry(sim.modality, sim.geometry, volume.shape,
                                      cache_dir=tmp_path_factory.mktemp("radon"))
    return operator, torch.as_tensor(np.asarray(sim.measurements))
