"""mbir-batch: distributed DiffusionMBIR / DDS reconstruction of sparse-measurement CT and MRI volumes."""
from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["__version__", "load_denoiser"]


def __getattr__(name: str) -> Any:
    """Lazy public API: ``mbir_batch.load_denoiser`` imports torch only when first used (PEP 562)."""
    if name == "load_denoiser":
        from .kernels.priors import load_denoiser

        return load_denoiser
    raise AttributeError(f"module 'mbir_batch' has no attribute {name!r}")
