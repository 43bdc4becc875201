"""Peak memory of a large distributed reconstruction: driver and each SlabWorker actor (issue 4).

The claim under test (DESIGN.md, "Distribution"): a 384^3 (or larger) volume reconstructs, and no
process holds more than its slab's working set plus the model; nothing holds the full volume.

1. a dataset: ``mbir-batch simulate --phantom 9500 --size 384 --task svct --views 8`` (reused when
   it exists), and a copy of it without ``reference`` (so the driver does not score);
2. a timing/memory FIXTURE denoiser (``harness.denoisers.save_fixture_denoiser``: random weights,
   tiny channels, at the dataset's resolution) and its activation memory per slice;
3. for every run ``method:workers[:noref]`` the real CLI, ``mbir-batch submit DATASET --method M
   --config memory.yaml [--model fixture.json] --workers N --cpus-per-worker 1``, with a
   ``harness.procs.TreeMonitor`` sampling the driver and every process under it every 0.2 s (the
   actors are the processes named ``SlabWorker``; their slab comes from the actor's log file);
4. the size-independent part of each process (``bench/rss_probe.py`` in a fresh Python), admm-tv's
   peak over its live starting state in one fresh process, and the paper-size denoiser's activations.

    python bench/memory.py                           # 384^3: fbp x1/x2 (noref), fbp x2, admm-tv x2 (noref), dds x2
    python bench/memory.py --runs dds:2,dds:1 --size 384
    python bench/memory.py --size 32 --runs fbp:1:noref,fbp:2:noref --paper-activations 0 --no-state-check

Writes ``bench/results/memory-cpu-<date>.md`` and ``.json``; bench/README.md says how to read them.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness.denoisers import FIXTURE_LABEL, build_denoiser, parameter_count, save_fixture_denoiser
from harness.problems import cli_path, simulate_dataset, svct_problem
from harness.procs import TreeMonitor, reset_peak_rss, vm_status
from harness.ranks import RankContext, run_ranks
from harness.results import BENCH_DIR, RESULTS_DIR, command_line, environment, publish, rerender, today
from memory_report import DENOISING, MB, render, theory

# name -> the bench/rss_probe.py steps whose VmRSS it is
BASELINES = {
    "actor imports + operator": ("actor",),
    "+ denoiser module and fixture model": ("actor", "denoiser"),
    "driver imports (cli, cluster.job)": ("driver",),
    "+ scoring imports (mbir_batch.metrics, skimage)": ("driver", "scoring"),
}


def _env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", RAY_USAGE_STATS_ENABLED="0")


# -- fixtures ----------------------------------------------------------------------------------------------

def ensure_dataset(path: Path, size: int, depth: int, phantom: int, log=print) -> dict[str, Any]:
    """Simulate the dataset with the CLI unless it exists (then ``simulate_s`` is None)."""
    if path.exists():
        log(f"[memory] reusing {path}")
        return {"path": str(path), "size": size, "depth": depth, "phantom": phantom, "simulate_s": None}
    info = simulate_dataset(path, size=size, depth=depth, phantom=phantom, env=_env())
    log(f"[memory] simulated {path} in {info['simulate_s']:.1f} s")
    return info


def without_reference(dataset: Path, out: Path) -> Path:
    """A copy of ``dataset`` minus its ``reference`` array (zarr v3: an array is its folder)."""
    from mbir_batch.dataset import open_dataset

    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(dataset, out, ignore=lambda folder, names: ["reference"] if Path(folder) == dataset else [])
    if open_dataset(out, verify_data=False).has_reference:
        raise SystemExit(f"{out}: still has a reference after removing the folder")
    return out


def activation_bytes(model, size: int, batches: tuple[int, ...] = (1, 2, 4)) -> dict[str, Any]:
    """Peak RSS growth of one ``denoise_slab`` batch (VmHWM reset before each), 1 thread.

    Returns the fitted bytes per slice and the intercept (allocator reserve) over ``batches``.
    """
    import numpy as np
    import torch
    from mbir_batch.kernels.denoiser import denoise_slab

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        x = torch.rand(max(batches), size, size)
        denoise_slab(model, x[:1], 1.0, batch=1)  # first-call allocations
        growth = []
        for b in batches:
            base = reset_peak_rss()
            denoise_slab(model, x[:b], 1.0, batch=b)
            growth.append(vm_status()["VmHWM"] - base)
    finally:
        torch.set_num_threads(threads)
    slope, intercept = np.polyfit(np.asarray(batches, float), np.asarray(growth, float), 1)
    return {"batches": list(batches), "growth_bytes": growth, "bytes_per_slice": float(slope),
            "intercept_bytes": float(intercept)}


def import_baselines(dataset: Path, model: Path) -> dict[str, int]:
    """VmRSS (bytes) of a fresh Python after each set of :data:`BASELINES` steps (``bench/rss_probe.py``)."""
    out: dict[str, int] = {}
    for name, steps in BASELINES.items():
        command = [sys.executable, str(BENCH_DIR / "rss_probe.py"), *steps, "--dataset", str(dataset),
                   "--model", str(model)]
        done = subprocess.run(command, check=False, capture_output=True, text=True, env=_env())
        if done.returncode:
            raise SystemExit(f"baseline {name!r} ({' '.join(command)}) failed:\n{done.stderr[-2000:]}")
        out[name] = int(done.stdout.strip().splitlines()[-1])
    return out


def state_peak(ctx: RankContext, slices: int, size: int) -> float:
    """admm-tv over ``slices`` x ``size^2`` in this (fresh) process: the peak RSS over the live starting
    state, in slab buffers S, with the caller holding the SlabState as SlabWorker.run does."""
    import torch
    from mbir_batch.kernels.comm import LocalComm
    from mbir_batch.methods import get
    from mbir_batch.solve import SlabSolver

    problem = svct_problem(torch.rand(slices, size, size), 8)
    solver = SlabSolver(problem, get("admm-tv").config_type(iters=2, cg_iters=2, lam=0.02), comm=LocalComm())
    state = solver.initial_state()  # held by this frame during run()
    base = reset_peak_rss()
    solver.run(state)
    return (vm_status()["VmHWM"] - base) / (slices * size * size * 4)


def state_check(size: int, slices: int = 96) -> dict[str, float]:
    """:func:`state_peak` in one fresh process (slabs above glibc's 32 MB mmap threshold at 96 slices)."""
    return {"slices": slices, "peak_s": run_ranks(state_peak, 1, slices, size, threads=1)[0]}


def write_config(path: Path, steps: int, cg_iters: int, batch: int) -> Path:
    path.write_text(
        "description: bench/memory.py - few steps, few CG iterations (a memory run, not a quality run)\n"
        f"dds:\n  steps: {steps}\n  cg_iters: {cg_iters}\n  batch: {batch}\n  rho: 1.0\n  lam: 0.1\n"
        f"admm-tv:\n  iters: {steps}\n  cg_iters: {cg_iters}\n  rho: 1.0\n  lam: 0.02\n"
        "fbp: {}\n")
    return path


# -- one run -----------------------------------------------------------------------------------------------

def ray_kind(cmdline: str) -> str:
    """A process under ``mbir-batch submit``: a SlabWorker ``actor`` or another ``ray`` process."""
    return "actor" if "SlabWorker" in cmdline else "ray"


def actor_slabs(monitor: TreeMonitor) -> dict[int, tuple[int, ...]]:
    """pid -> (rank, z0, z1) of each actor, from its log file (the log prefix names the slab)."""
    sessions = [re.search(r"--session[-_]dir=(\S+)", record["cmd"]) for record in monitor.of_kind("ray")]
    session = next((found.group(1) for found in sessions if found), None)
    found: dict[int, tuple[int, ...]] = {}
    for record in monitor.of_kind("actor") if session else []:
        for path in glob.glob(os.path.join(session, "logs", f"worker-*-{record['pid']}.err")):
            match = re.search(r"slab(\d+)\[z(\d+)-(\d+)\]", Path(path).read_text(errors="replace"))
            if match:
                found[record["pid"]] = tuple(int(g) for g in match.groups())
    return found


def submit(dataset: Path, out: Path, method: str, workers: int, config: Path, model: Path | None,
           log=print) -> dict[str, Any]:
    """One ``mbir-batch submit``, sampled by a :class:`TreeMonitor`; its peaks, timings and traffic."""
    command = [str(cli_path()), "submit", str(dataset), "--method", method, "--config", str(config), "--out",
               str(out), "--workers", str(workers), "--cpus-per-worker", "1", "--overwrite"]
    if model is not None:
        command += ["--model", str(model)]
    started = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env())
    monitor = TreeMonitor(proc.pid, ray_kind, default_kind="ray")
    monitor.start()
    assert proc.stdout is not None
    text = "".join(proc.stdout)
    # wait4 gives the driver's own ru_maxrss as a cross-check of the sampled VmHWM
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    monitor.stop()
    wall = time.perf_counter() - started
    if proc.returncode:
        raise SystemExit(f"submit failed ({proc.returncode}):\n{' '.join(command)}\n{text[-3000:]}")
    slabs = actor_slabs(monitor)
    actors = [{"pid": r["pid"], "rank": rank, "z0": z0, "z1": z1, "rss_max": r["rss_max"], "hwm": r["hwm"]}
              for r in monitor.of_kind("actor") for rank, z0, z1 in [slabs.get(r["pid"], (None, None, None))]]
    actors.sort(key=lambda a: (a["rank"] is None, a["rank"], a["pid"]))
    driver = monitor.procs.get(proc.pid, {"rss_max": 0, "hwm": 0})
    ray_procs = monitor.of_kind("ray")
    from mbir_batch.output import OutputStore

    attrs = OutputStore.open(out, mode="r").attrs
    log(f"[memory] {method} x{workers} {Path(dataset).name}: driver peak {driver['hwm'] / MB:.0f} MB, actors "
        + ", ".join(f"{a['hwm'] / MB:.0f} MB" for a in actors) + f" ({wall:.0f} s, {monitor.samples} samples)")
    return {
        "method": method, "workers": workers, "dataset": str(dataset), "command": " ".join(["mbir-batch", *command[1:]]),
        "wall_s": wall, "timings": attrs.get("timings"), "complete": attrs.get("complete"),
        "bytes_sent": attrs.get("bytes_sent"), "metrics": attrs.get("metrics"),
        "driver": {"pid": proc.pid, "rss_max": driver["rss_max"], "hwm": driver["hwm"],
                   "ru_maxrss": usage.ru_maxrss * 1024},
        "actors": actors, "ray_processes": len(ray_procs),
        "ray_processes_rss_max_sum": sum(r["rss_max"] for r in ray_procs), "max_total_rss": monitor.max_total,
        "samples": monitor.samples, "timeline": monitor.timeline[:: max(1, len(monitor.timeline) // 400)],
        "load": monitor.load[:: max(1, len(monitor.load) // 400)], "stdout_tail": text[-1500:],
    }


# -- the numbers derived from several runs -----------------------------------------------------------------

def derive(result: dict[str, Any]) -> None:
    """Add the actor baseline (fbp x1 vs x2), the denoiser's extra baseline and the driver's scoring cost."""
    runs = result["runs"]
    fbp1 = [r for r in runs if r["method"] == "fbp" and r["workers"] == 1]
    fbp2 = [r for r in runs if r["method"] == "fbp" and r["workers"] == 2]
    if fbp1 and fbp2 and fbp1[0]["actors"] and fbp2[0]["actors"]:
        one, two = fbp1[0]["actors"][0], max(fbp2[0]["actors"], key=lambda a: a["hwm"])
        s_one = fbp1[0]["theory"]["per_actor"][0]["slab_bytes"]
        s_two = max(t["slab_bytes"] for t in fbp2[0]["theory"]["per_actor"])
        k = (one["hwm"] - two["hwm"]) / (s_one - s_two)
        result["fbp_buffers_per_slab"] = k
        result["actor_baseline_bytes"] = two["hwm"] - k * s_two
    imports = result["import_baselines"]
    names = list(BASELINES)
    result["baseline_extra"] = {"dds": imports[names[1]] - imports[names[0]]}
    with_ref = [r for r in fbp2 if not r["noref"]]
    without = [r for r in fbp2 if r["noref"]]
    if with_ref and without:
        delta = with_ref[0]["driver"]["hwm"] - without[0]["driver"]["hwm"]
        score_imports = imports[names[3]] - imports[names[2]]
        result["driver_scoring"] = {"with": with_ref[0]["driver"]["hwm"], "without": without[0]["driver"]["hwm"],
                                    "delta": delta, "imports": score_imports, "data": delta - score_imports}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=384)
    parser.add_argument("--depth", type=int, default=None, help="default: size")
    parser.add_argument("--phantom", type=int, default=9500)
    parser.add_argument("--workdir", default="/tmp/mbir-memory", help="dataset, fixture model and outputs")
    parser.add_argument("--dataset", default=None, help="default: WORKDIR/big-SIZE.zarr (simulated if missing)")
    parser.add_argument("--runs", default="fbp:1:noref,fbp:2:noref,fbp:2,admm-tv:2:noref,dds:2",
                        help="method:workers[:noref], comma-separated")
    parser.add_argument("--steps", type=int, default=2, help="dds steps / admm-tv iterations")
    parser.add_argument("--cg-iters", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8, help="dds denoiser batch (slices)")
    parser.add_argument("--out", default=None, help="report stem (default results/memory-cpu-<date>)")
    parser.add_argument("--keep", action="store_true", help="keep the output stores")
    parser.add_argument("--render", default=None, help="only re-render the report from this JSON")
    parser.add_argument("--paper-activations", type=int, default=256, metavar="SIZE",
                        help="also measure the activations of the paper-size denoiser at SIZE^2 (0: skip)")
    parser.add_argument("--state-check", action=argparse.BooleanOptionalAction, default=True,
                        help="also measure the held-initial-state cost in one process (admm-tv, 96 slices)")
    args = parser.parse_args(argv)
    if args.render:
        rerender(Path(args.render), render, Path(args.out) if args.out else None)
        return 0
    depth = args.depth or args.size
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    dataset = Path(args.dataset) if args.dataset else workdir / f"big-{args.size}.zarr"
    result: dict[str, Any] = {"date": today(), "env": environment("cpu"), "batch": args.batch,
                              "command": command_line("memory.py", argv)}
    result["dataset"] = ensure_dataset(dataset, args.size, depth, args.phantom)
    config = write_config(workdir / "memory.yaml", args.steps, args.cg_iters, args.batch)
    result["config_text"] = config.read_text()
    model_path, model = save_fixture_denoiser(workdir, args.size)
    result.update(model=str(model_path), model_label=FIXTURE_LABEL, model_parameters=parameter_count(model))
    result["model_bytes"] = result["model_parameters"] * 4
    runs = [r.split(":") for r in args.runs.split(",") if r]
    if any(r[0] in DENOISING for r in runs):
        result["activations"] = activation_bytes(model, args.size)
    del model
    result["import_baselines"] = import_baselines(dataset, model_path)
    noref = without_reference(dataset, workdir / f"big-{args.size}-noref.zarr") if any(
        len(r) > 2 and r[2] == "noref" for r in runs) else None
    result["runs"] = []
    for spec in runs:
        method, workers = spec[0], int(spec[1])
        use_noref = len(spec) > 2 and spec[2] == "noref"
        out = workdir / f"out-{method}-x{workers}{'-noref' if use_noref else ''}.zarr"
        run = submit(noref if use_noref else dataset, out, method, workers, config,
                     model_path if method in DENOISING else None)
        run["noref"] = use_noref
        run["theory"] = theory(run, (depth, args.size, args.size), result.get("activations"), args.batch,
                               result["model_bytes"])
        result["runs"].append(run)
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)
    derive(result)
    if args.state_check:
        result["state_check"] = state_check(args.size)
    if args.paper_activations:
        paper, label = build_denoiser("paper", args.paper_activations, "cpu")
        result["paper_activations"] = activation_bytes(paper, args.paper_activations) | {
            "size": args.paper_activations, "label": label, "parameters": parameter_count(paper)}
        del paper
    publish(Path(args.out) if args.out else RESULTS_DIR / f"memory-cpu-{result['date']}", render(result), result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
