"""Quality benchmark: FBP, ADMM-TV, slice2d, DDS and DiffusionMBIR on held-out phantoms.

For every task (SV-CT 8/4/2 views, LA-CT 90 degrees, CS-MRI 4x) and every method it reconstructs
held-out phantoms (seeds >= 9000, never used in training) with the presets in ``configs/`` and
reports PSNR / SSIM per axis (axial, coronal, sagittal), NFE and wall time. It writes a markdown
table, a JSON and one orthogonal-planes PNG per task to ``--out``.

    python bench/quality.py --device cpu --seeds 9100 9101
    python bench/quality.py --tasks svct-8view --methods admm-tv,dds --set dds.lam=0.2 --seeds 17

The size is the model's resolution (64^3 for the bundled model; ``--depth`` changes the slice count).
Tasks can run in parallel processes (``--tasks A --tag a`` and ``--tasks B --tag b``) and be joined
into one table with ``--merge results/a.json results/b.json --tag T``.

Runs in one process (LocalComm) and needs no zarr: measurements are simulated in memory with the
same operators the datasets use. Use ``--seeds`` below 9000 (training phantoms) to tune presets;
never tune on the held-out seeds.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch

from mbir_batch.config import load_config
from mbir_batch.io import simulate_measurements
from mbir_batch.kernels.comm import LocalComm
from mbir_batch.kernels.operators import operator_from_geometry
from mbir_batch.methods import METHODS as REGISTRY
from mbir_batch.metrics import psnr_ssim_per_axis
from mbir_batch.phantoms import HELDOUT_SEED_START, make_phantom
from mbir_batch.solve import SlabProblem, SlabSolver

TASKS = {
    "svct-8view": dict(task="svct", views=8),
    "svct-4view": dict(task="svct", views=4),
    "svct-2view": dict(task="svct", views=2),
    "lact-90": dict(task="lact", views=None, arc=90.0),
    "csmri-4x": dict(task="csmri", accel=4.0),
}
METHODS = tuple(REGISTRY)  # table order: baselines first
AXES = ("axial", "coronal", "sagittal")


def build_problem(volume: np.ndarray, task: str, noise: float, seed: int, device: torch.device) -> SlabProblem:
    spec = TASKS[task]
    sim = simulate_measurements(volume, noise=noise, seed=seed, **spec)
    depth = volume.shape[0]
    operator = operator_from_geometry(sim.modality, sim.geometry, volume.shape, mask=sim.mask, device=device)
    measurements = torch.as_tensor(np.asarray(sim.measurements)).to(device)
    return SlabProblem(z0=0, z1=depth, depth=depth, operator=operator, measurements=measurements)


def parse_overrides(items: list[str]) -> dict[str, dict[str, float]]:
    """``method.key=value`` pairs -> {method: {key: value}}."""
    out: dict[str, dict[str, float]] = {}
    for item in items:
        key, _, value = item.partition("=")
        method, _, name = key.partition(".")
        if not name or not value:
            raise SystemExit(f"--set {item!r}: expected METHOD.KEY=VALUE, e.g. dds.lam=0.2")
        number = float(value)
        out.setdefault(method, {})[name] = int(number) if name in ("steps", "iters", "cg_iters", "batch") else number
    return out


def run(args: argparse.Namespace) -> list[dict]:
    from mbir_batch.kernels.denoiser import bundled_model_path, load_denoiser

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible")
    if device.type == "cpu" and args.threads:
        torch.set_num_threads(args.threads)
    model_path = Path(args.model) if args.model else bundled_model_path()
    denoiser = load_denoiser(model_path, device=device)
    size = denoiser.config.resolution
    overrides = parse_overrides(args.set)
    rows: list[dict] = []
    for seed in args.seeds:
        volume = make_phantom(seed, size, args.depth or size)
        for task in args.tasks:
            problem = build_problem(volume, task, args.noise, seed, device)
            results: dict[str, np.ndarray] = {}
            for method in args.methods:
                cfg = load_config(task, method, seed=args.sampler_seed, **overrides.get(method, {}))
                solver = SlabSolver(problem, cfg, comm=LocalComm(), denoiser=denoiser, device=device)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                started = time.perf_counter()
                recon = solver.run(solver.initial_state()).numpy()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                wall = time.perf_counter() - started
                scores = psnr_ssim_per_axis(volume, recon)
                results[method] = recon
                row = dict(seed=seed, task=task, method=method, nfe=cfg.nfe, wall_s=wall, config=cfg.to_dict(),
                           **{f"{axis}_{m}": scores[axis][m] for axis in AXES for m in ("psnr", "ssim")})
                rows.append(row)
                print(f"seed {seed} {task:11s} {method:8s} NFE {cfg.nfe:4d} {wall:7.1f} s  "
                      + "  ".join(f"{axis} {scores[axis]['psnr']:.2f}/{scores[axis]['ssim']:.3f}" for axis in AXES),
                      flush=True)
            if args.png and seed == args.seeds[0]:
                from mbir_batch.report import make_report_png

                kind = "held-out" if seed >= HELDOUT_SEED_START else "training"
                make_report_png(volume, {REGISTRY[m].label: v for m, v in results.items()},
                                args.out / f"quality-{task}.png",
                                title=f"{task}, {kind} phantom {seed}, {size}^2 x {volume.shape[0]}")
    return rows


def summarise(rows: list[dict]) -> str:
    """Mean over seeds per (task, method) as a markdown table."""
    lines = ["| task | method | NFE | wall s | axial PSNR | coronal PSNR | sagittal PSNR | axial SSIM | coronal SSIM "
             "| sagittal SSIM |", "|---|---|---|---|---|---|---|---|---|---|"]
    keys = list(dict.fromkeys((r["task"], r["method"]) for r in rows))
    for task, method in keys:
        group = [r for r in rows if r["task"] == task and r["method"] == method]
        mean = {k: float(np.mean([r[k] for r in group])) for k in group[0] if k.endswith(("psnr", "ssim", "wall_s"))}
        lines.append(f"| {task} | {method} | {group[0]['nfe']} | {mean['wall_s']:.1f} | "
                     + " | ".join(f"{mean[f'{a}_psnr']:.2f}" for a in AXES) + " | "
                     + " | ".join(f"{mean[f'{a}_ssim']:.3f}" for a in AXES) + " |")
    return "\n".join(lines) + "\n"


def merge(paths: list[Path], out: Path, tag: str) -> None:
    """Write one table from the JSON rows of several runs, keeping each run's header line.

    A row of a later file replaces the row of an earlier one with the same (seed, task, method),
    e.g. a method re-run after its preset changed; the replaced rows are listed under the table.
    """
    by_key: dict[tuple, dict] = {}
    replaced: list[str] = []
    headers: list[str] = []
    for path in paths:
        if not path.is_file():
            raise SystemExit(f"--merge: {path}: no such file")
        for row in json.loads(path.read_text()):
            key = (row["seed"], row["task"], row["method"])
            if key in by_key:
                old = by_key[key]
                changed = {k: f"{v} -> {row['config'].get(k)}" for k, v in old["config"].items()
                           if row["config"].get(k) != v}
                replaced.append(f"- seed {key[0]} {key[1]} {key[2]}: replaced by {path.name}; the earlier row had "
                                f"axial/coronal/sagittal PSNR {old['axial_psnr']:.2f} / {old['coronal_psnr']:.2f} / "
                                f"{old['sagittal_psnr']:.2f} (config changed: {changed or 'none'})")
            by_key[key] = row
        md = path.with_suffix(".md")
        if md.is_file():
            headers += [f"- {line.split(' PSNR in dB')[0]}" for line in md.read_text().splitlines()
                        if line.startswith(("`python", "Device:"))]
    rows = list(by_key.values())
    order = {t: i for i, t in enumerate(TASKS)} | {m: i for i, m in enumerate(METHODS)}
    rows.sort(key=lambda r: (order.get(r["task"], 99), order.get(r["method"], 99), r["seed"]))
    seeds = sorted({r["seed"] for r in rows})
    table = summarise(rows)
    text = (f"# Quality benchmark\n\nMerged from {len(paths)} runs (seeds {seeds}):\n\n" + "\n".join(headers)
            + "\n\nPSNR in dB (data range of the reference), mean over slices per axis, then over seeds.\n\n" + table
            + ("\nReplaced rows:\n\n" + "\n".join(replaced) + "\n" if replaced else ""))
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{tag}.md").write_text(text)
    (out / f"{tag}.json").write_text(json.dumps(rows, indent=1))
    print(table)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--model", default=None, help="denoiser JSON (default: the bundled model)")
    p.add_argument("--seeds", type=int, nargs="+", default=[HELDOUT_SEED_START + 100])
    p.add_argument("--depth", type=int, default=None, help="slices (default: the model resolution)")
    p.add_argument("--tasks", type=lambda s: s.split(","), default=list(TASKS))
    p.add_argument("--methods", type=lambda s: s.split(","), default=list(METHODS))
    p.add_argument("--noise", type=float, default=0.0, help="measurement noise sigma")
    p.add_argument("--sampler-seed", type=int, default=0)
    p.add_argument("--set", action="append", default=[], help="METHOD.KEY=VALUE config override")
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    p.add_argument("--tag", default=None, help="file name tag (default: quality-<device>-<date>)")
    p.add_argument("--no-png", dest="png", action="store_false")
    p.add_argument("--merge", type=Path, nargs="+", default=None, metavar="JSON",
                   help="only combine the JSON results of earlier runs (e.g. tasks run in parallel) into one table")
    args = p.parse_args(argv)
    if args.merge:
        merge(args.merge, args.out, args.tag or f"quality-{args.device}-{date.today().isoformat()}")
        return
    unknown = [t for t in args.tasks if t not in TASKS] + [m for m in args.methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"unknown task or method: {', '.join(unknown)}")
    if any(s < HELDOUT_SEED_START for s in args.seeds):
        print(f"note: seeds below {HELDOUT_SEED_START} are training phantoms (use them for tuning only)")
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    rows = run(args)
    tag = args.tag or f"quality-{args.device}-{date.today().isoformat()}"
    table = summarise(rows)
    device_name = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else platform.processor() or "cpu"
    header = (f"# Quality benchmark\n\n`python bench/quality.py {' '.join(sys.argv[1:] if argv is None else argv)}`\n\n"
              f"Device: {device_name}, torch {torch.__version__}; seeds {args.seeds}; noise {args.noise}; "
              f"total {time.perf_counter() - started:.0f} s. PSNR in dB (data range of the reference), mean "
              f"over slices per axis, then over seeds.\n\n")
    (args.out / f"{tag}.md").write_text(header + table)
    (args.out / f"{tag}.json").write_text(json.dumps(rows, indent=1))
    print(table)


if __name__ == "__main__":
    main()
