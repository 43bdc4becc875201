"""Volume files: a single DICOM file, one-slice z spacing, NIfTI sform/qform codes, destinations."""
from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from mbir_batch.errors import InputFileError, OutputError
from mbir_batch.io import export_volume, import_volume
from mbir_batch.volume_files import VolumeInfo, read_volume, write_nifti
from typer.testing import CliRunner


# sform: array axes (P, S, L), zooms (0.7, 1.2, 2.5); the qform is the same rotation with another origin
SFORM = np.array([[0.0, 0.0, -2.5, 10.0], [-0.7, 0.0, 0.0, 5.0], [0.0, 1.2, 0.0, -3.0], [0.0, 0.0, 0.0, 1.0]])
QFORM = SFORM + np.array([[0, 0, 0, 4.0], [0, 0, 0, -6.0], [0, 0, 0, 8.0], [0, 0, 0, 0]])
MNI, SCANNER = 4, 1


def save_nifti(path: Path, data: np.ndarray, *, sform_code: int, qform_code: int, unit: str = "mm") -> Path:
    """A NIfTI file whose header holds SFORM/QFORM with the given codes (nibabel would pick 2 and 0)."""
    image = nib.Nifti1Image(data, None)
    image.set_qform(QFORM, code=qform_code)
    image.set_sform(SFORM, code=sform_code)
    image.header.set_xyzt_units(unit)
    nib.save(image, path)
    return path


def edit_dicom(file: Path, **tags) -> None:
    """Set (value) or delete (None) DICOM tags of `file` in place."""
    dataset = pydicom.dcmread(file)
    for key, value in tags.items():
        if value is None:
            delattr(dataset, key)
        else:
            setattr(dataset, key, value)
    dataset.save_as(file)


# --- DICOM: one file, one slice ------------------------------------------------------------------

def test_single_dcm_file_is_one_slice_with_slice_thickness(tmp_path, dicom_series):
    hu = np.random.default_rng(0).integers(-1000, 1000, (3, 6, 7)).astype(np.float32)
    files = dicom_series(tmp_path / "series", hu, spacing=(2.5, 0.8, 0.6))
    middle = next(f for f in files if pydicom.dcmread(f).ImagePositionPatient[2] == 5.0 + 2.5)
    volume, info = read_volume(middle)
    np.testing.assert_allclose(volume, hu[1:2], atol=0.5)  # that file only, not its series
    assert info.kind == "dicom" and info.path == str(middle)
    assert info.spacing == pytest.approx((2.5, 0.8, 0.6))
    np.testing.assert_allclose(info.affine[:3, 2], [0.0, 0.0, 2.5])  # z column: normal * SliceThickness
    np.testing.assert_allclose(info.affine[:3, 3], [10.0, -20.0, 7.5])  # LPS (-10, 20, 7.5) -> RAS


def test_dicom_file_without_suffix_is_recognised(tmp_path, dicom_series):
    [file] = dicom_series(tmp_path / "series", np.zeros((1, 4, 4), np.float32), spacing=(1.5, 1.0, 1.0))
    renamed = file.rename(tmp_path / "IM0001")
    assert read_volume(renamed)[1].spacing == pytest.approx((1.5, 1.0, 1.0))


@pytest.mark.parametrize("tags, dz", [
    ({}, 3.0),  # SliceThickness
    ({"SliceThickness": None, "SpacingBetweenSlices": 4.0}, 4.0),
    ({"SliceThickness": 0.0, "SpacingBetweenSlices": 4.0}, 4.0),  # 0 is "not known"
    ({"SliceThickness": None}, 1.0),  # nothing to go by
])
def test_one_slice_folder_z_spacing(tmp_path, dicom_series, tags, dz):
    [file] = dicom_series(tmp_path / "one", np.zeros((1, 4, 5), np.float32), spacing=(3.0, 0.5, 0.5))
    edit_dicom(file, **tags)
    volume, info = read_volume(tmp_path / "one")
    assert volume.shape == (1, 4, 5) and info.spacing == pytest.approx((dz, 0.5, 0.5))
    assert info.affine[2, 2] == pytest.approx(dz)


def test_one_slice_negative_thickness_is_an_error(tmp_path, dicom_series):
    [file] = dicom_series(tmp_path / "one", np.zeros((1, 4, 4), np.float32))
    edit_dicom(file, SliceThickness=-2.0)
    with pytest.raises(InputFileError, match="SliceThickness must be a positive length") as error:
        read_volume(file)
    assert str(file) in str(error.value)


def test_single_file_errors(tmp_path, dicom_series):
    (tmp_path / "fake.dcm").write_text("not dicom")
    with pytest.raises(InputFileError, match="fake.dcm: not a DICOM file"):
        read_volume(tmp_path / "fake.dcm")
    [file] = dicom_series(tmp_path / "one", np.zeros((1, 4, 4), np.float32))
    edit_dicom(file, PixelData=None)
    with pytest.raises(InputFileError, match="no DICOM image found"):
        read_volume(file)


def test_import_single_dcm_file_then_export_nifti_with_scanner_codes(fake_reconstruction, tmp_path, dicom_series,
                                                                    tree_hash):
    hu = np.random.default_rng(1).integers(-1000, 1000, (1, 6, 6)).astype(np.float32)
    [file] = dicom_series(tmp_path / "one", hu, spacing=(3.0, 0.5, 0.5))
    before = tree_hash(file)
    dataset = import_volume(file, tmp_path / "ds.zarr", views=4, hu_window=(-1000, 1000))
    assert tree_hash(file) == before
    exported = nib.load(export_volume(fake_reconstruction(dataset, tmp_path / "rec.zarr"), to="nifti"))
    assert exported.shape == (6, 6, 1)
    assert int(exported.header["sform_code"]) == SCANNER and int(exported.header["qform_code"]) == SCANNER
    np.testing.assert_allclose(exported.header.get_zooms()[:3], (0.5, 0.5, 3.0), rtol=1e-6)
    np.testing.assert_allclose(exported.get_fdata()[..., 0], hu[0].T, atol=0.1)


# --- NIfTI: sform/qform codes and units ------------------------------------------------------------

@pytest.mark.parametrize("sform_code, qform_code", [(MNI, SCANNER), (0, SCANNER), (SCANNER, 0), (2, 3)])
def test_nifti_export_keeps_sform_qform_and_codes(fake_reconstruction, tmp_path, sform_code, qform_code):
    data = np.random.default_rng(2).uniform(-900, 900, (10, 8, 6)).astype(np.float32)
    source = save_nifti(tmp_path / "ct.nii.gz", data, sform_code=sform_code, qform_code=qform_code)
    dataset = import_volume(source, tmp_path / "ds.zarr", views=4, hu_window=(-1000, 1000))
    recorded = nib.load(source).header
    from mbir_batch.dataset import open_dataset

    provenance = open_dataset(dataset).meta.source["nifti"]
    assert (provenance["sform_code"], provenance["qform_code"]) == (sform_code, qform_code)
    np.testing.assert_allclose(provenance["sform"], recorded.get_sform(), atol=1e-6)
    np.testing.assert_allclose(provenance["qform"], recorded.get_qform(), atol=1e-6)

    exported = nib.load(export_volume(fake_reconstruction(dataset, tmp_path / "rec.zarr"), to="nifti"))
    header = exported.header
    assert (int(header["sform_code"]), int(header["qform_code"])) == (sform_code, qform_code)
    np.testing.assert_allclose(header.get_sform(), recorded.get_sform(), atol=1e-5)
    np.testing.assert_allclose(header.get_qform(), QFORM, atol=1e-5)
    np.testing.assert_allclose(exported.affine, nib.load(source).affine, atol=1e-5)
    np.testing.assert_allclose(header.get_zooms()[:3], (0.7, 1.2, 2.5), rtol=1e-6)
    np.testing.assert_allclose(exported.get_fdata(), data, atol=1e-3)


def test_nifti_in_microns_gives_mm_spacing_and_exports_microns(tmp_path):
    data = np.random.default_rng(3).random((10, 8, 6), dtype=np.float32)
    source = save_nifti(tmp_path / "micro.nii", data, sform_code=SCANNER, qform_code=SCANNER, unit="micron")
    volume, info = read_volume(source)
    assert info.spacing == pytest.approx((1.2e-3, 0.7e-3, 2.5e-3))
    np.testing.assert_allclose(info.affine[:3, :], SFORM[:3, :] * 1e-3, atol=1e-9)  # VolumeInfo.affine is mm
    written = nib.load(write_nifti(tmp_path / "back.nii.gz", volume, info))
    assert written.header.get_xyzt_units()[0] == "micron"
    np.testing.assert_allclose(written.affine, SFORM, atol=1e-5)
    np.testing.assert_allclose(written.get_fdata(), data, rtol=1e-6)


def test_source_attrs_round_trip_and_old_datasets(tmp_path):
    source = save_nifti(tmp_path / "ct.nii.gz", np.ones((4, 4, 4), np.float32), sform_code=MNI, qform_code=0)
    info = read_volume(source)[1]
    back = VolumeInfo.from_source_attrs(info.to_source_attrs(), info.spacing)
    assert back.nifti.sform_code == MNI and back.nifti.qform_code == 0 and back.nifti.unit == "mm"
    np.testing.assert_array_equal(back.nifti.sform, info.nifti.sform)
    old = {k: v for k, v in info.to_source_attrs().items() if k != "nifti"}  # imported before the codes were kept
    written = nib.load(write_nifti(tmp_path / "old.nii.gz", np.ones((4, 4, 4), np.float32),
                                   VolumeInfo.from_source_attrs(old, info.spacing)))
    assert (int(written.header["sform_code"]), int(written.header["qform_code"])) == (2, 0)  # nibabel's default
    np.testing.assert_allclose(written.affine, SFORM, atol=1e-5)


# --- destinations ----------------------------------------------------------------------------------

@pytest.fixture
def read_only_folder(tmp_path) -> Iterator[Path]:
    """A folder nothing can be written to: chmod 0555, or for root (who ignores modes) a read-only tmpfs."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    mount = shutil.which("mount")
    if mount is None or subprocess.run([mount, "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)],
                                       capture_output=True).returncode != 0:
        pytest.skip("running as root (file modes do not stop root) and cannot mount a read-only tmpfs")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


@pytest.fixture
def exported_source(fake_reconstruction, tmp_path) -> Path:
    """A complete output store made from a tiny NIfTI import."""
    source = save_nifti(tmp_path / "ct.nii.gz", np.random.default_rng(4).random((6, 6, 4), dtype=np.float32),
                        sform_code=SCANNER, qform_code=SCANNER)
    return fake_reconstruction(import_volume(source, tmp_path / "ds.zarr", views=4), tmp_path / "rec.zarr")


@pytest.mark.parametrize("to, suffix", [("nifti", ".nii.gz"), ("tiff", ".tif"), ("npy", ".npy")])
def test_export_into_read_only_folder_is_one_line(exported_source, read_only_folder, run_cli, tree_hash, to,
                                                  suffix):
    before = tree_hash(exported_source)
    dest = read_only_folder / f"rec{suffix}"
    code, err = run_cli("export", exported_source, "--to", to, "--dest", dest)
    assert code == 2 and "Traceback" not in err
    assert err.strip().startswith(f"error: {dest}: cannot write") and len(err.strip().splitlines()) == 1
    assert tree_hash(exported_source) == before and list(read_only_folder.iterdir()) == []


def test_destination_below_a_file_is_one_line(exported_source, tmp_path, run_cli, tree_hash):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    before = tree_hash(exported_source)
    code, err = run_cli("export", exported_source, "--dest", blocker / "sub" / "rec.nii.gz")
    assert code == 2 and "Traceback" not in err and f"{blocker} is a file, not a folder" in err
    code, err = run_cli("import", tmp_path / "ct.nii.gz", "--out", blocker / "ds.zarr", "--views", "4")
    assert code == 2 and "Traceback" not in err and f"{blocker} is a file, not a folder" in err
    assert tree_hash(exported_source) == before and blocker.read_text() == "x"
    with pytest.raises(OutputError, match="is a file, not a folder"):
        export_volume(exported_source, blocker / "rec.npy", to="npy")


# --- the CLI ---------------------------------------------------------------------------------------

def test_cli_import_single_dcm_file(tmp_path, dicom_series, run_cli, tree_hash):
    [file] = dicom_series(tmp_path / "one", np.full((1, 5, 5), 100.0, np.float32), spacing=(2.0, 1.0, 1.0))
    before = tree_hash(tmp_path / "one")
    code, err = run_cli("import", file, "--out", tmp_path / "ds.zarr", "--views", "4", "--hu-window", "-1000", "1000")
    assert code == 0, err
    assert tree_hash(tmp_path / "one") == before
    from mbir_batch.dataset import open_dataset

    meta = open_dataset(tmp_path / "ds.zarr").meta
    assert meta.volume_shape == (1, 5, 5) and meta.voxel_size_mm == (2.0, 1.0, 1.0)


@pytest.mark.parametrize("command, flags", [
    ("import", ("--max", "--sinogram", "--kspace", "--overwrite")), ("export", ("--overwrite",)),
])
def test_help_shows_no_type_on_flags(command, flags):
    from mbir_batch.cli import app

    result = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "160", "NO_COLOR": "1"})
    assert result.exit_code == 0
    rows = {flag: [line for line in result.stdout.splitlines() if f" {flag} " in line] for flag in flags}
    for flag, lines in rows.items():
        assert len(lines) == 1, (flag, result.stdout)
        assert "<bool>" not in lines[0] and "<" not in lines[0], lines[0]
