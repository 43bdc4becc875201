"""The one check of a denoiser model before a job starts: format, integrity, and slice size.

The driver (:func:`mbir_batch.cluster.job.run_jobs`) calls :func:`check_models` once, before it
takes any lock, creates any output or starts Ray. A model that cannot work for a dataset is then
one line that says what to do, instead of a traceback from every slab worker after Ray has
started and an incomplete output has been left behind.

Every format :func:`mbir_batch.kernels.priors.load_denoiser` reads is checked here:

* the project's own v1 models (``<stem>.json`` + ``<stem>.safetensors``, what ``mbir-batch
  train`` writes) cheaply, without torch: the card is read
  (:func:`mbir_batch.kernels.model_card.read_model_card`) and the weights are hashed;
* every other format (own v2, score_sde ``.pth``, guided-diffusion ADM ``.pt``, a diffusers
  folder) by loading it on the CPU once, which proves it loadable with every key mapped.

Either way the model's resolution must equal the dataset's (square) slice size.
"""
from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ModelError

__all__ = ["ModelUse", "check_adapter", "check_model", "check_models"]

ADVICE_ADMM = "or use --method admm-tv (no learned prior)"
FORMATS_HINT = ("pass --model a model mbir-batch reads (a `mbir-batch train` .json, a score_sde .pth, a "
                "guided-diffusion .pt or a diffusers folder)")


@dataclass(frozen=True)
class ModelUse:
    """One model as a job uses it: the file, how to read it, and the slices it must denoise.

    Attributes
    ----------
    model : the model path (own ``.json``/stem, ``.pth``, ``.pt`` or a diffusers folder).
    config : the model's config file when it is not beside the checkpoint (``--model-config``).
    data_range : ``(lo, hi)``, the range the network was trained in (``--model-data-range``).
    slice_shape : ``(H, W)`` of the dataset's axial slices.
    dataset : how messages name the dataset.
    """

    model: Path
    config: Path | None
    data_range: tuple[float, float] | None
    slice_shape: tuple[int, int]
    dataset: str


def _own_v1_card(path: Path, config: Path | None, data_range: Any) -> Path | None:
    """The card of an own-format v1 model that needs no options, else None (another format)."""
    from mbir_batch.kernels.model_card import FORMAT_VERSION, card_paths

    if path.is_dir() or config is not None or data_range is not None:
        return None
    json_path, _ = card_paths(path)
    if path.suffix not in (".json", ".safetensors") and not (not path.exists() and json_path.is_file()):
        return None
    try:
        version = json.loads(json_path.read_text()).get("version")
    except (OSError, ValueError, AttributeError):
        return json_path  # missing or not JSON: the card reader says so in one line
    return json_path if version == FORMAT_VERSION else None


def _check_own_v1(json_path: Path) -> int:
    """Read the card and hash the weights; return the model's resolution."""
    from mbir_batch.kernels.model_card import DenoiserLoadError, file_sha256, read_model_card

    try:
        card = read_model_card(json_path)
    except DenoiserLoadError as error:
        raise ModelError(f"{error}; {FORMATS_HINT}, {ADVICE_ADMM}") from None
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
    if expected is not None and file_sha256(weights) != expected:
        raise ModelError(f"{weights}: corrupted (its sha256 differs from the one in {json_path.name}); "
                         f"copy or train the model again, {ADVICE_ADMM}")
    return resolution


def _check_loadable(path: Path, config: Path | None, data_range: tuple[float, float] | None) -> int:
    """Load any other format on the CPU (strict: every key mapped); return its resolution."""
    from mbir_batch.kernels.denoiser import DenoiserLoadError
    from mbir_batch.kernels.priors import load_denoiser

    try:
        model = load_denoiser(path, config=config, data_range=data_range, device="cpu")
    except DenoiserLoadError as error:
        raise ModelError(f"{error}; {FORMATS_HINT}, {ADVICE_ADMM}") from None
    return int(model.resolution)


def check_model(path: str | Path, slice_shape: tuple[int, int], *, dataset: str | Path = "the dataset",
                config: str | Path | None = None, data_range: tuple[float, float] | None = None) -> int:
    """Check that the denoiser at ``path`` can reconstruct slices of ``slice_shape``; return its resolution.

    Parameters
    ----------
    path : the model: an own ``.json`` (or stem, or ``.safetensors``), a score_sde ``.pth``, a
        guided-diffusion ``.pt`` or a diffusers folder.
    slice_shape : ``(H, W)`` of the dataset's axial slices.
    dataset : how the message names the dataset.
    config, data_range : as :func:`mbir_batch.kernels.priors.load_denoiser` takes them.

    Raises
    ------
    ModelError
        One line naming the file and the problem: a file that is missing, of no known format,
        truncated or with unmapped keys; an own card whose weights are missing or whose sha256
        differs; or a model trained at another slice size than ``H x W`` (the message says how to
        train one of that size, or to use ``--method admm-tv``).
    """
    path = Path(path)
    config = None if config is None else Path(config)
    card = _own_v1_card(path, config, data_range)
    resolution = _check_own_v1(card) if card is not None else _check_loadable(path, config, data_range)
    described = card or path
    height, width = (int(n) for n in slice_shape)
    if height != width:
        raise ModelError(f"{dataset}: slices are {height}x{width}, but the diffusion methods need square slices "
                         f"(the denoiser {described} works on {resolution}x{resolution}); use --method admm-tv")
    if height != resolution:
        raise ModelError(f"{described}: the denoiser was trained on {resolution}x{resolution} slices, but {dataset} "
                         f"has {height}x{width} slices; train a model of that size (mbir-batch train --resolution "
                         f"{height} --out MODEL, then submit --model MODEL.json), {ADVICE_ADMM}")
    return resolution


def check_models(uses: Iterable[ModelUse]) -> None:
    """:func:`check_model` for each use, once per model, way of reading it and slice size."""
    checked: set[tuple[Any, ...]] = set()
    for use in uses:
        key = (str(Path(use.model).resolve()), use.config, use.data_range, tuple(use.slice_shape))
        if key not in checked:
            check_model(use.model, use.slice_shape, dataset=use.dataset, config=use.config,
                        data_range=use.data_range)
            checked.add(key)


def check_adapter(adapter: str | Path, model: str | Path) -> None:
    """Check that ``adapter`` (``submit --adapter FILE``) is a readable LoRA adapter made for ``model``.

    The adapter records the SHA-256 of its base model's weights
    (:func:`mbir_batch.methods.adaptation.weights_sha256`); another model's adapter would adapt
    the wrong network.

    Raises
    ------
    ModelError
        One line naming the adapter: missing, unreadable, not an adapter, or made for another model.
    """
    from mbir_batch.kernels.adapter_file import read_adapter
    from mbir_batch.kernels.lora import AdapterLoadError
    from mbir_batch.methods.adaptation import weights_sha256

    try:
        read_adapter(adapter, base_sha256=weights_sha256(model))
    except AdapterLoadError as error:
        raise ModelError(f"{error}; pass the adapter.safetensors a run with this --model wrote, or drop --adapter") \
            from None
