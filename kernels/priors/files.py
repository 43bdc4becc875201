"""Strict reading of checkpoint files: one-line errors that name the file and the first offending keys.

Every loader goes through :func:`read_torch_file` (``torch.load(weights_only=True)``, so a
checkpoint can never run code) and :func:`build_strict` (the network is built on the meta
device and *every* tensor comes from the file: a key that is missing, unmapped or of the wrong
shape is an error, never a random weight).
"""
from __future__ import annotations

import json
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch
import yaml
from torch import Tensor, nn

from ..model_card import file_sha256 as sha256_file  # one file hash for every format (torch-free)
from ..model_card import one_line
from .base import PriorLoadError

__all__ = ["build_strict", "check_keys", "one_line", "read_json", "read_torch_file", "read_yaml",
           "sha256_file", "strip_prefix"]

M = TypeVar("M", bound=nn.Module)
_SHOW = 3  # how many offending keys a message names


def require_file(path: Path, what: str) -> Path:
    """``path`` if it is a file; otherwise a :class:`PriorLoadError` naming it and ``what`` it is."""
    if not path.is_file():
        raise PriorLoadError(f"{path}: {what} not found")
    return path


def read_torch_file(path: Path) -> Any:
    """``torch.load(path, weights_only=True)`` on CPU; a truncated or corrupted file raises one line.

    Zip-format files (torch >= 1.6) are memory-mapped: tensors are read from disk only when
    used, so checking a multi-GB checkpoint's keys and shapes costs little memory.
    """
    require_file(path, "checkpoint file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as err:  # torch raises RuntimeError, pickle/zip errors, EOFError ... for bad files
        raise PriorLoadError(f"{path}: cannot read as a torch checkpoint (truncated or corrupted?): "
                             f"{one_line(err)[:300]}") from err


def _read_mapping(path: Path, what: str, parse: Callable[[str], Any], error: type[Exception], language: str,
                  kind: str, *, limit: int | None = None) -> dict[str, Any]:
    """``parse(text of path)``, checked to be a dict; missing, unparsable (``error``, its text cut
    to ``limit`` characters) or another kind of document raises one line naming ``what`` it is."""
    require_file(path, what)
    try:
        doc = parse(path.read_text())
    except (OSError, UnicodeDecodeError, error) as err:
        raise PriorLoadError(f"{path}: {what} is not valid {language} ({one_line(err)[:limit]})") from err
    if not isinstance(doc, dict):
        raise PriorLoadError(f"{path}: {what} is not a {language} {kind}")
    return doc


def read_json(path: Path, what: str) -> dict[str, Any]:
    """A JSON object from ``path``; missing or invalid raises one line."""
    return _read_mapping(path, what, json.loads, json.JSONDecodeError, "JSON", "object")


def read_yaml(path: Path, what: str) -> dict[str, Any]:
    """A YAML mapping from ``path`` (``yaml.safe_load``); missing or invalid raises one line."""
    return _read_mapping(path, what, yaml.safe_load, yaml.YAMLError, "YAML", "mapping", limit=200)


def strip_prefix(state: Mapping[str, Any], prefix: str = "module.") -> dict[str, Any]:
    """Remove ``prefix`` (``nn.DataParallel``'s ``module.``) when every key has it."""
    if state and all(k.startswith(prefix) for k in state):
        return {k[len(prefix):]: v for k, v in state.items()}
    return dict(state)


def _shape(value: Any) -> tuple[int, ...]:
    return tuple(int(s) for s in (value.shape if hasattr(value, "shape") else value))


def check_keys(file: Path | str, found: Mapping[str, Any], expected: Mapping[str, Any], *,
               rename: Callable[[str], str] = lambda k: k) -> None:
    """Every key of ``found`` maps to one of ``expected`` with the same shape, and none is missing.

    Values are tensors or shapes. ``rename`` gives the file's name of a key for the message.
    Raises :class:`PriorLoadError` naming ``file`` and the first offending keys.
    """
    unmapped = [k for k in found if k not in expected]
    missing = [k for k in expected if k not in found]
    if unmapped or missing:
        parts = []
        if unmapped:
            parts.append(f"{len(unmapped)} unmapped key(s) {[rename(k) for k in unmapped[:_SHOW]]}")
        if missing:
            parts.append(f"{len(missing)} missing key(s) {[rename(k) for k in missing[:_SHOW]]}")
        raise PriorLoadError(f"{file}: does not match the architecture of its config: {'; '.join(parts)}")
    wrong = [(k, _shape(found[k]), _shape(expected[k])) for k in expected if _shape(found[k]) != _shape(expected[k])]
    if wrong:
        shown = ", ".join(f"{rename(k)} {got} (expected {want})" for k, got, want in wrong[:_SHOW])
        raise PriorLoadError(f"{file}: {len(wrong)} tensor(s) of the wrong shape: {shown}")


def build_strict(file: Path | str, factory: Callable[[], M], state: Mapping[str, Tensor], *,
                 rename: Callable[[str], str] = lambda k: k) -> M:
    """Build ``factory()`` on the meta device and give it exactly the tensors of ``state``.

    The module never holds an initialised weight: everything it has comes from ``state``
    (cast to float32), after :func:`check_keys`. Returns the module in eval mode on CPU.
    """
    with torch.device("meta"):
        module = factory()
    expected = module.state_dict()
    check_keys(file, state, expected, rename=rename)
    not_float = [k for k, v in state.items() if not torch.is_floating_point(v)]
    if not_float:
        raise PriorLoadError(f"{file}: tensor(s) {[rename(k) for k in not_float[:_SHOW]]} are not floating point")
    module.load_state_dict({k: v.detach().to(torch.float32).contiguous() for k, v in state.items()},
                           strict=True, assign=True)
    leftover = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if leftover:  # a buffer outside the state dict would have no value: refuse rather than invent one
        raise PriorLoadError(f"{file}: no value for {leftover[:_SHOW]} after loading")
    return module.eval()
