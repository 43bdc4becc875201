"""Observability (DESIGN.md, "Distribution"): Ray metrics for the dashboard, and the CLI's progress bars.

Ray metrics are recorded by the slab workers. Ray exports them with its ``ray_`` prefix
(``ray_mbir_step``, ...) on every node's Prometheus endpoint
(``http://<node>:<MetricsExportPort>/metrics``, printed by ``submit --dashboard``), about every
10 s; the dashboard's Metrics page shows them once Prometheus and Grafana run (README).

Every series is tagged with ``dataset`` (the input store's stem) and ``slab`` (e.g. ``"1[z8-16]"``).

===============================  =======  ===============================================
name                             kind     meaning
===============================  =======  ===============================================
mbir_step                        gauge    steps done (diffusion steps, or ADMM iterations)
mbir_total_steps                 gauge    steps of the whole run
mbir_slices_per_second           gauge    slice-updates per second in the last step
mbir_cg_residual                 gauge    relative CG residual of the last data step
mbir_admm_primal_residual        gauge    ADMM primal residual ||D x - z|| (global)
mbir_admm_dual_residual          gauge    ADMM dual residual rho ||z - z_prev|| (global)
mbir_checkpoint_step             gauge    last step this slab wrote to ``state/``
mbir_restarts                    counter  group restarts after a worker died (slab ``all``)
===============================  =======  ===============================================
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from functools import cache
from typing import Any

log = logging.getLogger("mbir_batch.cluster.job")

TAG_KEYS = ("dataset", "slab")

_GAUGES = {
    "step": "mbir_step",
    "total": "mbir_total_steps",
    "slices_per_s": "mbir_slices_per_second",
    "cg_residual": "mbir_cg_residual",
    "primal_residual": "mbir_admm_primal_residual",
    "dual_residual": "mbir_admm_dual_residual",
    "checkpoint_step": "mbir_checkpoint_step",
}
_DESCRIPTIONS = {
    "mbir_step": "Steps done by this slab (diffusion steps or ADMM iterations).",
    "mbir_total_steps": "Steps of the whole run.",
    "mbir_slices_per_second": "Slice updates per second during the last step.",
    "mbir_cg_residual": "Relative CG residual of the last data-consistency step.",
    "mbir_admm_primal_residual": "ADMM primal residual (global over all slabs).",
    "mbir_admm_dual_residual": "ADMM dual residual (global over all slabs).",
    "mbir_checkpoint_step": "Last step this slab wrote to the output's state/ group.",
}


@cache
def _gauge(name: str) -> Any:
    from ray.util.metrics import Gauge

    return Gauge(name, description=_DESCRIPTIONS[name], tag_keys=TAG_KEYS)


@cache
def _restart_counter() -> Any:
    from ray.util.metrics import Counter

    return Counter("mbir_restarts", description="Group restarts after a slab worker died.", tag_keys=TAG_KEYS)


def slab_tag(rank: int, z0: int, z1: int) -> str:
    """The ``slab`` tag value: rank and global slice range."""
    return f"{rank}[z{z0}-{z1}]"


class SlabMetrics:
    """The gauges of one slab worker, with its tags bound.

    Parameters
    ----------
    dataset : the dataset tag (input store stem).
    slab : the slab tag, see :func:`slab_tag`.
    """

    def __init__(self, dataset: str, slab: str) -> None:
        self.tags = {"dataset": dataset, "slab": slab}

    def record(self, values: Mapping[str, float | int | None]) -> None:
        """Set every known gauge present (and not ``None``) in ``values``; other keys are ignored."""
        for key, name in _GAUGES.items():
            value = values.get(key)
            if value is not None:
                _gauge(name).set(float(value), tags=self.tags)


def record_restart(dataset: str) -> None:
    """Count one restart of a dataset's worker group (driver side)."""
    _restart_counter().inc(1.0, tags={"dataset": dataset, "slab": "all"})


def format_scores(metrics: Mapping[str, Mapping[str, float | None]] | None) -> str:
    """``", PSNR 28.1/33.0/30.2 dB, SSIM 0.812/0.903/0.855 (axial/coronal/sagittal)"``, or ``""``."""
    if not metrics:
        return ""
    axes = ("axial", "coronal", "sagittal")
    psnr = "/".join(f"{metrics[a]['psnr']:.1f}" for a in axes)
    ssim = "/".join("n/a" if metrics[a].get("ssim") is None else f"{metrics[a]['ssim']:.3f}" for a in axes)
    return f", PSNR {psnr} dB, SSIM {ssim} ({'/'.join(axes)})"


class ConsoleReporter:
    """Driver messages to the log and, when given, a rich console (above the progress bars).

    Messages hold foreign text (exception messages, paths, gloo's ``[.../pair.cc:537]``), so they
    are printed as plain text, never parsed as rich markup.
    """

    def __init__(self, console: Any) -> None:
        self.console = console

    def __call__(self, message: str) -> None:
        log.info(message)
        if self.console is not None:
            self.console.print(message, markup=False, highlight=False, soft_wrap=True)

    def bars(self) -> ProgressBars:
        return ProgressBars(self.console)


def _columns() -> tuple:
    """Label, bar, steps, rate, ETA, note; nothing is parsed as markup (labels hold file names)."""
    from rich.progress import BarColumn, ProgressColumn, TextColumn, TimeRemainingColumn
    from rich.text import Text

    class Bar(BarColumn):
        """An empty bar while the total is unknown (rich would draw an animated, full-looking one)."""

        def render(self, task):
            if task.total is None:
                from rich.progress_bar import ProgressBar

                return ProgressBar(total=1, completed=0, width=self.bar_width, style=self.style,
                                   complete_style=self.complete_style, finished_style=self.finished_style,
                                   pulse_style=self.pulse_style, animation_time=task.get_time())
            return super().render(task)

    class Steps(ProgressColumn):
        def render(self, task):
            if task.total is None:
                return Text("-/-")
            return Text(f"{int(task.completed)}/{int(task.total)}")

    class Eta(TimeRemainingColumn):
        def render(self, task):
            if task.total is None or task.finished or task.fields.get("phase") != "running":
                return Text("")
            return Text.assemble("ETA ", super().render(task))

    return (TextColumn("{task.description}", markup=False), Bar(), Steps(),
            TextColumn("{task.fields[rate]}", markup=False), Eta(), TextColumn("{task.fields[note]}", markup=False))


class ProgressBars:
    """A rich ``Progress`` with one bar per running dataset (does nothing without a console).

    Bars are keyed by the caller and updated from events with ``phase``, ``step``, ``total``,
    ``checkpoint_step``, ``restarts`` and ``workers`` (e.g. :class:`mbir_batch.cluster.job.ProgressEvent`).
    A bar shows ``step/total``, the slices per second of all its slabs together and the estimated
    time left. It stays empty, with ``-/-``, until the workers report their first step; the ETA
    is timed from that step (a resumed job starts from its checkpoint, not from 0).
    """

    def __init__(self, console: Any) -> None:
        self.progress = None
        self.tasks: dict[Any, Any] = {}
        self.timed_from: dict[Any, int] = {}
        if console is not None:
            from rich.progress import Progress

            self.progress = Progress(*_columns(), console=console)

    def __enter__(self) -> ProgressBars:
        if self.progress is not None:
            self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.stop()

    def add(self, key: Any, label: str) -> None:
        if self.progress is not None and key not in self.tasks:
            self.tasks[key] = self.progress.add_task(label, total=None, start=False, note="launching", rate="",
                                                     phase="launching")

    def update(self, key: Any, event: Any) -> None:
        if self.progress is None or key not in self.tasks:
            return
        task = self.tasks[key]
        note = event.phase if event.phase not in ("running",) else (
            f"ckpt {event.checkpoint_step}" if event.checkpoint_step is not None else "")
        if event.restarts:
            note = f"{note} restarts {event.restarts}".strip()
        rates = [w.get("slices_per_s") for w in getattr(event, "workers", []) or []]
        rates = [r for r in rates if r]
        rate = f"{sum(rates):.1f} slices/s" if rates and event.phase == "running" else ""
        if not event.total:
            self.progress.update(task, note=note if event.phase != "running" else "launching", rate=rate)
            return
        if event.phase == "running" and self.timed_from.get(key) != event.restarts:
            # first step of this attempt: time the ETA from here, not from 0 or the previous attempt
            self.timed_from[key] = event.restarts
            self.progress.reset(task, total=event.total, completed=event.step, start=True)
        self.progress.update(task, completed=event.step, total=event.total, note=note, rate=rate, phase=event.phase)
