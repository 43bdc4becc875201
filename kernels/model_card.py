"""The project's own model files, read without torch: the card (``<stem>.json``) and its weights' hash.

A model in the project's own format is ``<stem>.safetensors`` (the weights) plus ``<stem>.json``,
the model card: format name and version, the architecture, the sigma range, the file name and
SHA-256 of the weights, and how the model was trained (:mod:`mbir_batch.kernels.denoiser`
writes and loads both). The driver checks a card before any worker starts; reading it here
imports nothing heavier than ``json`` and ``hashlib``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, Self

__all__ = ["FORMAT", "FORMAT_VERSION", "DenoiserLoadError", "JsonRecord", "card_paths", "card_weights",
           "file_sha256", "one_line", "read_model_card"]

FORMAT = "mbir-batch-denoiser"
FORMAT_VERSION = 1


class DenoiserLoadError(Exception):
    """A denoiser file is missing, corrupted or does not match the expected architecture."""


def one_line(err: BaseException) -> str:
    """An exception's text folded onto one line (for the one-line load errors)."""
    return " ".join(str(err).split()) or type(err).__name__


class JsonRecord:
    """Mixin of a dataclass that is written as a plain JSON dict: an architecture config in a
    model card, what a loaded prior reports about itself. Tuple fields become lists and back."""

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Self:
        """Inverse of :meth:`to_dict` (lists become tuples); unknown keys raise ``ValueError`` naming them."""
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown keys {unknown}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


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


def card_weights(json_path: Path, doc: dict[str, Any], *,
                 error: type[DenoiserLoadError] = DenoiserLoadError) -> Path:
    """The weights file the card ``doc`` (read from ``json_path``) names, beside it.

    ``doc["weights"]`` is its name (default ``<stem>.safetensors``). A missing file, or one whose
    SHA-256 is not the card's ``weights_sha256`` (when it records one), raises ``error`` naming it.
    """
    weights_path = json_path.with_name(doc.get("weights", card_paths(json_path)[1].name))
    if not weights_path.is_file():
        raise error(f"{weights_path}: weights file not found (named by {json_path})")
    if "weights_sha256" in doc and file_sha256(weights_path) != doc["weights_sha256"]:
        raise error(f"{weights_path}: corrupted (sha256 differs from {json_path.name})")
    return weights_path


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
