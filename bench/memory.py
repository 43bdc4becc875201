"""Peak memory of a large distributed reconstruction: driver and each SlabWorker actor (issue 4).

The claim under test (DESIGN.md, "Distribution"): a 384^3 (or larger) volume reconstructs, and no
process holds more than its slab's working set plus the model; nothing holds the full volume.

What it does:

1. a dataset: ``mbir-batch simulate --phantom 9500 --size 384 --task svct --views 8`` (reused when
   it exists), and a copy of it without ``reference`` (so the driver does not score);
2. a **timing/memory fixture denoiser**: a RANDOM-INIT ``Denoiser`` at the dataset's resolution with
   tiny channels (8, 16, 32), one layer per block and no attention, saved with ``save_denoiser``.
   It is not trained; its reconstructions are meaningless; it only makes the run cost what a small
   network costs. Its activation memory per slice is measured here (VmHWM around one batch);
3. for every run ``method:workers[:noref]`` it starts the real CLI,
   ``mbir-batch submit DATASET --method M --config memory.yaml [--model tiny.json] --workers N
   --cpus-per-worker 1``, and a monitor thread samples, every 0.2 s, the CLI process (the driver)
   and every descendant whose command line names ``SlabWorker`` (the actors; their rank comes from
   the actor's log file, which names the slab). For each it keeps the largest sampled RSS and the
   kernel's own peak (``VmHWM`` in /proc/PID/status, read at every sample, so the last reading before
   the process ends is its true peak even between samples);
4. compares each actor's peak with the theoretical slab working set: slab voxels x 4 B x the number of
   slab-sized float32 buffers the solver keeps live (counted per method below), plus the denoiser's
   batch activations, the radon matrices and the process baseline; and with the full volume.

    python bench/memory.py                           # 384^3: fbp x1/x2 (noref), fbp x2, admm-tv x2 (noref), dds x2
    python bench/memory.py --runs dds:2,dds:1 --size 384
    python bench/memory.py --size 128 --runs fbp:2,dds:2 --out /tmp/mem-smoke    # quick

Writes ``bench/results/memory-cpu-<date>.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, environment, markdown_table, today, write_report

MB = 1e6
FIXTURE_CHANNELS = (8, 16, 32)
FIXTURE_LABEL = "tiny RANDOM-INIT denoiser, a timing/memory FIXTURE (not trained; output meaningless)"

# Slab-sized float32 buffers (S = slab voxels x 4 B) live at the peak of a run: (persistent, peak, what).
# Counted from the code; the transient part of admm-tv was also measured in one process (see the report).
# SlabSolver.run consumes its starting SlabState (SlabState.release), so the initial ADMM variables (and
# admm-tv's initial x) are freed after the first step; only a diffusion run's starting x (1 S) stays
# alive, held by the sampler call's argument.
BUFFERS = {
    "fbp": (3, 4, "aty, initial zeros x, FBP result, A^T reshape copy"),
    "admm-tv": (8, 34, ("x, aty, z (3 S), w (3 S) persistent; step transients 26 S "
                        "(D v = 3 S stacked + its parts, new z/w next to the old, soft-threshold and residual "
                        "temporaries of 3 S each, CG x/r/p/Mp, rhs)")),
    "dds": (4, 15, ("x, aty, z, w persistent; + 1 S starting x held by the sampler call; denoised; CG x, r, p, "
                    "Mp + operator temporaries; D_z x, new z/w; DDIM eps_hat, noise")),
}


# -- fixtures ----------------------------------------------------------------------------------------------

def cli() -> str:
    return str(Path(sys.executable).with_name("mbir-batch"))


def ensure_dataset(path: Path, size: int, depth: int, phantom: int, log=print) -> dict[str, Any]:
    """Simulate the dataset with the CLI unless it exists; return how long that took (None: reused)."""
    info: dict[str, Any] = {"path": str(path), "size": size, "depth": depth, "phantom": phantom}
    if path.exists():
        info["simulate_s"] = None
        log(f"[memory] reusing {path}")
        return info
    command = [cli(), "simulate", "--phantom", str(phantom), "--size", str(size), "--depth", str(depth), "--task",
               "svct", "--views", "8", "--out", str(path)]
    started = time.perf_counter()
    done = subprocess.run(command, check=False, capture_output=True, text=True, env=_env())
    if done.returncode:
        raise SystemExit(f"simulate failed:\n{done.stdout}\n{done.stderr}")
    info["simulate_s"] = time.perf_counter() - started
    info["simulate_command"] = " ".join(command[1:])
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


def fixture_denoiser(folder: Path, size: int):
    """Save the random-init tiny denoiser; return (json path, model)."""
    import torch
    from mbir_batch.kernels.denoiser import Denoiser, DenoiserConfig, save_denoiser

    torch.manual_seed(0)
    config = DenoiserConfig(resolution=size, channels=FIXTURE_CHANNELS, layers_per_block=1,
                            attention_levels=(False,) * len(FIXTURE_CHANNELS), norm_groups=8)
    model = Denoiser(config).eval()
    json_path, _ = save_denoiser(model, folder / f"fixture-random-{size}",
                                 {"purpose": "bench/memory.py timing/memory fixture", "weights": "RANDOM INIT, seed 0",
                                  "trained": False})
    return json_path, model


def _vm(pid: int | str = "self") -> dict[str, int]:
    """VmRSS / VmHWM of a process in bytes (empty when it is gone)."""
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


def activation_bytes(model, size: int, batches: tuple[int, ...] = (1, 2, 4)) -> dict[str, float]:
    """Peak RSS growth of one ``denoise_slab`` batch (VmHWM reset via /proc/self/clear_refs), 1 thread.

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
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS
            base = _vm()["VmRSS"]
            denoise_slab(model, x[:b], 1.0, batch=b)
            growth.append(_vm()["VmHWM"] - base)
    finally:
        torch.set_num_threads(threads)
    slope, intercept = np.polyfit(np.asarray(batches, float), np.asarray(growth, float), 1)
    return {"batches": list(batches), "growth_bytes": growth, "bytes_per_slice": float(slope),
            "intercept_bytes": float(intercept)}


_BASELINES = {
    "actor imports + operator": "import ray, torch, zarr; import mbir_batch.solve, mbir_batch.dataset, "
                                "mbir_batch.output, mbir_batch.cluster.worker, mbir_batch.cluster.dist_comm; "
                                "torch.set_num_threads(1); from mbir_batch.dataset import open_dataset; "
                                "op = open_dataset(DATASET, verify_data=False).operator(0, 8)",
    "+ denoiser module and fixture model": "+; from mbir_batch.kernels.denoiser import load_denoiser; "
                                           "m = load_denoiser(MODEL)",
    "driver imports (cli, cluster.job)": "import mbir_batch.cli, mbir_batch.cluster.job, mbir_batch.dataset",
    "+ scoring imports (mbir_batch.metrics, skimage)": "+; import mbir_batch.metrics",
}


def import_baselines(dataset: Path, model: Path) -> dict[str, int]:
    """VmRSS (bytes) of a fresh Python after each set of imports: the size-independent part of a process."""
    out: dict[str, int] = {}
    previous = ""
    for name, code in _BASELINES.items():
        code = previous + code[1:] if code.startswith("+") else code
        previous = code
        script = (f"DATASET = {str(dataset)!r}; MODEL = {str(model)!r}\n{code}\n"
                  "print([l for l in open('/proc/self/status') if l.startswith('VmRSS')][0].split()[1])")
        done = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True,
                              env=_env())
        if done.returncode:
            raise SystemExit(f"baseline {name!r} failed:\n{done.stderr[-2000:]}")
        out[name] = int(done.stdout.strip().splitlines()[-1]) * 1024
    return out


_STATE_CHECK = """
import sys, numpy as np, torch
torch.set_num_threads(1)
from mbir_batch.methods import get
from mbir_batch.kernels.comm import LocalComm
from mbir_batch.kernels.radon import ParallelBeam
from mbir_batch.solve import SlabProblem, SlabSolver
Z, N = int(sys.argv[1]), int(sys.argv[2])
angles = [float(a) for a in np.linspace(0, 180, 8, endpoint=False)]
op = ParallelBeam(shape=(N, N), angles_deg=angles, det_count=int(np.ceil(N * np.sqrt(2))), det_spacing=1.0)
problem = SlabProblem(z0=0, z1=Z, depth=Z, operator=op, measurements=op.A(torch.rand(Z, N, N)))
solver = SlabSolver(problem, get("admm-tv").config_type(iters=2, cg_iters=2, lam=0.02), comm=LocalComm())
def vm(key):
    return int([l for l in open("/proc/self/status") if l.startswith(key)][0].split()[1]) * 1024
state = solver.initial_state()  # held by this frame during run(), as SlabWorker.run holds it
open("/proc/self/clear_refs", "w").write("5")
base = vm("VmRSS")
solver.run(state)
print((vm("VmHWM") - base) / (Z * N * N * 4))
"""


def state_check(size: int, slices: int = 96) -> dict[str, float]:
    """admm-tv in one process (LocalComm, ``slices`` x size^2, slabs > glibc's 32 MB mmap threshold): the peak
    over the live initial state, in slab buffers S, with the caller holding the SlabState (as SlabWorker.run
    does; SlabSolver.run releases its tensors)."""
    done = subprocess.run([sys.executable, "-c", _STATE_CHECK, str(slices), str(size)], check=False,
                          capture_output=True, text=True, env=_env())
    if done.returncode:
        raise SystemExit(f"state check failed:\n{done.stderr[-2000:]}")
    return {"slices": slices, "peak_s": float(done.stdout.strip().splitlines()[-1])}


def write_config(path: Path, steps: int, cg_iters: int, batch: int) -> Path:
    path.write_text(
        "description: bench/memory.py - few steps, few CG iterations (a memory run, not a quality run)\n"
        f"dds:\n  steps: {steps}\n  cg_iters: {cg_iters}\n  batch: {batch}\n  rho: 1.0\n  lam: 0.1\n"
        f"admm-tv:\n  iters: {steps}\n  cg_iters: {cg_iters}\n  rho: 1.0\n  lam: 0.02\n"
        "fbp: {}\n")
    return path


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", RAY_USAGE_STATS_ENABLED="0")
    return env


# -- the monitor -------------------------------------------------------------------------------------------

class Monitor(threading.Thread):
    """Samples the driver and its descendants every ``period`` s until :meth:`stop`."""

    def __init__(self, pid: int, period: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.pid, self.period = pid, period
        self.procs: dict[int, dict[str, Any]] = {}
        self.samples = 0
        self.session_dir: str | None = None
        self.max_total = 0
        self.timeline: list[tuple[float, int, int]] = []  # (t, driver rss, sum of actor rss)
        self._halt = threading.Event()
        self.started = time.perf_counter()

    def stop(self) -> None:
        self._halt.set()

    def run(self) -> None:
        while not self._halt.is_set():
            self.sample()
            self._halt.wait(self.period)

    def _kind(self, cmdline: str) -> str:
        if "SlabWorker" in cmdline:
            return "actor"
        if "raylet" in cmdline and self.session_dir is None:
            found = re.search(r"--session[-_]dir=(\S+)", cmdline)
            self.session_dir = found.group(1) if found else None
        return "ray"

    def sample(self) -> None:
        try:
            driver = psutil.Process(self.pid)
            procs = [driver] + driver.children(recursive=True)
        except psutil.NoSuchProcess:
            return
        total = actors = driver_rss = 0
        for proc in procs:
            try:
                cmdline = " ".join(proc.cmdline())
                rss = proc.memory_info().rss
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            record = self.procs.setdefault(proc.pid, {"pid": proc.pid, "rss_max": 0, "hwm": 0, "kind": None,
                                                       "cmd": cmdline[:120]})
            kind = "driver" if proc.pid == self.pid else self._kind(cmdline)
            if kind == "actor" or record["kind"] is None:
                record["kind"], record["cmd"] = kind, cmdline[:120]  # an idle Ray worker can become an actor
            hwm = _vm(proc.pid).get("VmHWM")
            record["rss_max"] = max(record["rss_max"], rss)
            if hwm:
                record["hwm"] = max(record["hwm"], hwm)
            total += rss
            if record["kind"] == "actor":
                actors += rss
            elif record["kind"] == "driver":
                driver_rss = rss
        self.max_total = max(self.max_total, total)
        self.samples += 1
        self.timeline.append((time.perf_counter() - self.started, driver_rss, actors))

    def actor_slabs(self) -> dict[int, tuple[int, int, int]]:
        """pid -> (rank, z0, z1), from the actors' log files (the log prefix names the slab)."""
        found: dict[int, tuple[int, int, int]] = {}
        if not self.session_dir:
            return found
        for pid, record in self.procs.items():
            if record["kind"] != "actor":
                continue
            for path in glob.glob(os.path.join(self.session_dir, "logs", f"worker-*-{pid}.err")):
                match = re.search(r"slab(\d+)\[z(\d+)-(\d+)\]", Path(path).read_text(errors="replace"))
                if match:
                    found[pid] = tuple(int(g) for g in match.groups())
        return found


# -- one run -----------------------------------------------------------------------------------------------

def submit(dataset: Path, out: Path, method: str, workers: int, config: Path, model: Path | None,
           log=print) -> dict[str, Any]:
    command = [cli(), "submit", str(dataset), "--method", method, "--config", str(config), "--out", str(out),
               "--workers", str(workers), "--cpus-per-worker", "1", "--overwrite"]
    if model is not None:
        command += ["--model", str(model)]
    started = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env())
    monitor = Monitor(proc.pid)
    monitor.start()
    assert proc.stdout is not None
    output = list(proc.stdout)
    # wait4 gives the driver's own ru_maxrss as a cross-check of the sampled VmHWM
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    monitor.stop()
    monitor.join()
    wall = time.perf_counter() - started
    text = "".join(output)
    if proc.returncode:
        raise SystemExit(f"submit failed ({proc.returncode}):\n{' '.join(command)}\n{text[-3000:]}")
    slabs = monitor.actor_slabs()
    actors = []
    for pid, record in monitor.procs.items():
        if record["kind"] != "actor":
            continue
        rank, z0, z1 = slabs.get(pid, (None, None, None))
        actors.append({"pid": pid, "rank": rank, "z0": z0, "z1": z1, "rss_max": record["rss_max"],
                       "hwm": record["hwm"]})
    actors.sort(key=lambda a: (a["rank"] is None, a["rank"], a["pid"]))
    driver = monitor.procs.get(proc.pid, {"rss_max": 0, "hwm": 0})
    ray_procs = [r for r in monitor.procs.values() if r["kind"] == "ray"]
    from mbir_batch.output import OutputStore

    attrs = OutputStore.open(out, mode="r").attrs
    result = {
        "method": method, "workers": workers, "dataset": str(dataset), "command": " ".join(["mbir-batch"] + command[1:]),
        "wall_s": wall, "timings": attrs.get("timings"), "complete": attrs.get("complete"),
        "bytes_sent": attrs.get("bytes_sent"), "metrics": attrs.get("metrics"),
        "driver": {"pid": proc.pid, "rss_max": driver["rss_max"], "hwm": driver["hwm"],
                   "ru_maxrss": usage.ru_maxrss * 1024},
        "actors": actors, "ray_processes": len(ray_procs),
        "ray_processes_rss_max_sum": sum(r["rss_max"] for r in ray_procs), "max_total_rss": monitor.max_total,
        "samples": monitor.samples, "timeline": monitor.timeline[:: max(1, len(monitor.timeline) // 400)],
        "stdout_tail": text[-1500:],
    }
    log(f"[memory] {method} x{workers} {Path(dataset).name}: driver peak {driver['hwm'] / MB:.0f} MB, actors "
        + ", ".join(f"{a['hwm'] / MB:.0f} MB" for a in actors) + f" ({wall:.0f} s, {monitor.samples} samples)")
    return result


# -- theory and report -------------------------------------------------------------------------------------

def theory(run: dict[str, Any], shape: tuple[int, int, int], activations: dict[str, float] | None,
           batch: int, model_bytes: int) -> dict[str, Any]:
    depth, height, width = shape
    full = depth * height * width * 4
    out = []
    for actor in run["actors"]:
        slices = (actor["z1"] - actor["z0"]) if actor["z0"] is not None else depth // run["workers"]
        slab = slices * height * width * 4
        low, high, _ = BUFFERS[run["method"]]
        act = 0.0
        if run["method"] in ("dds", "mbir", "slice2d") and activations:
            act = activations["intercept_bytes"] + activations["bytes_per_slice"] * min(batch, slices)
        out.append({"rank": actor["rank"], "slices": slices, "slab_bytes": slab, "persistent": low * slab,
                    "estimate": high * slab + act + model_bytes, "activations": act, "buffers": (low, high),
                    "peak_minus_base": None, "equivalent_slab_buffers": None})
    return {"full_volume_bytes": full, "per_actor": out}


def render(result: dict[str, Any]) -> str:
    env, data = result["env"], result["dataset"]
    depth, size = data["depth"], data["size"]
    full = depth * size * size * 4
    act = result.get("activations")
    base = result.get("actor_baseline_bytes")
    lines = [f"# memory, cpu, {result['date']}", "",
             (f"env: python {env['python']}, torch {env['torch']}, machine {env['machine']}, commit {env['commit']}, "
             f"{os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB"), "",
             f"command: `{result['command']}`", "",
             ("Machine: a shared 2-core box (a background training job and other test runs used the cores too; "
             "memory figures do not depend on that, wall times do)."), "",
             f"Dataset: `mbir-batch simulate --phantom {data['phantom']} --size {size} --depth {depth} --task svct "
             f"--views 8` ({depth}x{size}x{size}; simulate took "
             + (f"{data['simulate_s']:.0f} s" if data.get("simulate_s") else "- (reused)") + "). "
             f"Full volume float32 = {full / MB:.0f} MB.", "",
             (f"Denoiser for dds: **{FIXTURE_LABEL}**: channels {FIXTURE_CHANNELS}, 1 layer per block, no attention, "
             f"{result['model_parameters']:,} parameters ({result['model_bytes'] / MB:.1f} MB), resolution {size}."), ""]
    if act:
        lines += ["Its batch activations (VmHWM growth of one `denoise_slab` batch, 1 thread): "
                  + ", ".join(f"batch {b}: {g / MB:.0f} MB" for b, g in zip(act["batches"], act["growth_bytes"]))
                  + f" -> {act['bytes_per_slice'] / MB:.1f} MB per slice + {act['intercept_bytes'] / MB:.0f} MB. "
                  f"The run uses batch {result['batch']}.", ""]
    lines += [f"Config: `{result['config_text'].strip()}`".replace("\n", "; "), "",
              "## Peak resident memory per process", "",
              ("Peak = VmHWM (kernel high-water mark of RSS), read every 0.2 s until the process ends; "
              "'sampled' is the largest sampled RSS. RSS includes shared library pages (torch etc.)."), ""]
    header = ["run", "process", "slab", "slab MB (S)", "peak MB", "sampled MB", "peak - actor baseline MB",
              "(that - batch activations) / S", "theory: persistent..estimate MB (incl. activations)",
              "full volume MB"]
    rows = []
    for run in result["runs"]:
        name = f"{run['method']} x{run['workers']}" + (" (no reference)" if run.get("noref") else "")
        drv = run["driver"]
        rows.append([name, "driver (mbir-batch submit)", "-", "-", drv["hwm"] / MB, drv["rss_max"] / MB, "-", "-",
                     "-", full / MB])
        method_base = None if base is None else base + result.get("baseline_extra", {}).get(run["method"], 0)
        for actor, th in zip(run["actors"], run["theory"]["per_actor"]):
            slab = f"[{actor['z0']}, {actor['z1']})" if actor["z0"] is not None else "?"
            extra = actor["hwm"] - method_base if method_base else None
            ratio = (extra - th["activations"]) / th["slab_bytes"] if extra is not None else None
            rows.append([name, f"actor rank {actor['rank']}", slab, th["slab_bytes"] / MB, actor["hwm"] / MB,
                         actor["rss_max"] / MB, None if extra is None else extra / MB, ratio,
                         f"{th['persistent'] / MB:.0f}..{th['estimate'] / MB:.0f}", full / MB])
    lines += [markdown_table(header, rows), ""]
    lines += ["Per run:", ""]
    rows = []
    for run in result["runs"]:
        t = run.get("timings") or {}
        rows.append([f"{run['method']} x{run['workers']}" + (" (noref)" if run.get("noref") else ""), run["wall_s"],
                     t.get("solve_s"), t.get("score_s"), run["driver"]["ru_maxrss"] / MB,
                     run["ray_processes"], run["ray_processes_rss_max_sum"] / MB, run["max_total_rss"] / MB,
                     ", ".join(f"{b:,}" for b in run.get("bytes_sent") or [])])
    lines += [markdown_table(["run", "wall s", "solve s", "score s (driver)", "wait4 ru_maxrss MB (driver + reaped Ray procs)",
                              "Ray system procs", "their RSS sum MB", "max total RSS MB", "bytes sent per rank"],
                             rows), ""]
    lines += ["Theory (S = slab slices x H x W x 4 B; counts from the code, bench/memory.py BUFFERS):", ""]
    for method, (low, high, what) in BUFFERS.items():
        lines.append(f"- {method}: {low} S persistent .. about {high} S at the peak of a step ({what})"
                     + (" + batch activations + model" if method == "dds" else "") + ".")
    if base:
        lines += ["", (f"Actor baseline = {base / MB:.0f} MB: {result['actor_baseline_from']}. For dds add "
                  f"{result['baseline_extra'].get('dds', 0) / MB:.0f} MB (importing the denoiser module with "
                  "diffusers and loading the fixture model, measured in a fresh Python below).")]
    if result.get("import_baselines"):
        lines += ["", "VmRSS of a fresh Python after imports only (size-independent part of each process):", ""]
        lines += [f"- {name}: {value / MB:.0f} MB" for name, value in result["import_baselines"].items()]
    driver = result.get("driver_scoring")
    if driver:
        lines += ["", (f"Driver scoring (fbp x2 with and without a reference): peak {driver['with'] / MB:.0f} MB vs "
                  f"{driver['without'] / MB:.0f} MB: +{driver['delta'] / MB:.0f} MB, of which "
                  f"{driver['imports'] / MB:.0f} MB are the scoring imports and {driver['data'] / MB:.0f} MB data "
                  f"= {driver['data'] / full:.1f} x the full volume ({full / MB:.0f} MB).")]
    lines += [""] + reading(result)
    return "\n".join(lines) + "\n"


def reading(result: dict[str, Any]) -> list[str]:
    """What the numbers say (generated from them)."""
    data = result["dataset"]
    full = data["depth"] * data["size"] ** 2 * 4
    out = ["## Reading", ""]
    for run in result["runs"]:
        if not run["actors"]:
            continue
        worst = max(run["actors"], key=lambda a: a["hwm"])
        th = run["theory"]["per_actor"][0]
        out.append(f"- {run['method']} x{run['workers']}{' (no reference)' if run.get('noref') else ''}: largest actor {worst['hwm'] / MB:.0f} MB for a slab of "
                   f"{th['slices']} slices (S = {th['slab_bytes'] / MB:.0f} MB); peak - baseline - activations = "
                   f"{(worst['hwm'] - result.get('actor_baseline_bytes', 0) - result.get('baseline_extra', {}).get(run['method'], 0) - th['activations']) / th['slab_bytes']:.1f} S "
                   f"(counted: {BUFFERS[run['method']][1]} S).")
    k = result.get("fbp_buffers_per_slab")
    if k:
        out.append(f"- Actors scale with their slab, not the volume: the fbp actor drops from the 1-worker to "
                   f"the 2-worker peak by {k:.2f} x the slab-size difference. No actor reads or holds the full "
                   "volume; each reads its own measurements and writes its own chunks.")
    check = result.get("state_check")
    text = (f"- The multiplier is large, though: admm-tv holds ~{BUFFERS['admm-tv'][1]} slab-sized buffers at its "
            "peak (a 3D-TV state of 3 S each for z, w and D x, soft-threshold and residual temporaries of 3 S "
            f"each), dds ~{BUFFERS['dds'][1]} S plus the denoiser batch. SlabSolver.run frees the starting state "
            "after the first step (it kept 7 S of admm-tv's and 3 S of dds's alive for the whole run before).")
    if check:
        text += (f" Measured in one process (admm-tv, {check['slices']} x {data['size']}^2, LocalComm): peak over "
                 f"the live starting state {check['peak_s']:.1f} S.")
    out.append(text)
    act = result.get("activations")
    if act:
        out.append(f"- Denoiser activations are per batch, independent of the slab: {act['bytes_per_slice'] / MB:.0f} MB "
                   f"per {data['size']}^2 slice for this 8-channel fixture on CPU, i.e. "
                   f"{(act['bytes_per_slice'] * 32 + act['intercept_bytes']) / 2**30:.1f} GiB per actor at the "
                   f"config default batch 32 (this run used {result['batch']}). They scale with channels x H x W x "
                   "batch, so a real network needs the batch sized to the memory.")
    pa = result.get("paper_activations")
    if pa:
        out.append(f"- The paper-size denoiser ({pa['label']}) at {pa['size']}^2 needs "
                   f"{pa['bytes_per_slice'] / MB:.0f} MB of activations per slice (fp32, CPU, VmHWM growth over "
                   f"batches {pa['batches']}), i.e. {pa['bytes_per_slice'] * 32 / 2**30:.1f} GiB at batch 32; bf16 "
                   "autocast on a GPU stores most of them at half the size.")
    drv = result.get("driver_scoring")
    if drv:
        out.append(f"- The driver scores the output against the reference block by block from the zarr arrays "
                   f"(psnr_ssim_per_axis, 32 slices at a time): driver peak {drv['with'] / MB:.0f} MB with a "
                   f"reference against {drv['without'] / MB:.0f} MB without, i.e. {drv['data'] / MB:.0f} MB = "
                   f"{drv['data'] / full:.1f} x the {full / MB:.0f} MB volume for scoring. (Before the block-wise "
                   "scoring it read both whole volumes, and the 2026-11-30 run measured 12.2 x.)")
    out.append("")
    return out


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
        import json

        result = json.loads(Path(args.render).read_text())
        if args.state_check:
            result["state_check"] = state_check(result["dataset"]["size"])
        text = render(result)
        print(text)
        stem = Path(args.out) if args.out else Path(args.render).with_suffix("")
        for path in write_report(stem, text, result, also_to_out=False):
            print(f"wrote {path}")
        return 0
    depth = args.depth or args.size
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    dataset = Path(args.dataset) if args.dataset else workdir / f"big-{args.size}.zarr"
    result: dict[str, Any] = {"date": today(), "env": environment("cpu"), "batch": args.batch,
                              "command": "python bench/memory.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    result["dataset"] = ensure_dataset(dataset, args.size, depth, args.phantom)
    config = write_config(workdir / "memory.yaml", args.steps, args.cg_iters, args.batch)
    result["config_text"] = config.read_text()
    model_path, model = fixture_denoiser(workdir, args.size)
    result["model"] = str(model_path)
    result["model_label"] = FIXTURE_LABEL
    result["model_parameters"] = sum(int(p.numel()) for p in model.parameters())
    result["model_bytes"] = result["model_parameters"] * 4
    runs = [r.split(":") for r in args.runs.split(",") if r]
    if any(r[0] == "dds" for r in runs):
        result["activations"] = activation_bytes(model, args.size)
    del model
    result["import_baselines"] = import_baselines(dataset, model_path)
    noref = without_reference(dataset, workdir / f"big-{args.size}-noref.zarr") if any(
        len(r) > 2 and r[2] == "noref" for r in runs) else None
    result["runs"] = []
    for spec in runs:
        method, workers = spec[0], int(spec[1])
        use_noref = len(spec) > 2 and spec[2] == "noref"
        source = noref if use_noref else dataset
        out = workdir / f"out-{method}-x{workers}{'-noref' if use_noref else ''}.zarr"
        run = submit(source, out, method, workers, config, model_path if method == "dds" else None)
        run["noref"] = use_noref
        run["theory"] = theory(run, (depth, args.size, args.size), result.get("activations"), args.batch,
                               result["model_bytes"])
        result["runs"].append(run)
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)
    # The actor baseline: a 2-worker fbp actor holds ~4 S; the 1-vs-2-worker difference gives S's factor.
    fbp1 = [r for r in result["runs"] if r["method"] == "fbp" and r["workers"] == 1]
    fbp2 = [r for r in result["runs"] if r["method"] == "fbp" and r["workers"] == 2]
    if fbp1 and fbp2:
        one, two = fbp1[0]["actors"][0], max(fbp2[0]["actors"], key=lambda a: a["hwm"])
        s_one = fbp1[0]["theory"]["per_actor"][0]["slab_bytes"]
        s_two = max(t["slab_bytes"] for t in fbp2[0]["theory"]["per_actor"])
        k = (one["hwm"] - two["hwm"]) / (s_one - s_two)
        result["fbp_buffers_per_slab"] = k
        result["actor_baseline_bytes"] = two["hwm"] - k * s_two
        result["actor_baseline_from"] = (f"fbp x1 vs fbp x2 actor peaks: {k:.2f} slab-sized buffers per slab "
                                         f"(measured), so an actor's size-independent part (Python, torch, Ray, "
                                         f"zarr, diffusers, radon matrices) is the fbp x2 peak minus {k:.2f} S")
    imports = result["import_baselines"]
    names = list(_BASELINES)
    result["baseline_extra"] = {"dds": imports[names[1]] - imports[names[0]]}
    with_ref = [r for r in result["runs"] if r["method"] == "fbp" and r["workers"] == 2 and not r["noref"]]
    without = [r for r in result["runs"] if r["method"] == "fbp" and r["workers"] == 2 and r["noref"]]
    if with_ref and without:
        delta = with_ref[0]["driver"]["hwm"] - without[0]["driver"]["hwm"]
        score_imports = imports[names[3]] - imports[names[2]]
        result["driver_scoring"] = {"with": with_ref[0]["driver"]["hwm"], "without": without[0]["driver"]["hwm"],
                                    "delta": delta, "imports": score_imports, "data": delta - score_imports}
    if args.state_check:
        result["state_check"] = state_check(args.size)
    if args.paper_activations:
        from common import build_denoiser, parameter_count

        paper, label = build_denoiser("paper", args.paper_activations, "cpu")
        result["paper_activations"] = activation_bytes(paper, args.paper_activations) | {
            "size": args.paper_activations, "label": label, "parameters": parameter_count(paper)}
        del paper
    text = render(result)
    print(text)
    stem = Path(args.out) if args.out else RESULTS_DIR / f"memory-cpu-{result['date']}"
    for path in write_report(stem, text, result):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
