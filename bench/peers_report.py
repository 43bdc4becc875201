"""Rows, the markdown table and the load-average monitor of ``bench/peers.py``.

A row is a flat dict: ``seed, task, method, source`` ("peer", "ours-run" or "ours-file"),
``status`` ("ok" or "n/a: <why>"), ``nfe`` (denoiser evaluations per slice, 0 for classical
methods), ``iters`` (iterations, where the method has them), ``wall_s``, ``wall_s_first``
(mbirjax: the first, cold recon, JAX compilation included), ``load_mean``/``load_max`` (the
1-minute load average sampled during the run), ``settings`` (a peer's knobs; for our methods the
main preset values, with the full preset under ``config``) and ``<axis>_psnr``/``<axis>_ssim``.
"""

from __future__ import annotations

import json
import math
import os
import threading
from pathlib import Path

import numpy as np

AXES = ("axial", "coronal", "sagittal")
METRICS = tuple(f"{axis}_{m}" for m in ("psnr", "ssim") for axis in AXES)


class LoadMonitor:
    """Samples ``os.getloadavg()[0]`` every ``period`` seconds while the ``with`` block runs."""

    def __init__(self, period: float = 2.0) -> None:
        self.period = period
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while True:
            self.samples.append(os.getloadavg()[0])
            if self._stop.wait(self.period):
                break

    def __enter__(self) -> LoadMonitor:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append(os.getloadavg()[0])

    def summary(self) -> dict[str, float]:
        return {"load_mean": float(np.mean(self.samples)), "load_max": float(np.max(self.samples))}


def na_row(seed: int, task: str, method: str, source: str, reason: str) -> dict:
    """A row for a method that does not support a task (kept in the table, never dropped)."""
    return {"seed": seed, "task": task, "method": method, "source": source, "status": f"n/a: {reason}", "nfe": None,
            "iters": None, "wall_s": None, "wall_s_first": None, "load_mean": None, "load_max": None,
            "settings": {}, **{k: None for k in METRICS}}


def rows_from_quality_json(path: Path, seeds: list[int], tasks: list[str], methods: list[str] | None) -> list[dict]:
    """Our methods' rows from a ``bench/quality.py`` results JSON, restricted to ``seeds`` and ``tasks``
    (and to the ``torso`` phantom family, the one peers.py simulates, when the rows name a family)."""
    if not path.is_file():
        raise SystemExit(f"--ours {path}: no such file")
    try:
        rows = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise SystemExit(f"--ours {path}: not valid JSON ({err})") from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) and {"seed", "task", "method"} <= r.keys()
                                             for r in rows):
        raise SystemExit(f"--ours {path}: expected the list of rows that bench/quality.py writes")
    picked = [r for r in rows if r["seed"] in seeds and r["task"] in tasks
              and r.get("family", "torso") == "torso"  # the phantom family peers.py simulates
              and (methods is None or r["method"] in methods)]
    if not picked:
        raise SystemExit(f"--ours {path}: no rows for seeds {seeds} and tasks {tasks}")
    return [{"seed": r["seed"], "task": r["task"], "method": r["method"], "source": "ours-file", "status": "ok",
             "nfe": r.get("nfe"), "iters": None, "wall_s": r.get("wall_s"), "wall_s_first": None, "load_mean": None,
             "load_max": None, "settings": {}, "config": r.get("config", {}), **{k: r.get(k) for k in METRICS}}
            for r in picked]


def _cell(value, fmt: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return format(value, fmt)


def _settings_text(settings: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in settings.items()) if settings else ""


def markdown_table(rows: list[dict], *, with_settings: bool = True) -> str:
    """One line per row (no averaging: tuning grids keep every setting)."""
    head = ["seed", "task", "method", "source", "NFE", "iters", "wall s", "wall s (cold, JIT)", "load 1-min mean/max"]
    head += [f"{a} PSNR" for a in AXES] + [f"{a} SSIM" for a in AXES] + (["settings"] if with_settings else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if r["status"] != "ok":
            cells = [str(r["seed"]), r["task"], r["method"], r["source"]] + ["n/a"] * (len(head) - 4)
            if with_settings:
                cells[-1] = r["status"][5:]
            lines.append("| " + " | ".join(cells) + " |")
            continue
        load = "-" if r["load_mean"] is None else f"{r['load_mean']:.1f} / {r['load_max']:.1f}"
        cells = [str(r["seed"]), r["task"], r["method"], r["source"], _cell(r["nfe"], "d"), _cell(r["iters"], "d"),
                 _cell(r["wall_s"], ".1f"), _cell(r["wall_s_first"], ".1f"), load]
        cells += [_cell(r[f"{a}_psnr"], ".2f") for a in AXES] + [_cell(r[f"{a}_ssim"], ".3f") for a in AXES]
        if with_settings:
            cells.append(_settings_text(r["settings"]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def dds_comparison(rows: list[dict], reference_method: str = "dds") -> str:
    """For each peer row, whether ``reference_method`` (same seed and task) has the higher PSNR on every axis."""
    lines = []
    for r in rows:
        if r["source"] != "peer" or r["status"] != "ok":
            continue
        ours = [o for o in rows if o["source"] != "peer" and o["method"] == reference_method and o["status"] == "ok"
                and o["seed"] == r["seed"] and o["task"] == r["task"]]
        if not ours:
            continue
        margins = [ours[0][f"{a}_psnr"] - r[f"{a}_psnr"] for a in AXES]
        verdict = "yes" if all(m > 0 for m in margins) else "no"
        lines.append(f"- seed {r['seed']} {r['task']} {r['method']} ({_settings_text(r['settings'])}): "
                     f"{reference_method} higher on every axis: {verdict} (PSNR margin axial/coronal/sagittal "
                     + " / ".join(f"{m:+.2f}" for m in margins) + " dB)")
    return "\n".join(lines) + ("\n" if lines else "")


def setup_notes(rows: list[dict]) -> str:
    """One line per row whose wall time includes a set-up (DDRM's dense SVD)."""
    lines = [f"- seed {r['seed']} {r['task']} {r['method']}: wall time includes {r['setup_s']:.1f} s of set-up"
             for r in rows if r.get("setup_s") and r["setup_s"] >= 0.5]
    return "\n".join(lines) + ("\n" if lines else "")
