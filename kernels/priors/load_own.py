"""The project's own format: ``<stem>.safetensors`` + ``<stem>.json``, versions 1 and 2.

Version 1 (:mod:`mbir_batch.kernels.denoiser`) holds the EDM UNet only; it is loaded by that
module's ``load_denoiser``, unchanged, and wrapped in :class:`~.adapters.EDMDenoiser`.

Version 2 records what the network is and how it is adapted, so any loaded prior can be
converted to it and reloaded without its original files::

    {"format": "mbir-batch-denoiser", "version": 2,
     "architecture": {"kind": "ncsnpp" | "adm" | "diffusers-unet2d" | "edm", "config": {...}},
     "adapter": {"kind": "ve-score" | "vp" | "edm", "data_range": [lo, hi], ...},
     "prior": {format, parameterization, resolution, sigma range, weights of the source},
     "resolution": R, "sigma_range": [min, max],
     "weights": "<stem>.safetensors", "weights_sha256": "...", "parameters": N,
     "converted_from": {"path", "format", "sha256"}}

The safetensors file holds the network's own ``state_dict`` (float32). The VP adapter's
abar_t table is stored in full (float32 values, exact in JSON), so D is identical after a round
trip. Loading is strict in the same way as every other format.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import denoiser as own_v1
from ..model_card import card_paths
from .adapters import EDMDenoiser, VEScoreDenoiser, VPDenoiser
from .base import PretrainedDenoiser, PriorConfig, PriorLoadError, check_data_range
from .files import build_strict, one_line, read_json, sha256_file

__all__ = ["FORMAT", "VERSION", "load_own", "own_paths", "save_own"]

FORMAT, VERSION = own_v1.FORMAT, 2


own_paths = card_paths  # (json, safetensors) of a stem, a ``.json`` or a ``.safetensors`` path


def _factories() -> dict[str, Callable[[dict[str, Any]], nn.Module]]:
    from .load_adm import adm_from_dict
    from .load_diffusers import unet_from_dict
    from .load_score_sde import ncsnpp_from_dict

    return {"ncsnpp": ncsnpp_from_dict, "adm": adm_from_dict, "diffusers-unet2d": unet_from_dict,
            "edm": lambda cfg: own_v1.Denoiser(own_v1.DenoiserConfig.from_dict(cfg))}


def _load_v1(json_path: Path, data_range: Any) -> EDMDenoiser:
    if data_range is not None and check_data_range(data_range, str(json_path)) != (0.0, 1.0):
        raise PriorLoadError(f"{json_path}: the project's EDM models work in [0, 1]; data_range does not apply")
    net = own_v1.load_denoiser(json_path)
    cfg = net.config
    info = PriorConfig(format="own", architecture="edm", parameterization="edm", resolution=cfg.resolution,
                       sigma_min=cfg.sigma_min, sigma_max=cfg.sigma_max, data_range=(0.0, 1.0),
                       weights="as saved", source=str(json_path))
    return EDMDenoiser(net, info, cfg.to_dict())


def load_own(path: Path, *, data_range: Any = None) -> PretrainedDenoiser:
    """A model in the project's own format (v1 or v2) as D(x, sigma) (see the module docstring)."""
    json_path = own_paths(path)[0]
    doc = read_json(json_path, "model description")
    if doc.get("format") != FORMAT or doc.get("version") not in (1, VERSION):
        raise PriorLoadError(f"{json_path}: not a {FORMAT} v1 or v2 file")
    if doc["version"] == 1:
        return _load_v1(json_path, data_range)
    try:
        kind, net_config = doc["architecture"]["kind"], doc["architecture"]["config"]
        adapter, prior = doc["adapter"], doc["prior"]
        factory = _factories()[kind]
    except (KeyError, TypeError) as err:
        raise PriorLoadError(f"{json_path}: incomplete or unknown architecture/adapter record "
                             f"({one_line(err)})") from err
    weights_path, state = own_v1.read_weights(json_path, doc, error=PriorLoadError)
    try:
        net = build_strict(weights_path, lambda: factory(net_config), state)
    except PriorLoadError:
        raise
    except (TypeError, ValueError) as err:
        raise PriorLoadError(f"{json_path}: invalid {kind} architecture config ({one_line(err)[:200]})") from err
    lo, hi = check_data_range(adapter["data_range"] if data_range is None else data_range, str(json_path))
    if adapter["kind"] == "edm" and (lo, hi) != (0.0, 1.0):
        raise PriorLoadError(f"{json_path}: the project's EDM models work in [0, 1]; data_range does not apply")
    old_scale = float(adapter["data_range"][1]) - float(adapter["data_range"][0])
    rescale = old_scale / (hi - lo)  # the recorded image-space sigma range was for the recorded data range
    info = PriorConfig(format="own", architecture=kind, parameterization=prior["parameterization"],
                       resolution=int(doc["resolution"]), sigma_min=float(doc["sigma_range"][0]) * rescale,
                       sigma_max=float(doc["sigma_range"][1]) * rescale, data_range=(lo, hi),
                       weights=str(prior.get("weights", "as saved")), source=str(json_path))
    diffusers_output = kind == "diffusers-unet2d"
    if adapter["kind"] == "ve-score":
        return VEScoreDenoiser(net, info, net_config, sigma_min_model=adapter["sigma_min"],
                               sigma_max_model=adapter["sigma_max"], num_scales=adapter["num_scales"],
                               diffusers_output=diffusers_output)
    if adapter["kind"] == "vp":
        return VPDenoiser(net, info, net_config, alphas_cumprod=torch.tensor(adapter["alphas_cumprod"]),
                          prediction=adapter["prediction"], learn_sigma=adapter["learn_sigma"],
                          integer_timesteps=adapter.get("integer_timesteps", False), diffusers_output=diffusers_output,
                          clip_sample=adapter.get("clip_sample"))
    if adapter["kind"] == "edm":
        return EDMDenoiser(net, info, net_config)
    raise PriorLoadError(f"{json_path}: unknown adapter kind {adapter['kind']!r}")


def save_own(model: PretrainedDenoiser, path: Path | str, *, source: dict[str, Any]) -> tuple[Path, Path]:
    """Write ``model`` as own format v2 (``<stem>.json`` + ``<stem>.safetensors``), atomically.

    ``source`` describes where it came from (path, format, sha256). Returns (json, safetensors).
    """
    json_path, weights_path = own_paths(path)
    state = own_v1.write_weights(model.net, weights_path, {"format": FORMAT, "version": str(VERSION)})
    cfg = model.config
    doc = {
        "format": FORMAT, "version": VERSION,
        "architecture": {"kind": cfg.architecture, "config": model.net_config},
        "adapter": model.adapter_spec(), "prior": cfg.to_dict(),
        "resolution": cfg.resolution, "sigma_range": [cfg.sigma_min, cfg.sigma_max],
        "image_space": "x in [0, 1], sigma the noise std on that scale",
        "weights": weights_path.name, "weights_sha256": sha256_file(weights_path),
        "parameters": sum(int(v.numel()) for v in state.values()), "converted_from": source,
    }
    own_v1.write_card(json_path, json.dumps(doc, indent=1) + "\n")
    return json_path, weights_path
