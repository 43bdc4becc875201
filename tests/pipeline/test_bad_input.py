"""Malformed datasets, config files and input files through the CLI.

Every case must end with exit status 2, exactly one ``error:`` line on stderr that
names the offending file, no traceback, and every input file byte-identical.
"""
from __future__ import annotations

import gzip
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import zarr
from mbir_batch.output import OutputStore

Case = Callable[[Path, SimpleNamespace], tuple[list, Path, list[Path]]]
"""A case builds its inputs under tmp_path with the fixtures in its second argument (make_ct_dataset,
dicom_series) and returns (CLI args, the path the message must name, inputs to hash)."""


def _submit(dataset: Path, tmp: Path, *extra: str) -> list:
    return ["submit", dataset, "--method", "fbp", "--out", tmp / "out.zarr", *extra]


def _broken_dataset(mutate: Callable[[Path], None]) -> Case:
    def build(tmp: Path, fx: SimpleNamespace) -> tuple[list, Path, list[Path]]:
        dataset = fx.make_ct_dataset()
        mutate(dataset)
        return _submit(dataset, tmp), dataset, [dataset]

    return build


def _attrs(**changes) -> Callable[[Path], None]:
    def mutate(path: Path) -> None:
        group = zarr.open_group(path, mode="r+")
        attrs = dict(group.attrs["mbir"])
        geometry = dict(attrs["geometry"], **changes.pop("geometry", {}))
        attrs.update(changes, geometry=geometry)
        group.attrs["mbir"] = attrs

    return mutate


def _drop_attrs(path: Path) -> None:
    del zarr.open_group(path, mode="r+").attrs["mbir"]


def _nan_in_sinogram(path: Path) -> None:
    zarr.open_group(path, mode="r+")["sinogram"][7, 2, 3] = np.nan


def _float64_sinogram(path: Path) -> None:
    group = zarr.open_group(path, mode="r+")
    del group["sinogram"]
    group.create_array("sinogram", shape=(12, 4, 13), chunks=(4, 4, 13), dtype="float64")[...] = 0.0


def _no_sinogram(path: Path) -> None:
    del zarr.open_group(path, mode="r+")["sinogram"]


def _garbage_chunk(path: Path) -> None:
    (path / "sinogram" / "c" / "2" / "0" / "0").write_bytes(b"\xffnot a blosc frame" * 5)


def _file_case(name: str, write: Callable[[Path], None], *args: str) -> Case:
    """`mbir-batch import FILE ...` on a malformed input file."""

    def build(tmp: Path, fx: SimpleNamespace) -> tuple[list, Path, list[Path]]:
        path = tmp / name
        write(path)
        return ["import", path, "--out", tmp / "ds.zarr", *args], path, [path]

    return build


def _truncated_nifti(path: Path) -> None:
    nib.save(nib.Nifti1Image(np.ones((16, 16, 16), np.float32), np.eye(4)), path)
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[: len(raw) // 2]))


def _nan_nifti(path: Path) -> None:
    data = np.zeros((4, 4, 4), np.float32)
    data[1, 2, 3] = np.nan
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)


def _dicom_case(**kwargs) -> Case:
    def build(tmp: Path, fx: SimpleNamespace) -> tuple[list, Path, list[Path]]:
        folder = tmp / "series"
        fx.dicom_series(folder, np.zeros((4, 6, 6), np.float32), **kwargs)
        return ["import", folder, "--out", tmp / "ds.zarr", "--hu-window", "-1000", "1000"], folder, [folder]

    return build


def _sinogram_angle_mismatch(tmp: Path, fx: SimpleNamespace) -> tuple[list, Path, list[Path]]:
    np.save(tmp / "sino.npy", np.zeros((3, 7, 13), np.float32))
    args = ["import", tmp / "sino.npy", "--sinogram", "--angles-deg", "0:180:8", "--out", tmp / "ds.zarr"]
    return args, tmp / "sino.npy", [tmp / "sino.npy"]


def _geometry_unknown_key(tmp: Path, fx: SimpleNamespace) -> tuple[list, Path, list[Path]]:
    np.save(tmp / "sino.npy", np.zeros((3, 8, 13), np.float32))
    (tmp / "geom.yaml").write_text("views: 8\ndet_spaceing: 1.0\n")
    args = ["import", tmp / "sino.npy", "--sinogram", "--geometry", tmp / "geom.yaml", "--out", tmp / "ds.zarr"]
    return args, tmp / "geom.yaml", [tmp / "sino.npy", tmp / "geom.yaml"]


def _config_case(text: str) -> Case:
    def build(tmp: Path, fx: SimpleNamespace) -> tuple[list, Path, list[Path]]:
        dataset = fx.make_ct_dataset()
        (tmp / "solver.yaml").write_text(text)
        args = _submit(dataset, tmp, "--config", tmp / "solver.yaml")
        return args, tmp / "solver.yaml", [dataset, tmp / "solver.yaml"]

    return build


def _incomplete_output(tmp: Path, fx: SimpleNamespace) -> tuple[list, Path, list[Path]]:
    dataset = fx.make_ct_dataset()
    OutputStore.create(tmp / "rec.zarr", input_path=dataset, shape=(12, 8, 8), chunk_z=4)
    return ["export", tmp / "rec.zarr", "--to", "nifti"], tmp / "rec.zarr", [dataset, tmp / "rec.zarr"]


CASES: dict[str, Case] = {
    "dataset: missing mbir attrs": _broken_dataset(_drop_attrs),
    "dataset: format version 2": _broken_dataset(_attrs(version=2)),
    "dataset: unknown modality": _broken_dataset(_attrs(modality="pet")),
    "dataset: wrong angle count": _broken_dataset(_attrs(geometry={"angles_deg": [0.0, 60.0, 120.0]})),
    "dataset: negative det spacing": _broken_dataset(_attrs(geometry={"det_spacing": -0.5})),
    "dataset: NaN in sinogram": _broken_dataset(_nan_in_sinogram),
    "dataset: wrong dtype": _broken_dataset(_float64_sinogram),
    "dataset: missing array": _broken_dataset(_no_sinogram),
    "dataset: corrupted chunk": _broken_dataset(_garbage_chunk),
    "file: truncated NIfTI": _file_case("vol.nii.gz", _truncated_nifti),
    "file: not a NIfTI": _file_case("vol.nii", lambda p: p.write_bytes(b"definitely not nifti" * 30)),
    "file: NaN in NIfTI": _file_case("vol.nii.gz", _nan_nifti),
    "file: npy with wrong ndim": _file_case("vol.npy", lambda p: np.save(p, np.zeros((4, 4), np.float32))),
    "file: empty TIFF": _file_case("vol.tif", lambda p: p.write_bytes(b"")),
    "file: DICOM missing slice": _dicom_case(positions=[0.0, 2.5, 5.0, 10.0]),
    "file: DICOM mixed sizes": _dicom_case(sizes=[(6, 6), (6, 6), (8, 6), (6, 6)]),
    "file: sinogram angle mismatch": _sinogram_angle_mismatch,
    "config: geometry YAML unknown key": _geometry_unknown_key,
    "config: solver YAML unknown key": _config_case("fbp:\n  cg_itres: 5\n"),
    "config: solver YAML wrong type": _config_case("fbp:\n  cg_iters: ten\n"),
    "output: export of an incomplete output": _incomplete_output,
}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_exits_2_with_one_line(case, tmp_path, make_ct_dataset, dicom_series, run_cli, tree_hash):
    fixtures = SimpleNamespace(make_ct_dataset=make_ct_dataset, dicom_series=dicom_series)
    args, named, inputs = CASES[case](tmp_path, fixtures)
    before = {str(p): tree_hash(p) for p in inputs}
    code, stderr = run_cli(*args)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == 2, stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert str(named) in lines[0], lines[0]
    assert "Traceback" not in stderr
    assert {str(p): tree_hash(p) for p in inputs} == before
    assert not (tmp_path / "out.zarr").exists() and not (tmp_path / "ds.zarr").exists()
