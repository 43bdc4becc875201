"""The tiny denoiser architecture the training tests train (16^2 slices, two levels, no attention)."""
from __future__ import annotations

from mbir_batch.kernels.denoiser import DenoiserConfig

TINY = DenoiserConfig(resolution=16, channels=(8, 16), layers_per_block=1, norm_groups=4,
                      attention_levels=(False, False))
