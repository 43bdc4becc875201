"""score_sde / DiffusionMBIR checkpoints: ``checkpoint_N.pth`` + the config as JSON.

Checkpoint layout (score_sde ``utils.save_checkpoint``), a dict with

* ``model``: ``nn.DataParallel(NCSNpp).state_dict()``, every key prefixed ``module.``; it holds
  the ``sigmas`` buffer (unused by the continuous model: ignored) and the Fourier ``W``
  (``requires_grad=False``, never trained, so its only copy is here);
* ``ema``: ``{"decay", "num_updates", "shadow_params"}``, the EMA weights as an *unnamed* list
  in parameter order, i.e. the ``model`` key order without ``sigmas`` and ``W``;
* ``optimizer``, ``step``: not needed for sampling.

The weights used are DiffusionMBIR's (``restore_checkpoint`` + ``ema.copy_to``): the EMA value
of every trainable tensor plus ``W`` from ``model``.

Config: score_sde's ``ml_collections`` config as ``ConfigDict.to_dict()`` JSON, given
explicitly or found as ``config.json`` beside the checkpoint. Only continuous VE models
(``training.sde = "vesde"``, ``training.continuous = true``) are supported; the label given to
the network is sigma itself and D = x + sigma^2 s(x, sigma).

Data range: [0, 1] when ``data.centered`` is false (the network maps x -> 2x - 1 itself;
DiffusionMBIR's AAPM prior), [-1, 1] when it is true.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor

from .adapters import VEScoreDenoiser
from .base import PriorConfig, PriorLoadError, check_data_range
from .files import build_strict, read_json
from .ncsnpp import NCSNpp, NCSNppConfig

__all__ = ["ema_names", "is_score_sde_checkpoint", "load_score_sde", "score_sde_state"]

FOURIER_W = "all_modules.0.W"
SIGMAS = "sigmas"


def is_score_sde_checkpoint(payload: Any) -> bool:
    """A score_sde training checkpoint: a dict with ``model`` and ``ema``."""
    return isinstance(payload, Mapping) and "model" in payload and "ema" in payload


def _plain(key: str) -> str:
    return key[len("module."):] if key.startswith("module.") else key


def ema_names(model_keys: list[str]) -> list[str]:
    """The parameter name of each EMA shadow tensor: the ``model`` keys minus ``sigmas`` and ``W``."""
    return [k for k in model_keys if _plain(k) not in (SIGMAS, FOURIER_W)]


def find_config(path: Path, config: Path | str | Mapping[str, Any] | None) -> tuple[dict[str, Any], str]:
    """The config dict and where it came from: ``config`` (a path or dict) or ``config.json`` beside."""
    if isinstance(config, Mapping):
        return dict(config), "<given dict>"
    cfg_path = Path(config) if config is not None else path.parent / "config.json"
    if config is None and not cfg_path.is_file():
        raise PriorLoadError(f"{path}: score_sde checkpoint has no config.json beside it; pass the "
                             f"ml_collections config as JSON (ConfigDict.to_dict()) with config=")
    return read_json(cfg_path, "score_sde config"), str(cfg_path)


def parse_config(doc: dict[str, Any], where: str) -> tuple[NCSNppConfig, dict[str, Any]]:
    """The NCSN++ architecture and the VE schedule (sigma_min, sigma_max, num_scales) of a config."""
    try:
        training, model = doc["training"], doc["model"]
        if training["sde"] != "vesde" or not training["continuous"]:
            raise ValueError(f"training.sde = {training['sde']!r}, continuous = {training['continuous']!r}; "
                             f"only continuous 'vesde' models are supported")
        arch = NCSNppConfig.from_score_sde(doc)
        schedule = {"sigma_min": float(model["sigma_min"]), "sigma_max": float(model["sigma_max"]),
                    "num_scales": int(model["num_scales"])}
    except KeyError as err:
        raise PriorLoadError(f"{where}: score_sde config lacks key {err}") from err
    except (TypeError, ValueError) as err:
        raise PriorLoadError(f"{where}: {err}") from err
    return arch, schedule


def score_sde_state(path: Path, payload: Mapping[str, Any]) -> dict[str, Tensor]:
    """The sampling weights: EMA shadow values named by ``model``'s key order, plus W from ``model``."""
    model, ema = payload["model"], payload["ema"]
    if not isinstance(model, Mapping) or not isinstance(ema, Mapping) or "shadow_params" not in ema:
        raise PriorLoadError(f"{path}: 'model' must be a state dict and 'ema' hold 'shadow_params'")
    names = ema_names(list(model))
    shadow = list(ema["shadow_params"])
    if len(shadow) != len(names):
        raise PriorLoadError(f"{path}: ema.shadow_params has {len(shadow)} tensors but 'model' has "
                             f"{len(names)} trainable tensors")
    state = {_plain(k): v for k, v in model.items() if _plain(k) != SIGMAS}
    for index, (name, value) in enumerate(zip(names, shadow)):
        if not isinstance(value, Tensor) or tuple(value.shape) != tuple(model[name].shape):
            got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise PriorLoadError(f"{path}: ema.shadow_params[{index}] is {got}, but its parameter "
                                 f"{name} is {tuple(model[name].shape)}")
        state[_plain(name)] = value
    return state


def load_score_sde(path: Path, payload: Mapping[str, Any], *, config: Any = None,
                   data_range: tuple[float, float] | None = None) -> VEScoreDenoiser:
    """A DiffusionMBIR / score_sde NCSN++ checkpoint as D(x, sigma) (see the module docstring)."""
    doc, where = find_config(path, config)
    arch, schedule = parse_config(doc, where)
    if data_range is None:
        data_range = (-1.0, 1.0) if arch.centered else (0.0, 1.0)
    lo, hi = check_data_range(data_range, str(path))
    state = score_sde_state(path, payload)
    net = build_strict(path, lambda: NCSNpp(arch), state, rename=lambda k: "module." + k)
    scale = hi - lo
    info = PriorConfig(format="score_sde", architecture="ncsnpp", parameterization="ve-score",
                       resolution=arch.image_size, sigma_min=schedule["sigma_min"] / scale,
                       sigma_max=schedule["sigma_max"] / scale, data_range=(lo, hi),
                       weights="ema (W from model)", source=str(path))
    return VEScoreDenoiser(net, info, arch.to_dict(), sigma_min_model=schedule["sigma_min"],
                           sigma_max_model=schedule["sigma_max"], num_scales=schedule["num_scales"])


def ncsnpp_from_dict(net_config: dict[str, Any]) -> NCSNpp:
    """An NCSN++ module (on the current default device) from :meth:`NCSNppConfig.to_dict` output."""
    return NCSNpp(NCSNppConfig.from_dict(net_config))

