"""Pretrained 2D diffusion priors as one denoiser D(x, sigma) -> x0 in image space.

``load_denoiser(path)`` reads any of:

=============  ==========================================  ==================  ===============
format         files                                        network             default range
=============  ==========================================  ==================  ===============
score_sde      ``checkpoint_N.pth`` + ``config.json``       NCSN++ (VE score)   [0, 1] (config)
adm            ``model.pt`` + DDS-schema ``.yml``           guided-diffusion    [0, 1]
diffusers      a ``save_pretrained`` folder                 UNet2DModel         [-1, 1] VP,
                                                                                 [0, 1] ScoreSdeVe
own            ``<stem>.json`` + ``<stem>.safetensors``     EDM UNet (v1), any  as recorded
=============  ==========================================  ==================  ===============

The format is detected from the file; see each ``load_*`` module for its layout, the weights
it uses and its data range. Every loader is strict: a missing file, an unmapped, missing or
mis-shaped key, or a truncated file raises :class:`PriorLoadError` (a
:class:`~mbir_batch.kernels.denoiser.DenoiserLoadError`) with one line naming the file.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .base import PretrainedDenoiser, PriorConfig, PriorLoadError, check_data_range

__all__ = ["FORMATS", "PretrainedDenoiser", "PriorConfig", "PriorLoadError", "detect_format", "load_denoiser"]

FORMATS = ("score_sde", "adm", "diffusers", "own")
_OWN_SUFFIXES = (".json", ".safetensors")


def detect_format(path: Path | str) -> tuple[str, Any]:
    """(format, payload) of a model path; ``payload`` is the loaded checkpoint object or None.

    A folder is a diffusers model, a ``.json`` / ``.safetensors`` (or a stem with a ``.json``
    beside it) the own format; any other file is read with ``torch.load(weights_only=True)``:
    a dict with ``model`` and ``ema`` is a score_sde checkpoint, a flat state dict with
    ``input_blocks.0.0.weight`` an ADM UNet.
    """
    from .files import read_torch_file
    from .load_adm import is_adm_state_dict
    from .load_score_sde import is_score_sde_checkpoint

    path = Path(path)
    if path.is_dir():
        return "diffusers", None
    if path.suffix in _OWN_SUFFIXES or (not path.exists() and path.with_name(path.name + ".json").is_file()):
        return "own", None
    if not path.exists():
        raise PriorLoadError(f"{path}: model file not found")
    payload = read_torch_file(path)
    if is_score_sde_checkpoint(payload):
        return "score_sde", payload
    if is_adm_state_dict(payload):
        return "adm", payload
    keys = list(payload)[:4] if isinstance(payload, Mapping) else type(payload).__name__
    raise PriorLoadError(f"{path}: not a known checkpoint format (score_sde dict with 'model' and 'ema', "
                         f"or a guided-diffusion UNet state dict); it holds {keys}")


def load_denoiser(path: Path | str, *, config: Path | str | Mapping[str, Any] | None = None,
                  data_range: tuple[float, float] | None = None,
                  device: str | torch.device = "cpu") -> PretrainedDenoiser:
    """Load any supported pretrained model as D(x, sigma) -> x0, in eval mode on ``device``.

    Parameters
    ----------
    path : checkpoint file, diffusers folder, or own-format stem / ``.json`` / ``.safetensors``.
    config : the model's config when it is not beside the checkpoint: score_sde's JSON
        (``config.json``), DDS's YAML, or a diffusers ``scheduler_config.json``; a path or an
        already parsed dict (score_sde, ADM).
    data_range : (lo, hi), the range the network was trained in; overrides the format's default.
    device : where the model runs.

    Returns
    -------
    PretrainedDenoiser
        ``D(x, sigma)`` with x (B, 1, H, W) in [0, 1] and sigma a float or (B,) tensor in
        image space, and ``resolution``, ``sigma_min``, ``sigma_max``, ``format``,
        ``config`` (:class:`PriorConfig`), ``discrete_sigmas()`` and ``model_schedule(steps)``.
    """
    path = Path(path)
    if data_range is not None:
        data_range = check_data_range(data_range, str(path))
    fmt, payload = detect_format(path)
    if fmt == "score_sde":
        from .load_score_sde import load_score_sde
        model = load_score_sde(path, payload, config=config, data_range=data_range)
    elif fmt == "adm":
        from .load_adm import load_adm
        model = load_adm(path, payload, config=config, data_range=data_range)
    elif fmt == "diffusers":
        from .load_diffusers import load_diffusers
        model = load_diffusers(path, config=config, data_range=data_range)
    else:
        if config is not None:
            raise PriorLoadError(f"{path}: own-format models carry their config; config= does not apply")
        from .load_own import load_own
        model = load_own(path, data_range=data_range)
    return model.to(device).eval()
