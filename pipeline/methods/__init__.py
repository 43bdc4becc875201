"""The reconstruction methods, one module each, and the one registry table of them.

The table feeds the CLI's ``--method`` choices, the YAML loader (:mod:`mbir_batch.config`), the
report labels and the "needs a model" check. A new method is one new module (a config, an
``initial_state`` and a ``run``, see :mod:`.base`) plus one line below.
"""

from __future__ import annotations

from ..errors import ConfigError
from . import admm_tv, dds, fbp, mbir, slice2d
from .base import Method, MethodConfig, SettingError

__all__ = ["METHODS", "Method", "MethodConfig", "SettingError", "get", "names"]

METHODS: dict[str, Method] = {
    "fbp": fbp.METHOD,
    "admm-tv": admm_tv.METHOD,
    "slice2d": slice2d.METHOD,
    "dds": dds.METHOD,
    "mbir": mbir.METHOD,
}


def names() -> tuple[str, ...]:
    """The method names, in table order (baselines first)."""
    return tuple(METHODS)


def get(name: str) -> Method:
    """The :class:`Method` called ``name``.

    Raises
    ------
    ConfigError : no such method (the message lists the choices).
    """
    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}") from None
