"""``mbir-batch submit``: reconstruct datasets through Ray; the one command that calls into ``cluster/``.

The command opens and verifies each dataset once, picks its task preset from the dataset's
geometry, resolves the model when the method needs one, and hands all of it to the driver
(:func:`mbir_batch.cluster.job.run_jobs`), whose messages and progress events it draws.
"""
from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Any, Optional

import typer

from mbir_batch.cli.common import console, flag, parse_data_range
from mbir_batch.errors import UserError
from mbir_batch.methods import get as get_method
from mbir_batch.methods import names as method_names

__all__ = ["Method", "default_preset", "resolve_model", "submit", "with_adaptation"]

Method = Enum("Method", {name: name for name in method_names()}, type=str)
"""The ``--method`` choices: the registry's names (:mod:`mbir_batch.methods`)."""


def default_preset(meta: Any) -> str:
    """The preset that fits a dataset: by modality, then by angular coverage and view count."""
    if meta.modality == "mri":
        return "csmri-4x"
    angles = meta.geometry["angles_deg"]
    span = max(angles) - min(angles) if len(angles) > 1 else 0.0
    if len(angles) > 16 and span < 150:
        return "lact-90"
    if len(angles) <= 2:
        return "svct-2view"
    if len(angles) <= 4:
        return "svct-4view"
    return "svct-8view"


def with_adaptation(cfg: Any, adapt: bool | None, adapter: Path | None) -> Any:
    """``cfg`` with ``--adapt`` / ``--no-adapt`` (``None``: as the preset says) and ``--adapter FILE``.

    ``--adapt`` on a preset without an ``adapt:`` section adapts with the default settings
    (:class:`~mbir_batch.kernels.adapt.AdaptConfig`). ``--adapter`` alone keeps the preset's
    choice: adapt further from the file, or, when the preset does not adapt, use it as it is.

    Raises
    ------
    UserError : either flag for a method that has no ``adapt:`` section (no prior to adapt).
    """
    if adapt is None and adapter is None:
        return cfg
    if not hasattr(cfg, "adapt"):
        given = "--adapter" if adapter is not None else ("--adapt" if adapt else "--no-adapt")
        raise UserError(f"{given}: method {cfg.method!r} has no prior to adapt; test-time adaptation is for dds and "
                        "mbir")
    section = cfg.adapt.to_dict() if cfg.adapt is not None else {"enabled": False}
    if adapt is not None:
        section["enabled"] = adapt
    if adapter is not None:
        section["adapter"] = str(adapter.resolve())
    return cfg.replace(adapt=section)


def resolve_model(model: Path | None) -> Path:
    """``--model``, or the bundled model when it is not given (which must then be installed)."""
    if model is not None:
        return model  # any format; the driver checks it (one line) before anything starts
    from mbir_batch.kernels.model_paths import bundled_model_path

    path = bundled_model_path()
    if not path.is_file():
        raise UserError(f"{path}: denoiser checkpoint not found (the bundled model is missing from this "
                        f"installation)")
    return path


def submit(
    datasets: list[Path] = typer.Argument(..., help="One or more dataset.zarr stores."),
    method: Method = typer.Option(Method("dds"), "--method", help="Reconstruction method."),
    config: Optional[str] = typer.Option(None, "--config", help="YAML file or preset name (default: by "
                                         "modality/geometry). Keys it leaves out come from the dataset's task "
                                         "preset, then the defaults."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output store (one dataset only; default: "
                                       "DATASET.METHOD.zarr). Missing parent folders are created."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Diffusion steps (or ADMM iterations for admm-tv)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Sampler seed."),
    model: Optional[Path] = typer.Option(None, "--model", help="Denoiser: a `mbir-batch train` .json, a score_sde "
                                         ".pth, a guided-diffusion .pt or a diffusers folder (default: the "
                                         "bundled model)."),
    model_config: Optional[Path] = typer.Option(None, "--model-config", help="The model's config when it is not "
                                                "beside it: score_sde config.json, DDS-schema .yml, diffusers "
                                                "scheduler_config.json, or a shipped one by name "
                                                "(ncsnpp-aapm256: DiffusionMBIR's AAPM prior)."),
    model_data_range: Optional[str] = typer.Option(None, "--model-data-range", metavar="LO,HI",
                                                   help="Range the model was trained in (default: the format's, "
                                                   "e.g. -1,1 for diffusers VP models)."),
    workers: int = typer.Option(1, "--workers", help="Slab actors per dataset."),
    gpus_per_worker: float = typer.Option(0.0, "--gpus-per-worker", help="GPUs per actor (0: CPU actors)."),
    cpus_per_worker: int = typer.Option(1, "--cpus-per-worker", help="CPU threads per actor."),
    address: Optional[str] = typer.Option(None, "--address",
                                          help="Attach to a running Ray cluster (default: embedded local Ray)."),
    connect_timeout: float = typer.Option(20.0, "--connect-timeout",
                                          help="Seconds to wait for the cluster at --address to answer."),
    checkpoint_every: int = typer.Option(10, "--checkpoint-every", help="Checkpoint every K steps (0: never)."),
    max_restarts: int = typer.Option(3, "--max-restarts", help="Restarts of a job after an actor dies."),
    dashboard: bool = typer.Option(False, "--dashboard/--no-dashboard",
                                   help="Start the Ray dashboard with the embedded Ray; print its address, how to "
                                   "get its token and the Prometheus metrics endpoint."),
    overwrite: bool = flag("--overwrite", "Replace an existing complete output."),
    adapt: Optional[bool] = typer.Option(None, "--adapt/--no-adapt",
                                         help="Adapt the prior to each volume while sampling (dds, mbir: the "
                                         "preset's adapt: settings); default: as the preset says."),
    adapter: Optional[Path] = typer.Option(None, "--adapter", metavar="FILE",
                                           help="Start from a kept adapter.safetensors (one a run with this "
                                           "--model wrote); with --no-adapt it is used as it is."),
) -> None:
    """Reconstruct datasets; each output gets `volume` and `complete: true` when it is done.

    Ray's own start-up messages go to the driver log, /tmp/ray/mbir-batch-driver.log (or the file
    $MBIR_BATCH_LOG names), not to the terminal. Ctrl-C or SIGTERM stops cleanly; the same command
    resumes from the last checkpoint.
    """
    from mbir_batch.cli.progress import ProgressBars, printer
    from mbir_batch.cluster.job import run_jobs
    from mbir_batch.cluster.plan import JobSpec
    from mbir_batch.config import load_config, model_config_path
    from mbir_batch.dataset import open_dataset

    if out is not None and len(datasets) > 1:
        raise UserError("--out names one output, but several datasets were given; omit --out")
    data_range = parse_data_range(model_data_range)
    model_config = model_config_path(model_config) if model_config is not None else None
    needs_model = get_method(method.value).needs_model
    model_path = resolve_model(model) if needs_model else None
    specs = []
    for path in datasets:
        dataset = open_dataset(path)  # opened and verified once; the driver reuses it
        task_preset = default_preset(dataset.meta)  # a --config file's missing keys come from it
        cfg = load_config(config or task_preset, method.value, base_preset=task_preset if config else None,
                          steps=steps, seed=seed)
        cfg = with_adaptation(cfg, adapt, adapter)
        output = out or path.with_name(f"{path.name.removesuffix('.zarr')}.{method.value}.zarr")
        specs.append(JobSpec(dataset=path, output=output, cfg=cfg, model=model_path,
                             model_config=model_config if needs_model else None,
                             model_data_range=data_range if needs_model else None, opened=dataset))
    with ProgressBars(console) as bars:
        run_jobs(specs, workers=workers, gpus_per_worker=gpus_per_worker, cpus_per_worker=cpus_per_worker,
                 address=address, checkpoint_every=checkpoint_every, max_restarts=max_restarts,
                 overwrite=overwrite, dashboard=dashboard, progress=bars, message=printer(console),
                 connect_timeout_s=connect_timeout)
