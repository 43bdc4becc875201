"""The ``mbir-batch`` command line: simulate, submit, report, train, import, export, model.

One pattern for every command: each is a plain function in its module (:mod:`.simulate`,
:mod:`.submit`, :mod:`.report`, :mod:`.train`, :mod:`.io`, :mod:`.model`), and the table below
is the one place that registers them, each wrapped in :func:`~.common.user_errors`. The CLI is
the entry point, the one place in ``pipeline/`` that may call into ``cluster/`` (``submit``).

User errors (bad datasets, configs, files, models) end in one red line naming the file and the
problem, and exit code 2; they never print a traceback. Ctrl-C (SIGINT) and SIGTERM end in one
line that says where the run stopped and that the same command resumes it, with exit code 130 /
143. Everything printed may hold foreign text, so nothing is parsed as rich markup.
"""

from __future__ import annotations

import typer

from mbir_batch.cli import io, model, report, simulate, submit, train
from mbir_batch.cli.common import Command, Group, user_errors

__all__ = ["app", "main", "user_errors"]

app = typer.Typer(
    cls=Group,
    name="mbir-batch",
    help="Reconstruct 3D CT and MRI volumes from sparse measurements with a 2D diffusion prior "
    "(DiffusionMBIR / DDS), across Ray actors.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
model_app = typer.Typer(cls=Group, help="Inspect a pretrained denoiser, or convert it to the project's format.",
                        no_args_is_help=True, pretty_exceptions_enable=False)

COMMANDS = (
    (app, "simulate", simulate.simulate),
    (app, "submit", submit.submit),
    (app, "report", report.report),
    (app, "train", train.train),
    (app, "import", io.import_data),
    (app, "export", io.export),
    (model_app, "inspect", model.inspect),
    (model_app, "convert", model.convert),
)
for _group, _name, _command in COMMANDS:
    _group.command(_name, cls=Command)(user_errors(_command))
app.add_typer(model_app, name="model")


def main() -> None:  # pragma: no cover - console script
    app()
