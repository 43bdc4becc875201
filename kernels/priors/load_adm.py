"""guided-diffusion ADM state dicts in DDS's format: ``AAPM256_1M.pt`` + its YAML.

The checkpoint is a bare ``UNetModel.state_dict()`` (no wrapper, no prefix, no EMA; a uniform
``module.`` prefix is stripped if present). The YAML follows DDS's schema
(``configs/vp/AAPM256.yml``):

* ``model``: the arguments of guided-diffusion's ``create_model``. As in DDS, the YAML's
  ``out_channels`` is ignored (the network has 2 in_channels outputs when ``learn_sigma``),
  ``channel_mult: ""`` picks guided-diffusion's row for the image size, and
  ``attention_resolutions`` lists feature-map sizes (each becomes image_size // res);
  ``type``, ``resamp_with_conv`` and ``var_type`` are ignored as DDS ignores them.
* ``diffusion``: ``beta_schedule``, ``beta_start``, ``beta_end``, ``num_diffusion_timesteps``.

The config is given explicitly or found beside the checkpoint (``<stem>.yml`` / ``.yaml``, or
the only YAML file in the folder). The network predicts eps (channel 0; channel 1 is the learned
variance and is dropped, as DDS drops it).

Data range: (0, 1) by default. DDS feeds the AAPM slices unscaled, and DiffusionMBIR treats the
same slices as [0, 1]; pass ``data_range=(-1, 1)`` for ADM models trained on centred images
(guided-diffusion's own ImageNet/LSUN models).
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor

from .adapters import VPDenoiser, beta_schedule, vp_alphas_cumprod
from .adm import ADMConfig, ADMUNet
from .base import PriorConfig, PriorLoadError, check_data_range
from .files import build_strict, read_yaml, strip_prefix

__all__ = ["adm_config_from_yaml", "find_yaml", "is_adm_state_dict", "load_adm"]

# guided-diffusion create_model's channel_mult rows by image size
_CHANNEL_MULT = {512: (0.5, 1, 1, 2, 2, 4, 4), 256: (1, 1, 2, 2, 4, 4), 320: (1, 1, 2, 2, 4, 4),
                 128: (1, 1, 2, 3, 4), 64: (1, 2, 3, 4)}
_IGNORED = {"type", "out_channels", "resamp_with_conv", "var_type", "use_checkpoint", "use_fp16"}
_KNOWN = {"image_size", "in_channels", "num_channels", "num_res_blocks", "channel_mult", "learn_sigma",
          "class_cond", "attention_resolutions", "num_heads", "num_head_channels", "num_heads_upsample",
          "use_scale_shift_norm", "dropout", "resblock_updown", "use_new_attention_order"} | _IGNORED


def is_adm_state_dict(payload: Any) -> bool:
    """A flat name -> tensor mapping with guided-diffusion's UNet keys."""
    if not isinstance(payload, Mapping) or not payload:
        return False
    keys = strip_prefix({k: None for k in payload})
    return all(isinstance(v, Tensor) for v in payload.values()) and "input_blocks.0.0.weight" in keys


def find_yaml(path: Path, config: Path | str | Mapping[str, Any] | None) -> tuple[dict[str, Any], str]:
    """The YAML config (a path, a dict, ``<stem>.yml`` / ``.yaml`` beside, or the folder's only YAML)."""
    if isinstance(config, Mapping):
        return dict(config), "<given dict>"
    if config is not None:
        return read_yaml(Path(config), "ADM config"), str(config)
    for suffix in (".yml", ".yaml"):
        if path.with_suffix(suffix).is_file():
            return read_yaml(path.with_suffix(suffix), "ADM config"), str(path.with_suffix(suffix))
    found = sorted(p for p in path.parent.iterdir() if p.suffix in (".yml", ".yaml"))
    if len(found) != 1:
        listed = f"found {[p.name for p in found]}" if found else "found none"
        raise PriorLoadError(f"{path}: ADM checkpoint needs its YAML config (DDS schema) beside it or "
                             f"passed with config=; {listed}")
    return read_yaml(found[0], "ADM config"), str(found[0])


def _int_list(value: Any) -> list[int]:
    if isinstance(value, str):
        return [int(v) for v in value.split(",") if v.strip()]
    if isinstance(value, int | float):
        return [int(value)]
    return [int(v) for v in value]


def adm_config_from_yaml(doc: dict[str, Any], where: str) -> tuple[ADMConfig, bool, dict[str, Any]]:
    """(architecture, learn_sigma, diffusion section) from a DDS-schema YAML, as ``create_model`` reads it."""
    try:
        model, diffusion = doc["model"], doc["diffusion"]
        unknown = sorted(set(model) - _KNOWN)
        if unknown:
            raise ValueError(f"unknown model keys {unknown}")
        if model.get("class_cond", False):
            raise ValueError("class-conditional ADM models (class_cond: true) are not supported")
        size, in_ch = int(model["image_size"]), int(model["in_channels"])
        mult = model.get("channel_mult", "")
        if mult in ("", None):
            if size not in _CHANNEL_MULT:
                raise ValueError(f"channel_mult is empty and image_size {size} has no default row")
            channel_mult: tuple[float, ...] = _CHANNEL_MULT[size]
        else:
            channel_mult = tuple(_int_list(mult))
        learn_sigma = bool(model.get("learn_sigma", False))
        arch = ADMConfig(
            image_size=size, in_channels=in_ch, model_channels=int(model["num_channels"]),
            out_channels=2 * in_ch if learn_sigma else in_ch, num_res_blocks=int(model["num_res_blocks"]),
            attention_ds=tuple(size // r for r in _int_list(model.get("attention_resolutions", "16"))),
            channel_mult=channel_mult, conv_resample=True, num_heads=int(model.get("num_heads", 1)),
            num_head_channels=int(model.get("num_head_channels", -1)),
            num_heads_upsample=int(model.get("num_heads_upsample", -1)),
            use_scale_shift_norm=bool(model.get("use_scale_shift_norm", False)),
            resblock_updown=bool(model.get("resblock_updown", False)),
            use_new_attention_order=bool(model.get("use_new_attention_order", False)),
            dropout=float(model.get("dropout", 0.0)))
        schedule = {"beta_schedule": str(diffusion["beta_schedule"]),
                    "beta_start": float(diffusion["beta_start"]), "beta_end": float(diffusion["beta_end"]),
                    "num_diffusion_timesteps": int(diffusion["num_diffusion_timesteps"])}
    except KeyError as err:
        raise PriorLoadError(f"{where}: ADM config lacks key {err}") from err
    except (TypeError, ValueError, AttributeError) as err:
        raise PriorLoadError(f"{where}: {err}") from err
    return arch, learn_sigma, schedule


def load_adm(path: Path, payload: Mapping[str, Tensor], *, config: Any = None,
             data_range: tuple[float, float] | None = None) -> VPDenoiser:
    """A DDS / guided-diffusion ADM state dict as D(x, sigma) (see the module docstring)."""
    doc, where = find_yaml(path, config)
    arch, learn_sigma, schedule = adm_config_from_yaml(doc, where)
    lo, hi = check_data_range((0.0, 1.0) if data_range is None else data_range, str(path))
    try:
        betas = beta_schedule(schedule["beta_schedule"], beta_start=schedule["beta_start"],
                              beta_end=schedule["beta_end"], steps=schedule["num_diffusion_timesteps"])
    except ValueError as err:
        raise PriorLoadError(f"{where}: diffusion: {err}") from err
    alphas_cumprod = vp_alphas_cumprod(betas)
    net = build_strict(path, lambda: ADMUNet(arch), strip_prefix(payload))
    sig = ((1.0 - alphas_cumprod.double()) / alphas_cumprod.double()).sqrt() / (hi - lo)
    info = PriorConfig(format="adm", architecture="adm", parameterization="vp-epsilon",
                       resolution=arch.image_size, sigma_min=float(sig[0]), sigma_max=float(sig[-1]),
                       data_range=(lo, hi), weights="as saved (a bare state dict does not say EMA or raw)",
                       source=str(path))
    return VPDenoiser(net, info, arch.to_dict(), alphas_cumprod=alphas_cumprod, prediction="epsilon",
                      learn_sigma=learn_sigma)


def adm_from_dict(net_config: dict[str, Any]) -> ADMUNet:
    """An ADM UNet (on the current default device) from :meth:`ADMConfig.to_dict` output."""
    return ADMUNet(ADMConfig.from_dict(net_config))

