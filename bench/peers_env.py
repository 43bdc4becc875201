"""Process set-up shared by ``bench/peers.py`` and its helpers: JAX on CPU, and torchvision beside a CPU torch.

Call :func:`prepare` before anything imports jax, torchvision, diffusers or deepinv.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

__all__ = ["prepare", "declare_missing_torchvision_ops"]

_SCHEMAS: list = []  # keeps the torch.library.Library alive (it deregisters its schemas when collected)


def prepare() -> None:
    """Set ``JAX_PLATFORMS=cpu`` and ``MBIRJAX_NUM_CPU_DEVICES=1`` (unless set) and make torchvision importable."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("MBIRJAX_NUM_CPU_DEVICES", "1")  # else mbirjax splits the work over 2 virtual devices
    declare_missing_torchvision_ops()


def declare_missing_torchvision_ops() -> bool:
    """Let torchvision import when its C++ operators cannot load; returns True when it had to.

    deepinv imports torchvision, and so does diffusers when torchvision is installed. PyPI's Linux
    torchvision wheels link the CUDA build of torch; beside the CPU build their operators do not
    load, and torchvision 0.28 then fails on import at ``register_fake("torchvision::nms")`` (and
    ``qnms``), the two fake kernels it registers without checking that the operators exist.
    Nothing run here calls a torchvision operator, so we declare those two schemas with no
    kernel: the import goes through, and a call to ``torchvision.ops.nms`` still fails loudly.
    Without torchvision, or with one whose operators load, this does nothing.
    """
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.origin or _SCHEMAS:
        return bool(_SCHEMAS)
    try:
        torch.ops.load_library(str(Path(spec.origin).parent / "_C.so"))
        return False
    except (OSError, RuntimeError):
        schemas = torch.library.Library("torchvision", "DEF")
        for name in ("nms", "qnms"):
            schemas.define(f"{name}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _SCHEMAS.append(schemas)
        return True
