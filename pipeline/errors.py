"""User-facing errors of mbir-batch.

Every error a user can cause (a bad dataset, a bad config, an output that
cannot be written, an input file that cannot be read) is a `UserError`.
The CLI catches `UserError`, prints one red line ``error: <message>`` to
stderr and exits with status 2, without a traceback. Anything else is a
bug and keeps its traceback.

Messages name the file or path first and then the problem, e.g.
``"data/ct.zarr: sinogram has 7 views but geometry.angles_deg has 8"``.
"""
from __future__ import annotations

__all__ = ["EXIT_USER_ERROR", "ConfigError", "DatasetError", "InputFileError", "ModelError", "OutputError",
           "SolverDivergedError", "UserError", "one_line"]

EXIT_USER_ERROR = 2
"""Exit status of the CLI for any `UserError`."""


class UserError(Exception):
    """An error caused by user input; the message names the path and the problem."""


class DatasetError(UserError):
    """A dataset store that breaks the data contract (DESIGN.md, "Data contract")."""


class ConfigError(UserError):
    """A YAML config or CLI option that is unknown, missing or of the wrong type."""


class OutputError(UserError):
    """An output that must not or cannot be written (exists, locked, disk full, no permission)."""


class InputFileError(UserError):
    """An input file for `mbir-batch import` that cannot be read (NIfTI, DICOM, TIFF, npy, h5)."""


class ModelError(UserError):
    """A denoiser model that is missing, corrupted, of an unknown format or of the wrong slice size."""


class SolverDivergedError(UserError):
    """A reconstruction whose result holds NaN or inf; it is never written as a result."""


def one_line(error: BaseException) -> str:
    """``"<Type>: <text>"`` of a library exception, folded onto one line for a UserError message."""
    return f"{type(error).__name__}: {' '.join(str(error).split())}"
