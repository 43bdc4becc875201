"""Solver configuration: YAML presets from ``configs/`` parsed once into frozen dataclasses.

A preset file holds one mapping per method, e.g.::

    dds:
      steps: 50
      rho: 1.0
      lam: 0.1
    admm-tv:
      iters: 100

Only keys that exist on :class:`SolverConfig` are accepted, and each value is
checked against the field's type. Errors name the file and the key.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError

METHODS = ("fbp", "admm-tv", "dds", "mbir", "slice2d")
DIFFUSION_METHODS = ("dds", "mbir", "slice2d")
DEFAULT_PRESET = "svct-8view"


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
            raise ConfigError(f"method: unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        for name in ("steps", "iters", "cg_iters", "batch"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        for name in ("rho", "sigma_min", "sigma_max"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name}: must be > 0, got {getattr(self, name)}")
        for name in ("lam", "lam_xy", "snr"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.eta <= 1.0:
            raise ConfigError(f"eta: must be in [0, 1], got {self.eta}")
        if self.sigma_min >= self.sigma_max:
            raise ConfigError(f"sigma_min ({self.sigma_min}) must be below sigma_max ({self.sigma_max})")

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


_FIELD_TYPES = {f.name: f.type for f in dataclasses.fields(SolverConfig) if f.name not in ("method", "extra")}


def _coerce(source: str, method: str, key: str, value: Any) -> Any:
    kind = _FIELD_TYPES[key]
    where = f"{source}: {method}.{key}"
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    raise ConfigError(f"{where}: unsupported key type {kind}")


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


def load_config(path_or_preset: str | Path = DEFAULT_PRESET, method: str = "dds", **overrides: Any) -> SolverConfig:
    """Load the ``method`` section of a preset or YAML file into a :class:`SolverConfig`.

    ``overrides`` (e.g. ``steps=``, ``seed=`` from the command line) win over the file; ``None``
    values are ignored.
    """
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
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    section = document.get(method) or {}
    if not isinstance(section, dict):
        raise ConfigError(f"{source}: {method}: expected a mapping, got {type(section).__name__}")
    values: dict[str, Any] = {}
    for key, value in section.items():
        if key not in _FIELD_TYPES:
            raise ConfigError(f"{source}: {method}.{key}: unknown key (known: {', '.join(sorted(_FIELD_TYPES))})")
        values[key] = _coerce(source, method, key, value)
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return SolverConfig(method=method, **values)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
