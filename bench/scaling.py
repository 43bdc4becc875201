"""Scaling over z-slabs: step time with 1 and 2 actors, and bytes sent per actor per step (issue 4).

(a) **Step time, 1 vs 2 actors.** ``run_jobs`` (the real driver: embedded Ray, SlabWorker actors,
    TorchDistComm over gloo, zarr in and out) reconstructs a ``depth x size^2`` phantom with 1 and
    then 2 workers of 1 CPU thread each. The per-step seconds are the workers' own step timings
    (``StepEvent.seconds``, reported through ``SlabWorker.progress`` as ``slices_per_s``), so Ray
    startup, loading and writing are not in them. The first and the last step are left out (warm-up;
    the last step does not re-noise). For 2 actors the step time is the slower rank's (the ranks meet
    at every CG all-reduce). Prints a side-by-side table with the speed-up.

(b) **Bytes per actor per step vs depth.** Two ranks (``harness.ranks.run_ranks``: spawned processes), one gloo
    group, each a real :class:`~mbir_batch.cluster.dist_comm.TorchDistComm` and a real
    :class:`~mbir_batch.solve.SlabSolver` on its half of a ``depth x size^2`` volume (sparse-view CT,
    ``ParallelBeam``; no Ray, no zarr). ``comm.bytes_sent()`` (all-reduce payloads + halo slices) is
    read after every step. For depths 32, 64, 128 the bytes per step must stay the same: they are
    O(H*W) per CG iteration, whatever Z is. The table also has the count the algorithm predicts
    (halo exchanges x one slice + all-reduced scalars).

    python bench/scaling.py                                  # (a) dds + admm-tv, (b) dds + admm-tv
    python bench/scaling.py --skip-actors --byte-depths 32,64,128,256
    python bench/scaling.py --methods dds --steps 10 --repeats 3
    python bench/scaling.py --skip-actors --methods dds,dds+adapt --byte-depths 32,64,128

``dds+adapt`` (b only) adds test-time adaptation before every step: one all-reduce of
4 |S| (P + 2) bytes per AdamW step (P LoRA parameters, |S| slices per step), also independent of Z.

Writes ``bench/results/scaling-cpu-<date>.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness.problems import make_volume, simulate_dataset, svct_problem
from harness.procs import tree_cpu_seconds
from harness.ranks import RankContext, run_ranks
from harness.results import RESULTS_DIR, command_line, environment, header, markdown_table, publish, rerender, today

BUNDLED_SIZE = 64  # the bundled denoiser works on 64^2 slices only


# -- (a) step time with Ray actors -------------------------------------------------------------------------

ADAPTED = "+adapt"
"""A method name suffix (``dds+adapt``): the method with test-time adaptation before EVERY step
(window over the whole schedule, ``every: 1``), the preset's other adaptation settings."""
ADAPT_EVERY_STEP = {"sigma_start": 1e3, "sigma_end": 1e-6, "every": 1}


def _config(method: str, steps: int, cg_iters: int | None, preset: str = "svct-8view"):
    """The preset's config of ``method`` with ``steps`` steps (admm-tv: iterations) and ``cg_iters``."""
    from mbir_batch.config import load_config

    if method.endswith(ADAPTED):
        return load_config(preset, method.removesuffix(ADAPTED), steps=steps, cg_iters=cg_iters,
                           adapt=ADAPT_EVERY_STEP)
    return load_config(preset, method, steps=steps, cg_iters=cg_iters)


def _model(method: str) -> Path | None:
    """The bundled denoiser for a method that needs one."""
    from mbir_batch.kernels.model_paths import bundled_model_path
    from mbir_batch.methods import get

    return bundled_model_path() if get(method.removesuffix(ADAPTED)).needs_model else None


def expected_adapt_bytes_per_step(adam_steps: int, slices: int, lora_parameters: int) -> int:
    """Payload bytes of one adaptation round per rank (``kernels/adapt.py`` ``adapt_round``): per AdamW
    step one all-reduce of a (|S|, P + 2) float32 buffer (each chosen slice's gradient row and its two
    loss terms), independent of the depth."""
    return adam_steps * 4 * slices * (lora_parameters + 2)


def actor_run(dataset: Path, out: Path, method: str, workers: int, steps: int, cg_iters: int | None,
              log=print) -> dict[str, Any]:
    """One ``run_jobs`` call; returns per-(rank, step) seconds from the workers' own timings."""
    from mbir_batch.cluster.job import run_jobs
    from mbir_batch.cluster.plan import JobSpec

    cfg = _config(method, steps, cg_iters)
    nfe = getattr(type(cfg), "nfe_per_step", 1)
    seen: dict[tuple[int, int], float] = {}
    slabs: dict[int, tuple[int, int]] = {}
    cpu_at: dict[int, dict[int, float]] = {}  # lowest step of all ranks -> {actor pid: CPU s}, at first sight

    def progress(event) -> None:
        steps_now = [int(w.get("step") or 0) for w in event.workers]
        if steps_now and len(steps_now) == workers and min(steps_now) not in cpu_at:
            cpu_at[min(steps_now)] = tree_cpu_seconds("SlabWorker")
        for worker in event.workers:
            step, rate = int(worker.get("step") or 0), float(worker.get("slices_per_s") or 0.0)
            if step > 0 and rate > 0 and "rank" in worker:
                rank = int(worker["rank"])
                slabs[rank] = (int(worker["z0"]), int(worker["z1"]))
                seen[(rank, step)] = (worker["z1"] - worker["z0"]) * nfe / rate

    load_before = os.getloadavg()
    started = time.perf_counter()
    summary = run_jobs([JobSpec(dataset=dataset, output=out, cfg=cfg, model=_model(method))], workers=workers,
                       cpus_per_worker=1, num_cpus=2, checkpoint_every=0, max_restarts=0, overwrite=True,
                       progress=progress, poll_s=0.1)[0]
    wall = time.perf_counter() - started
    total = cfg.total_steps
    # leave out step 1 (warm-up, first touch of every buffer) and the last step (no re-noising)
    steps_kept = sorted({s for (_, s) in seen if 1 < s < total})
    # CPU seconds per step of each actor process, between the first sight of step 2 and of the last step
    cpu_steps = sorted(s for s in cpu_at if 1 < s < total)
    cpu_per_step: list[float] = []
    if len(cpu_steps) >= 2:
        first, last = cpu_at[cpu_steps[0]], cpu_at[cpu_steps[-1]]
        cpu_per_step = [(last[pid] - first[pid]) / (cpu_steps[-1] - cpu_steps[0]) for pid in first if pid in last]
    per_step = [max(seen[(r, s)] for r in range(workers) if (r, s) in seen) for s in steps_kept]
    result = {
        "method": method, "workers": workers, "steps": total, "cg_iters": cfg.cg_iters, "wall_s": wall,
        "solve_s": summary["timings"]["solve_s"], "load_s": summary["timings"]["load_s"],
        "score_s": summary["timings"]["score_s"], "bytes_sent": summary["bytes_sent"],
        "slabs": [list(slabs.get(r, ())) for r in range(workers)],
        "observed": {f"{r}:{s}": t for (r, s), t in sorted(seen.items())},
        "steps_timed": steps_kept, "step_s_median": statistics.median(per_step) if per_step else float("nan"),
        "step_s_min": min(per_step) if per_step else float("nan"),
        "cpu_s_per_step": cpu_per_step, "cpu_s_per_step_max": max(cpu_per_step) if cpu_per_step else float("nan"),
        "loadavg_before": load_before[0], "loadavg_after": os.getloadavg()[0],
    }
    log(f"[scaling] {method} x{workers}: median step {result['step_s_median']:.3f} s over {len(per_step)} steps "
        f"(solve {result['solve_s']:.1f} s, wall {wall:.1f} s, load {load_before[0]:.1f})")
    return result


def measure_actors(methods: list[str], size: int, depth: int, steps: dict[str, int], repeats: int,
                   workdir: Path, log=print) -> dict[str, Any]:
    dataset = workdir / f"scaling-{depth}x{size}.zarr"
    sim_s = simulate_dataset(dataset, size=size, depth=depth, phantom=9001)["simulate_s"]
    log(f"[scaling] simulated {dataset} in {sim_s:.1f} s")
    runs: list[dict[str, Any]] = []
    for method in methods:
        for _ in range(repeats):  # interleaved 1, 2, 1, 2: both see the same drift of the machine's load
            for workers in (1, 2):
                out = workdir / f"scaling-{method}-x{workers}.zarr"
                runs.append(actor_run(dataset, out, method, workers, steps[method], None, log=log))
    rows = []
    for method in methods:
        one = [r for r in runs if r["method"] == method and r["workers"] == 1]
        two = [r for r in runs if r["method"] == method and r["workers"] == 2]
        t1 = statistics.median(r["step_s_median"] for r in one)
        t2 = statistics.median(r["step_s_median"] for r in two)
        c1 = statistics.median(r["cpu_s_per_step_max"] for r in one)
        c2 = statistics.median(r["cpu_s_per_step_max"] for r in two)
        rows.append({"method": method, "step_s_1": t1, "step_s_2": t2, "speedup": t1 / t2,
                     "cpu_s_1": c1, "cpu_s_2": c2, "cpu_speedup": c1 / c2,
                     "efficiency": t1 / t2 / 2, "solve_s_1": statistics.median(r["solve_s"] for r in one),
                     "solve_s_2": statistics.median(r["solve_s"] for r in two),
                     "bytes_per_rank_2": two[0]["bytes_sent"], "steps": one[0]["steps"],
                     "cg_iters": one[0]["cg_iters"]})
    return {"dataset": str(dataset), "size": size, "depth": depth, "simulate_s": sim_s, "runs": runs,
            "rows": rows}


# -- (b) bytes per step over two gloo processes ------------------------------------------------------------

def expected_bytes_per_step(method: str, cg_iters: int, size: int, neighbours: int) -> int:
    """Payload bytes one rank sends per step, counted from the algorithm (``kernels/admm.py`` ``admm_tv_step``).

    Halo exchanges, each one float32 slice to each neighbour: ``D^T (z - w)`` for the right-hand
    side, the normal operator ``D^T D`` once before CG and once per CG iteration, ``D x``, and
    ``D^T (z - z_old)`` for the dual residual. ``D^T D`` is one exchange for ``D_z`` (dds, mbir: the
    fused ``diff_z_normal_comm``) and two for the 3D gradient (admm-tv: one in ``D``, one in ``D^T``).
    All-reduces: ``||b||^2``, ``r.r`` and 2 per CG iteration of one float64 each, and the primal and
    dual residual norms together (2 float64). slice2d has no TV term: only the CG scalars.
    """
    slice_bytes = size * size * 4 * neighbours
    scalars = (2 * cg_iters + 2) * 8
    if method == "slice2d":
        return scalars
    exchanges_per_normal = {"admm-tv": 2, "dds": 1, "mbir": 1}.get(method)
    if exchanges_per_normal is None:
        raise ValueError(f"expected_bytes_per_step: no count for method {method!r}")
    halos = exchanges_per_normal * (cg_iters + 1) + 3
    return halos * slice_bytes + scalars + 16


def _lora_size(cfg: Any, denoiser: Any) -> int:
    """P: the LoRA parameters ``cfg``'s adaptation injects into ``denoiser`` (0 without adaptation)."""
    import copy

    section = getattr(cfg, "adapt", None)
    if section is None or not section.in_use:
        return 0
    from mbir_batch.kernels.lora import inject_lora, lora_parameters

    model = copy.deepcopy(denoiser)
    inject_lora(model, section.settings.lora)
    return sum(p.numel() for _, p in lora_parameters(model))


def _rank_main(ctx: RankContext, method: str, size: int, depth: int, steps: int,
               cg_iters: int | None) -> dict[str, Any]:
    """One rank: its slab of the volume, a real TorchDistComm and SlabSolver, ``steps`` steps; bytes per step."""
    from mbir_batch.cluster.dist_comm import TorchDistComm
    from mbir_batch.cluster.plan import plan_slabs
    from mbir_batch.solve import SlabSolver

    slab = plan_slabs(depth, 8, ctx.world)[ctx.rank]
    cfg = _config(method, steps, cg_iters)
    problem = svct_problem(make_volume(size, depth), 8, z0=slab.z0, z1=slab.z1)
    denoiser = None
    if _model(method) is not None:
        from harness.denoisers import load_model

        denoiser, _ = load_model(_model(method))
    comm = TorchDistComm(ctx.rank, ctx.world, "gloo", addr=ctx.addr, port=ctx.port, timeout_s=300)
    try:
        solver = SlabSolver(problem, cfg, comm=comm, denoiser=denoiser)
        state = solver.initial_state()
        records: list[dict[str, Any]] = []
        start_bytes = last_bytes = comm.bytes_sent()

        def on_step(event) -> None:
            nonlocal last_bytes
            sent = comm.bytes_sent()
            records.append({"step": event.step, "bytes": sent - last_bytes, "seconds": event.seconds})
            last_bytes = sent

        solver.run(state, callback=on_step)
        comm.barrier()
    finally:
        comm.close()
    adapt = getattr(cfg, "adapt", None)
    return {"rank": ctx.rank, "z0": slab.z0, "z1": slab.z1, "cg_iters": cfg.cg_iters, "setup_bytes": start_bytes,
            "total_bytes": comm.bytes_sent(), "steps": records, "lora_parameters": _lora_size(cfg, denoiser),
            "adam_steps": adapt.settings.steps if adapt else 0, "adapt_slices": adapt.settings.slices if adapt else 0}


def measure_bytes(methods: list[str], size: int, depths: list[int], steps: int, log=print) -> dict[str, Any]:
    rows = []
    for method in methods:
        for depth in depths:
            started = time.perf_counter()
            ranks = run_ranks(_rank_main, 2, method, size, depth, steps, None, timeout_s=900, threads=1)
            for r in ranks:
                per_step = [s["bytes"] for s in r["steps"]]
                neighbours = (r["rank"] > 0) + (r["rank"] < len(ranks) - 1)
                expected = expected_bytes_per_step(method.removesuffix(ADAPTED), r["cg_iters"], size, neighbours)
                expected += expected_adapt_bytes_per_step(r["adam_steps"], r["adapt_slices"], r["lora_parameters"])
                rows.append({"method": method, "depth": depth, "rank": r["rank"], "slab": [r["z0"], r["z1"]],
                             "cg_iters": r["cg_iters"], "steps": len(per_step), "bytes_per_step": per_step,
                             "bytes_per_step_median": statistics.median(per_step),
                             "constant_over_steps": len(set(per_step)) == 1,
                             "bytes_per_cg_iter": statistics.median(per_step) / r["cg_iters"],
                             "slices_per_cg_iter": statistics.median(per_step) / r["cg_iters"] / (size * size * 4),
                             "expected_bytes_per_step": expected, "setup_bytes": r["setup_bytes"],
                             "step_s_median": statistics.median(s["seconds"] for s in r["steps"][1:] or r["steps"])})
            log(f"[scaling] bytes {method} depth {depth}: " + ", ".join(
                f"rank {r['rank']} {statistics.median(s['bytes'] for s in r['steps']):,.0f} B/step"
                for r in ranks) + f" ({time.perf_counter() - started:.1f} s)")
    return {"size": size, "depths": depths, "steps": steps, "rows": rows}


# -- report ----------------------------------------------------------------------------------------------

def render(result: dict[str, Any]) -> str:
    """The tables of a scaling result (what they mean: bench/README.md, "scaling.py")."""
    lines = header(f"scaling, cpu, {result['date']}", result["env"], result["command"])
    actors = result.get("actors")
    if actors:
        lines += ["## (a) time per step, 1 vs 2 SlabWorker actors (1 thread each)", "",
                  f"run_jobs on a simulated {actors['depth']}x{actors['size']}^2 sparse-view CT dataset, 8 views.", ""]
        head = ["method", "steps", "CG iters", "1 actor: s/step", "2 actors: s/step", "speed-up (1/2)",
                "efficiency", "CPU s/step/actor (1)", "CPU s/step/actor (2, max)", "CPU ratio (1/2)",
                "solve s (1)", "solve s (2)", "bytes sent per rank (2 actors, whole run)"]
        rows = [[r["method"], r["steps"], r["cg_iters"], r["step_s_1"], r["step_s_2"], r["speedup"],
                 r["efficiency"], r["cpu_s_1"], r["cpu_s_2"], r["cpu_speedup"], r["solve_s_1"], r["solve_s_2"],
                 ", ".join(f"{b:,}" for b in r["bytes_per_rank_2"])] for r in actors["rows"]]
        lines += [markdown_table(head, rows), "", "Every run:", ""]
        rows = [[r["method"], r["workers"], r["step_s_median"], r["step_s_min"], len(r["steps_timed"]),
                 ", ".join(f"{c:.3g}" for c in r["cpu_s_per_step"]), r["solve_s"], r["load_s"], r["wall_s"],
                 r["loadavg_before"]] for r in actors["runs"]]
        lines += [markdown_table(["method", "actors", "median s/step", "min s/step", "steps timed",
                                  "CPU s/step per actor", "solve s", "load s", "run_jobs wall s",
                                  "load avg (1 min)"], rows), ""]
    data = result.get("bytes")
    if data:
        lines += ["## (b) bytes sent per actor per step vs depth (2 ranks, gloo)", "",
                  f"{data['steps']} steps per run; one slice = {data['size']}^2 x 4 B = {data['size'] ** 2 * 4:,} B.", ""]
        head = ["method", "depth", "rank", "slab", "CG iters", "bytes/step", "expected", "same every step",
                "bytes per CG iter", "= slices per CG iter", "s/step"]
        rows = [[r["method"], r["depth"], r["rank"], f"[{r['slab'][0]}, {r['slab'][1]})", r["cg_iters"],
                 f"{r['bytes_per_step_median']:,.0f}", f"{r['expected_bytes_per_step']:,}",
                 "yes" if r["constant_over_steps"] else "NO", f"{r['bytes_per_cg_iter']:,.0f}",
                 r["slices_per_cg_iter"], r["step_s_median"]] for r in data["rows"]]
        lines += [markdown_table(head, rows), ""]
        for method in sorted({r["method"] for r in data["rows"]}):
            values = {r["bytes_per_step_median"] for r in data["rows"] if r["method"] == method}
            depths = sorted({r["depth"] for r in data["rows"] if r["method"] == method})
            verdict = "the same for every depth" if len(values) == 1 else f"VARIES: {sorted(values)}"
            lines.append(f"- {method}: bytes per rank per step over depths {depths}: {verdict}.")
        lines.append("")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default="dds,admm-tv", help="methods of (a) and (b)")
    parser.add_argument("--size", type=int, default=BUNDLED_SIZE, help="slice size (dds needs 64)")
    parser.add_argument("--depth", type=int, default=64, help="depth of (a)")
    parser.add_argument("--steps", type=int, default=8, help="dds steps in (a)")
    parser.add_argument("--admm-iters", type=int, default=30, help="admm-tv iterations in (a)")
    parser.add_argument("--repeats", type=int, default=2, help="(a): runs of each (method, actors)")
    parser.add_argument("--byte-depths", default="32,64,128", help="depths of (b)")
    parser.add_argument("--byte-steps", type=int, default=3, help="steps of each (b) run")
    parser.add_argument("--skip-actors", action="store_true")
    parser.add_argument("--skip-bytes", action="store_true")
    parser.add_argument("--out", default=None, help="report stem (default results/scaling-cpu-<date>)")
    parser.add_argument("--render", default=None, help="only re-render the report from this JSON")
    args = parser.parse_args(argv)
    if args.render:
        rerender(Path(args.render), render, Path(args.out) if args.out else None)
        return 0
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    methods = [m for m in args.methods.split(",") if m]
    if "dds" in methods and args.size != BUNDLED_SIZE:
        parser.error(f"dds uses the bundled denoiser, which works at {BUNDLED_SIZE}^2 only")
    result: dict[str, Any] = {"date": today(), "env": environment("cpu"), "command": command_line("scaling.py", argv)}
    with tempfile.TemporaryDirectory(prefix="mbir-scaling-") as tmp:
        if not args.skip_actors:
            result["actors"] = measure_actors(methods, args.size, args.depth,
                                              {"dds": args.steps, "mbir": args.steps, "slice2d": args.steps,
                                               "admm-tv": args.admm_iters}, args.repeats, Path(tmp))
    if not args.skip_bytes:
        depths = [int(d) for d in args.byte_depths.split(",") if d]
        result["bytes"] = measure_bytes(methods, args.size, depths, args.byte_steps)
    publish(Path(args.out) if args.out else RESULTS_DIR / f"scaling-cpu-{result['date']}", render(result), result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
