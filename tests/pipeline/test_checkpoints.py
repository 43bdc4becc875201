"""Checkpoints are verified before they are trusted (issue 11, item 3).

Each damage a disk, a copy or a user can do to a checkpoint (a chunk file removed, truncated or with
one byte flipped, a garbled ``zarr.json``) must end in a one-line `CheckpointError` naming the
checkpoint, never in arrays that differ from the ones written. The expectation is independent of
the code under test: the arrays are compared with the ones the test wrote.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from mbir_batch.errors import OutputError, UserError
from mbir_batch.checkpoints import CheckpointError, array_digest
from mbir_batch.output import OutputStore, open_output, output_status

SLAB = "z0-16"


@pytest.fixture
def arrays() -> dict[str, np.ndarray]:
    """A slab state like SlabState.to_numpy's: x, admm_z, admm_w (16 slices: two z-chunks) and step."""
    rng = np.random.default_rng(7)
    return {"step": np.asarray(6, dtype=np.int64), "x": rng.random((16, 8, 8), dtype=np.float32),
            "admm_z": rng.standard_normal((16, 8, 8), dtype=np.float32),
            "admm_w": np.zeros((16, 8, 8), np.float32)}  # all zero: its chunks must be on disk all the same


@pytest.fixture
def store(make_ct_dataset, tmp_path) -> OutputStore:
    return OutputStore.create(tmp_path / "out.zarr", input_path=make_ct_dataset(depth=16), shape=(16, 8, 8),
                              chunk_z=4)


def _checkpoint(store: OutputStore, step: int = 6) -> Path:
    return store.path / "state" / f"slab_{SLAB}" / f"step_{step:08d}"


def _assert_same(read: dict[str, np.ndarray], written: dict[str, np.ndarray]) -> None:
    assert sorted(read) == sorted(written)
    for key, value in written.items():
        assert read[key].dtype == value.dtype and read[key].shape == value.shape
        np.testing.assert_array_equal(read[key], value)


def _one_line_error(store: OutputStore, step: int, match: str) -> CheckpointError:
    with pytest.raises(CheckpointError, match=match) as failure:
        store.checkpoints.verify(step, SLAB)
    message = str(failure.value)
    assert "\n" not in message and message.startswith(f"{store.path}/state/slab_{SLAB}/step_{step:08d}")
    assert isinstance(failure.value, UserError)
    with pytest.raises(CheckpointError, match=match):
        store.checkpoints.read(step, SLAB)
    return failure.value


def test_intact_checkpoint_reads_back_exactly(store, arrays):
    store.checkpoints.write(6, SLAB, arrays)
    store.checkpoints.verify(6, SLAB)
    _assert_same(store.checkpoints.read(6, SLAB), arrays)
    manifest = store._group[f"state/slab_{SLAB}/step_00000006"].attrs["arrays"]
    assert manifest["x"] == {"dtype": "<f4", "shape": [16, 8, 8], "sha256": array_digest(arrays["x"])}
    assert sorted(p.name for p in (_checkpoint(store) / "admm_w" / "c").iterdir()) == ["0", "1"]


def test_digest_sees_dtype_shape_and_every_byte(arrays):
    x = arrays["x"]
    assert array_digest(x) == array_digest(x.copy()) == array_digest(x.astype(">f4"))
    assert array_digest(x) != array_digest(x.reshape(8, 16, 8))
    assert array_digest(x) != array_digest(x.view(np.int32))
    flipped = x.copy()
    flipped.reshape(-1).view(np.uint8)[1000] ^= 1
    assert array_digest(x) != array_digest(flipped)


def test_missing_chunk_is_named(store, arrays):
    store.checkpoints.write(6, SLAB, arrays)
    (_checkpoint(store) / "x" / "c" / "1" / "0" / "0").unlink()
    error = _one_line_error(store, 6, r"x: chunk c/1/0/0 missing \(1 of 2 chunks\)")
    assert error.checkpoint == f"state/slab_{SLAB}/step_00000006/x"


def test_missing_chunk_of_an_all_zero_array_is_caught(store, arrays):
    store.checkpoints.write(6, SLAB, arrays)
    (_checkpoint(store) / "admm_w" / "c" / "0" / "0" / "0").unlink()
    _one_line_error(store, 6, r"admm_w: chunk c/0/0/0 missing")


def test_truncated_chunk(store, arrays):
    store.checkpoints.write(6, SLAB, arrays)
    chunk = _checkpoint(store) / "x" / "c" / "1" / "0" / "0"
    chunk.write_bytes(chunk.read_bytes()[: chunk.stat().st_size // 2])
    _one_line_error(store, 6, r"x: chunk data unreadable: RuntimeError: error during blosc decompression")


def test_every_flipped_byte_is_caught_or_harmless(store, arrays):
    """One flipped bit anywhere in a chunk file: an error, or (never) different arrays."""
    store.checkpoints.write(6, SLAB, arrays)
    chunk = _checkpoint(store) / "x" / "c" / "1" / "0" / "0"
    original = chunk.read_bytes()
    offsets = sorted(set(range(32)) | set(np.linspace(32, len(original) - 1, 48).astype(int).tolist()))
    caught = 0
    for offset in offsets:
        damaged = bytearray(original)
        damaged[offset] ^= 0x10
        chunk.write_bytes(bytes(damaged))
        try:
            read = store.checkpoints.read(6, SLAB)
        except CheckpointError as error:
            assert "\n" not in str(error) and "x: " in str(error)
            caught += 1
        else:  # a bit the codec never reads (e.g. a reserved header bit) changes nothing
            _assert_same(read, arrays)
    assert caught >= 0.9 * len(offsets), f"only {caught} of {len(offsets)} flips were caught"
    chunk.write_bytes(original)
    _assert_same(store.checkpoints.read(6, SLAB), arrays)


def test_flipped_payload_byte_is_a_checksum_mismatch(store, arrays):
    store.checkpoints.write(6, SLAB, arrays)
    chunk = _checkpoint(store) / "admm_z" / "c" / "0" / "0" / "0"
    damaged = bytearray(chunk.read_bytes())
    damaged[len(damaged) // 2] ^= 0x01
    chunk.write_bytes(bytes(damaged))
    _one_line_error(store, 6, r"admm_z: (checksum mismatch|chunk data unreadable)")


@pytest.mark.parametrize("where", ["x/zarr.json", "zarr.json"])
@pytest.mark.parametrize("garbage", [b"{garbage", b"", b'{"zarr_format": 3, "node_type": "array"}'])
def test_garbled_zarr_json(store, arrays, where, garbage):
    store.checkpoints.write(6, SLAB, arrays)
    (_checkpoint(store) / where).write_bytes(garbage)
    _one_line_error(store, 6, "zarr.json (unreadable|is not a checkpoint group)")


def test_valid_but_altered_metadata(store, arrays):
    store.checkpoints.write(6, SLAB, arrays)
    metadata = _checkpoint(store) / "x" / "zarr.json"
    metadata.write_text(json.dumps({**json.loads(metadata.read_text()), "data_type": "int32"}))
    _one_line_error(store, 6, r"x: is <i4 \[16, 8, 8\], but <f4 \[16, 8, 8\] was written")


def test_missing_array_unfinished_and_unsummed_checkpoints(store, arrays):
    store.checkpoints.write(6, SLAB, arrays)
    shutil.rmtree(_checkpoint(store) / "admm_z")
    _one_line_error(store, 6, r"admm_z: array missing")
    _one_line_error(store, 8, "no complete checkpoint here")
    store.checkpoints.write(6, SLAB, arrays)  # rewriting a damaged checkpoint replaces it
    _assert_same(store.checkpoints.read(6, SLAB), arrays)
    group = store._group[f"state/slab_{SLAB}/step_00000006"]
    group.attrs.update({"complete": False})
    _one_line_error(store, 6, "no complete checkpoint here")
    group.attrs.update({"complete": True, "arrays": None})  # as written before checksums existed
    _one_line_error(store, 6, "no checksums")


def test_rewrite_over_a_garbled_checkpoint(store, arrays):
    store.checkpoints.write(6, SLAB, arrays)
    (_checkpoint(store) / "zarr.json").write_text("{garbage")
    store.checkpoints.write(6, SLAB, {"x": arrays["x"] + 1})
    _assert_same(store.checkpoints.read(6, SLAB), {"x": arrays["x"] + 1})


def test_two_newest_recorded_steps_are_kept(store, arrays):
    slabs = [SLAB, "z16-24"]
    for step in (2, 4, 6, 8):
        for slab in slabs:
            store.checkpoints.write(step, slab, arrays)
    assert store.checkpoints.recorded == [] and store.checkpoints.last_recorded is None
    store.checkpoints.record(2)
    store.checkpoints.record(4)
    store.checkpoints.record(6)
    assert store.checkpoints.recorded == [4, 6] and store.checkpoints.last_recorded == 6
    assert sorted(p.name for p in (store.path / "state" / f"slab_{SLAB}").glob("step_*")) == [
        "step_00000004", "step_00000006", "step_00000008"]  # 8: written, not recorded yet
    store.checkpoints.verify(4, "z16-24")
    # step 6 was damaged, the job fell back to 4 and now records 5: 6 is forgotten, 4 is kept
    store.checkpoints.record(5)
    assert store.checkpoints.recorded == [4, 5] and store.checkpoints.last_recorded == 5
    assert _checkpoint(store, 4).exists() and _checkpoint(store, 6).exists()  # 6 is rewritten when reached
    store.checkpoints.record(8)
    assert store.checkpoints.recorded == [5, 8] and not _checkpoint(store, 4).exists()
    store.mark_complete({"method": "test"})
    assert not [p for p in (store.path / "state").iterdir() if p.is_dir()]


def test_pruning_and_completion_survive_a_garbled_checkpoint(store, arrays):
    for step in (2, 4):
        store.checkpoints.write(step, SLAB, arrays)
    (_checkpoint(store, 2) / "zarr.json").write_text("{garbage")
    store.checkpoints.record(2)
    store.checkpoints.record(4)
    store.checkpoints.record(6)
    assert not _checkpoint(store, 2).exists() and _checkpoint(store, 4).exists()
    (_checkpoint(store, 4) / "zarr.json").write_text("{garbage")
    store.mark_complete({"method": "test"})
    assert open_output(store.path).complete


def test_garbled_output_root_is_one_line_and_overwritable(store):
    source = store.attrs["input"]
    (store.path / "zarr.json").write_text("{garbage")
    assert output_status(store.path) == "damaged"
    for open_it in (lambda: OutputStore.open(store.path), lambda: open_output(store.path),
                    lambda: OutputStore.create(store.path, input_path=source, shape=(16, 8, 8), chunk_z=4)):
        with pytest.raises(OutputError, match=r"output store is damaged \(zarr.json unreadable: JSONDecodeError") \
                as failure:
            open_it()
        assert "\n" not in str(failure.value) and str(failure.value).endswith("pass --overwrite to start over")
    fresh = OutputStore.create(store.path, input_path=source, shape=(16, 8, 8), chunk_z=4, overwrite=True)
    assert output_status(fresh.path) == "incomplete"


def test_garbled_volume_metadata_is_one_line(store):
    (store.path / "volume" / "zarr.json").write_text("{garbage")
    with pytest.raises(OutputError, match=r"output store is damaged \(volume unreadable: JSONDecodeError"):
        OutputStore.open(store.path)


def test_other_zarr_store_is_not_called_damaged(tmp_path):
    other = tmp_path / "someone-elses.zarr"
    other.mkdir()
    (other / "zarr.json").write_text("{garbage")
    assert output_status(other) == "other"
