"""The one check of a denoiser model before a job starts: format, integrity, and slice size.

The driver (:func:`mbir_batch.cluster.job.run_jobs`) calls :func:`check_model` once per model and
slice size, before it takes any lock, creates any output or starts Ray. A model that cannot work
for a dataset is then one line that says what to do, instead of a traceback from every slab
worker after Ray has started and an incomplete output has been left behind.

The check reads only the model card (``<stem>.json``, via
:func:`mbir_batch.kernels.denoiser.read_model_card`) and hashes the weights file; it does not
build the network. A new model format is checked here too, so that every format has one entry
point before launch.
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .errors import UserError

__all__ = ["ModelError", "check_model", "check_models"]

ADVICE_ADMM = "or use --method admm-tv (no learned prior)"


class ModelError(UserError):
    """A denoiser model that is missing, corrupted, of an unknown format or of the wrong slice size."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _card_paths(path: Path) -> Path:
    """The ``.json`` of a model given as its stem, ``.json`` or ``.safetensors``."""
    stem = path.with_suffix("") if path.suffix in (".json", ".safetensors") else path
    return stem.with_name(stem.name + ".json")


def check_model(path: str | Path, slice_shape: tuple[int, int], *,
                dataset: str | Path = "the dataset") -> dict[str, Any]:
    """Check that the denoiser at ``path`` can reconstruct slices of ``slice_shape``; return its card.

    Parameters
    ----------
    path : the model's ``.json`` (or stem, or ``.safetensors``).
    slice_shape : ``(H, W)`` of the dataset's axial slices.
    dataset : how the message names the dataset.

    Raises
    ------
    ModelError
        One line naming the file and the problem: the card is missing or not a model card of a
        known format and version; the weights are missing or their sha256 differs from the card's;
        or the model was trained at another slice size than ``H x W`` (the message says how to
        train one of that size, or to use ``--method admm-tv``).
    """
    from mbir_batch.kernels.denoiser import DenoiserLoadError, read_model_card

    json_path = _card_paths(Path(path))
    try:
        card = read_model_card(json_path)
    except DenoiserLoadError as error:
        raise ModelError(f"{error}; pass --model a model written by `mbir-batch train`, {ADVICE_ADMM}") from None
    config = card.get("config") if isinstance(card.get("config"), dict) else {}
    resolution = config.get("resolution", card.get("resolution"))
    if not isinstance(resolution, int) or isinstance(resolution, bool) or resolution < 1:
        raise ModelError(f"{json_path}: no valid config.resolution (got {resolution!r}); the model card is damaged, "
                         f"{ADVICE_ADMM}")
    weights = json_path.with_name(str(card.get("weights", json_path.with_suffix(".safetensors").name)))
    if not weights.is_file():
        raise ModelError(f"{weights}: weights file not found (named by {json_path}); copy it beside the card, "
                         f"{ADVICE_ADMM}")
    expected = card.get("weights_sha256")
    if expected is not None and _sha256(weights) != expected:
        raise ModelError(f"{weights}: corrupted (its sha256 differs from the one in {json_path.name}); "
                         f"copy or train the model again, {ADVICE_ADMM}")
    height, width = (int(n) for n in slice_shape)
    if height != width:
        raise ModelError(f"{dataset}: slices are {height}x{width}, but the diffusion methods need square slices "
                         f"(the denoiser {json_path} works on {resolution}x{resolution}); use --method admm-tv")
    if height != resolution:
        raise ModelError(f"{json_path}: the denoiser was trained on {resolution}x{resolution} slices, but {dataset} "
                         f"has {height}x{width} slices; train a model of that size (mbir-batch train --resolution "
                         f"{height} --out MODEL, then submit --model MODEL.json), {ADVICE_ADMM}")
    return card


def check_models(jobs: Iterable[tuple[str | Path | None, str | Path]]) -> None:
    """:func:`check_model` for each ``(model, dataset)`` pair with a model, once per model and slice size."""
    from .dataset import open_dataset

    checked: set[tuple[str, tuple[int, ...]]] = set()
    for model, dataset in jobs:
        if model is None:
            continue
        shape = tuple(open_dataset(dataset, verify_data=False).meta.volume_shape[1:])
        key = (str(Path(model).resolve()), shape)
        if key not in checked:
            check_model(model, shape, dataset=dataset)
            checked.add(key)
