"""The counted working set of a SlabWorker actor, and the tables of ``bench/memory.py``'s result.

The report holds the measured numbers and the counts they are compared with; what they mean is
in ``bench/README.md`` ("memory.py"), with the per-method breakdown of the counts below.
"""

from __future__ import annotations

from typing import Any

from harness.results import header, markdown_table

MB = 1e6

# Slab-sized float32 buffers (S = slab voxels x 4 B) a run keeps live: (persistent, at the peak of a step),
# counted from the code (the breakdown per method is in bench/README.md, "memory.py").
BUFFERS = {"fbp": (3, 4), "admm-tv": (8, 34), "dds": (4, 15)}
DENOISING = ("dds", "mbir", "slice2d")


def theory(run: dict[str, Any], shape: tuple[int, int, int], activations: dict[str, float] | None,
           batch: int, model_bytes: int) -> dict[str, Any]:
    """Per actor of ``run``: its slab size S, and ``BUFFERS`` x S (+ the denoiser's batch and weights)."""
    depth, height, width = shape
    out = []
    for actor in run["actors"]:
        slices = (actor["z1"] - actor["z0"]) if actor["z0"] is not None else depth // run["workers"]
        slab = slices * height * width * 4
        low, high = BUFFERS[run["method"]]
        act = 0.0
        if run["method"] in DENOISING and activations:
            act = activations["intercept_bytes"] + activations["bytes_per_slice"] * min(batch, slices)
        out.append({"rank": actor["rank"], "slices": slices, "slab_bytes": slab, "persistent": low * slab,
                    "estimate": high * slab + act + model_bytes, "activations": act, "buffers": (low, high)})
    return {"full_volume_bytes": depth * height * width * 4, "per_actor": out}


def _run_name(run: dict[str, Any]) -> str:
    return f"{run['method']} x{run['workers']}" + (" (no reference)" if run.get("noref") else "")


def _setup_lines(result: dict[str, Any], full: float) -> list[str]:
    data, act = result["dataset"], result.get("activations")
    simulated = f"{data['simulate_s']:.0f} s" if data.get("simulate_s") else "reused"
    lines = [f"Dataset: {data['depth']}x{data['size']}x{data['size']}, phantom {data['phantom']}, 8 views "
             f"(simulate: {simulated}); full volume float32 = {full / MB:.0f} MB.", "",
             f"Denoiser for dds: {result['model_label']}, {result['model_parameters']:,} parameters "
             f"({result['model_bytes'] / MB:.1f} MB).", ""]
    if act:
        lines += ["Batch activations (VmHWM growth of one `denoise_slab` batch, 1 thread): "
                  + ", ".join(f"batch {b}: {g / MB:.0f} MB" for b, g in zip(act["batches"], act["growth_bytes"]))
                  + f" -> {act['bytes_per_slice'] / MB:.1f} MB per slice + {act['intercept_bytes'] / MB:.0f} MB; "
                  f"the runs use batch {result['batch']}.", ""]
    return lines + [f"Config: `{result['config_text'].strip()}`".replace("\n", "; "), ""]


def _peak_rows(result: dict[str, Any], full: float) -> list[list[Any]]:
    base = result.get("actor_baseline_bytes")
    rows = []
    for run in result["runs"]:
        drv = run["driver"]
        rows.append([_run_name(run), "driver (mbir-batch submit)", "-", "-", drv["hwm"] / MB, drv["rss_max"] / MB,
                     "-", "-", "-", full / MB])
        method_base = None if base is None else base + result.get("baseline_extra", {}).get(run["method"], 0)
        for actor, th in zip(run["actors"], run["theory"]["per_actor"]):
            slab = f"[{actor['z0']}, {actor['z1']})" if actor["z0"] is not None else "?"
            extra = actor["hwm"] - method_base if method_base else None
            ratio = (extra - th["activations"]) / th["slab_bytes"] if extra is not None else None
            rows.append([_run_name(run), f"actor rank {actor['rank']}", slab, th["slab_bytes"] / MB, actor["hwm"] / MB,
                         actor["rss_max"] / MB, None if extra is None else extra / MB, ratio,
                         f"{th['persistent'] / MB:.0f}..{th['estimate'] / MB:.0f}", full / MB])
    return rows


def _derived_lines(result: dict[str, Any], full: float) -> list[str]:
    """The numbers derived from the runs: baselines, fbp's buffers per slab, driver scoring, the extra checks."""
    lines = []
    if result.get("fbp_buffers_per_slab"):
        lines.append(f"- fbp actor peak, 1 vs 2 workers: {result['fbp_buffers_per_slab']:.2f} slab-sized buffers per "
                     f"slab; actor baseline (fbp x2 peak minus that x S) = {result['actor_baseline_bytes'] / MB:.0f} MB"
                     f"; dds adds {result['baseline_extra'].get('dds', 0) / MB:.0f} MB (denoiser module and model).")
    lines += [f"- fresh Python, {name}: {value / MB:.0f} MB" for name, value in result.get("import_baselines", {}).items()]
    drv = result.get("driver_scoring")
    if drv:
        lines.append(f"- driver peak, fbp x2 with / without a reference: {drv['with'] / MB:.0f} / {drv['without'] / MB:.0f}"
                     f" MB: +{drv['delta'] / MB:.0f} MB = {drv['imports'] / MB:.0f} MB scoring imports + "
                     f"{drv['data'] / MB:.0f} MB data ({drv['data'] / full:.1f} x the full volume).")
    check = result.get("state_check")
    if check:
        lines.append(f"- admm-tv in one process ({check['slices']} x {result['dataset']['size']}^2, LocalComm): peak "
                     f"over the live starting state {check['peak_s']:.1f} S.")
    pa = result.get("paper_activations")
    if pa:
        lines.append(f"- paper-size denoiser ({pa['label']}) at {pa['size']}^2: {pa['bytes_per_slice'] / MB:.0f} MB of "
                     f"activations per slice (fp32, CPU, batches {pa['batches']}).")
    return lines


def render(result: dict[str, Any]) -> str:
    """The markdown of a memory result: setup, the peak per process, per run, the derived numbers."""
    data = result["dataset"]
    full = data["depth"] * data["size"] ** 2 * 4
    lines = header(f"memory, cpu, {result['date']}", result["env"], result["command"]) + _setup_lines(result, full)
    head = ["run", "process", "slab", "slab MB (S)", "peak MB", "sampled MB", "peak - actor baseline MB",
            "(that - batch activations) / S", "counted: persistent..peak MB (incl. activations)", "full volume MB"]
    lines += ["## Peak resident memory per process (VmHWM)", "", markdown_table(head, _peak_rows(result, full)), ""]
    rows = [[_run_name(run), run["wall_s"], (run.get("timings") or {}).get("solve_s"),
             (run.get("timings") or {}).get("score_s"), run["driver"]["ru_maxrss"] / MB, run["ray_processes"],
             run["ray_processes_rss_max_sum"] / MB, run["max_total_rss"] / MB,
             ", ".join(f"{b:,}" for b in run.get("bytes_sent") or [])] for run in result["runs"]]
    lines += ["## Per run", "", markdown_table(["run", "wall s", "solve s", "score s (driver)",
                                                "wait4 ru_maxrss MB (driver + reaped Ray procs)", "Ray system procs",
                                                "their RSS sum MB", "max total RSS MB", "bytes sent per rank"], rows), ""]
    counts = [[method, low, high] for method, (low, high) in BUFFERS.items()]
    lines += ["## Counted slab buffers (S = slab slices x H x W x 4 B)", "",
              markdown_table(["method", "persistent S", "at the peak of a step S"], counts), ""]
    derived = _derived_lines(result, full)
    return "\n".join(lines + (["## Derived", "", *derived, ""] if derived else [])) + "\n"
