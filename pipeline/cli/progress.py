"""What ``submit`` shows while the driver runs: its messages, and one progress bar per dataset.

The driver (:func:`mbir_batch.cluster.job.run_jobs`) draws nothing; it reports through two
callbacks, and this module draws them on a rich console: :func:`printer` prints the driver's
messages as plain text, :class:`ProgressBars` turns its
:class:`~mbir_batch.cluster.group.ProgressEvent` s into bars. Messages hold foreign text (exception
messages, paths, gloo's ``[.../pair.cc:537]``) and labels hold file names, so nothing is parsed
as rich markup.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.progress import BarColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
from rich.progress_bar import ProgressBar
from rich.text import Text

if TYPE_CHECKING:
    from mbir_batch.cluster.group import ProgressEvent

__all__ = ["ProgressBars", "printer"]


def printer(console: Console) -> Callable[[str], None]:
    """A ``message`` callback that prints each line as-is (no markup), above any live bars."""

    def say(line: str) -> None:
        console.print(line, markup=False, highlight=False, soft_wrap=True)

    return say


def _columns() -> tuple:
    """Label, bar, steps, rate, ETA, note; nothing is parsed as markup (labels hold file names)."""

    class Bar(BarColumn):
        """An empty bar while the total is unknown (rich would draw an animated, full-looking one)."""

        def render(self, task):
            if task.total is None:
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
    """A rich ``Progress`` with one bar per dataset of a run, drawn from the driver's events.

    Use it as a context manager and pass it as ``run_jobs(progress=...)``: each
    :class:`~mbir_batch.cluster.group.ProgressEvent` adds its job's bar (labelled
    ``<dataset> <method> x<slabs>``) the first time and updates it after. The live display starts
    with the first bar, so lines printed before any job launches stay plain. A bar shows
    ``step/total``, the slices per second of all its slabs together and the estimated time left.
    It stays empty, with ``-/-``, until the workers report their first step; the ETA is timed
    from that step (a resumed job starts from its checkpoint, not from 0).
    """

    def __init__(self, console: Console) -> None:
        self.progress = Progress(*_columns(), console=console)
        self.tasks: dict[Any, Any] = {}
        self.timed_from: dict[Any, int] = {}
        self._live = False

    def __enter__(self) -> ProgressBars:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live:
            self.progress.stop()
            self._live = False

    def __call__(self, event: ProgressEvent) -> None:
        """Draw one event: its job's bar, keyed by the output store."""
        self.add(event.output, event.label)
        self.update(event.output, event)

    def add(self, key: Any, label: str) -> None:
        """A new bar for `key` (nothing if it has one), empty until its first step."""
        if not self._live:
            self.progress.start()
            self._live = True
        if key not in self.tasks:
            self.tasks[key] = self.progress.add_task(label, total=None, start=False, note="launching", rate="",
                                                     phase="launching")

    def update(self, key: Any, event: ProgressEvent) -> None:
        """Move the bar of `key` to `event`: step/total, summed rate, checkpoint and restarts."""
        if key not in self.tasks:
            return
        task = self.tasks[key]
        note = event.phase if event.phase not in ("running",) else (
            f"ckpt {event.checkpoint_step}" if event.checkpoint_step is not None else "")
        if event.restarts:
            note = f"{note} restarts {event.restarts}".strip()
        rates = [w.get("slices_per_s") for w in event.workers]
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
