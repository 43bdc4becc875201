"""Import (NIfTI, DICOM, TIFF, npy, sinogram, k-space) and export with geometry preserved."""
from __future__ import annotations

import json
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
import tifffile
import torch
from mbir_batch.dataset import open_dataset
from mbir_batch.errors import ConfigError, InputFileError, OutputError
from mbir_batch.io import (
    Normalization,
    export_volume,
    import_kspace,
    import_sinogram,
    import_volume,
    read_volume,
    simulate_measurements,
)
from mbir_batch.output import OutputStore

# an oblique-free but permuted and flipped affine: array axes (P, S, L), zooms (0.7, 1.2, 2.5)
AFFINE = np.array([[0.0, 0.0, -2.5, 10.0], [-0.7, 0.0, 0.0, 5.0], [0.0, 1.2, 0.0, -3.0], [0.0, 0.0, 0.0, 1.0]])


@pytest.fixture
def nifti_hu(tmp_path) -> tuple[Path, np.ndarray]:
    data = np.random.default_rng(0).uniform(-900, 900, (10, 8, 6)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, AFFINE), tmp_path / "ct.nii.gz")
    return tmp_path / "ct.nii.gz", data


def test_nifti_reoriented_to_canonical_stack(nifti_hu):
    path, _ = nifti_hu
    volume, info = read_volume(path)
    canonical = nib.as_closest_canonical(nib.load(path))
    np.testing.assert_allclose(volume, np.asarray(canonical.dataobj).transpose(2, 1, 0), rtol=1e-6)
    assert volume.shape == (8, 10, 6) and info.spacing == (1.2, 0.7, 2.5)
    assert info.orientation == ("P", "S", "L") and info.kind == "nifti"


def test_nifti_round_trip_restores_affine_spacing_and_hu(fake_reconstruction, nifti_hu, tmp_path,
                                                         tree_hash):
    path, data = nifti_hu
    before = tree_hash(path)
    dataset = import_volume(path, tmp_path / "ds.zarr", task="svct", views=4, hu_window=(-1000, 1000))
    assert tree_hash(path) == before
    meta = open_dataset(dataset).meta
    assert meta.voxel_size_mm == (1.2, 0.7, 2.5) and meta.normalization["kind"] == "hu_window"
    assert len(meta.geometry["angles_deg"]) == 4 and meta.source["orientation"] == ["P", "S", "L"]
    output = fake_reconstruction(dataset, tmp_path / "ds.copy.zarr")
    exported = nib.load(export_volume(output, to="nifti"))
    assert exported.shape == data.shape
    np.testing.assert_allclose(exported.affine, AFFINE, atol=1e-6)
    np.testing.assert_allclose(exported.header.get_zooms()[:3], (0.7, 1.2, 2.5), rtol=1e-6)
    np.testing.assert_allclose(exported.get_fdata(), data, atol=1e-3)
    with pytest.raises(OutputError, match="already exists"):
        export_volume(output, to="nifti")


def test_export_tiff_and_npy_carry_spacing(fake_reconstruction, nifti_hu, tmp_path):
    path, _ = nifti_hu
    dataset = import_volume(path, tmp_path / "ds.zarr", task="csmri", accel=2, percentile=99.5)
    output = fake_reconstruction(dataset, tmp_path / "out.zarr")
    reference = open_dataset(dataset).read_reference(0, 8)
    norm = Normalization.from_attrs(open_dataset(dataset).meta.normalization)
    for to, suffix in (("tiff", ".tif"), ("npy", ".npy")):
        written = export_volume(output, tmp_path / f"vol{suffix}", to=to)
        volume, info = read_volume(written)
        np.testing.assert_allclose(volume, norm.invert(reference), rtol=1e-5, atol=1e-3)
        np.testing.assert_allclose(info.spacing, (1.2, 0.7, 2.5), rtol=1e-5)
    assert json.loads((tmp_path / "vol.json").read_text())["normalization"]["kind"] == "percentile"


def test_export_refuses_incomplete_output(make_ct_dataset, tmp_path):
    source = make_ct_dataset()
    OutputStore.create(tmp_path / "out.zarr", input_path=source, shape=(12, 8, 8), chunk_z=4)
    with pytest.raises(OutputError, match="incomplete"):
        export_volume(tmp_path / "out.zarr", to="npy")
    assert not (tmp_path / "out.npy").exists()


def test_dicom_series_sorted_rescaled_and_placed(tmp_path, dicom_series):
    hu = np.random.default_rng(1).integers(-1000, 2000, (5, 6, 7)).astype(np.float32)
    dicom_series(tmp_path / "series", hu, spacing=(2.5, 0.8, 0.6), slope=2.0, intercept=-2048.0)
    (tmp_path / "series" / "README.txt").write_text("not dicom")
    volume, info = read_volume(tmp_path / "series")
    np.testing.assert_allclose(volume, hu, atol=1.0)  # slope 2: values rounded to even HU
    assert info.spacing == pytest.approx((2.5, 0.8, 0.6)) and info.kind == "dicom"
    np.testing.assert_allclose(info.affine[:3, 3], [10.0, -20.0, 5.0])  # LPS origin -> RAS
    np.testing.assert_allclose(np.abs(np.diag(info.affine)[:3]), [0.6, 0.8, 2.5])


@pytest.mark.parametrize("case, match", [
    ("gap", "missing slice"), ("mixed", "mixed sizes"), ("duplicate", "duplicate slice"), ("none", "no DICOM"),
])
def test_dicom_series_errors(tmp_path, dicom_series, case, match):
    hu = np.zeros((4, 6, 6), np.float32)
    folder = tmp_path / "series"
    if case == "gap":
        dicom_series(folder, hu, positions=[0.0, 2.5, 7.5, 10.0])
    elif case == "mixed":
        dicom_series(folder, hu, sizes=[(6, 6), (6, 6), (6, 8), (6, 6)])
    elif case == "duplicate":
        dicom_series(folder, hu, positions=[0.0, 2.5, 2.5, 5.0])
    else:
        folder.mkdir()
        (folder / "notes.txt").write_text("hello")
    with pytest.raises(InputFileError, match=match) as info:
        read_volume(folder)
    assert str(folder) in str(info.value)


def test_tiff_stack_file_and_folder(tmp_path):
    volume = np.random.default_rng(2).random((4, 5, 6), dtype=np.float32)
    tifffile.imwrite(tmp_path / "stack.tif", volume, imagej=True, resolution=(1 / 0.5, 1 / 0.25),
                     metadata={"spacing": 3.0, "unit": "mm", "axes": "ZYX"})
    read, info = read_volume(tmp_path / "stack.tif")
    np.testing.assert_array_equal(read, volume)
    assert info.spacing == pytest.approx((3.0, 0.25, 0.5))
    (tmp_path / "slices").mkdir()
    for k in range(4):
        tifffile.imwrite(tmp_path / "slices" / f"s{k:02d}.tif", volume[k])
    np.testing.assert_array_equal(read_volume(tmp_path / "slices")[0], volume)
    tifffile.imwrite(tmp_path / "rgb.tif", np.zeros((5, 6, 3), np.uint8), photometric="rgb")
    with pytest.raises(InputFileError, match="RGB"):
        read_volume(tmp_path / "rgb.tif")


def test_simulate_measurements_follow_the_contract():
    volume = np.random.default_rng(3).random((3, 8, 8), dtype=np.float32)
    geometry, modality, sinogram, mask = simulate_measurements(volume, task="svct", views=4)
    assert modality == "ct" and mask is None and geometry["angles_deg"] == [0.0, 45.0, 90.0, 135.0]
    assert geometry["det_count"] >= int(np.ceil(np.sqrt(2) * 8)) and sinogram.shape == (3, 4, geometry["det_count"])
    lact = simulate_measurements(volume, task="lact", views=None, arc=60.0)
    assert len(lact.geometry["angles_deg"]) == 60 and max(lact.geometry["angles_deg"]) < 60.0
    mri = simulate_measurements(volume, task="csmri", accel=2, noise=0.01, seed=5)
    assert mri.kspace.dtype == np.complex64 and mri.mask.shape == (8, 8) and np.all(mri.kspace[:, ~mri.mask] == 0)
    clean = torch.fft.fftshift(torch.fft.fft2(torch.fft.ifftshift(torch.from_numpy(volume), dim=(-2, -1)),
                                              norm="ortho"), dim=(-2, -1)).numpy() * mri.mask
    assert 0 < np.abs(mri.kspace - clean).max() < 0.1


def test_import_sinogram_with_geometry_file(tmp_path, tree_hash):
    sinogram = np.random.default_rng(4).random((5, 6, 13), dtype=np.float32)
    np.save(tmp_path / "sino.npy", sinogram)
    (tmp_path / "geom.yaml").write_text("views: 6\narc: 180\ndet_spacing: 1.0\nimage_size: 9\n")
    before = tree_hash(tmp_path / "sino.npy")
    ds = open_dataset(import_sinogram(tmp_path / "sino.npy", tmp_path / "ds.zarr",
                                      geometry_file=tmp_path / "geom.yaml"))
    assert ds.meta.volume_shape == (5, 9, 9) and ds.meta.geometry["angles_deg"][1] == 30.0
    np.testing.assert_array_equal(ds.read_measurements(0, 5), sinogram)
    assert not ds.has_reference and tree_hash(tmp_path / "sino.npy") == before


@pytest.mark.parametrize("option, match", [
    ({"image_size": 0}, r"image_size \(--size or the geometry file\): must be >= 1, got 0"),
    ({"det_spacing": 0.0}, r"det_spacing \(--det-spacing or the geometry file\): must be > 0, got 0.0"),
], ids=["size", "det-spacing"])
def test_import_sinogram_rejects_zero_size_and_spacing(tmp_path, option, match):
    np.save(tmp_path / "sino.npy", np.ones((2, 4, 9), np.float32))
    with pytest.raises(ConfigError, match=match):  # --size 0 was taken as "not given" before
        import_sinogram(tmp_path / "sino.npy", tmp_path / "ds.zarr", angles_deg=[0, 45, 90, 135], **option)
    assert not (tmp_path / "ds.zarr").exists()


def test_import_kspace_npy_and_h5(tmp_path):
    rng = np.random.default_rng(5)
    kspace = (rng.standard_normal((3, 8, 8)) + 1j * rng.standard_normal((3, 8, 8))).astype(np.complex64)
    lines = np.zeros(8, bool)
    lines[[0, 3, 4]] = True
    np.save(tmp_path / "k.npy", kspace)
    np.save(tmp_path / "mask.npy", lines)
    ds = open_dataset(import_kspace(tmp_path / "k.npy", tmp_path / "a.zarr", mask_path=tmp_path / "mask.npy"))
    assert ds.read_mask(0, 3)[:, :, 3].all() and not ds.read_mask(0, 3)[:, :, 1].any()
    np.testing.assert_array_equal(ds.read_measurements(0, 3), kspace * lines)
    with h5py.File(tmp_path / "k.h5", "w") as handle:
        handle["kspace"], handle["mask"] = kspace, np.broadcast_to(lines, (8, 8))
    ds = open_dataset(import_kspace(tmp_path / "k.h5", tmp_path / "b.zarr"))
    np.testing.assert_array_equal(ds.read_measurements(0, 3), kspace * lines)


def test_cli_import_then_export(fake_reconstruction, run_cli, nifti_hu, tmp_path):
    path, _ = nifti_hu
    code, err = run_cli("import", path, "--out", tmp_path / "ds.zarr", "--views", "4", "--hu-window", "-1000", "1000")
    assert code == 0, err
    fake_reconstruction(tmp_path / "ds.zarr", tmp_path / "rec.zarr")
    code, err = run_cli("export", tmp_path / "rec.zarr", "--to", "nifti", "--dest", tmp_path / "rec.nii.gz")
    assert code == 0, err
    np.testing.assert_allclose(nib.load(tmp_path / "rec.nii.gz").affine, AFFINE, atol=1e-6)
