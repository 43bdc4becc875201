"""The project's own model files, read without torch: the card (``<stem>.json``) and its weights' hash.

A model in the project's own format is ``<stem>.safetensors`` (the weights) plus ``<stem>.json``,
the model card: format name and version, the architecture, the sigma range, the file name and
SHA-256 of the weights, and how the model was trained (:mod:`mbir_batch.kernels.denoiser`
writes and loads both). The driver checks a card before any worker starts; reading it here
imports nothing heavier than ``json`` and ``hashlib``.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

__all__ = ["FORMAT", "FORMAT_VERSION", "DenoiserLoadError", "card_paths", "file_sha256", "read_model_card"]

FORMAT = "mbir-batch-denoiser"
FORMAT_VERSION = 1


class DenoiserLoadError(Exception):
    """A denoiser file is missing, corrupted or does not match the expected architecture."""


def card_paths(path: Path | str) -> tuple[Path, Path]:
    """(json, safetensors) of a model given as its stem, its ``.json`` or its ``.safetensors``."""
    path = Path(path)
    stem = path.with_suffix("") if path.suffix in (".json", ".safetensors") else path
    return stem.with_name(stem.name + ".json"), stem.with_name(stem.name + ".safetensors")


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_model_card(path: Path | str) -> dict[str, Any]:
    """The parsed card of a saved denoiser (config + training metadata), checked to be format v1.

    Raises
    ------
    DenoiserLoadError
        The card is missing, not JSON, or not a ``mbir-batch-denoiser`` v1 card (the message
        names the file).
    """
    json_path, _ = card_paths(path)
    if not json_path.is_file():
        raise DenoiserLoadError(f"{json_path}: denoiser description file not found")
    try:
        doc = json.loads(json_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DenoiserLoadError(f"{json_path}: not valid JSON ({err})") from err
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or doc.get("version") != FORMAT_VERSION:
        raise DenoiserLoadError(f"{json_path}: not a {FORMAT} v{FORMAT_VERSION} file")
    return doc
