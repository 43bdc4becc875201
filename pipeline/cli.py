"""The ``mbir-batch`` command line: simulate, submit, report, train, import, export.

This module is the entry point, the one place in ``pipeline/`` that may call into ``cluster/``.
User errors (bad datasets, configs, files) end in one red line naming the file and the problem,
and exit code 2; they never print a traceback. Ctrl-C (SIGINT) and SIGTERM end in one line that
says where the run stopped and that the same command resumes it, with exit code 130 / 143.

Everything printed may hold foreign text (paths, exception messages), so both consoles print
plain text: rich markup is off. They draw colours and live bars only on a terminal.
"""

from __future__ import annotations

import functools
import sys
from enum import Enum
from pathlib import Path
from typing import Callable, Optional

import typer
from rich.console import Console
from rich.text import Text
from typer.core import TyperCommand, TyperGroup

from .cli_io import ImportTask as Task
from .errors import UserError



def _no_flag_metavar(params: list) -> list:
    """Flags take no value, so their help shows no ``<bool>`` type (typer 0.29 shows one)."""
    for param in params:
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""
    return params


class _Command(TyperCommand):
    def get_params(self, ctx):  # noqa: D102 - typer's, with flags shown without a type
        return _no_flag_metavar(super().get_params(ctx))


class _Group(TyperGroup):
    def get_params(self, ctx):  # noqa: D102
        return _no_flag_metavar(super().get_params(ctx))


app = typer.Typer(
    cls=_Group,
    name="mbir-batch",
    help="Reconstruct 3D CT and MRI volumes from sparse measurements with a 2D diffusion prior "
    "(DiffusionMBIR / DDS), across Ray actors.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err_console = Console(stderr=True, markup=False, highlight=False)
console = Console(markup=False, highlight=False)


def user_errors(command: Callable) -> Callable:
    """Turn :class:`UserError` into one line on stderr and exit code 2; an interrupt into one line too.

    An interrupt (:class:`mbir_batch.cluster.session.Interrupted`, or a plain Ctrl-C outside the
    driver) exits with 128 + the signal number.
    """

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except UserError as exc:
            err_console.print(Text.assemble(("error:", "bold red"), " ", str(exc)), soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt as exc:
            err_console.print(str(exc) or "interrupted", soft_wrap=True)
            raise typer.Exit(getattr(exc, "exit_code", 130)) from None

    return wrapper


class Method(str, Enum):
    fbp = "fbp"
    admm_tv = "admm-tv"
    dds = "dds"
    mbir = "mbir"
    slice2d = "slice2d"




@app.command()
@user_errors
def simulate(
    out: Path = typer.Option(..., "--out", help="Dataset to write (dataset.zarr)."),
    phantom: int = typer.Option(9001, "--phantom", help="Phantom seed (training uses 0-8999; 9000+ is held out)."),
    size: int = typer.Option(64, "--size", help="Slice size H = W."),
    depth: Optional[int] = typer.Option(None, "--depth", help="Number of slices Z (default: size)."),
    task: Task = typer.Option(Task.svct, "--task", help="svct: sparse views; lact: limited arc; csmri: Cartesian MRI."),
    views: Optional[int] = typer.Option(None, "--views", help="CT views (svct default 8; lact default 1 per degree)."),
    arc: float = typer.Option(90.0, "--arc", help="Limited-angle arc in degrees (lact)."),
    accel: float = typer.Option(4.0, "--accel", help="MRI acceleration factor (csmri)."),
    noise: float = typer.Option(0.0, "--noise", help="Gaussian noise sigma added to the measurements."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing dataset."),
) -> None:
    """Write a dataset.zarr with simulated measurements of a procedural phantom and its reference."""
    from .dataset import DatasetMeta, create_dataset
    from .errors import ConfigError
    from .io import simulate_measurements
    from .phantoms import make_phantom

    for flag, value, least in (("--size", size, 8), ("--depth", depth, 1), ("--phantom", phantom, 0)):
        if value is not None and value < least:
            raise ConfigError(f"{flag}: must be >= {least}, got {value}")
    with console.status(f"phantom {phantom} ({depth or size}x{size}x{size})"):
        volume = make_phantom(phantom, size, depth)
    views_default = 8 if task == Task.svct else None
    simulated = simulate_measurements(
        volume, task=task.value, views=views if views is not None else views_default, arc=arc, accel=accel,
        noise=noise, seed=phantom,
    )
    meta = DatasetMeta(
        version=1, modality=simulated.modality, geometry=simulated.geometry, volume_shape=tuple(volume.shape),
        voxel_size_mm=(1.0, 1.0, 1.0), noise_sigma=noise,
        source={"kind": "phantom", "seed": phantom, "task": task.value},
    )
    create_dataset(out, meta, sinogram=simulated.sinogram, kspace=simulated.kspace, mask=simulated.mask,
                   reference=volume, overwrite=overwrite)
    console.print(f"wrote {out} ({simulated.modality}, volume {tuple(volume.shape)})")


@app.command()
@user_errors
def submit(
    datasets: list[Path] = typer.Argument(..., help="One or more dataset.zarr stores."),
    method: Method = typer.Option(Method.dds, "--method", help="Reconstruction method."),
    config: Optional[str] = typer.Option(None, "--config", help="YAML file or preset name (default: by "
                                         "modality/geometry). Keys it leaves out come from the dataset's task "
                                         "preset, then the defaults."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output store (one dataset only; default: "
                                       "DATASET.METHOD.zarr). Missing parent folders are created."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Diffusion steps (or ADMM iterations for admm-tv)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Sampler seed."),
    model: Optional[Path] = typer.Option(None, "--model", help="Denoiser JSON (default: the bundled model)."),
    workers: int = typer.Option(1, "--workers", help="Slab actors per dataset."),
    gpus_per_worker: float = typer.Option(0.0, "--gpus-per-worker", help="GPUs per actor (0: CPU actors)."),
    cpus_per_worker: int = typer.Option(1, "--cpus-per-worker", help="CPU threads per actor."),
    address: Optional[str] = typer.Option(None, "--address", help="Attach to a running Ray cluster (default: embedded local Ray)."),
    connect_timeout: float = typer.Option(20.0, "--connect-timeout",
                                          help="Seconds to wait for the cluster at --address to answer."),
    checkpoint_every: int = typer.Option(10, "--checkpoint-every", help="Checkpoint every K steps (0: never)."),
    max_restarts: int = typer.Option(3, "--max-restarts", help="Restarts of a job after an actor dies."),
    dashboard: bool = typer.Option(False, "--dashboard/--no-dashboard",
                                   help="Start the Ray dashboard with the embedded Ray; print its address, how to "
                                   "get its token and the Prometheus metrics endpoint."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing complete output."),
) -> None:
    """Reconstruct datasets; each output gets `volume` and `complete: true` when it is done.

    Ray's own start-up messages go to the driver log, /tmp/ray/mbir-batch-driver.log (or the file
    $MBIR_BATCH_LOG names), not to the terminal. Ctrl-C or SIGTERM stops cleanly; the same command
    resumes from the last checkpoint.
    """
    from .cluster.job import JobSpec, run_jobs
    from .config import load_config
    from .dataset import open_dataset

    if out is not None and len(datasets) > 1:
        raise UserError("--out names one output, but several datasets were given; omit --out")
    specs = []
    for path in datasets:
        dataset = open_dataset(path)
        task_preset = default_preset(dataset.meta)  # a --config file's missing keys come from it
        cfg = load_config(config or task_preset, method.value, base_preset=task_preset if config else None,
                          steps=steps if method != Method.admm_tv else None,
                          iters=steps if method == Method.admm_tv else None, seed=seed)
        model_path = None
        if cfg.method in ("dds", "mbir", "slice2d"):
            model_path = resolve_model(model)
        output = out or path.with_name(f"{path.name.removesuffix('.zarr')}.{method.value}.zarr")
        specs.append(JobSpec(dataset=path, output=output, cfg=cfg, model=model_path))
    run_jobs(
        specs, workers=workers, gpus_per_worker=gpus_per_worker, cpus_per_worker=cpus_per_worker,
        address=address, checkpoint_every=checkpoint_every, max_restarts=max_restarts,
        overwrite=overwrite, dashboard=dashboard, console=console, connect_timeout_s=connect_timeout,
    )


def default_preset(meta) -> str:
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


def resolve_model(model: Path | None) -> Path:
    from .kernels.model_paths import bundled_model_path

    path = model if model is not None else bundled_model_path()
    if not path.is_file():
        hint = "" if model is not None else " (the bundled model is missing from this installation)"
        raise UserError(f"{path}: denoiser checkpoint not found{hint}")
    return path


@app.command()
@user_errors
def report(
    outputs: list[Path] = typer.Argument(..., help="Output stores of one dataset."),
    png: Optional[Path] = typer.Option(None, "--png", help="Write the orthogonal-planes figure here."),
    reference: Optional[Path] = typer.Option(None, "--reference", help="Dataset with the reference (default: the outputs' input)."),
    markdown: Optional[Path] = typer.Option(None, "--markdown", help="Also write the metrics table here."),
) -> None:
    """PSNR/SSIM per axis (axial, coronal, sagittal) and a PNG of the three mid-planes."""
    from .reporting import build_report

    table = build_report(outputs, png=png, reference=reference, markdown=markdown)
    console.print(table, soft_wrap=True)
    if png is not None:
        console.print(f"wrote {png}")


@app.command()
@user_errors
def train(
    out: Path = typer.Option(..., "--out", help="Model stem to write: OUT.safetensors + OUT.json."),
    resolution: int = typer.Option(64, "--resolution", help="Slice size the model is trained at."),
    steps: int = typer.Option(2000, "--steps", help="Optimiser steps."),
    batch: int = typer.Option(32, "--batch", help="Slices per batch."),
    lr: float = typer.Option(2e-4, "--lr", help="Learning rate."),
    channels: str = typer.Option("32,64,128,128", "--channels", help="UNet block channels, comma-separated."),
    volumes: list[Path] = typer.Option([], "--volume", help="Also train on a dataset's reference, an output volume or a NIfTI."),
    phantoms: bool = typer.Option(True, "--phantoms/--no-phantoms", help="Train on procedural phantoms."),
    checkpoint_every: int = typer.Option(200, "--checkpoint-every", help="Checkpoint every N steps (resumable)."),
    max_minutes: Optional[float] = typer.Option(None, "--max-minutes", help="Stop after this wall time."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads."),
) -> None:
    """Train the 2D slice denoiser (EDM loss) on phantoms and/or user volumes; resumable."""
    from .training_cli import run_training

    run_training(out=out, resolution=resolution, steps=steps, batch=batch, lr=lr, channels=channels,
                 volumes=volumes, phantoms=phantoms, checkpoint_every=checkpoint_every,
                 max_minutes=max_minutes, device=device, threads=threads, console=console,
                 command=" ".join(["mbir-batch", *sys.argv[1:]]))


def _register_io_commands() -> None:
    from . import cli_io

    app.command("import")(user_errors(cli_io.import_cmd))
    app.command("export")(user_errors(cli_io.export_cmd))


_register_io_commands()
for _info in app.registered_commands:  # every command's --help without <bool> on flags
    if _info.cls in (None, TyperCommand):
        _info.cls = _Command


def main() -> None:  # pragma: no cover - console script
    app()
