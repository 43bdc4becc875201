"""Solver configuration: YAML presets from ``configs/`` parsed once into frozen dataclasses.

A preset file holds one mapping per method, e.g.::

    dds:
      steps: 50
      rho: 1.0
      lam: 0.1
    admm-tv:
      iters: 100

Where each setting comes from (one rule, highest first):

1. overrides passed to :func:`load_config` (the command line's ``--steps``, ``--seed``);
2. the ``method`` section of the config file or preset named by ``path_or_preset``
   (``--config``);
3. the ``method`` section of ``base_preset``, the preset of the dataset's task (the CLI picks it
   from the dataset's modality and geometry, e.g. ``svct-4view``);
4. the defaults of :class:`SolverConfig`.

So a ``--config`` file that sets only ``steps: 20`` keeps the task's tuned ``lam`` and ``rho``
instead of falling back to the global defaults.

Only keys that exist on :class:`SolverConfig` are accepted, each value is checked against the
field's type, and numbers must be finite (YAML's ``.nan`` and ``.inf`` are refused when the file is
loaded, not found later as a diverged run). Errors name the file (or ``override``) and the key.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError

METHODS = ("fbp", "admm-tv", "dds", "mbir", "slice2d")
DIFFUSION_METHODS = ("dds", "mbir", "slice2d")
DEFAULT_PRESET = "svct-8view"
OVERRIDE = "override"
"""The source named in errors about a value passed to :func:`load_config` as a keyword."""


class SettingError(ConfigError):
    """An invalid :class:`SolverConfig` value; ``keys`` names the field(s) at fault."""

    def __init__(self, message: str, *keys: str) -> None:
        super().__init__(message)
        self.keys = keys


@dataclass(frozen=True)
class SolverConfig:
    """Knobs of one reconstruction. Symbols follow DESIGN.md ("Algorithm").

    Attributes
    ----------
    method : one of ``METHODS``.
    steps : diffusion steps (``dds``, ``slice2d``: one NFE each; ``mbir``: predictor + corrector,
        so two NFE each).
    iters : ADMM iterations of the ``admm-tv`` baseline.
    rho, lam : ADMM penalty and TV weight (lam ||D_z x||_1, or ||D x||_1 for the 3D baseline).
    lam_xy : in-slice TV weight relative to ``lam`` for the 3D ``admm-tv`` baseline.
    cg_iters : CG iterations per ADMM iteration.
    sigma_min, sigma_max : the VE noise range of the sampler.
    eta : DDIM stochasticity of ``dds`` (0: deterministic, 1: fully re-noised).
    snr : Langevin corrector signal-to-noise ratio of ``mbir`` (Song et al. 2021).
    batch : slices per denoiser batch.
    seed : the sampler seed; the same seed gives the same volume for any slab split.

    Raises
    ------
    SettingError : a value of the wrong type, a non-finite number, or one out of range.
    """

    method: str = "dds"
    steps: int = 50
    iters: int = 100
    rho: float = 1.0
    lam: float = 0.1
    lam_xy: float = 1.0
    cg_iters: int = 20
    sigma_min: float = 0.005
    sigma_max: float = 10.0
    eta: float = 0.85
    snr: float = 0.16
    batch: int = 32
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise SettingError(f"method: unknown method {self.method!r}; choose one of {', '.join(METHODS)}", "method")
        for name, kind in _FIELD_TYPES.items():
            value = getattr(self, name)
            if kind == "int" and (isinstance(value, bool) or not isinstance(value, numbers.Integral)):
                raise SettingError(f"{name}: expected an integer, got {value!r}", name)
            if kind == "float" and (isinstance(value, bool) or not isinstance(value, numbers.Real)):
                raise SettingError(f"{name}: expected a number, got {value!r}", name)
            if kind == "float" and not math.isfinite(value):
                raise SettingError(f"{name}: must be a finite number, got {value!r}", name)
        for name in ("steps", "iters", "cg_iters", "batch"):
            if getattr(self, name) < 1:
                raise SettingError(f"{name}: must be >= 1, got {getattr(self, name)}", name)
        for name in ("rho", "sigma_min", "sigma_max"):
            if not getattr(self, name) > 0:
                raise SettingError(f"{name}: must be > 0, got {getattr(self, name)}", name)
        for name in ("lam", "lam_xy", "snr"):
            if not getattr(self, name) >= 0:
                raise SettingError(f"{name}: must be >= 0, got {getattr(self, name)}", name)
        if not 0.0 <= self.eta <= 1.0:
            raise SettingError(f"eta: must be in [0, 1], got {self.eta}", "eta")
        if self.sigma_min >= self.sigma_max:
            raise SettingError(f"sigma_min ({self.sigma_min}) must be below sigma_max ({self.sigma_max})",
                               "sigma_min", "sigma_max")

    @property
    def nfe(self) -> int:
        """Denoiser evaluations per slice."""
        if self.method == "mbir":
            return 2 * self.steps
        return self.steps if self.method in DIFFUSION_METHODS else 0

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.pop("extra")
        return out

    def replace(self, **changes: Any) -> SolverConfig:
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})


# Field name -> "int" | "float" (annotations are strings under ``from __future__ import annotations``).
_FIELD_TYPES = {f.name: f.type for f in dataclasses.fields(SolverConfig) if f.name not in ("method", "extra")}


def _coerce(source: str, method: str, key: str, value: Any) -> Any:
    """``value`` as the type of field ``key``; a wrong type or a NaN/inf names ``source`` and the key."""
    if key not in _FIELD_TYPES:
        raise ConfigError(f"{source}: {method}.{key}: unknown key (known: {', '.join(sorted(_FIELD_TYPES))})")
    kind = _FIELD_TYPES[key]
    where = f"{source}: {method}.{key}"
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return int(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if not math.isfinite(value):
        raise ConfigError(f"{where}: must be a finite number, got {value!r}")
    return float(value)


def preset_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("mbir_batch.configs").iterdir() if p.name.endswith(".yaml"))


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
        if key not in METHODS and key != "description":
            raise ConfigError(f"{source}: unknown key {key!r} (expected a method: {', '.join(METHODS)})")
    section = document.get(method) or {}
    if not isinstance(section, dict):
        raise ConfigError(f"{source}: {method}: expected a mapping, got {type(section).__name__}")
    return source, {key: _coerce(source, method, key, value) for key, value in section.items()}


def load_config(path_or_preset: str | Path = DEFAULT_PRESET, method: str = "dds", *,
                base_preset: str | None = None, **overrides: Any) -> SolverConfig:
    """Load the settings of ``method`` into a :class:`SolverConfig`, layered as the module docstring says.

    Parameters
    ----------
    path_or_preset : a YAML file (``.yaml``/``.yml`` or an existing path) or a preset name.
    method : the method whose section is read (one of ``METHODS``).
    base_preset : the preset (or file) under ``path_or_preset``: keys the file leaves out come from
        its ``method`` section before the :class:`SolverConfig` defaults. ``None``: defaults only.
    **overrides : settings that win over both files (``None`` values are ignored).

    Raises
    ------
    ConfigError : a missing or unreadable file, invalid YAML, an unknown key, a value of the wrong
        type, a NaN or inf, or a value out of range; the message names the file (or ``override``)
        and the key.
    """
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    layers = []
    if base_preset is not None:
        layers.append(_read_section(base_preset, method))
    source, file_values = _read_section(path_or_preset, method)
    layers.append((source, file_values))
    given = {key: _coerce(OVERRIDE, method, key, value) for key, value in overrides.items() if value is not None}
    layers.append((OVERRIDE, given))
    values: dict[str, Any] = {}
    origins: dict[str, str] = {}
    for layer_source, layer_values in layers:
        values.update(layer_values)
        origins.update(dict.fromkeys(layer_values, layer_source))
    try:
        return SolverConfig(method=method, **values)
    except SettingError as exc:
        named = [origins[key] for key in exc.keys if key in origins]
        # a check across fields names the highest layer involved (override, then file, then base)
        where = max(named, key=[s for s, _ in layers].index) if named else source
        raise ConfigError(f"{where}: {method}.{exc}") from None
