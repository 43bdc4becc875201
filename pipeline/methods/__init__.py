"""The reconstruction methods, one module each, and the one registry table of them.

The table feeds the CLI's ``--method`` choices, the YAML loader (:mod:`mbir_batch.config`), the
report labels and the "needs a model" check. A new method is one new module (a config, an
``initial_state`` and a ``run``, see :mod:`.base`) plus one line below.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError
from .base import Method, MethodConfig, SettingError

if TYPE_CHECKING:
    METHODS: dict[str, Method]

__all__ = ["METHODS", "Method", "MethodConfig", "SettingError", "get", "names"]

#: The table: method name -> its module. Modules are imported on first use (they import torch),
#: so listing the names (the CLI's ``--method`` choices, ``--help``) stays cheap.
_MODULES = {
    "fbp": "fbp",
    "admm-tv": "admm_tv",
    "slice2d": "slice2d",
    "dds": "dds",
    "mbir": "mbir",
}


def names() -> tuple[str, ...]:
    """The method names, in table order (baselines first)."""
    return tuple(_MODULES)


def get(name: str) -> Method:
    """The :class:`Method` called ``name`` (its module is imported on first use).

    Raises
    ------
    ConfigError : no such method (the message lists the choices).
    """
    if name not in _MODULES:
        raise ConfigError(f"unknown method {name!r}; choose one of {', '.join(_MODULES)}")
    return importlib.import_module(f"{__name__}.{_MODULES[name]}").METHOD


def __getattr__(attribute: str) -> Any:
    """``METHODS``: every :class:`Method` by name, in table order (imports every method module)."""
    if attribute == "METHODS":
        return {name: get(name) for name in _MODULES}
    raise AttributeError(f"module {__name__!r} has no attribute {attribute!r}")
