"""An exclusive lock on an output store, so that two jobs never write one output.

The lock is a file ``<out>.lock`` next to the store (so it exists before the
store does and survives ``--overwrite``), created atomically with
``O_CREAT | O_EXCL``. It holds JSON ``{pid, host, started, heartbeat, token}``.
Missing parent folders of the output are created first (``mkdir -p``), so
``--out results/run1/ct.zarr`` works in a fresh checkout.
A lock is stale, and is taken over with a warning, when

* its holder ran on this host and that process no longer exists, or
* its heartbeat is older than `stale_after_s` (holders on other hosts,
  whose processes cannot be checked), or
* it is empty or not a lock record (a holder that died, or a disk that was
  full, between creating the file and writing it) and older than
  `UNWRITTEN_GRACE_S`; a live holder writes its record microseconds after
  creating the file.

A lock that cannot be created or written (read-only folder, no permission,
disk full) raises `OutputError` naming the lock file, and leaves no file
behind.

A running job calls `OutputLock.refresh` (or `start_heartbeat`) well within
`stale_after_s`.
"""
from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import threading
import time
from pathlib import Path
from types import TracebackType

from mbir_batch.errors import OutputError

__all__ = ["OutputLock", "lock_path"]

log = logging.getLogger(__name__)

UNWRITTEN_GRACE_S = 2.0
"""Age after which an empty or unparsable lock file counts as stale."""


def lock_path(output: str | Path) -> Path:
    """The lock file of an output store: ``<out>.lock`` beside it."""
    output = Path(output)
    return output.parent / f"{output.name}.lock"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _reason(error: OSError) -> str:
    """``"No space left on device"``-style text of an OSError, without its repr noise."""
    return error.strerror or type(error).__name__


class OutputLock:
    """Context manager holding the lock of one output store.

    Parameters
    ----------
    output : the output store the lock protects.
    stale_after_s : a heartbeat older than this marks the lock stale.

    Raises
    ------
    OutputError
        on entry, when another live job holds the lock; the message names its
        pid, host and start time and the lock file.
    """

    def __init__(self, output: str | Path, *, stale_after_s: float = 600.0) -> None:
        self.output = Path(output)
        self.path = lock_path(output)
        self.stale_after_s = stale_after_s
        self._record: dict | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.release()

    @property
    def held(self) -> bool:
        return self._record is not None

    def _new_record(self) -> dict:
        now = time.time()
        return {"pid": os.getpid(), "host": socket.gethostname(), "started": now, "heartbeat": now,
                "token": secrets.token_hex(8)}

    def _read(self, path: Path) -> dict | None:
        """The lock's record; an unwritten (empty, unparsable) lock gives ``{"unwritten": mtime, ...}``."""
        try:
            record = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            record = None
        if isinstance(record, dict) and isinstance(record.get("token"), str):
            return record
        try:
            mtime = path.stat().st_mtime
        except FileNotFoundError:
            return None
        return {"pid": None, "host": None, "started": mtime, "heartbeat": mtime, "token": "", "unwritten": mtime}

    def _is_stale(self, record: dict) -> bool:
        if "unwritten" in record:
            return time.time() - float(record["unwritten"]) > UNWRITTEN_GRACE_S
        if record.get("host") == socket.gethostname() and isinstance(record.get("pid"), int) and record["pid"] > 0:
            return not _pid_alive(record["pid"])
        return time.time() - float(record.get("heartbeat", 0)) > self.stale_after_s

    def _describe(self, record: dict) -> str:
        if "unwritten" in record:
            return "nobody (the file is empty or not a lock record)"
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(record.get("started", 0))))
        return f"pid {record.get('pid')} on host {record.get('host')} (since {started})"

    def acquire(self) -> None:
        """Take the lock, taking over a stale one; raise `OutputError` if a live job holds it."""
        record = self._new_record()
        self._make_parent()
        for _ in range(8):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._read(self.path)
                if holder is None:
                    continue  # released meanwhile
                if not self._is_stale(holder):
                    if "unwritten" in holder:  # its creator is writing it right now, or died doing so
                        time.sleep(UNWRITTEN_GRACE_S / 4)
                        continue
                    raise OutputError(f"{self.output}: locked by another job, {self._describe(holder)}; "
                                      f"lock file {self.path}. If that job is gone, delete the lock file.") from None
                self._take_over(holder)
                continue
            except OSError as error:
                raise OutputError(f"{self.output}: cannot create the lock file {self.path} ({_reason(error)}); "
                                  f"choose an --out in a writable folder") from None
            self._write_new(fd, record)
            self._record = record
            return
        raise OutputError(f"{self.output}: could not take the lock {self.path} (contended); try again")

    def _make_parent(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise OutputError(f"{self.output}: cannot create its folder {self.path.parent} "
                              f"({_reason(error)})") from None

    def _write_new(self, fd: int, record: dict) -> None:
        """Write the record into the freshly created lock; on failure remove it, so no empty lock stays."""
        data = json.dumps(record).encode()
        try:
            try:
                while data:
                    data = data[os.write(fd, data):]
            finally:
                os.close(fd)
        except OSError as error:
            self.path.unlink(missing_ok=True)
            raise OutputError(f"{self.output}: cannot write the lock file {self.path} ({_reason(error)})") from None

    def _take_over(self, holder: dict) -> None:
        """Move a stale lock aside atomically; put it back if it changed under us."""
        aside = self.path.parent / f".{self.path.name}.stale-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        except OSError as error:
            raise OutputError(f"{self.output}: cannot replace the stale lock file {self.path} "
                              f"({_reason(error)})") from None
        if self._read(aside) != holder:  # someone replaced the stale lock before we moved it
            try:
                os.link(aside, self.path)
            except FileExistsError:
                pass
            os.unlink(aside)
            return
        os.unlink(aside)
        log.warning("%s: took over a stale lock held by %s", self.output, self._describe(holder))

    def refresh(self) -> None:
        """Rewrite the heartbeat; raise `OutputError` if the lock was taken over meanwhile."""
        if self._record is None:
            raise RuntimeError(f"{self.path}: refresh() on a lock that is not held")
        current = self._read(self.path)
        if current is None or current.get("token") != self._record["token"]:
            raise OutputError(f"{self.output}: lost the lock {self.path} to another job")
        self._record = {**self._record, "heartbeat": time.time()}
        staging = self.path.parent / f".{self.path.name}.{self._record['token']}"
        staging.write_text(json.dumps(self._record))
        os.replace(staging, self.path)

    def start_heartbeat(self, interval_s: float = 60.0) -> None:
        """Refresh the heartbeat every `interval_s` seconds in a daemon thread until release."""
        def beat() -> None:
            while not self._stop.wait(interval_s):
                try:
                    self.refresh()
                except (OutputError, OSError) as error:
                    log.error("%s", error)
                    return

        self._thread = threading.Thread(target=beat, name=f"lock-heartbeat:{self.output.name}", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Delete the lock file if this object still holds it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._record is None:
            return
        current = self._read(self.path)
        if current is not None and current.get("token") == self._record["token"]:
            self.path.unlink(missing_ok=True)
        self._record = None
