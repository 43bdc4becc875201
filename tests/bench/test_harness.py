"""bench/harness: the benchmarks' problems, rank launcher, process sampling and result files."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

from harness.problems import make_volume, svct_geometry, svct_problem  # noqa: E402
from harness.procs import TreeMonitor, reset_peak_rss, vm_status  # noqa: E402
from harness.ranks import RankContext, RankError, run_ranks  # noqa: E402
from harness.results import markdown_table, write_report  # noqa: E402


@pytest.mark.parametrize("size, views", [(16, 8), (20, 3)])
def test_svct_geometry_is_the_one_simulate_gives_a_dataset(size, views):
    from mbir_batch.io import simulate_measurements

    sim = simulate_measurements(np.zeros((1, size, size), np.float32), task="svct", views=views)
    assert svct_geometry(size, views) == sim.geometry


def test_svct_problem_of_a_slab_holds_that_slab_of_the_whole_sinogram():
    volume = make_volume(16, 6)
    whole = svct_problem(volume, 4)
    slab = svct_problem(volume, 4, z0=2, z1=5)
    assert (slab.z0, slab.z1, slab.depth) == (2, 5, 6)
    assert torch.equal(slab.measurements, whole.measurements[2:5])


def _rank_sum(ctx: RankContext, offset: int) -> tuple[int, int, float, int]:
    """All-reduce ``rank + offset`` over a real gloo TorchDistComm; return what this rank saw."""
    from mbir_batch.cluster.dist_comm import TorchDistComm

    comm = TorchDistComm(ctx.rank, ctx.world, "gloo", addr=ctx.addr, port=ctx.port, timeout_s=60)
    try:
        total = comm.all_reduce_sum(torch.tensor([float(ctx.rank + offset)], dtype=torch.float64))
    finally:
        comm.close()
    return ctx.rank, ctx.world, float(total[0]), os.getpid()


def _rank_fails_on_one(ctx: RankContext) -> int:
    if ctx.rank == 1:
        raise ValueError("rank one refuses")
    return ctx.rank


def _own_pid(ctx: RankContext) -> tuple[int, int]:
    return os.getpid(), torch.get_num_threads()


def test_run_ranks_returns_each_ranks_value_in_rank_order_from_other_processes():
    results = run_ranks(_rank_sum, 2, 10, timeout_s=300, threads=1)
    assert [r[:3] for r in results] == [(0, 2, 21.0), (1, 2, 21.0)]
    assert len({r[3] for r in results} | {os.getpid()}) == 3


def test_run_ranks_names_the_failing_rank_with_its_traceback():
    with pytest.raises(RankError, match=r"rank 1 of 2 failed:(.|\n)*ValueError: rank one refuses"):
        run_ranks(_rank_fails_on_one, 2, timeout_s=300)


def test_one_rank_is_a_fresh_process_with_the_threads_asked_for():
    pid, threads = run_ranks(_own_pid, 1, timeout_s=300, threads=1)[0]
    assert pid != os.getpid() and threads == 1


def test_peak_rss_counts_an_allocation_after_the_reset():
    base = reset_peak_rss()
    block = np.ones(64 * 2**20 // 8)  # 64 MiB, touched
    assert vm_status()["VmHWM"] - base >= 60 * 2**20
    del block


def test_tree_monitor_samples_the_children_it_classifies():
    sleeper = subprocess.Popen(["sleep", "3"])
    monitor = TreeMonitor(os.getpid(), lambda cmd: "sleeper" if cmd.startswith("sleep") else "other", period=0.05)
    try:
        monitor.start()
        time.sleep(0.5)
    finally:
        monitor.stop()
        sleeper.kill()
        sleeper.wait()
    assert [r["pid"] for r in monitor.of_kind("sleeper")] == [sleeper.pid]
    root = monitor.procs[os.getpid()]
    assert root["kind"] == "root" and root["hwm"] >= root["rss_max"] > 0
    assert monitor.samples >= 3 and len(monitor.load) == monitor.samples
    assert all(sample["root"] > 0 for _, sample in monitor.timeline)


def test_markdown_table_formats_floats_and_missing_values():
    table = markdown_table(["a", "b", "c"], [[1.234567, None, float("nan")], ["x", 12345678.0, 3]])
    assert table.splitlines() == ["| a | b | c |", "|---|---|---|", "| 1.235 | - | - |", "| x | 1.235e+07 | 3 |"]


def test_write_report_writes_markdown_and_json_here_and_into_out(tmp_path, monkeypatch):
    monkeypatch.setenv("OUT", str(tmp_path / "out"))
    written = write_report(tmp_path / "res" / "r1", "# r1\n", {"n": np.int64(3), "x": np.float32(0.5),
                                                              "p": tmp_path})
    assert sorted(p.relative_to(tmp_path).as_posix() for p in written) == ["out/r1.json", "out/r1.md",
                                                                           "res/r1.json", "res/r1.md"]
    assert json.loads((tmp_path / "out" / "r1.json").read_text()) == {"n": 3, "x": 0.5, "p": str(tmp_path)}
    assert (tmp_path / "res" / "r1.md").read_text() == "# r1\n"
