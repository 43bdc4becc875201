"""What every command of the CLI shares: the consoles, the error boundary, help without ``<bool>``.

Everything printed may hold foreign text (paths, exception messages), so both consoles print
plain text: rich markup is off. They draw colours and live bars only on a terminal.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from enum import Enum
from typing import Any

import typer
from rich.console import Console
from rich.text import Text
from typer.core import TyperCommand, TyperGroup

from mbir_batch.errors import EXIT_USER_ERROR, ConfigError, UserError
from mbir_batch.kernels.model_card import DenoiserLoadError

__all__ = ["ACCEL", "ARC", "NOISE", "TASK", "VIEWS", "Command", "Group", "Task", "console", "err_console", "flag",
           "parse_data_range", "user_errors"]

console = Console(markup=False, highlight=False)
err_console = Console(stderr=True, markup=False, highlight=False)


class Task(str, Enum):
    """The measurements to simulate from a volume (``simulate``, ``import``)."""

    svct = "svct"
    lact = "lact"
    csmri = "csmri"


# the measurements `simulate` and `import` simulate from a volume (mbir_batch.io.simulate_measurements)
TASK = typer.Option(Task.svct, "--task", help="svct: sparse views; lact: limited arc; csmri: Cartesian MRI.")
VIEWS = typer.Option(None, "--views", help="CT views (svct default 8; lact default 1 per degree).")
ARC = typer.Option(90.0, "--arc", help="Limited-angle arc in degrees (lact).")
ACCEL = typer.Option(4.0, "--accel", help="MRI acceleration factor (csmri, Gaussian 1D mask).")
NOISE = typer.Option(0.0, "--noise", help="Gaussian noise sigma added to the simulated measurements.")


def user_errors(command: Callable) -> Callable:
    """Turn a user's mistake into one line on stderr and exit code 2; an interrupt into one line too.

    A :class:`~mbir_batch.errors.UserError`, or a model file that cannot be loaded
    (:class:`~mbir_batch.kernels.model_card.DenoiserLoadError` and its subclass
    :class:`~mbir_batch.kernels.priors.PriorLoadError`), prints ``error: <message>`` without a
    traceback. An interrupt (:class:`mbir_batch.cluster.session.Interrupted`, or a plain Ctrl-C
    outside the driver) prints where it stopped and exits with 128 + the signal number.
    """

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except (UserError, DenoiserLoadError) as exc:
            err_console.print(Text.assemble(("error:", "bold red"), " ", str(exc)), soft_wrap=True)
            raise typer.Exit(EXIT_USER_ERROR) from None
        except KeyboardInterrupt as exc:
            err_console.print(str(exc) or "interrupted", soft_wrap=True)
            raise typer.Exit(getattr(exc, "exit_code", 130)) from None

    return wrapper


def flag(name: str, help: str) -> Any:
    """A switch that is off unless given."""
    return typer.Option(False, name, help=help)


def parse_data_range(text: str | None) -> tuple[float, float] | None:
    """``--model-data-range "LO,HI"`` as ``(lo, hi)`` with lo < hi; None when not given."""
    if text is None:
        return None
    try:
        lo, hi = (float(part) for part in text.split(","))
    except ValueError:
        raise ConfigError(f"--model-data-range: expected LO,HI (two numbers, e.g. -1,1), got {text!r}") from None
    if not lo < hi:
        raise ConfigError(f"--model-data-range: LO must be below HI, got {text!r}")
    return lo, hi


def _no_flag_metavar(params: list) -> list:
    """Flags take no value, so their help shows no ``<bool>`` type (typer 0.29 shows one)."""
    for param in params:
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""
    return params


class Command(TyperCommand):
    """A typer command whose ``--help`` shows flags without a ``<bool>`` type."""

    def get_params(self, ctx):  # noqa: D102 - typer's, with flags shown without a type
        return _no_flag_metavar(super().get_params(ctx))


class Group(TyperGroup):
    """A typer group whose ``--help`` shows flags without a ``<bool>`` type."""

    def get_params(self, ctx):  # noqa: D102
        return _no_flag_metavar(super().get_params(ctx))
