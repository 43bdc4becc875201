"""Data contract (DESIGN.md): dataset round trips, validation errors, output store rules, locks."""
from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numcodecs
import numpy as np
import pytest
import torch
import zarr
from mbir_batch.dataset import DatasetError, create_dataset, open_dataset
from mbir_batch.errors import OutputError, UserError
from mbir_batch.locking import OutputLock, lock_path
from mbir_batch.output import OutputStore, is_complete, open_output


def test_ct_round_trip(make_ct_dataset, ct_meta):
    path = make_ct_dataset(depth=10, chunk_z=4)
    ds = open_dataset(path)
    assert ds.meta == ct_meta(depth=10)
    assert ds.chunk_z == 4 and ds.depth == 10 and ds.has_reference
    full = ds.read_measurements(0, 10)
    assert full.dtype == np.float32 and full.shape == (10, 4, 13)
    np.testing.assert_array_equal(ds.read_measurements(4, 7), full[4:7])
    assert ds.read_reference(8, 10).shape == (2, 8, 8)
    with pytest.raises(ValueError):
        ds.read_measurements(5, 11)


def test_ct_operator_matches_geometry(make_ct_dataset):
    pytest.importorskip("astra")
    op = open_dataset(make_ct_dataset()).operator(0, 4)
    assert tuple(op.domain_shape) == (8, 8) and tuple(op.range_shape) == (4, 13)


@pytest.mark.parametrize("mask_3d", [False, True])
def test_mri_round_trip(make_mri_dataset, mask_3d):
    ds = open_dataset(make_mri_dataset(mask_3d=mask_3d))
    kspace, mask = ds.read_measurements(1, 5), ds.read_mask(1, 5)
    assert kspace.dtype == np.complex64 and mask.dtype == np.bool_ and mask.shape == (4, 8, 8)
    assert np.all(kspace[~mask] == 0) and ds.read_reference(0, 1) is None
    op = ds.operator(1, 5)
    assert op.A(torch.zeros(4, 8, 8)).shape == (4, 8, 8)


def test_v2_store_is_readable(tmp_path, ct_meta):
    meta = ct_meta(depth=4)
    group = zarr.open_group(tmp_path / "v2.zarr", mode="w", zarr_format=2)
    array = group.create_array("sinogram", shape=meta.measurement_shape, chunks=(2, 4, 13), dtype="float32",
                               compressors=numcodecs.Blosc())
    array[...] = 1.0
    group.attrs["mbir"] = meta.to_attrs()
    ds = open_dataset(tmp_path / "v2.zarr")
    assert ds.chunk_z == 2 and float(ds.read_measurements(0, 4).sum()) == 4 * 4 * 13


def _set_attr(path: Path, **changes) -> None:
    group = zarr.open_group(path, mode="r+")
    attrs = dict(group.attrs["mbir"])
    for key, value in changes.items():
        if value is None:
            attrs.pop(key)
        else:
            attrs[key] = value
    group.attrs["mbir"] = attrs


def _set_geometry(path: Path, **changes) -> None:
    geometry = dict(zarr.open_group(path, mode="r").attrs["mbir"]["geometry"], **changes)
    _set_attr(path, geometry=geometry)


def _replace_array(path: Path, name: str, value: np.ndarray | None) -> None:
    group = zarr.open_group(path, mode="r+")
    del group[name]
    if value is not None:
        group.create_array(name, shape=value.shape, dtype=value.dtype, chunks=(4, *value.shape[1:]))[...] = value


def _corrupt_chunk(path: Path) -> None:
    (path / "sinogram" / "c" / "1" / "0" / "0").write_bytes(b"\x00garbage" * 7)


CONTRACT_ERRORS = {
    "missing attrs": (lambda p: zarr.open_group(p, mode="r+").attrs.__delitem__("mbir"), "no 'mbir'"),
    "version 2": (lambda p: _set_attr(p, version=2), "version 2"),
    "unknown key": (lambda p: _set_attr(p, colour="red"), "unknown key(s) 'colour'"),
    "missing key": (lambda p: _set_attr(p, noise_sigma=None), "missing 'noise_sigma'"),
    "unknown modality": (lambda p: _set_attr(p, modality="pet"), "unknown modality 'pet'"),
    "wrong angle count": (lambda p: _set_geometry(p, angles_deg=[0.0, 90.0]), "4 views"),
    "wrong det count": (lambda p: _set_geometry(p, det_count=11), "13 detector bins"),
    "wrong volume depth": (lambda p: _set_attr(p, volume_shape=[11, 8, 8]), "12 slices"),
    "negative det spacing": (lambda p: _set_geometry(p, det_spacing=-1.0), "det_spacing"),
    "zero voxel size": (lambda p: _set_attr(p, voxel_size_mm=[0, 1, 1]), "voxel_size_mm"),
    "NaN in sinogram": (lambda p: zarr.open_group(p, mode="r+")["sinogram"].__setitem__((5, 1, 2), np.nan),
                        "NaN or Inf"),
    "Inf in reference": (lambda p: zarr.open_group(p, mode="r+")["reference"].__setitem__((0, 0, 0), np.inf),
                         "'reference' contains NaN"),
    "wrong dtype": (lambda p: _replace_array(p, "sinogram", np.zeros((12, 4, 13), np.float64)), "dtype float64"),
    "wrong ndim": (lambda p: _replace_array(p, "reference", np.zeros((12, 64), np.float32)), "2 dimensions"),
    "missing array": (lambda p: _replace_array(p, "sinogram", None), "missing array 'sinogram'"),
    "corrupted chunk": (_corrupt_chunk, "chunk 1 (slices 4-8)"),
}


@pytest.mark.parametrize("case", CONTRACT_ERRORS)
def test_contract_violation_names_path_and_problem(make_ct_dataset, case):
    path = make_ct_dataset()
    mutate, expected = CONTRACT_ERRORS[case]
    mutate(path)
    with pytest.raises(DatasetError) as info:
        open_dataset(path)
    assert str(info.value).startswith(f"{path}: ") and expected in str(info.value)


def test_not_a_dataset(tmp_path):
    for path in (tmp_path / "missing.zarr", tmp_path / "file.zarr", tmp_path / "emptydir.zarr"):
        if path.name == "file.zarr":
            path.write_text("hello")
        elif path.name == "emptydir.zarr":
            path.mkdir()
        with pytest.raises(DatasetError, match=str(path)):
            open_dataset(path)


def test_create_dataset_validates_arrays(tmp_path, ct_meta):
    meta = ct_meta(depth=4)
    with pytest.raises(DatasetError, match="3 views"):
        create_dataset(tmp_path / "a.zarr", meta, sinogram=np.zeros((4, 3, 13)))
    with pytest.raises(DatasetError, match="'sinogram' is required"):
        create_dataset(tmp_path / "a.zarr", meta)
    with pytest.raises(DatasetError, match="NaN"):
        create_dataset(tmp_path / "a.zarr", meta, sinogram=np.full((4, 4, 13), np.nan))
    assert not (tmp_path / "a.zarr").exists() and list(tmp_path.iterdir()) == []
    create_dataset(tmp_path / "a.zarr", meta, sinogram=np.zeros((4, 4, 13)))
    with pytest.raises(OutputError, match="already exists"):
        create_dataset(tmp_path / "a.zarr", meta, sinogram=np.ones((4, 4, 13)))
    create_dataset(tmp_path / "a.zarr", meta, sinogram=np.ones((4, 4, 13)), overwrite=True)
    assert open_dataset(tmp_path / "a.zarr").read_measurements(0, 1).min() == 1.0


# --- output stores -------------------------------------------------------------------------------


def test_output_refuses_input_and_its_inside(make_ct_dataset, tree_hash):
    source = make_ct_dataset()
    before = tree_hash(source)
    for out in (source, source / "out.zarr", source.parent / "." / source.name):
        with pytest.raises(OutputError, match="input dataset"):
            OutputStore.create(out, input_path=source, shape=(12, 8, 8), chunk_z=4, overwrite=True)
    assert tree_hash(source) == before


def test_output_lifecycle_and_input_untouched(make_ct_dataset, tree_hash, tmp_path, monkeypatch):
    source = make_ct_dataset()
    before = tree_hash(source)
    ds = open_dataset(source)
    out = tmp_path / "out.zarr"
    store = OutputStore.create(out, input_path=source, shape=ds.meta.volume_shape, chunk_z=ds.chunk_z)
    assert store.attrs["dataset"] == ds.meta.to_attrs() and not is_complete(out)
    with pytest.raises(OutputError, match="incomplete"):
        open_output(out)
    assert open_output(out, allow_incomplete=True).shape == (12, 8, 8)
    with pytest.raises(OutputError, match="unfinished"):
        OutputStore.create(out, input_path=source, shape=(12, 8, 8), chunk_z=4)
    with pytest.raises(ValueError, match="aligned"):
        store.write_slab(2, np.zeros((4, 8, 8)))
    for z0 in range(0, 12, 4):
        store.write_slab(z0, ds.read_reference(z0, z0 + 4))

    updates: list[dict] = []
    original = zarr.core.attributes.Attributes.update
    monkeypatch.setattr(zarr.core.attributes.Attributes, "update",
                        lambda self, d: (updates.append(dict(d)), original(self, d))[1])
    store.mark_complete({"method": "fbp", "config": {"rho": np.float32(10.0)}, "seed": 3})
    assert updates[-1] == {"complete": True}
    assert all("complete" not in u for u in updates[:-1])
    monkeypatch.undo()

    done = open_output(out)
    assert done.complete and done.attrs["config"] == {"rho": 10.0}
    np.testing.assert_array_equal(done.read_volume(), ds.read_reference(0, 12))
    with pytest.raises(OutputError, match="complete reconstruction"):
        OutputStore.create(out, input_path=source, shape=(12, 8, 8), chunk_z=4)
    with pytest.raises(OutputError, match="already complete"):
        OutputStore.open_for_resume(out)
    fresh = OutputStore.create(out, input_path=source, shape=(12, 8, 8), chunk_z=4, overwrite=True)
    assert not fresh.complete and float(fresh.read_volume().max()) == 0.0
    assert tree_hash(source) == before


def test_resume_and_checkpoints(make_ct_dataset, tmp_path):
    source = make_ct_dataset()
    out = tmp_path / "out.zarr"
    store = OutputStore.create(out, input_path=source, shape=(12, 8, 8), chunk_z=4)
    for step in (5, 10):
        for slab in range(3):
            store.checkpoints.write(step, slab, {"x": np.full((4, 8, 8), step, np.float32), "rng": np.arange(3),
                                           "scalar": np.array(1.5)})
    assert store.checkpoints.last_recorded is None
    store.checkpoints.record(10)
    resumed = OutputStore.open_for_resume(out, input_path=source)
    assert resumed.checkpoints.last_recorded == 10
    state = resumed.checkpoints.read(10, 2)
    assert state["x"].mean() == 10 and state["rng"].tolist() == [0, 1, 2] and float(state["scalar"]) == 1.5
    with pytest.raises(OutputError, match="no complete checkpoint"):
        resumed.checkpoints.read(5, 0)  # pruned
    resumed.checkpoints.write(10, 2, {"x": np.zeros((4, 8, 8), np.float32)})  # rerun after a restart replaces it
    assert list(resumed.checkpoints.read(10, 2)) == ["x"] and resumed.checkpoints.read(10, 2)["x"].max() == 0
    with pytest.raises(OutputError, match="was started from"):
        OutputStore.open_for_resume(out, input_path=tmp_path / "other.zarr")


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"),
                                   PermissionError(errno.EACCES, "Permission denied")])
def test_write_errors_become_output_errors(make_ct_dataset, tmp_path, tree_hash, monkeypatch, error):
    source = make_ct_dataset()
    earlier = OutputStore.create(tmp_path / "earlier.zarr", input_path=source, shape=(12, 8, 8), chunk_z=4)
    earlier.mark_complete({"method": "fbp"})
    store = OutputStore.create(tmp_path / "out.zarr", input_path=source, shape=(12, 8, 8), chunk_z=4)
    before = tree_hash(source) | tree_hash(tmp_path / "earlier.zarr")

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(zarr.storage.LocalStore, "set", fail)
    text = os.strerror(error.errno)
    with pytest.raises(OutputError, match=f"out.zarr: cannot write: {text}"):
        store.write_slab(0, np.ones((4, 8, 8)))
    with pytest.raises(OutputError, match=f"new.zarr: cannot write: {text}"):
        OutputStore.create(tmp_path / "new.zarr", input_path=source, shape=(12, 8, 8), chunk_z=4)
    with pytest.raises(OutputError, match=f"earlier.zarr: cannot write: {text}"):
        OutputStore.create(tmp_path / "earlier.zarr", input_path=source, shape=(12, 8, 8), chunk_z=4,
                           overwrite=True)
    monkeypatch.undo()
    assert tree_hash(source) | tree_hash(tmp_path / "earlier.zarr") == before
    assert not (tmp_path / "new.zarr").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct.zarr", "earlier.zarr", "out.zarr"]


# --- locks ---------------------------------------------------------------------------------------


def test_second_lock_is_refused_naming_the_holder(tmp_path):
    out = tmp_path / "out.zarr"
    with OutputLock(out) as lock:
        assert lock_path(out).exists()
        with pytest.raises(OutputError) as info:
            OutputLock(out).acquire()
        assert f"pid {os.getpid()} on host {socket.gethostname()}" in str(info.value)
        assert str(lock_path(out)) in str(info.value)
        lock.refresh()
    assert not lock_path(out).exists()


def _write_lock(out: Path, pid: int, host: str, heartbeat: float) -> None:
    record = {"pid": pid, "host": host, "started": heartbeat, "heartbeat": heartbeat, "token": "old"}
    lock_path(out).write_text(json.dumps(record))


def test_lock_of_dead_pid_is_taken_over(tmp_path, caplog):
    out = tmp_path / "out.zarr"
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                           check=True)
    _write_lock(out, int(child.stdout), socket.gethostname(), time.time())
    with caplog.at_level("WARNING"), OutputLock(out) as lock:
        assert json.loads(lock_path(out).read_text())["pid"] == os.getpid() and lock.held
    assert "stale lock" in caplog.text and f"pid {int(child.stdout)}" in caplog.text


def test_lock_from_other_host_uses_heartbeat(tmp_path):
    out = tmp_path / "out.zarr"
    _write_lock(out, 1, "elsewhere", time.time())
    with pytest.raises(OutputError, match="host elsewhere"):
        OutputLock(out).acquire()
    _write_lock(out, 1, "elsewhere", time.time() - 3600)
    with OutputLock(out, stale_after_s=600) as lock:
        assert lock.held


def test_lock_lost_to_another_job_is_detected(tmp_path):
    out = tmp_path / "out.zarr"
    lock = OutputLock(out)
    lock.acquire()
    _write_lock(out, os.getpid(), socket.gethostname(), time.time())
    with pytest.raises(UserError, match="lost the lock"):
        lock.refresh()
    lock.release()
    assert lock_path(out).exists()  # not ours any more: left alone
