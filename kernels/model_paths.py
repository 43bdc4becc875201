"""Where the bundled denoiser lives. Imports nothing heavy, so the driver can find the model
without loading torch or diffusers (it only passes the path on to the slab actors)."""

from __future__ import annotations

from pathlib import Path

BUNDLED_MODEL_NAME = "svct-phantom-64"


def bundled_model_path(name: str = BUNDLED_MODEL_NAME) -> Path:
    """Path of the JSON of a model shipped with the package (``mbir_batch/models/<name>.json``).

    In a source checkout that folder is ``pipeline/models/``; in an installed package it is
    ``mbir_batch/models/``. The path is returned whether or not the file exists;
    :func:`load_denoiser` reports a missing file.
    """
    root = Path(__file__).resolve().parent.parent
    source_tree = root / "pipeline" / "models"
    folder = source_tree if (root / "pipeline").is_dir() else root / "models"
    return folder / f"{name}.json"
