"""mbir-batch: distributed DiffusionMBIR / DDS reconstruction of sparse-measurement CT and MRI volumes."""
from __future__ import annotations

__version__ = "0.1.0"
