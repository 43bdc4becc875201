"""A damaged checkpoint never gives a wrong volume marked complete (issue 11, item 3).

An admm-tv job on 2 workers is interrupted in the driver (KeyboardInterrupt, as Ctrl-C) after it
recorded two checkpoint steps. Copies of that output get one damage each in the newest step's
checkpoint of slab ``z0-16``: a chunk file removed, truncated or with one byte flipped, or a garbled
``zarr.json``. Resubmitted, each resumes from the previous step and ends bit-identical to the
uninterrupted 2-worker run (``admm_runs[2]``, the same comparison as the other resume tests); with
both steps damaged the job is refused in one line that suggests ``--overwrite``, and nothing is
written.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from mbir_batch.cli import app
from mbir_batch.cluster.group import ProgressEvent
from mbir_batch.cluster.job import run_jobs
from mbir_batch.cluster.plan import JobSpec
from mbir_batch.cluster.worker import SlabSpec, launch_worker
from mbir_batch.checkpoints import CheckpointError
from mbir_batch.output import OutputStore, output_status

SLAB = "slab_z0-16"


def _remove_chunk(checkpoint: Path) -> None:
    (checkpoint / "x" / "c" / "1" / "0" / "0").unlink()  # the repro


def _truncate_chunk(checkpoint: Path) -> None:
    chunk = checkpoint / "x" / "c" / "1" / "0" / "0"
    chunk.write_bytes(chunk.read_bytes()[:-200])


def _flip_byte(checkpoint: Path) -> None:
    chunk = min(p for p in (checkpoint / "admm_z" / "c").rglob("*") if p.is_file())  # (3, Z, H, W): one chunk
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x01
    chunk.write_bytes(bytes(data))


def _garble_json(checkpoint: Path) -> None:
    (checkpoint / "x" / "zarr.json").write_text('{"zarr_format": 3, "node_type": "arr')


DAMAGES: dict[str, Callable[[Path], None]] = {"missing-chunk": _remove_chunk, "truncated-chunk": _truncate_chunk,
                                              "flipped-byte": _flip_byte, "bad-json": _garble_json}


def _volume(path: Path) -> np.ndarray:
    return OutputStore.open(path, mode="r").read_volume()


def _tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _wait_until_quiet(path: Path, settle_s: float = 0.5, limit_s: float = 15.0) -> None:
    """Wait until nothing under ``path`` changes for ``settle_s`` (files, sizes, mtimes).

    ``ray.kill`` only asks: a killed worker was seen writing for a few milliseconds more (zarr's
    write-then-rename), and copying the store then can meet a file that vanishes under it."""
    def snapshot() -> list[tuple[str, int, int]]:
        return sorted((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in path.rglob("*") if p.is_file())
    deadline = time.monotonic() + limit_s
    while True:
        try:
            before = snapshot()
            time.sleep(settle_s)
            if snapshot() == before:
                return
        except FileNotFoundError:  # a file vanished while we looked: still busy
            pass
        assert time.monotonic() < deadline, f"{path} was still changing after {limit_s} s"


@pytest.fixture(scope="module")
def interrupted(ray_session, ct_dataset, admm_cfg, tmp_path_factory) -> Path:
    """An output of 2 workers interrupted in the driver after two recorded checkpoint steps."""
    out = tmp_path_factory.mktemp("interrupted") / "interrupted.zarr"
    recorded: list[int] = []

    def interrupt_after_two_checkpoints(event: ProgressEvent) -> None:
        if event.checkpoint_step is not None and event.checkpoint_step not in recorded:
            recorded.append(event.checkpoint_step)
        if len(recorded) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_jobs([JobSpec(ct_dataset, out, admm_cfg)], workers=2, checkpoint_every=1,
                 progress=interrupt_after_two_checkpoints, poll_s=0.02)
    _wait_until_quiet(out)
    store = OutputStore.open(out, mode="r")
    assert output_status(out) == "incomplete" and store.checkpoints.recorded == recorded, recorded
    return out


def _damaged_copy(interrupted: Path, target: Path, damage: Callable[[Path], None], step: int) -> Path:
    shutil.copytree(interrupted, target)
    damage(target / "state" / SLAB / f"step_{step:08d}")
    return target


def test_each_damage_of_the_newest_step_falls_back_to_the_previous(interrupted, ct_dataset, admm_cfg, admm_runs,
                                                                    tmp_path):
    previous, newest = OutputStore.open(interrupted, mode="r").checkpoints.recorded
    outputs = {name: _damaged_copy(interrupted, tmp_path / f"{name}.zarr", damage, newest)
               for name, damage in DAMAGES.items()}
    lines: list[str] = []
    summaries = run_jobs([JobSpec(ct_dataset, out, admm_cfg) for out in outputs.values()], workers=2,
                         checkpoint_every=2, message=lines.append)
    said = "\n".join(lines)
    expected = _volume(admm_runs[2])
    for (name, out), summary in zip(outputs.items(), summaries):
        assert summary["status"] == "done" and summary["resumed_from"] == previous, name
        assert (f"{out}: the checkpoint of step {newest} is damaged (state/{SLAB}/step_{newest:08d}/"
                f"{'admm_z' if name == 'flipped-byte' else 'x'}: ") in said, said
        assert f"resuming from step {previous}, the previous complete one" in said
        np.testing.assert_array_equal(_volume(out), expected, err_msg=name)
    assert "chunk c/1/0/0 missing" in said and "chunk data unreadable" in said and "zarr.json unreadable" in said


def test_no_usable_checkpoint_is_one_line_and_overwrite_restarts(interrupted, ct_dataset, admm_cfg, admm_runs,
                                                                  tmp_path):
    previous, newest = OutputStore.open(interrupted, mode="r").checkpoints.recorded
    out = _damaged_copy(interrupted, tmp_path / "both.zarr", _remove_chunk, newest)
    _flip_byte(out / "state" / SLAB / f"step_{previous:08d}")
    before = _tree(out)
    with pytest.raises(CheckpointError) as failure:
        run_jobs([JobSpec(ct_dataset, out, admm_cfg)], workers=2)
    message = str(failure.value)
    assert "\n" not in message and message.startswith(f"{out}: no usable checkpoint (")
    assert f"step_{newest:08d}/x: chunk c/1/0/0 missing" in message and f"step_{previous:08d}/admm_z" in message
    assert message.endswith("pass --overwrite to start over")
    assert _tree(out) == before and output_status(out) == "incomplete"

    [summary] = run_jobs([JobSpec(ct_dataset, out, admm_cfg)], workers=2, overwrite=True)
    assert summary["status"] == "done" and summary["resumed_from"] is None
    np.testing.assert_array_equal(_volume(out), _volume(admm_runs[2]))


def test_worker_refuses_a_damaged_checkpoint(ray_session, interrupted, ct_dataset, admm_cfg, tmp_path):
    """Defence in depth: a worker told to resume from a damaged checkpoint raises, writes nothing."""
    ray = ray_session
    newest = OutputStore.open(interrupted, mode="r").checkpoints.last_recorded
    out = _damaged_copy(interrupted, tmp_path / "worker.zarr", _flip_byte, newest)
    before = _tree(out)
    spec = SlabSpec(dataset=str(ct_dataset), output=str(out), cfg=admm_cfg, model=None, rank=0, world_size=1,
                    z0=0, z1=16, checkpoint_every=2)
    actor = launch_worker(spec, num_cpus=1, num_gpus=0)
    try:
        with pytest.raises(ray.exceptions.RayTaskError) as failure:
            ray.get(actor.run.remote("", 0, newest), timeout=60)
    finally:
        ray.kill(actor, no_restart=True)
    assert isinstance(failure.value.cause, CheckpointError), failure.value
    assert f"step_{newest:08d}/admm_z: " in str(failure.value.cause)
    assert _tree(out) == before


def test_cli_damaged_output_is_one_line(ray_session, interrupted, ct_dataset, tmp_path):
    """The CLI on an output whose root zarr.json is garbled: exit 2, one line, the input unchanged."""
    out = tmp_path / "garbled.zarr"
    shutil.copytree(interrupted, out)
    (out / "zarr.json").write_text("{garbage")
    dataset_before = _tree(ct_dataset)
    result = CliRunner().invoke(app, ["submit", str(ct_dataset), "--method", "admm-tv", "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and "output store is damaged" in result.output
    assert "pass --overwrite" in result.output
    assert _tree(ct_dataset) == dataset_before
