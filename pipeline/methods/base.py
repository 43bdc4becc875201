"""What every method module shares: the :class:`Method` record and the :class:`MethodConfig` base.

A method module (``fbp.py``, ``admm_tv.py``, ...) holds a frozen config dataclass derived from
:class:`MethodConfig` and two functions with the same signature in every module::

    def initial_state(problem: SlabProblem, cfg: XConfig, *, device, denoiser=None) -> SlabState
    def run(problem: SlabProblem, cfg: XConfig, state: SlabState, *, comm: Comm,
            denoiser: Denoiser | None, device, callback: Callable[[StepEvent], None] | None) -> Tensor

and one :class:`Method` record, ``METHOD``, that the registry (:mod:`mbir_batch.methods`) lists.

A config checks its values when it is built: integers are integers, numbers are finite, each value
is within its field's range (``metadata`` ``at_least`` / ``above`` / ``within``). Built from a
mapping (a YAML section, the command line) it also refuses keys the method does not have, and the
error names where the value came from.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from ..errors import ConfigError

if TYPE_CHECKING:  # torch stays unimported until a method runs (the CLI starts without it)
    from ..kernels.admm import AdmmState
    from typing import Self

    from torch import Tensor

    from ..solve import SlabState

ADMM_KEYS = ("admm_z", "admm_w")
"""The checkpoint names of the ADMM splitting variable z and scaled dual w in ``SlabState.aux``."""


class SettingError(ConfigError):
    """An invalid config value; ``keys`` names the field(s) at fault."""

    def __init__(self, message: str, *keys: str) -> None:
        super().__init__(message)
        self.keys = keys


def setting(default: int | float | str, **bounds: Any) -> Any:
    """A config field with a range: ``at_least=b`` (>= b), ``above=b`` (> b), ``within=(lo, hi)``,
    or, for a ``str`` field, ``choices=(...)``. A number field annotated ``float | str`` with
    ``words=(...)`` also takes exactly those words (``lam: auto``); the range applies to numbers."""
    return field(default=default, metadata=bounds)


def section(parse: Callable[[str, Any], Any]) -> Any:
    """A nested section field (the ``adapt:`` mapping of a diffusion method), ``None`` when absent.

    ``parse(where, value)`` turns a mapping (or ``None``, or an already parsed value) into the
    field's value and raises :class:`SettingError` naming ``where`` and the key at fault. Config
    layers are merged key by key inside a section (:func:`mbir_batch.config.load_config`), so a
    file that sets ``adapt: {lr: 0.001}`` keeps the preset's other ``adapt`` keys.
    """
    return field(default=None, metadata={"section": parse})


def is_section(item: dataclasses.Field) -> bool:
    """Whether a config field is a :func:`section`."""
    return "section" in item.metadata


def _typed(name: str, kind: str, value: Any, words: tuple[str, ...] = ()) -> Any:
    """``value`` if it is of ``kind`` ("int", "float" or "str") and finite, or one of ``words``,
    else :class:`SettingError`."""
    if words and isinstance(value, str):
        if value not in words:
            choices = " or ".join(repr(word) for word in words)
            raise SettingError(f"{name}: expected a number or {choices}, got {value!r}", name)
        return value
    kind = kind.split(" | ")[0]  # "float | str": a number, or one of the words above
    if kind == "str":
        if not isinstance(value, str):
            raise SettingError(f"{name}: expected a word, got {value!r}", name)
        return value
    if kind == "int" and (isinstance(value, bool) or not isinstance(value, numbers.Integral)):
        raise SettingError(f"{name}: expected an integer, got {value!r}", name)
    if kind == "float" and (isinstance(value, bool) or not isinstance(value, numbers.Real)):
        raise SettingError(f"{name}: expected a number, got {value!r}", name)
    if kind == "float" and not math.isfinite(value):
        raise SettingError(f"{name}: must be a finite number, got {value!r}", name)
    return value


def _check_bounds(name: str, value: Any, bounds: Mapping[str, Any]) -> None:
    if value in bounds.get("words", ()):
        return
    if "choices" in bounds and value not in bounds["choices"]:
        raise SettingError(f"{name}: must be one of {', '.join(bounds['choices'])}, got {value!r}", name)
    if "at_least" in bounds and not value >= bounds["at_least"]:
        raise SettingError(f"{name}: must be >= {bounds['at_least']}, got {value}", name)
    if "above" in bounds and not value > bounds["above"]:
        raise SettingError(f"{name}: must be > {bounds['above']}, got {value}", name)
    if "within" in bounds and not bounds["within"][0] <= value <= bounds["within"][1]:
        low, high = bounds["within"]
        raise SettingError(f"{name}: must be in [{low}, {high}], got {value}", name)


@dataclass(frozen=True)
class MethodConfig:
    """The knobs every method has. Symbols follow DESIGN.md ("Algorithm").

    Attributes
    ----------
    method : the registry name of the method (a class constant).
    seed : the sampler seed; the same seed gives the same volume for any slab split.

    Raises
    ------
    SettingError : a value of the wrong type, a non-finite number, or one out of range.
    """

    method: ClassVar[str] = ""
    seed: int = 0

    def __post_init__(self) -> None:
        for item in dataclasses.fields(self):
            if is_section(item):
                object.__setattr__(self, item.name, item.metadata["section"](item.name, getattr(self, item.name)))
                continue
            value = _typed(item.name, item.type, getattr(self, item.name), item.metadata.get("words", ()))
            _check_bounds(item.name, value, item.metadata)
        self.check()

    def check(self) -> None:
        """Checks across fields (a subclass adds its own); raise :class:`SettingError`."""

    @property
    def nfe(self) -> int:
        """Denoiser evaluations per slice."""
        return 0

    @property
    def total_steps(self) -> int:
        """Steps of a whole run (what the progress bars and checkpoints count)."""
        return 1

    # -- building from a mapping ------------------------------------------------------------

    @classmethod
    def checked(cls, source: str, mapping: Mapping[str, Any]) -> dict[str, Any]:
        """The values of ``mapping`` as this config's field types; errors name ``source`` and the key.

        Raises
        ------
        ConfigError : an unknown key, a value of the wrong type, or a NaN / inf.
        """
        kinds = {item.name: item.type for item in dataclasses.fields(cls)}
        words = {item.name: item.metadata.get("words", ()) for item in dataclasses.fields(cls)}
        sections = {item.name: item.metadata["section"] for item in dataclasses.fields(cls) if is_section(item)}
        values = {}
        for key, value in mapping.items():
            where = f"{source}: {cls.method}.{key}"
            if key not in kinds:
                raise ConfigError(f"{where}: unknown key (known: {', '.join(sorted(kinds))})")
            if key in sections:  # checked here (errors name the file), merged across layers as a mapping
                try:
                    sections[key](key, value)
                except SettingError as exc:
                    raise ConfigError(f"{source}: {cls.method}.{exc}") from None
                values[key] = dict(value) if isinstance(value, Mapping) else value
                continue
            try:
                value = _typed(key, kinds[key], value, words[key])
            except SettingError as exc:
                raise ConfigError(f"{source}: {cls.method}.{exc}") from None
            if value not in words[key]:
                value = {"int": int, "float": float}.get(kinds[key].split(" | ")[0], str)(value)
            values[key] = value
        return values

    @classmethod
    def from_mapping(cls, source: str, mapping: Mapping[str, Any]) -> Self:
        """The config of ``mapping`` (missing keys take the defaults); errors name ``source`` and the key.

        Raises
        ------
        ConfigError : an unknown key, a value of the wrong type, a NaN / inf, or a value out of range.
        """
        try:
            return cls(**cls.checked(source, mapping))
        except SettingError as exc:
            raise ConfigError(f"{source}: {cls.method}.{exc}") from None

    # -- records ----------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """``{"method": ..., <the method's settings>..., "seed": ...}``, the recorded provenance."""
        values = {item.name: getattr(self, item.name) for item in dataclasses.fields(self) if item.name != "seed"}
        values.update((item.name, None if values[item.name] is None else values[item.name].to_dict())
                      for item in dataclasses.fields(self) if is_section(item))
        return {"method": self.method, **values, "seed": self.seed}

    def replace(self, **changes: Any) -> Self:
        """A copy with ``changes`` applied (``None`` values are ignored), checked like a new config."""
        given = {key: value for key, value in changes.items() if value is not None}
        known = {item.name for item in dataclasses.fields(self)}
        for key in given:
            if key not in known:
                raise SettingError(f"{key}: not a setting of {self.method} (settings: {', '.join(sorted(known))})",
                                   key)
        return dataclasses.replace(self, **given)


@dataclass(frozen=True)
class Method:
    """One reconstruction method: a row of the registry table.

    Attributes
    ----------
    name : the registry name (``--method``, the YAML section, the output's ``method`` attribute).
    label : the name in reports and tables (e.g. ``"DiffusionMBIR"``).
    config_type : its :class:`MethodConfig` subclass.
    needs_model : whether it runs a denoiser (a model must be given and checked).
    steps_key : the config field ``--steps`` sets (``None``: the method has no steps).
    initial_state : ``initial_state(problem, cfg, *, device, denoiser=None) -> SlabState`` (the
        diffusion methods start at the first sigma of a schedule that depends on the denoiser).
    run : ``run(problem, cfg, state, *, comm, denoiser, device, callback) -> Tensor``, the slab on
        ``device``; it consumes ``state`` (see ``SlabState.release``).
    """

    name: str
    label: str
    config_type: type[MethodConfig]
    needs_model: bool
    steps_key: str | None
    initial_state: Callable[..., SlabState]
    run: Callable[..., Tensor]

    def __post_init__(self) -> None:
        if self.config_type.method != self.name:
            raise ValueError(f"method {self.name!r}: its config class says {self.config_type.method!r}")


def admm_aux(state: AdmmState) -> dict[str, Tensor]:
    """ADMM (z, w) under their checkpoint names (``SlabState.aux``)."""
    return dict(zip(ADMM_KEYS, (state.z, state.w)))


def take_admm(aux: dict[str, Tensor], where: str) -> AdmmState:
    """Remove ADMM (z, w) from ``aux`` (so that dict no longer holds them) and return them.

    Raises
    ------
    ValueError : ``aux`` lacks them (a state of another method).
    """
    missing = [key for key in ADMM_KEYS if key not in aux]
    if missing:
        raise ValueError(f"{where}: the state has no {' or '.join(missing)}; it is not a state of this method")
    from ..kernels.admm import AdmmState

    return AdmmState(z=aux.pop("admm_z"), w=aux.pop("admm_w"))
