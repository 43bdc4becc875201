"""Side by side with the tools users would pick instead: mbirjax, deepinv's samplers, ASTRA SIRT/CGLS.

On the same simulated data as ``bench/quality.py`` (procedural phantom ``make_phantom(seed)``,
measurements from the datasets' operators, noiseless unless ``--noise``) it runs:

- mbirjax ``ParallelBeamModel`` (qGGMRF MBIR; CT only), positivity on;
- ASTRA's CPU SIRT and CGLS, slice by slice (CT only);
- deepinv's DiffPIR, DPS and DDRM with OUR bundled denoiser and OUR operator, slice by slice, at a
  matched NFE (``--nfe``, 50 like our DDS);
- our methods: rows from a ``bench/quality.py`` JSON (``--ours FILE``) or run here (``--run-ours``).

    python bench/peers.py --tasks svct-8view,lact-90,csmri-4x --seeds 9100 --run-ours fbp,admm-tv,dds
    python bench/peers.py --tasks svct-8view --seeds 17 --depth 16 --peers dps --set dps.weight=0.3,1,3 --no-png
    python bench/peers.py --merge results/a.json results/b.json --tag peers-<date>   # runs split over processes

``--set PEER.KEY=V1,V2`` overrides a setting of ``TUNED``; several values make a grid (tuning:
training seeds < 9000 only). It reports PSNR/SSIM per axis, NFE or iterations, wall time (mbirjax
also with its first, JIT-compiling recon) and the 1-minute load average during each run, and
writes ``results/<tag>.md/.json`` and one PNG per task. A peer that does not support a task is a
row marked "n/a". Needs the ``peers`` extra (mbirjax, deepinv) for those peers.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import os
import platform
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch
from peers_env import prepare  # bench/ is on sys.path when this runs as a script

prepare()  # JAX_PLATFORMS=cpu, MBIRJAX_NUM_CPU_DEVICES=1, torchvision importable: before jax/diffusers load

from peers_report import (  # noqa: E402
    LoadMonitor,
    dds_comparison,
    markdown_table,
    na_row,
    rows_from_quality_json,
    setup_notes,
)
from quality import TASKS, build_problem  # noqa: E402

PEERS = ("mbirjax", "sirt", "cgls", "diffpir", "dps", "ddrm")
CT_ONLY = {"mbirjax": "mbirjax models X-ray CT only", "sirt": "ASTRA is a tomography toolbox (CT only)",
           "cgls": "ASTRA is a tomography toolbox (CT only)"}
NEEDS = {"mbirjax": "mbirjax", "diffpir": "deepinv", "dps": "deepinv", "ddrm": "deepinv"}
LABELS = {"mbirjax": "mbirjax", "sirt": "ASTRA SIRT", "cgls": "ASTRA CGLS", "diffpir": "DiffPIR (deepinv)",
          "dps": "DPS (deepinv)", "ddrm": "DDRM (deepinv)", "fbp": "FBP (ours)", "admm-tv": "ADMM-TV (ours)",
          "slice2d": "slice2d (ours)", "dds": "DDS (ours)", "mbir": "DiffusionMBIR (ours)"}
OURS_DEFAULT = "fbp,admm-tv,dds"
OURS_SHOWN = {"admm-tv": ("rho", "lam", "cg_iters"), "dds": ("steps", "rho", "lam", "cg_iters", "eta"),
              "slice2d": ("steps", "cg_iters", "eta"), "mbir": ("steps", "rho", "lam", "cg_iters", "snr")}
INSTALL_LINE = ("bench/peers.py: the 'peers' extra is missing (mbirjax, deepinv): pip install -e '.[peers]' "
                "(see bench/README.md, 'peers.py', for a CPU torch)")

# Chosen on training phantom 17 (64^2, noiseless; depth 16 for mbirjax/ASTRA, 8 for DiffPIR/DDRM, 4 for
# DPS) with --set grids, by the mean PSNR over the three axes; the grids are in bench/README.md
# ("peers.py"). Every task has its own entry; a missing key takes the wrapper's default.
TUNED: dict[str, dict[str, dict]] = {
    "mbirjax": {"svct-8view": dict(sharpness=0.0, snr_db=40.0, max_iterations=50),
                "lact-90": dict(sharpness=0.0, snr_db=40.0, max_iterations=50)},
    # lact-90 SIRT capped at 800 for cost: 1600 gave +1.0 dB on phantom 17 but took ~18 min per 16 slices
    "sirt": {"svct-8view": dict(iters=1600, min_constraint=0.0), "lact-90": dict(iters=800, min_constraint=0.0)},
    "cgls": {"svct-8view": dict(iters=100), "lact-90": dict(iters=400)},
    "diffpir": {"svct-8view": dict(lambda_=0.1, zeta=0.9, sigma=0.01),
                "lact-90": dict(lambda_=0.1, zeta=0.9, sigma=0.01),
                "csmri-4x": dict(lambda_=0.1, zeta=0.9, sigma=0.01)},
    "dps": {"svct-8view": dict(weight=100.0, schedule="vp"), "lact-90": dict(weight=30.0, schedule="vp"),
            "csmri-4x": dict(weight=100.0, schedule="vp")},
    "ddrm": {"svct-8view": dict(eta=1.0, etab=1.0, sigma_max=1.0), "lact-90": dict(eta=1.0, etab=1.0, sigma_max=1.0),
             "csmri-4x": dict(eta=1.0, etab=1.0, sigma_max=0.5)},
}


def parse_grid(items: list[str]) -> dict[str, dict[str, list]]:
    """``peer.key=v1,v2`` pairs -> {peer: {key: [values]}} (numbers parsed, ``none``/``true``/``false`` too)."""
    def value(text: str):
        lowered = text.strip().lower()
        if lowered in ("none", "true", "false"):
            return {"none": None, "true": True, "false": False}[lowered]
        try:
            number = float(text)
        except ValueError:
            return text.strip()
        return int(number) if number.is_integer() and "." not in text and "e" not in lowered else number

    grid: dict[str, dict[str, list]] = {}
    for item in items:
        key, _, values = item.partition("=")
        peer, _, name = key.partition(".")
        if peer not in PEERS or not name or not values:
            raise SystemExit(f"--set {item!r}: expected PEER.KEY=V1[,V2...] with PEER one of {', '.join(PEERS)}")
        grid.setdefault(peer, {})[name] = [value(v) for v in values.split(",")]
    return grid


def settings_grid(peer: str, task: str, grid: dict[str, dict[str, list]]) -> list[dict]:
    """The tuned settings of ``peer`` on ``task``, once per combination of the ``--set`` values."""
    base = dict(TUNED.get(peer, {}).get(task, {}))
    axes = grid.get(peer, {})
    combos = itertools.product(*axes.values()) if axes else [()]
    return [{**base, **dict(zip(axes, combo))} for combo in combos]


def run_peer(peer: str, settings: dict, problem, volume: np.ndarray, args, model) -> tuple[np.ndarray, dict]:
    """Reconstruct with one peer; returns (volume, row fields: nfe, iters, wall_s, wall_s_first, settings)."""
    depth, height, width = volume.shape
    operator, measurements = problem.operator, problem.measurements
    if peer in ("sirt", "cgls"):
        from peers_astra import AstraSettings, astra_reconstruct

        started = time.perf_counter()
        recon = astra_reconstruct(measurements.numpy(), angles_deg=operator.angles_deg, det_count=operator.det_count,
                                  det_spacing=operator.det_spacing, shape=(height, width), algorithm=peer,
                                  settings=AstraSettings(**settings))
        return recon, dict(nfe=0, iters=settings["iters"], wall_s=time.perf_counter() - started, wall_s_first=None)
    if peer == "mbirjax":
        from peers_mbirjax import MbirjaxSettings, mbirjax_reconstruct

        recon, info = mbirjax_reconstruct(measurements.numpy(), angles_deg=operator.angles_deg,
                                          det_count=operator.det_count, det_spacing=operator.det_spacing,
                                          shape=(height, width), settings=MbirjaxSettings(**settings),
                                          repeat_warm=args.mbirjax_warm)
        return recon, dict(nfe=0, iters=info["iters"], wall_s=info["wall_s"],
                           wall_s_first=info["wall_s_first"] if args.mbirjax_warm else None)
    from peers_deepinv import SamplerSettings, run_sampler

    started = time.perf_counter()
    recon, info = run_sampler(peer, model, operator, measurements, batch=args.batch, seed=args.sampler_seed,
                              settings=SamplerSettings(nfe=args.nfe, extra=settings), noise=args.noise)
    return recon, dict(nfe=info["nfe"], iters=None, wall_s=time.perf_counter() - started, wall_s_first=None,
                       setup_s=info["setup_s"])


def run_ours(method: str, task: str, problem, args, model) -> tuple[np.ndarray, dict]:
    """One of our methods with its preset, exactly as ``bench/quality.py`` runs it."""
    from mbir_batch.config import load_config
    from mbir_batch.kernels.comm import LocalComm
    from mbir_batch.solve import SlabSolver

    cfg = load_config(task, method, seed=args.sampler_seed)
    solver = SlabSolver(problem, cfg, comm=LocalComm(), denoiser=model, device=torch.device("cpu"))
    started = time.perf_counter()
    recon = solver.run(solver.initial_state()).numpy()
    config = cfg.to_dict()
    shown = {k: config[k] for k in OURS_SHOWN.get(method, ()) if k in config}
    return recon, dict(nfe=cfg.nfe, iters=config.get("iters") if method == "admm-tv" else None,
                       wall_s=time.perf_counter() - started, wall_s_first=None, settings=shown, config=config)


def scored_row(seed: int, task: str, method: str, source: str, volume: np.ndarray, recon: np.ndarray, fields: dict,
               load: dict) -> dict:
    from mbir_batch.metrics import psnr_ssim_per_axis

    scores = psnr_ssim_per_axis(volume, recon)
    row = {"seed": seed, "task": task, "method": method, "source": source, "status": "ok", **fields, **load}
    row.update({f"{axis}_{m}": scores[axis][m] for axis in scores for m in ("psnr", "ssim")})
    return row


def print_row(row: dict) -> None:
    if row["status"] != "ok":
        print(f"seed {row['seed']} {row['task']:11s} {row['method']:8s} {row['status']}", flush=True)
        return
    print(f"seed {row['seed']} {row['task']:11s} {row['method']:8s} NFE {row['nfe'] or 0:3d} {row['wall_s']:7.1f} s "
          f"load {row['load_mean']:.1f}  " + "  ".join(f"{a} {row[a + '_psnr']:.2f}/{_number(row[a + '_ssim'])}"
                                                  for a in ("axial", "coronal", "sagittal"))
          + f"  {row['settings']}", flush=True)


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def run(args) -> tuple[list[dict], dict[str, dict[str, np.ndarray]]]:
    """All rows, and per task the first seed's reconstructions (first setting of each method) for the PNG."""
    from mbir_batch.phantoms import make_phantom

    model = None
    if any(p in ("diffpir", "dps", "ddrm") for p in args.peers) or args.run_ours:
        from mbir_batch.kernels.denoiser import bundled_model_path, load_denoiser

        model = load_denoiser(Path(args.model) if args.model else bundled_model_path())
    resolution = model.config.resolution if model is not None else None
    size = args.size or resolution or 64
    grid = parse_grid(args.set)
    rows: list[dict] = []
    images: dict[str, dict[str, np.ndarray]] = {}
    for seed in args.seeds:
        volume = make_phantom(seed, size, args.depth or size)
        for task in args.tasks:
            problem = build_problem(volume, task, args.noise, seed, torch.device("cpu"))
            keep = images.setdefault(task, {"reference": volume}) if seed == args.seeds[0] else {}
            is_ct = TASKS[task]["task"] != "csmri"
            jobs = [(p, "peer") for p in args.peers] + [(m, "ours-run") for m in args.run_ours]
            for method, source in jobs:
                if method in CT_ONLY and not is_ct:
                    rows.append(na_row(seed, task, method, source, CT_ONLY[method]))
                    print_row(rows[-1])
                    continue
                needs_model = method not in ("mbirjax", "sirt", "cgls", "fbp", "admm-tv")
                if needs_model and resolution != size:
                    rows.append(na_row(seed, task, method, source, f"the denoiser is trained at {resolution}^2, "
                                       f"the volume is {size}^2"))
                    print_row(rows[-1])
                    continue
                for settings in (settings_grid(method, task, grid) if source == "peer" else [{}]):
                    with LoadMonitor() as load:
                        if source == "peer":
                            recon, fields = run_peer(method, settings, problem, volume, args, model)
                            fields["settings"] = settings
                        else:
                            recon, fields = run_ours(method, task, problem, args, model)
                    rows.append(scored_row(seed, task, method, source, volume, recon, fields, load.summary()))
                    print_row(rows[-1])
                    keep.setdefault(LABELS[method], recon)
    return rows, images


def missing_extra(peers: list[str]) -> bool:
    return any(p in NEEDS and importlib.util.find_spec(NEEDS[p]) is None for p in peers)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tasks", type=lambda s: s.split(","), default=["svct-8view", "lact-90", "csmri-4x"])
    p.add_argument("--seeds", type=int, nargs="+", default=[9100])
    p.add_argument("--size", type=int, default=None, help="slice size (default: the denoiser's resolution, 64)")
    p.add_argument("--depth", type=int, default=None, help="slices (default: --size)")
    p.add_argument("--peers", type=lambda s: s.split(","), default=list(PEERS))
    p.add_argument("--noise", type=float, default=0.0, help="measurement noise sigma (as bench/quality.py)")
    p.add_argument("--nfe", type=int, default=50, help="denoiser evaluations per slice of the deepinv samplers")
    p.add_argument("--batch", type=int, default=16, help="slices per deepinv sampler call")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--model", default=None, help="denoiser JSON (default: the bundled model)")
    p.add_argument("--sampler-seed", type=int, default=0)
    p.add_argument("--set", action="append", default=[], help="PEER.KEY=V1[,V2...]: override / grid")
    p.add_argument("--ours", type=Path, default=None, help="bench/quality.py results JSON with our rows")
    p.add_argument("--run-ours", nargs="?", const=OURS_DEFAULT, default="",
                   help=f"run our methods here (default {OURS_DEFAULT})")
    p.add_argument("--no-mbirjax-warm", dest="mbirjax_warm", action="store_false",
                   help="skip the second (compiled) mbirjax recon; then only the cold wall time is known")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    p.add_argument("--tag", default=None, help="file name stem (default peers-<date>)")
    p.add_argument("--no-png", dest="png", action="store_false")
    p.add_argument("--merge", type=Path, nargs="+", default=None, metavar="JSON",
                   help="only join the JSON of earlier runs (e.g. tasks run in parallel) into one table")
    args = p.parse_args(argv)
    if args.merge:
        merge(args.merge, args.out, args.tag or f"peers-{date.today().isoformat()}")
        return 0
    args.run_ours = [m for m in args.run_ours.split(",") if m]
    unknown = ([t for t in args.tasks if t not in TASKS] + [x for x in args.peers if x not in PEERS]
               + [m for m in args.run_ours if m not in LABELS or m in PEERS])
    if unknown:
        raise SystemExit(f"bench/peers.py: unknown task, peer or method: {', '.join(unknown)}")
    if missing_extra(args.peers):
        print(INSTALL_LINE, file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
        if args.threads == 1:
            os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
    if any(s < 9000 for s in args.seeds):
        print("note: seeds below 9000 are training phantoms (use them for tuning only)")
    started = time.perf_counter()
    rows, images = run(args)
    if args.ours is not None:
        rows += rows_from_quality_json(args.ours, args.seeds, args.tasks, None)
    tag = args.tag or f"peers-{date.today().isoformat()}"
    write_outputs(args, argv, rows, images, tag, time.perf_counter() - started)
    return 0


def write_outputs(args, argv, rows: list[dict], images: dict, tag: str, total_s: float) -> None:
    command = "python bench/peers.py " + " ".join(sys.argv[1:] if argv is None else argv)
    versions = {name: _version(name) for name in ("torch", "mbirjax", "jax", "deepinv", "astra-toolbox")}
    header = (f"# Peers benchmark\n\n`{command}`\n\nCPU ({platform.processor() or platform.machine()}, "
              f"{os.cpu_count()} cores), {args.threads} thread(s); "
              + ", ".join(f"{k} {v}" for k, v in versions.items())
              + f"; seeds {args.seeds}; noise {args.noise}; total {total_s:.0f} s. "
              "PSNR in dB (data range of the reference), mean over the slices of each axis. 'load' is the 1-minute "
              "load average sampled during each run. Settings: bench/peers.py TUNED unless --set.\n\n")
    comparison = dds_comparison(rows)
    setups = setup_notes(rows)
    text = (header + markdown_table(rows) + ("\nSet-up inside the wall time:\n\n" + setups if setups else "")
            + ("\nDDS against each peer:\n\n" + comparison if comparison else ""))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{tag}.md").write_text(text)
    (args.out / f"{tag}.json").write_text(json.dumps({"command": command, "versions": versions, "rows": rows},
                                                     indent=1, default=float))
    if args.png:
        from mbir_batch.report import make_report_png

        for task, recons in images.items():
            reference = recons.pop("reference")
            if recons:
                kind = "held-out" if args.seeds[0] >= 9000 else "training"
                make_report_png(reference, recons, args.out / f"{tag}-{task}.png",
                                title=f"{task}, {kind} phantom {args.seeds[0]}, {reference.shape[1]}^2 x "
                                      f"{reference.shape[0]}: peers and ours")
    print(markdown_table(rows, with_settings=False) + ("\n" + comparison if comparison else ""))


def merge(paths: list[Path], out: Path, tag: str) -> None:
    """One table from the rows of several runs (their commands listed); PNGs stay with each run."""
    rows, commands = [], []
    for path in paths:
        try:
            document = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise SystemExit(f"--merge {path}: cannot read a peers JSON ({err})") from None
        if not isinstance(document, dict) or "rows" not in document:
            raise SystemExit(f"--merge {path}: not a bench/peers.py results JSON (no 'rows')")
        rows += document["rows"]
        commands.append(document.get("command", str(path)))
    setups, comparison = setup_notes(rows), dds_comparison(rows)
    text = ("# Peers benchmark\n\nMerged from:\n\n" + "".join(f"- `{c}`\n" for c in commands) + "\n"
            + markdown_table(rows) + ("\nSet-up inside the wall time:\n\n" + setups if setups else "")
            + ("\nDDS against each peer:\n\n" + comparison if comparison else ""))
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{tag}.md").write_text(text)
    (out / f"{tag}.json").write_text(json.dumps({"command": commands, "rows": rows}, indent=1, default=float))
    print(markdown_table(rows, with_settings=False))


def _version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


if __name__ == "__main__":
    sys.exit(main())
