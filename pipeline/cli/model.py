"""``mbir-batch model inspect`` and ``mbir-batch model convert``: what a pretrained model file is.

Both load the model through :func:`mbir_batch.kernels.priors.load_denoiser` (on the CPU), so what
``inspect`` reports is what a reconstruction would use, and a file it accepts is one ``submit
--model`` loads. A file that cannot be loaded is one line naming it (exit code 2).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from mbir_batch.cli.common import console, parse_data_range

__all__ = ["convert", "inspect"]

MODEL = typer.Argument(..., help="A `mbir-batch train` .json, a score_sde .pth, a guided-diffusion .pt or a "
                                 "diffusers folder (inspect: also a LoRA adapter.safetensors).")
MODEL_CONFIG = typer.Option(None, "--model-config", help="The model's config when it is not beside it: score_sde "
                            "config.json, DDS-schema .yml, diffusers scheduler_config.json, or a shipped one by "
                            "name (ncsnpp-aapm256: DiffusionMBIR's AAPM prior).")


def _config(model_config: Path | None) -> Path | None:
    from mbir_batch.config import model_config_path

    return model_config_path(model_config) if model_config is not None else None
DATA_RANGE = typer.Option(None, "--model-data-range", metavar="LO,HI",
                          help="Range the model was trained in (default: the format's).")


def inspect(
    path: Path = MODEL,
    model_config: Optional[Path] = MODEL_CONFIG,
    model_data_range: Optional[str] = DATA_RANGE,
) -> None:
    """Format, parameters, resolution, schedule and sigma range, data range, weights used, sha256.

    An adapter file (``adapter.safetensors``) shows its base model's sha256, rank and layers instead."""
    from mbir_batch.kernels.adapter_file import adapter_lines, is_adapter_file, read_adapter

    if is_adapter_file(path):
        lines = adapter_lines(path, read_adapter(path))
    else:
        from mbir_batch.kernels.priors.inspect import inspect_model

        lines = inspect_model(path, config=_config(model_config),
                              data_range=parse_data_range(model_data_range)).lines()
    for line in lines:
        console.print(line, soft_wrap=True)


def convert(
    path: Path = MODEL,
    out: Path = typer.Option(..., "--out", help="Stem to write: OUT.json + OUT.safetensors (own format)."),
    model_config: Optional[Path] = MODEL_CONFIG,
    model_data_range: Optional[str] = DATA_RANGE,
) -> None:
    """Write any loadable model in the project's own format (safetensors + JSON), which reloads identically."""
    from mbir_batch.kernels.priors.inspect import convert_model

    json_path, weights_path = convert_model(path, out, config=_config(model_config),
                                            data_range=parse_data_range(model_data_range))
    console.print(f"wrote {json_path} and {weights_path}", soft_wrap=True)
