"""Process sampling: resident memory, its peak and CPU seconds of a process tree, over time.

Linux only (``/proc``). The peak is the kernel's own high-water mark of the resident set
(``VmHWM`` in ``/proc/PID/status``): read at every sample, its last reading before a process ends
is the true peak even between samples. ``reset_peak_rss`` starts a new interval for this process.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import Any

import psutil

_GONE = (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess)


def vm_status(pid: int | str = "self") -> dict[str, int]:
    """``{"VmRSS": bytes, "VmHWM": bytes}`` of a process (empty when it is gone)."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    key, value = line.split(":")
                    out[key] = int(value.split()[0]) * 1024
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return out


def reset_peak_rss() -> int:
    """Reset this process's ``VmHWM`` to its current RSS (``/proc/self/clear_refs``); return that RSS."""
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")
    return vm_status()["VmRSS"]


def process_tree(root: int) -> list[tuple[psutil.Process, str]]:
    """``(process, command line)`` of ``root`` and every live descendant."""
    try:
        parent = psutil.Process(root)
        procs = [parent] + parent.children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    out = []
    for proc in procs:
        try:
            out.append((proc, " ".join(proc.cmdline())))
        except _GONE:
            continue
    return out


def tree_cpu_seconds(match: str, root: int | None = None) -> dict[int, float]:
    """User + system CPU seconds of each descendant of ``root`` (default: this process) whose
    command line contains ``match``, e.g. ``"SlabWorker"`` for the Ray actors of an embedded Ray."""
    out = {}
    for proc, cmdline in process_tree(os.getpid() if root is None else root):
        if match in cmdline:
            try:
                times = proc.cpu_times()
            except _GONE:
                continue
            out[proc.pid] = times.user + times.system
    return out


class TreeMonitor(threading.Thread):
    """Samples ``root`` and its descendants every ``period`` seconds between :meth:`start` and :meth:`stop`.

    ``classify(command line)`` names a process's kind (``root`` is always ``"root"``); a process
    first seen as ``default_kind`` takes the first other kind it shows (an idle Ray worker that
    becomes an actor).

    Attributes
    ----------
    procs : pid -> ``{"pid", "kind", "cmd", "rss_max", "hwm"}`` (bytes; ``hwm`` the last VmHWM read).
    timeline : ``(seconds since start, {kind: summed RSS})`` per sample.
    max_total : the largest summed RSS of the tree in one sample.
    load : the 1-minute load average at every sample.
    """

    def __init__(self, root: int, classify: Callable[[str], str], *, period: float = 0.2,
                 default_kind: str = "other") -> None:
        super().__init__(daemon=True)
        self.root, self.classify, self.period, self.default_kind = root, classify, period, default_kind
        self.procs: dict[int, dict[str, Any]] = {}
        self.timeline: list[tuple[float, dict[str, int]]] = []
        self.load: list[float] = []
        self.max_total = 0
        self.samples = 0
        self._halt = threading.Event()
        self._t0 = time.perf_counter()

    def stop(self) -> None:
        """End the sampling (waits for the thread)."""
        self._halt.set()
        self.join()

    def run(self) -> None:
        while not self._halt.is_set():
            self.sample()
            self._halt.wait(self.period)

    def sample(self) -> None:
        """One reading of every process of the tree."""
        sums: dict[str, int] = {}
        for proc, cmdline in process_tree(self.root):
            try:
                rss = proc.memory_info().rss
            except _GONE:
                continue
            kind = "root" if proc.pid == self.root else self.classify(cmdline)
            record = self.procs.setdefault(proc.pid, {"pid": proc.pid, "kind": None, "cmd": cmdline, "rss_max": 0,
                                                      "hwm": 0})
            if record["kind"] in (None, self.default_kind):
                record["kind"], record["cmd"] = kind, cmdline
            record["rss_max"] = max(record["rss_max"], rss)
            record["hwm"] = max(record["hwm"], vm_status(proc.pid).get("VmHWM", 0))
            sums[record["kind"]] = sums.get(record["kind"], 0) + rss
        self.max_total = max(self.max_total, sum(sums.values()))
        self.timeline.append((time.perf_counter() - self._t0, sums))
        self.load.append(os.getloadavg()[0])
        self.samples += 1

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        """The records of the processes of ``kind``."""
        return [record for record in self.procs.values() if record["kind"] == kind]
