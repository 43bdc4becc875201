"""The denoisers a benchmark runs: the bundled model, any model file, and random-weight networks.

A model file is read by :func:`mbir_batch.kernels.priors.load_denoiser`, as ``mbir-batch submit``
reads it: the project's own JSON + safetensors, a diffusers folder, a score_sde or guided-diffusion
checkpoint. The random-weight networks (``paper``, ``random-small``, the memory fixture) cost what
a network of that size costs and say so in their label; a missing bundled model is an error,
never a silent random fallback.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

# Song et al. NCSN++ at 256^2 (score_sde configs: nf 128, ch_mult (1,1,2,2,2,2,2), 2 res blocks,
# attention at 16^2): a diffusers UNet2DModel with the same widths, attention at 16^2 and below.
PAPER_CHANNELS = (128, 128, 256, 256, 256, 256, 256)
PAPER_ATTENTION = (False, False, False, False, True, True, True)
FIXTURE_CHANNELS = (8, 16, 32)
FIXTURE_LABEL = "tiny RANDOM-INIT denoiser, a timing/memory FIXTURE (not trained; output meaningless)"


def parameter_count(model: torch.nn.Module) -> int:
    """Number of parameters of ``model``."""
    return sum(int(p.numel()) for p in model.parameters())


def paper_config(resolution: int = 256):
    """The paper-size denoiser's :class:`DenoiserConfig` (NCSN++-like widths, ~61 M parameters)."""
    from mbir_batch.kernels.denoiser import DenoiserConfig

    return DenoiserConfig(resolution=resolution, channels=PAPER_CHANNELS, layers_per_block=2,
                          attention_levels=PAPER_ATTENTION, attention_head_dim=64)


def load_model(path: Path | None, *, config: Path | None = None, data_range: tuple[float, float] | None = None,
               device: str | torch.device = "cpu") -> tuple[torch.nn.Module, str]:
    """``(model, label)`` of a model file in any format the product reads (None: the bundled model).

    Raises
    ------
    SystemExit : the bundled model is missing, or the file cannot be read (one line naming it).
    """
    from mbir_batch.kernels.denoiser import DenoiserLoadError
    from mbir_batch.kernels.model_paths import bundled_model_path
    from mbir_batch.kernels.priors import load_denoiser

    if path is None:
        path = bundled_model_path()
        if not path.is_file():
            raise SystemExit(f"bundled denoiser {path} does not exist; pass --model PATH (or a random-weight "
                             "model where the script offers one)")
    try:
        model = load_denoiser(path, config=config, data_range=data_range, device=device)
    except DenoiserLoadError as error:
        raise SystemExit(str(error)) from None
    return model, f"{Path(path).name} ({model.format}): trained, {parameter_count(model) / 1e6:.1f} M params"


def build_denoiser(spec: str, resolution: int, device: str | torch.device, seed: int = 0) -> tuple[Any, str]:
    """``(model, label)`` for ``--model``: ``bundled``, ``paper``, ``random-small`` or a path.

    ``paper`` and ``random-small`` have random weights (seeded by ``seed``) and say so in the label.

    Raises
    ------
    SystemExit : a missing or unreadable model, or one trained at another resolution.
    """
    from mbir_batch.kernels.denoiser import Denoiser, DenoiserConfig

    if spec in ("paper", "random-small"):
        torch.manual_seed(seed)
        config = paper_config(resolution) if spec == "paper" else DenoiserConfig(resolution=resolution)
        model = Denoiser(config).to(device).eval()
        kind = "paper-size NCSN++-like" if spec == "paper" else "bundled architecture (DenoiserConfig defaults)"
        return model, f"{spec}: {kind}, RANDOM weights, {parameter_count(model) / 1e6:.1f} M params"
    model, label = load_model(None if spec == "bundled" else Path(spec), device=device)
    if model.resolution != resolution:
        raise SystemExit(f"{spec}: model resolution {model.resolution} != --size {resolution}")
    return model, label


def save_fixture_denoiser(folder: Path, size: int) -> tuple[Path, torch.nn.Module]:
    """Save the random-init tiny denoiser (channels :data:`FIXTURE_CHANNELS`, one layer per block, no
    attention) at ``size^2`` under ``folder``; return ``(json path, model)``."""
    from mbir_batch.kernels.denoiser import Denoiser, DenoiserConfig, save_denoiser

    torch.manual_seed(0)
    config = DenoiserConfig(resolution=size, channels=FIXTURE_CHANNELS, layers_per_block=1,
                            attention_levels=(False,) * len(FIXTURE_CHANNELS), norm_groups=8)
    model = Denoiser(config).eval()
    json_path, _ = save_denoiser(model, folder / f"fixture-random-{size}",
                                 {"purpose": "bench/memory.py timing/memory fixture", "weights": "RANDOM INIT, seed 0",
                                  "trained": False})
    return json_path, model
