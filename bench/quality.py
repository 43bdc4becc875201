"""Quality benchmark: FBP, ADMM-TV, slice2d, DDS and DiffusionMBIR, in and out of distribution.

For every phantom family, seed, task (SV-CT 8/4/2 views, LA-CT 90 degrees, CS-MRI 4x) and method
it reconstructs the phantom with the method's preset in ``configs/`` and reports PSNR / SSIM per
axis (axial, coronal, sagittal), NFE and wall time: one line per reconstruction, then a markdown
table (mean over seeds, rows grouped by family, in- and out-of-distribution apart), a JSON of
every row and one orthogonal-planes PNG per family and task.

    python bench/quality.py --device cpu --seeds 9100 9101
    python bench/quality.py --family ellipsoids,brain --seeds 1 --tasks svct-8view
    python bench/quality.py --tasks svct-8view --methods admm-tv,dds --set dds.lam=0.2 --seeds 17
    python bench/quality.py --model runs/my-diffusers-unet --model-data-range -1,1

Families (``--family``): ``torso`` is the training distribution (:func:`mbir_batch.phantoms.make_phantom`;
seeds below 9000 are training phantoms, for tuning only, seeds from 9000 on are held out);
``ellipsoids`` and ``brain`` are out of distribution (``bench/ood_phantoms.py``, each with its own
seed stream; ``brain`` is for reporting only). The script prints these rules.

One process (LocalComm), no zarr: measurements are simulated in memory exactly as
``mbir-batch simulate`` makes a dataset. ``--save-volumes DIR`` writes every reconstruction as
``<family>-<seed>-<task>-<method>.npy``, to compare two code versions bit for bit.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness.denoisers import load_model
from harness.problems import simulate_problem
from harness.results import RESULTS_DIR, command_line, environment, markdown_table, today, write_report
from ood_phantoms import OOD_FAMILIES, ROLES

from mbir_batch.config import load_config
from mbir_batch.errors import UserError
from mbir_batch.kernels.comm import LocalComm
from mbir_batch.methods import get, names
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
METHODS = names()  # table order: baselines first
AXES = ("axial", "coronal", "sagittal")
IN, OUT = "in-distribution", "out-of-distribution"


@dataclass(frozen=True)
class Family:
    """A phantom family: how to make one volume, whether the priors were trained on it, its seed rule."""

    make: Callable[[int, int, int], np.ndarray]
    distribution: str
    seed_rule: str


FAMILIES = {
    "torso": Family(lambda seed, size, depth: make_phantom(seed, size, depth), IN,
                    f"seeds < {HELDOUT_SEED_START} are training phantoms (tune presets on these only); "
                    f"seeds >= {HELDOUT_SEED_START} are held out (report these)"),
    **{name: Family(make, OUT, f"its own seed stream (any seed); {ROLES[name]}") for name, make in OOD_FAMILIES.items()},
}


def build_problem(volume: np.ndarray, task: str, noise: float, seed: int, device: torch.device) -> SlabProblem:
    """The whole-volume problem of ``task`` (a key of :data:`TASKS`) for ``volume``, noise from ``seed``."""
    return simulate_problem(volume, noise=noise, seed=seed, device=device, **TASKS[task])


def setting_value(text: str) -> Any:
    """``--set`` value: true/false, else an int, else a float, else the text itself (the method's
    config judges it)."""
    if text in ("true", "false"):
        return text == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_overrides(items: list[str]) -> dict[str, dict[str, Any]]:
    """``method.key=value`` pairs -> {method: {key: value}}; ``method.section.key=value`` (``dds.adapt.lr=0.001``)
    sets a key of a nested section."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, _, value = item.partition("=")
        method, _, name = key.partition(".")
        if not name or not value:
            raise SystemExit(f"--set {item!r}: expected METHOD.KEY=VALUE, e.g. dds.lam=0.2")
        section, _, inner = name.partition(".")
        if inner:
            out.setdefault(method, {}).setdefault(section, {})[inner] = setting_value(value)
        else:
            out.setdefault(method, {})[name] = setting_value(value)
    return out


def seed_rules(families: list[str]) -> list[str]:
    """One line per family: its distribution and which seeds are for what."""
    return [f"- {name} ({FAMILIES[name].distribution}): {FAMILIES[name].seed_rule}" for name in families]


def load_denoiser_for(args: argparse.Namespace, device: torch.device) -> tuple[Any, str, int]:
    """``(denoiser or None, label, slice size)``: a model only when a method needs one."""
    if not any(get(method).needs_model for method in args.methods):
        return None, "none (no method needs one)", args.size or 64
    from mbir_batch.cli.common import parse_data_range
    from mbir_batch.config import model_config_path

    config = model_config_path(args.model_config) if args.model_config is not None else None
    model, label = load_model(args.model, config=config, data_range=parse_data_range(args.model_data_range),
                              device=device)
    if args.size and args.size != model.resolution:
        raise SystemExit(f"--size {args.size}: the model works at {model.resolution}^2")
    return model, label, model.resolution


def run(args: argparse.Namespace, denoiser: Any, size: int, device: torch.device) -> list[dict]:
    """Every (family, seed, task, method) reconstruction: one printed line and one row each."""
    overrides = parse_overrides(args.set)
    rows: list[dict] = []
    for family in args.family:
        for seed in args.seeds:
            volume = FAMILIES[family].make(seed, size, args.depth or size)
            for task in args.tasks:
                problem = build_problem(volume, task, args.noise, seed, device)
                recons: dict[str, np.ndarray] = {}
                for method in args.methods:
                    recon, cfg, wall, info = reconstruct(problem, task, method, args, overrides, denoiser, device)
                    rows.append(score(volume, recon, cfg, wall, info, family=family, seed=seed, task=task,
                                      variant=variant_of(overrides.get(method, {}))))
                    if args.save_volumes:
                        np.save(args.save_volumes / f"{family}-{seed}-{task}-{method}.npy", recon)
                    recons[get(method).label] = recon
                if args.png and seed == args.seeds[0]:
                    from mbir_batch.report import make_report_png

                    make_report_png(volume, recons,
                                    args.out / f"quality-{family}-{task}.png",
                                    title=f"{task}, {family} phantom {seed}, {size}^2 x {volume.shape[0]}")
    return rows


def reconstruct(problem: SlabProblem, task: str, method: str, args: argparse.Namespace,
                overrides: dict[str, dict[str, Any]], denoiser: Any, device: torch.device):
    """``(volume, config, wall seconds, last step-event info)`` of ``method`` with the task's preset and
    ``--set`` overrides."""
    cfg = load_config(task, method, seed=args.sampler_seed, **overrides.get(method, {}))
    solver = SlabSolver(problem, cfg, comm=LocalComm(), denoiser=denoiser, device=device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    info: dict[str, float] = {}
    recon = solver.run(solver.initial_state(), callback=lambda event: info.update(event.info)).cpu().numpy()
    return recon, cfg, time.perf_counter() - started, info


def variant_of(overrides: dict[str, Any]) -> str:
    """The ``--set`` overrides of a method as text (``lam=auto``), part of a row's identity."""
    return ",".join(f"{key}.{inner}={v}" if isinstance(value, dict) else f"{key}={value}"
                    for key, value in overrides.items()
                    for inner, v in (value.items() if isinstance(value, dict) else [(None, value)]))


def lam_auto_of(info: dict[str, float]) -> dict[str, float] | None:
    """The ``lam: auto`` choice in a run's step info (pipeline/methods/sampling.py ``lam_info``), if any."""
    return {k: v for k, v in info.items() if k.startswith("lam")} or None


def score(volume: np.ndarray, recon: np.ndarray, cfg: Any, wall: float, info: dict[str, float] | None = None,
          **key: Any) -> dict:
    """The row of one reconstruction (and its printed line). NFE counts a ``lam: auto`` choice's
    cross-validation runs too (``lam_auto_nfe`` per slice), whose choice the row keeps."""
    scores = psnr_ssim_per_axis(volume, recon)
    family = key["family"]
    lam_auto = lam_auto_of(info or {})
    nfe = cfg.nfe + int(lam_auto["lam_auto_nfe"]) if lam_auto else cfg.nfe
    adapt = {k: v for k, v in (info or {}).items() if k.startswith("adapt_")} or None
    row = dict(**key, distribution=FAMILIES[family].distribution, method=cfg.method, nfe=nfe, wall_s=wall,
               config=cfg.to_dict(), lam_auto=lam_auto, adapt=adapt,
               **{f"{axis}_{m}": scores[axis][m] for axis in AXES for m in ("psnr", "ssim")})
    chosen = f"  (lam auto: {lam_auto['lam']:.4g}, CV {lam_auto['lam_auto_s']:.0f} s)" if lam_auto else ""
    if adapt:
        chosen += f"  (adapted: {adapt['adapt_rounds']:.0f} rounds, {adapt['adapt_s']:.0f} s)"
    print(f"{family:10s} seed {key['seed']} {key['task']:11s} {label_of(row):8s} NFE {nfe:4d} {wall:7.1f} s  "
          + "  ".join(f"{axis} {scores[axis]['psnr']:.2f}/{scores[axis]['ssim']:.3f}" for axis in AXES) + chosen,
          flush=True)
    return row


def label_of(row: dict) -> str:
    """A row's method with its ``--set`` variant (``dds [lam=auto]``)."""
    return f"{row['method']} [{row['variant']}]" if row.get("variant") else row["method"]


def family_of(row: dict) -> str:
    """A row's family; rows written before families existed are torso rows."""
    return row.get("family", "torso")


def summarise(rows: list[dict]) -> str:
    """Mean over seeds per (family, task, method) as a markdown table, families in :data:`FAMILIES` order."""
    order = {name: i for i, name in enumerate([*FAMILIES, *TASKS, *METHODS])}
    keys = sorted(dict.fromkeys((family_of(r), r["task"], r["method"], r.get("variant", "")) for r in rows),
                  key=lambda k: tuple(order.get(part, 99) for part in k[:3]) + (k[3],))
    table = []
    for family, task, method, variant in keys:
        group = [r for r in rows
                 if (family_of(r), r["task"], r["method"], r.get("variant", "")) == (family, task, method, variant)]
        mean = {k: float(np.mean([r[k] for r in group])) for k in group[0] if k.endswith(("psnr", "ssim", "wall_s"))}
        table.append([family, FAMILIES[family].distribution, task, label_of(group[0]), group[0]["nfe"],
                      f"{mean['wall_s']:.1f}",
                      *(f"{mean[f'{a}_psnr']:.2f}" for a in AXES), *(f"{mean[f'{a}_ssim']:.3f}" for a in AXES)])
    head = ["family", "distribution", "task", "method", "NFE", "wall s", *(f"{a} PSNR" for a in AXES),
            *(f"{a} SSIM" for a in AXES)]
    return markdown_table(head, table) + "\n"


CAPTION = "PSNR in dB (data range of the reference), mean over slices per axis, then over seeds."


def merge(paths: list[Path], out: Path, tag: str) -> None:
    """Write one table from the JSON rows of several runs, keeping each run's header line.

    A row of a later file replaces the row of an earlier one with the same (family, seed, task,
    method, ``--set`` variant), e.g. a method re-run after its preset changed; the replaced rows are
    listed under the table.
    """
    import json

    by_key: dict[tuple, dict] = {}
    replaced: list[str] = []
    headers: list[str] = []
    for path in paths:
        if not path.is_file():
            raise SystemExit(f"--merge: {path}: no such file")
        for row in json.loads(path.read_text()):
            key = (family_of(row), row["seed"], row["task"], row["method"], row.get("variant", ""))
            if key in by_key:
                old = by_key[key]
                changed = {k: f"{v} -> {row['config'].get(k)}" for k, v in old["config"].items()
                           if row["config"].get(k) != v}
                name = " ".join(str(part) for part in key if part != "")
                replaced.append(f"- {name}: replaced by {path.name}; the earlier row had "
                                f"axial/coronal/sagittal PSNR {old['axial_psnr']:.2f} / {old['coronal_psnr']:.2f} / "
                                f"{old['sagittal_psnr']:.2f} (config changed: {changed or 'none'})")
            by_key[key] = row
        md = path.with_suffix(".md")
        if md.is_file():
            headers += [f"- {line}" for line in md.read_text().splitlines() if line.startswith(("`python", "Device:"))]
    rows = list(by_key.values())
    seeds = sorted({r["seed"] for r in rows})
    table = summarise(rows)
    text = (f"# Quality benchmark\n\nMerged from {len(paths)} runs (seeds {seeds}):\n\n" + "\n".join(headers)
            + f"\n\n{CAPTION}\n\n" + table + ("\nReplaced rows:\n\n" + "\n".join(replaced) + "\n" if replaced else ""))
    write_report(out / tag, text, rows)
    print(table)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    def listed(choices: tuple[str, ...] | list[str], what: str) -> Callable[[str], list[str]]:
        def parse(text: str) -> list[str]:
            items = [item for item in text.split(",") if item]
            unknown = [item for item in items if item not in choices]
            if unknown or not items:
                raise argparse.ArgumentTypeError(f"unknown {what} {', '.join(unknown) or '(none given)'}; "
                                                 f"choose from {', '.join(choices)}")
            return items
        return parse

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--family", type=listed(list(FAMILIES), "family"), default=["torso"],
                   help=f"phantom families, comma-separated: {', '.join(FAMILIES)} (default torso)")
    p.add_argument("--model", type=Path, default=None, help="denoiser, any format `mbir-batch submit --model` "
                   "reads (own JSON, diffusers folder, score_sde or ADM checkpoint); default: the bundled model")
    p.add_argument("--model-config", default=None, help="the model's config when it is not beside it: a file or "
                   "the name of a shipped one (as `submit --model-config`)")
    p.add_argument("--model-data-range", default=None, metavar="LO,HI", help="the range the model was trained in")
    p.add_argument("--seeds", type=int, nargs="+", default=[HELDOUT_SEED_START + 100])
    p.add_argument("--size", type=int, default=None, help="slice size (default: the model's resolution, or 64)")
    p.add_argument("--depth", type=int, default=None, help="slices (default: the slice size)")
    p.add_argument("--tasks", type=listed(list(TASKS), "task"), default=list(TASKS))
    p.add_argument("--methods", type=listed(METHODS, "method"), default=list(METHODS))
    p.add_argument("--noise", type=float, default=0.0, help="measurement noise sigma")
    p.add_argument("--sampler-seed", type=int, default=0)
    p.add_argument("--set", action="append", default=[], help="METHOD.KEY=VALUE config override")
    p.add_argument("--out", type=Path, default=RESULTS_DIR)
    p.add_argument("--tag", default=None, help="file name tag (default: quality-<device>-<date>)")
    p.add_argument("--no-png", dest="png", action="store_false")
    p.add_argument("--save-volumes", type=Path, default=None, metavar="DIR",
                   help="write every reconstruction to DIR/<family>-<seed>-<task>-<method>.npy")
    p.add_argument("--merge", type=Path, nargs="+", default=None, metavar="JSON",
                   help="only combine the JSON results of earlier runs (e.g. tasks run in parallel) into one table")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    tag = args.tag or f"quality-{args.device}-{today()}"
    if args.merge:
        merge(args.merge, args.out, tag)
        return
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible")
    if device.type == "cpu" and args.threads:
        torch.set_num_threads(args.threads)
    rules = seed_rules(args.family)
    print("seed rules:\n" + "\n".join(rules), flush=True)
    if "torso" in args.family and any(s < HELDOUT_SEED_START for s in args.seeds):
        print(f"note: torso seeds below {HELDOUT_SEED_START} are training phantoms (use them for tuning only)")
    for folder in filter(None, (args.out, args.save_volumes)):
        folder.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    try:
        denoiser, label, size = load_denoiser_for(args, device)
        rows = run(args, denoiser, size, device)
    except UserError as error:
        raise SystemExit(f"quality.py: {error}") from None
    env = environment(args.device)
    device_name = env.get("gpu", f"cpu ({env['cores']} cores, {torch.get_num_threads()} threads)")
    text = "\n".join(["# Quality benchmark", "", f"`{command_line('quality.py', argv)}`", "",
                      f"Device: {device_name}, torch {env['torch']}, commit {env['commit']}; model {label}; seeds "
                      f"{args.seeds}; noise {args.noise}; total {time.perf_counter() - started:.0f} s.", "",
                      "Seed rules:", "", *rules, "", CAPTION, "", summarise(rows)])
    write_report(args.out / tag, text, rows)
    print(summarise(rows))


if __name__ == "__main__":
    main()
