"""Throughput of one DDS step against the bare denoiser forward (issue 5, "Speed").

On one device and one slab of ``depth`` slices of ``size^2`` (sparse-view CT, ``views`` views,
a :class:`ParallelBeam` built directly, ``LocalComm``, no zarr) it measures

(a) the bare denoiser forward over the Z slices in batches of ``batch`` (``denoise_slab``);
(b) one full DDS step (Chung, Lee, Ye, ICLR 2024) as :class:`SlabSolver` runs it: Tweedie
    denoise, ADMM-TV-z data step with ``cg_iters`` CG iterations (DiffusionMBIR, CVPR 2023,
    Sec. 3), DDIM re-noising with ``slice_noise``; timed between synchronised step callbacks of
    one ``SlabSolver.run`` over ``steps`` steps (the first and the last step are left out);
(c) the ADMM-TV-z step alone (``admm_tv_z_step``), and its parts: one application of the CG
    normal operator and one ``slice_noise`` draw for the slab.

On CUDA the solver draws each step's noise one step ahead on a thread
(:class:`~mbir_batch.kernels.diffusion.NoisePrefetch`); on the CPU it draws it in place.

Prints a table of slices x NFE per second, ``ratio step/forward = R`` (b / a) and the share of
(c) in (b); writes ``bench/results/throughput-<device>-<date>.md`` and ``.json``.

    python bench/throughput.py --device cpu                      # 64^3, bundled model
    python bench/throughput.py --device cuda --size 256 --model paper --steps 50
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness.denoisers import build_denoiser, parameter_count
from harness.problems import make_problem
from harness.results import RESULTS_DIR, environment, header, markdown_table, publish, today
from harness.timing import Stopwatch, median, peak_mib, reset_peak, stopwatch_on, sync, time_call


class _OutOfTime(Exception):
    """Raised from the step callback when the remaining steps would overrun the time budget."""


def measure(*, device: str, size: int, depth: int, model: str, views: int = 8, cg_iters: int = 20,
            batch: int = 32, steps: int = 5, repeats: int = 3, max_seconds: float | None = None,
            max_steps: int | None = None, profile: bool = False,
            log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the measurements and return the figures (seconds are medians over repeats / steps).

    ``max_seconds`` / ``max_steps`` stop the timed run early (the total is then extrapolated).
    """
    import mbir_batch.kernels.denoiser as denoiser_module
    import mbir_batch.methods.sampling as sampling_module
    from mbir_batch.kernels.admm import AdmmState, admm_tv_z_step
    from mbir_batch.kernels.comm import LocalComm
    from mbir_batch.kernels.diffusion import get_sigmas_karras, slice_noise
    from mbir_batch.kernels.tv import diff_z_normal_comm
    from mbir_batch.methods import get
    from mbir_batch.solve import SlabSolver

    denoise_slab = denoiser_module.denoise_slab
    built = time.perf_counter()
    denoiser, label = build_denoiser(model, size, device)
    problem, _ = make_problem(size, depth, views, device)
    op, comm = problem.operator, LocalComm()
    cfg = get("dds").config_type(steps=steps, cg_iters=cg_iters, batch=batch, sigma_min=denoiser.config.sigma_min,
                                 sigma_max=denoiser.config.sigma_max)
    solver = SlabSolver(problem, cfg, comm=comm, denoiser=denoiser, device=device)
    setup_s = time.perf_counter() - built
    log(f"[throughput] {device} {depth}x{size}^2, {views} views, {label}; setup {setup_s:.1f} s")
    result: dict[str, Any] = {"device": device, "size": size, "depth": depth, "views": views, "model": model,
                              "model_label": label, "parameters": parameter_count(denoiser), "batch": batch,
                              "cg_iters": cg_iters, "steps": steps, "repeats": repeats, "setup_s": setup_s,
                              "threads": torch.get_num_threads()}
    x_noisy = solver.initial_state().x
    sigma = 1.0

    def part(name: str, fn: Callable[[], Any], n: int = repeats) -> None:
        reset_peak(device)
        wall, cpu = time_call(fn, device, repeats=n, warmup=1)
        result[name] = {"median_s": median(wall), "min_s": min(wall), "cpu_median_s": median(cpu),
                        "times_s": wall, "peak_mib": peak_mib(device)}
        log(f"[throughput] {name}: median {median(wall):.4f} s (cpu {median(cpu):.4f} s) over {n}")

    # warm-up of (a); its timed repeats are interleaved with the steps of (b) below
    reset_peak(device)
    x0 = denoise_slab(denoiser, x_noisy, sigma, batch=batch)
    sync(device)
    forward_peak = peak_mib(device)
    # (c) the ADMM-TV-z step alone, from a denoised slab and a cold ADMM state; and its pieces
    admm = AdmmState.zeros_like(x0)
    part("admm", lambda: admm_tv_z_step(x0, admm, A=op.A, AT=op.AT, aty=problem.aty, rho=cfg.rho, lam=cfg.lam,
                                        cg_iters=cg_iters, comm=comm))
    part("normal_op", lambda: op.AT(op.A(x0)) + cfg.rho * diff_z_normal_comm(x0, comm), n=max(repeats, 5))
    part("noise", lambda: slice_noise(cfg.seed, 3, problem.slice_indices, problem.slice_shape, device=device),
         n=max(repeats, 5))

    # (b) full steps as SlabSolver runs them, timed between synchronised callbacks. The sampler's
    # denoise_slab and its data step's admm_tv_step are wrapped in stopwatches where they are
    # looked up (module attributes, restored after).
    # (a) after each of the first `repeats` steps, outside the step's clock, the bare forward of the
    # next step's input at the next sigma: pairs of (a) and (b) see the same load on a shared CPU.
    sigmas = get_sigmas_karras(steps, cfg.sigma_min, cfg.sigma_max)
    bare = Stopwatch(lambda x, s: denoise_slab(denoiser, x, s, batch=batch), device)
    step_wall: list[float] = []
    step_cpu: list[float] = []
    clock: dict[str, float] = {}

    def on_step(event: Any) -> None:
        sync(device)
        now, cpu_now = time.perf_counter(), time.process_time()
        step_wall.append(now - clock["t"])
        step_cpu.append(cpu_now - clock["cpu"])
        done = len(step_wall)
        if max_seconds is not None and 2 <= done < steps and (now - clock["start"]) * steps / done > max_seconds:
            raise _OutOfTime
        if max_steps is not None and done >= max_steps and done < steps:
            raise _OutOfTime
        if done <= repeats and done < steps:
            bare(event.state.x, float(sigmas[done]))
        clock["t"], clock["cpu"] = time.perf_counter(), time.process_time()

    reset_peak(device)
    state = solver.initial_state()
    sync(device)
    clock["start"] = clock["t"] = time.perf_counter()
    clock["cpu"] = time.process_time()
    completed = True
    with stopwatch_on(denoiser_module, "denoise_slab", device) as in_denoise, \
            stopwatch_on(sampling_module, "admm_tv_step", device) as in_admm:
        try:
            solver.run(state, callback=on_step)
        except _OutOfTime:
            completed = False
    sync(device)
    total = time.perf_counter() - clock["start"]
    done = len(step_wall)
    # leave out the first step (warm-up) and, in a finished run, the last (no re-noising)
    keep = list(range(1, done - 1)) if completed and done >= 3 else list(range(1, done)) or list(range(done))
    result["step"] = {"median_s": median([step_wall[i] for i in keep]), "min_s": min(step_wall[i] for i in keep),
                      "cpu_median_s": median([step_cpu[i] for i in keep]), "times_s": step_wall,
                      "peak_mib": peak_mib(device)}
    paired = [i for i in keep if 1 <= i <= len(bare.wall)]
    result["forward"] = {"median_s": median(bare.wall), "min_s": min(bare.wall), "cpu_median_s": median(bare.cpu),
                         "times_s": bare.wall, "peak_mib": forward_peak,
                         "pair_ratios": [step_wall[i] / bare.wall[i - 1] for i in paired]}
    result["in_step"] = {"denoise_s": median([in_denoise.wall[i] for i in keep]),
                         "admm_s": median([in_admm.wall[i] for i in keep]),
                         "denoise_cpu_s": median([in_denoise.cpu[i] for i in keep]),
                         "steps_used": len(keep)}
    # the solver's own time: the steps, without the interleaved bare forwards of (a)
    solver_s = sum(step_wall)
    result["run"] = {"completed": completed, "steps_done": done, "wall_s": total, "solver_s": solver_s,
                     "projected_solver_s": solver_s if completed else solver_s * steps / done}
    log(f"[throughput] step: median {result['step']['median_s']:.4f} s over {len(keep)} steps; run of "
        f"{done}/{steps} steps {total:.2f} s" + ("" if completed else " (stopped early)"))

    fwd, stp, adm = result["forward"]["median_s"], result["step"]["median_s"], result["admm"]["median_s"]
    result["ratio"] = stp / fwd
    result["ratio_pairs_median"] = median(result["forward"]["pair_ratios"])
    result["ratio_cpu_time"] = result["step"]["cpu_median_s"] / result["forward"]["cpu_median_s"]
    result["ratio_in_step"] = stp / result["in_step"]["denoise_s"]
    result["admm_share"] = adm / stp
    result["admm_share_in_step"] = result["in_step"]["admm_s"] / stp
    result["denoiser_share"] = fwd / stp
    result["other_s"] = stp - fwd - adm
    if profile:
        result["profile"] = _profile(solver, device)
    return result


def _profile(solver: Any, device: str) -> str:
    """torch.profiler table (top ops by self time) of the last two steps of a fresh run."""
    from torch.profiler import ProfilerActivity, profile

    state = solver.initial_state()
    state.step = max(solver.cfg.steps - 2, 0)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with profile(activities=activities) as prof:
        solver.run(state)
        sync(device)
    key = "self_cuda_time_total" if device.startswith("cuda") else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=18)


def render(result: dict[str, Any]) -> str:
    """Markdown section for one measurement."""
    z, b = result["depth"], result["batch"]
    rows = []

    def row(name: str, key: str, slices: int | None) -> None:
        m = result[key]
        rate = slices / m["median_s"] if slices else None
        rows.append([name, m["median_s"], m["min_s"], m["cpu_median_s"], rate, m["peak_mib"]])

    row(f"(a) denoiser forward, {z} slices, batch {b} (bare denoise_slab)", "forward", z)
    row("(b) DDS step (SlabSolver: prior + ADMM-TV-z + re-noise)", "step", z)
    row(f"(c) ADMM-TV-z step alone, {result['cg_iters']} CG iterations", "admm", z)
    row("    one CG operator application (A^T A + rho D_z^T D_z)", "normal_op", None)
    row(f"    slice_noise for {z} slices", "noise", None)
    rows.append(["(b) - (a) - (c)", result["other_s"], None, None, None, None])
    inner = result["in_step"]
    rows.append(["inside (b): denoise_slab", inner["denoise_s"], None, inner["denoise_cpu_s"], None, None])
    rows.append(["inside (b): admm_tv_step (D_z)", inner["admm_s"], None, None, None, None])
    rows.append(["inside (b): the rest (noise, DDIM update, callback)",
                 result["step"]["median_s"] - inner["denoise_s"] - inner["admm_s"], None, None, None, None])
    run = result["run"]
    run_line = (f"DDS run: {run['steps_done']}/{result['steps']} steps, solver time {run['solver_s']:.2f} s "
                f"(wall {run['wall_s']:.2f} s with the interleaved bare forwards)"
                + ("" if run["completed"] else f"; stopped early, {result['steps']} steps projected "
                   f"{run['projected_solver_s']:.1f} s"))
    text = [f"## {result['device']}: {z} x {result['size']}^2 slab, {result['views']} views, "
            f"{result['cg_iters']} CG iterations, {result['threads']} threads", "",
            f"model: {result['model_label']} ({result['parameters']:,} parameters)", "",
            markdown_table(["part", "median wall s", "min wall s", "median CPU s", "slices x NFE / s", "peak MiB"],
                           rows), "",
            f"ratio step/forward = {result['ratio']:.3f}",
            f"ratio step/forward, median of adjacent pairs = {result['ratio_pairs_median']:.3f}",
            f"ratio step/forward, process CPU time = {result['ratio_cpu_time']:.3f}",
            f"ratio step/its own denoise_slab (same step, same load) = {result['ratio_in_step']:.3f}",
            (f"ADMM/CG share of step = {100 * result['admm_share']:.1f} % "
             f"(inside the step: {100 * result['admm_share_in_step']:.1f} %)"),
            f"denoiser share of step = {100 * result['denoiser_share']:.1f} %",
            f"{run_line}; steps used for the median: {inner['steps_used']}",
            f"projected {result['steps']}-step volume: {result['step']['median_s'] * result['steps']:.1f} s", ""]
    if "profile" in result:
        text += ["```", result["profile"], "```", ""]
    return "\n".join(text)


def report_header(device: str) -> str:
    """The title and environment lines of a throughput report."""
    return "\n".join(header(f"throughput, {device}, {today()}", environment(device)))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--size", type=int, default=64, help="slice size H = W (default 64)")
    parser.add_argument("--depth", type=int, default=None, help="slices Z (default = size)")
    parser.add_argument("--model", default="bundled", help="bundled | paper | random-small | PATH (.json)")
    parser.add_argument("--views", type=int, default=8)
    parser.add_argument("--cg-iters", type=int, default=20)
    parser.add_argument("--batch", type=int, default=32, help="slices per denoiser batch")
    parser.add_argument("--steps", type=int, default=5, help="DDS steps of the timed SlabSolver run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--max-seconds", type=float, default=None, help="stop the run early and extrapolate")
    parser.add_argument("--max-steps", type=int, default=None, help="stop the timed run after this many steps")
    parser.add_argument("--profile", action="store_true", help="add a torch.profiler table of two steps")
    parser.add_argument("--out", type=Path, default=None, help="report stem (default bench/results/throughput-<device>-<date>)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible")
    result = measure(device=args.device, size=args.size, depth=args.depth or args.size, model=args.model,
                     views=args.views, cg_iters=args.cg_iters, batch=args.batch, steps=args.steps,
                     repeats=args.repeats, max_seconds=args.max_seconds, max_steps=args.max_steps,
                     profile=args.profile)
    markdown = report_header(args.device) + "\n" + render(result)
    stem = args.out or RESULTS_DIR / f"throughput-{torch.device(args.device).type}-{today()}"
    publish(stem, markdown, {"environment": environment(args.device), "results": [result]})
    return result


if __name__ == "__main__":
    main()
