"""The adapter file: LoRA weights kept beside an output and reused by the next run.

``adapter.safetensors``: the float32 tensors of :func:`~mbir_batch.kernels.lora.lora_state_dict`
and the metadata ``format = "mbir-batch-lora"``, ``version``, the
:class:`~mbir_batch.kernels.lora.LoraConfig` fields, the SHA-256 of the base model's weights and an
optional JSON ``provenance``. Reading is strict; a file that cannot be used raises
:class:`~mbir_batch.kernels.lora.AdapterLoadError` with one line naming it.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from .lora import AdapterLoadError, LoraConfig, lora_state_dict
from .model_card import one_line

__all__ = ["ADAPTER_FORMAT", "ADAPTER_VERSION", "Adapter", "adapter_lines", "is_adapter_file", "read_adapter",
           "save_adapter"]

ADAPTER_FORMAT = "mbir-batch-lora"
ADAPTER_VERSION = "1"


@dataclass(frozen=True)
class Adapter:
    """An adapter file's content: its tensors, its LoRA config, its base model and provenance."""

    weights: dict[str, Tensor]
    lora: LoraConfig
    base_sha256: str
    provenance: dict[str, Any]


def save_adapter(path: Path | str, model: nn.Module | Mapping[str, Tensor], cfg: LoraConfig, *, base_sha256: str,
                 provenance: Mapping[str, Any] | None = None) -> Path:
    """Write an adapter to ``path`` (safetensors, atomically: a temp file, then a rename).

    ``model`` is an injected model, or its :func:`lora_state_dict` already taken; ``base_sha256``
    is the SHA-256 of the base model's weights file; ``provenance`` any JSON-able record (run,
    volume, steps). Returns ``path``.
    """
    from safetensors.torch import save_file

    path = Path(path)
    meta = {"format": ADAPTER_FORMAT, "version": ADAPTER_VERSION, "base_sha256": str(base_sha256),
            "provenance": json.dumps(dict(provenance or {}), default=str), **cfg.to_metadata()}
    tmp = path.with_name(path.name + ".tmp")
    weights = lora_state_dict(model) if isinstance(model, nn.Module) else {
        name: t.detach().float().cpu().contiguous() for name, t in model.items()}
    save_file(weights, str(tmp), metadata=meta)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # safetensors creates 0600 files; an output must be readable as the umask allows
    os.replace(tmp, path)
    return path


def read_adapter(path: Path | str, *, base_sha256: str | None = None, rank: int | None = None) -> Adapter:
    """Read an adapter file strictly.

    Parameters
    ----------
    path : the ``adapter.safetensors``.
    base_sha256 : when given, the adapter must have been made for the model with these weights.
    rank : when given, the adapter's rank must be this.

    Raises
    ------
    AdapterLoadError
        One line naming ``path``: missing, unreadable or truncated, not an ``mbir-batch-lora``
        file, bad metadata, tensors that do not have the recorded rank, or a base model or rank
        other than the expected one.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise AdapterLoadError(f"{path}: adapter file not found")
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
            weights = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as err:  # safetensors raises its own error types for bad or short files
        raise AdapterLoadError(f"{path}: not a readable safetensors file ({one_line(err)[:200]})") from err
    if meta.get("format") != ADAPTER_FORMAT or meta.get("version") != ADAPTER_VERSION:
        raise AdapterLoadError(f"{path}: not an {ADAPTER_FORMAT} v{ADAPTER_VERSION} adapter "
                               f"(format {meta.get('format')!r}, version {meta.get('version')!r})")
    try:
        lora = LoraConfig.from_metadata(meta)
        provenance = json.loads(meta.get("provenance", "{}"))
        found_sha = meta["base_sha256"]
    except (KeyError, ValueError, TypeError) as err:
        raise AdapterLoadError(f"{path}: adapter metadata is incomplete or invalid ({one_line(err)})") from err
    bad = [k for k, v in weights.items() if (k.endswith(".down.weight") and v.shape[0] != lora.rank)
           or (k.endswith(".up.weight") and v.shape[1] != lora.rank)]
    if bad:
        raise AdapterLoadError(f"{path}: tensor {bad[0]} does not have the recorded rank {lora.rank}")
    if base_sha256 is not None and found_sha != base_sha256:
        raise AdapterLoadError(f"{path}: made for the base model with weights sha256 {found_sha[:12]}..., "
                               f"but the model in use has {base_sha256[:12]}...")
    if rank is not None and lora.rank != rank:
        raise AdapterLoadError(f"{path}: adapter rank is {lora.rank}, the configuration asks for {rank}")
    return Adapter(weights=weights, lora=lora, base_sha256=found_sha, provenance=provenance)


def is_adapter_file(path: Path | str) -> bool:
    """Whether ``path`` is a safetensors file whose header names the adapter format (reads the header only)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file() or path.suffix != ".safetensors":
        return False
    try:
        with safe_open(str(path), framework="pt") as handle:
            return (handle.metadata() or {}).get("format") == ADAPTER_FORMAT
    except Exception:  # noqa: BLE001 - not a readable safetensors file: not an adapter either
        return False


def adapter_lines(path: Path | str, adapter: Adapter) -> list[str]:
    """``name: value`` lines describing an adapter, for ``mbir-batch model inspect``."""
    lora = adapter.lora
    layers = sorted({key.rsplit(".", 2)[0] for key in adapter.weights if key.endswith(".down.weight")})
    parameters = sum(int(t.numel()) for t in adapter.weights.values())
    lines = [f"path: {path}", f"format: {ADAPTER_FORMAT} v{ADAPTER_VERSION} (a LoRA adapter, not a model)",
             f"base model weights sha256: {adapter.base_sha256}", f"rank: {lora.rank}",
             f"alpha: {lora.alpha if lora.alpha is not None else lora.rank} (scale {lora.scale:g})",
             f"blocks: {', '.join(lora.blocks) or '-'}", f"targets: {', '.join(lora.targets) or 'all in blocks'}",
             f"train bias: {'yes' if lora.train_bias else 'no'}",
             f"layers: {len(layers)}, parameters: {parameters:,}"]
    lines += [f"provenance {key}: {value}" for key, value in sorted(adapter.provenance.items())]
    return lines
