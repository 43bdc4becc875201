"""The output lock under a read-only folder, a missing parent, a full disk and an unwritten lock file."""
from __future__ import annotations

import errno
import json
import os
import time

import pytest
from mbir_batch import locking
from mbir_batch.errors import OutputError
from mbir_batch.locking import OutputLock, lock_path


def test_missing_parent_folders_are_created(tmp_path):
    out = tmp_path / "nodir" / "sub" / "out.zarr"
    with OutputLock(out) as lock:
        assert lock.held and lock_path(out).is_file()
    assert (tmp_path / "nodir" / "sub").is_dir() and not lock_path(out).exists()


def _fail_os(monkeypatch, name: str, code: int, on_lock_only: bool = True) -> None:
    """Make ``os.<name>`` raise ``OSError(code)`` for the lock file (found by path or by fd)."""
    real = getattr(os, name)

    def is_lock(target) -> bool:
        if isinstance(target, int):
            target = os.readlink(f"/proc/self/fd/{target}")
        return str(target).endswith(".lock")

    def fake(target, *args, **kwargs):
        if not on_lock_only or is_lock(target):
            raise OSError(code, os.strerror(code), str(target))
        return real(target, *args, **kwargs)

    monkeypatch.setattr(os, name, fake)


@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES])
def test_unwritable_folder_is_one_output_error(tmp_path, monkeypatch, code):
    out = tmp_path / "out.zarr"
    _fail_os(monkeypatch, "open", code)
    with pytest.raises(OutputError) as info:
        OutputLock(out).acquire()
    message = str(info.value)
    assert str(lock_path(out)) in message and os.strerror(code) in message and "\n" not in message
    assert not lock_path(out).exists()


def test_real_permission_denied_folder(tmp_path):
    """/sys refuses new files even to root (EACCES), which a chmod'ed temp folder does not."""
    if not os.path.isdir("/sys/fs"):
        pytest.skip("no /sys/fs on this system")
    with pytest.raises(OutputError, match="cannot create the lock file /sys/fs/out.zarr.lock"):
        OutputLock("/sys/fs/out.zarr").acquire()


def test_full_disk_leaves_no_empty_lock(tmp_path, monkeypatch):
    out = tmp_path / "out.zarr"
    with monkeypatch.context() as patch:
        _fail_os(patch, "write", errno.ENOSPC)
        with pytest.raises(OutputError, match="No space left on device"):
            OutputLock(out).acquire()
    assert not lock_path(out).exists()
    with OutputLock(out) as lock:  # once space is back, the retry takes the lock at once
        assert lock.held


@pytest.mark.parametrize("content", ["", "{\"pid\": 12", "[]", "{}"])
def test_an_old_unwritten_lock_is_stale(tmp_path, caplog, content):
    out = tmp_path / "out.zarr"
    lock_path(out).write_text(content)
    old = time.time() - 60
    os.utime(lock_path(out), (old, old))
    started = time.perf_counter()
    with caplog.at_level("WARNING"), OutputLock(out) as lock:
        assert lock.held and json.loads(lock_path(out).read_text())["pid"] == os.getpid()
    assert time.perf_counter() - started < 1.0
    assert "stale lock" in caplog.text and "empty or not a lock record" in caplog.text


def test_a_fresh_unwritten_lock_is_waited_for_then_taken_over(tmp_path, monkeypatch):
    """An empty lock younger than the grace may be a holder between create and write: wait, then judge."""
    monkeypatch.setattr(locking, "UNWRITTEN_GRACE_S", 0.4)
    out = tmp_path / "out.zarr"
    lock_path(out).write_text("")
    started = time.perf_counter()
    with OutputLock(out) as lock:
        assert lock.held
    assert 0.35 <= time.perf_counter() - started < 2.0
