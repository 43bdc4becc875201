"""Solver configuration: YAML presets from ``configs/`` parsed once into the methods' frozen dataclasses.

A preset file holds one mapping per method, e.g.::

    dds:
      steps: 50
      rho: 1.0
      lam: 0.1
    admm-tv:
      iters: 100

Each section becomes the method's config (:mod:`mbir_batch.methods`, e.g. ``DdsConfig``). Where
each setting comes from (one rule, highest first):

1. overrides passed to :func:`load_config` (the command line's ``--steps``, ``--seed``);
2. the ``method`` section of the config file or preset named by ``path_or_preset``
   (``--config``);
3. the ``method`` section of ``base_preset``, the preset of the dataset's task (the CLI picks it
   from the dataset's modality and geometry, e.g. ``svct-4view``);
4. the defaults of the method's config dataclass.

So a ``--config`` file that sets only ``steps: 20`` keeps the task's tuned ``lam`` and ``rho``
instead of falling back to the global defaults. A nested section (``adapt:``, test-time
adaptation of ``dds`` and ``mbir``) is layered key by key the same way; ``adapt: null`` in a
higher layer removes it.

Only keys the method has are accepted (``eta`` in an ``admm-tv`` section is an error), each value
is checked against the field's type, and numbers must be finite (YAML's ``.nan`` and ``.inf`` are
refused when the file is loaded, not found later as a diverged run). Errors name the file (or
``override``) and the key.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError
from .methods import MethodConfig, SettingError, get, names

__all__ = ["DEFAULT_PRESET", "OVERRIDE", "SettingError", "load_config", "preset_names"]

DEFAULT_PRESET = "svct-8view"
OVERRIDE = "override"
"""The source named in errors about a value passed to :func:`load_config` as a keyword."""

STEP_ALIASES = ("steps", "iters")
"""Override names for the method's step count (``Method.steps_key``): ``steps=`` and ``iters=`` both set it."""


def preset_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("mbir_batch.configs").iterdir() if p.name.endswith(".yaml"))


def shipped_model_configs() -> list[str]:
    """Names of the model configs shipped in ``configs/models/`` (e.g. ``ncsnpp-aapm256``)."""
    folder = resources.files("mbir_batch.configs") / "models"
    return sorted(p.name.rsplit(".", 1)[0] for p in folder.iterdir() if p.name.endswith((".json", ".yml", ".yaml")))


def model_config_path(value: str | Path) -> Path:
    """``--model-config``: an existing file, or the name of a config shipped in ``configs/models/``.

    The papers' checkpoints circulate without their configs (DiffusionMBIR's is Python code), so
    the ones the paper presets need are shipped: ``--model-config ncsnpp-aapm256``.

    Raises
    ------
    ConfigError : neither a file nor a shipped name (the message lists the shipped ones).
    """
    path = Path(value)
    if path.is_file():
        return path
    folder = resources.files("mbir_batch.configs") / "models"
    for suffix in ("", ".json", ".yml", ".yaml"):
        shipped = folder / f"{path.name}{suffix}"
        if path.parent == Path(".") and shipped.is_file():
            return Path(str(shipped))
    raise ConfigError(f"{value}: model config not found (no such file, and not one of the shipped configs: "
                      f"{', '.join(shipped_model_configs())})")


def _resolve(path_or_preset: str | Path) -> tuple[str, str]:
    """Return (source name, YAML text) for a file path or a preset name."""
    path = Path(path_or_preset)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            return str(path), path.read_text()
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read config file ({exc.strerror})") from None
    name = str(path_or_preset)
    resource = resources.files("mbir_batch.configs") / f"{name}.yaml"
    if not resource.is_file():
        raise ConfigError(f"{name}: no such config file or preset (presets: {', '.join(preset_names())})")
    return f"preset {name}", resource.read_text()


def _read_section(path_or_preset: str | Path, method: str) -> tuple[str, dict[str, Any]]:
    """Return (source name, checked values of the ``method`` section) of a config file or preset."""
    source, text = _resolve(path_or_preset)
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML ({exc})") from None
    document = document or {}
    if not isinstance(document, dict):
        raise ConfigError(f"{source}: expected a mapping of method -> settings, got {type(document).__name__}")
    for key in document:
        if key not in names() and key != "description":
            raise ConfigError(f"{source}: unknown key {key!r} (expected a method: {', '.join(names())})")
    section = document.get(method) or {}
    if not isinstance(section, dict):
        raise ConfigError(f"{source}: {method}: expected a mapping, got {type(section).__name__}")
    return source, get(method).config_type.checked(source, section)


def load_config(path_or_preset: str | Path = DEFAULT_PRESET, method: str = "dds", *,
                base_preset: str | None = None, **overrides: Any) -> MethodConfig:
    """Load the settings of ``method`` into its config, layered as the module docstring says.

    Parameters
    ----------
    path_or_preset : a YAML file (``.yaml``/``.yml`` or an existing path) or a preset name.
    method : the method whose section is read (a name of the registry, :mod:`mbir_batch.methods`).
    base_preset : the preset (or file) under ``path_or_preset``: keys the file leaves out come from
        its ``method`` section before the config's defaults. ``None``: defaults only.
    **overrides : settings that win over both files (``None`` values are ignored). ``steps`` and
        ``iters`` both set the method's step count (``Method.steps_key``: ``iters`` for admm-tv,
        ``steps`` for the diffusion methods); a method without steps (fbp) ignores them.

    Returns
    -------
    cfg : the method's frozen config (e.g. ``DdsConfig``).

    Raises
    ------
    ConfigError : an unknown method, a missing or unreadable file, invalid YAML, a key the method
        does not have, a value of the wrong type, a NaN or inf, or a value out of range; the message
        names the file (or ``override``) and the key.
    """
    config_type = get(method).config_type
    layers = []
    if base_preset is not None:
        layers.append(_read_section(base_preset, method))
    source, file_values = _read_section(path_or_preset, method)
    layers.append((source, file_values))
    layers.append((OVERRIDE, config_type.checked(OVERRIDE, _step_overrides(method, overrides))))
    values: dict[str, Any] = {}
    origins: dict[str, str] = {}
    for layer_source, layer_values in layers:
        for key, value in layer_values.items():
            below = values.get(key)
            # a section (``adapt:``) is merged key by key; ``adapt: null`` drops the layers below
            values[key] = {**below, **value} if isinstance(below, dict) and isinstance(value, dict) else value
        origins.update(dict.fromkeys(layer_values, layer_source))
    try:
        return config_type(**values)
    except SettingError as exc:
        named = [origins[key] for key in exc.keys if key in origins]
        # a check across fields names the highest layer involved (override, then file, then base)
        where = max(named, key=[s for s, _ in layers].index) if named else source
        raise ConfigError(f"{where}: {method}.{exc}") from None


def _step_overrides(method: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """``overrides`` without ``None`` values, ``steps``/``iters`` renamed to the method's ``steps_key``."""
    given = {key: value for key, value in overrides.items() if value is not None}
    counts = {key: given.pop(key) for key in STEP_ALIASES if key in given}
    steps_key = get(method).steps_key
    if steps_key is None or not counts:
        return given
    if len(counts) == 2 and counts["steps"] != counts["iters"]:
        raise ConfigError(f"{OVERRIDE}: {method}.{steps_key}: steps={counts['steps']!r} and iters={counts['iters']!r} "
                          "disagree; give one")
    given[steps_key] = next(iter(counts.values()))
    return given
