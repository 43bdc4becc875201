"""What the three diffusion methods (``dds``, ``mbir``, ``slice2d``) share.

* :class:`DiffusionConfig`: the sampler knobs (``steps``, ``cg_iters``, the VE range
  ``sigma_min``/``sigma_max`` and the denoiser ``batch``);
* :func:`noisy_start`: ``x = sigma_max * n_{-1}``, pure noise drawn per global slice, and
  :func:`noisy_start_with_admm` (the same with ADMM ``z = w = 0``);
* :class:`CarriedAdmmTvZ`: the data step of ``dds`` and ``mbir``, one ADMM-TV-z iteration whose
  (z, w) are carried across sampler steps (the "fast DiffusionMBIR" warm start, DESIGN.md), and
  :func:`admm_data_step`, which builds it from a state and resolves ``lam: auto``
  (:func:`resolve_lam`, :mod:`mbir_batch.kernels.lam_auto`) before a fresh run's first step;
* :func:`make_adaptation`: test-time adaptation of the prior when the ``adapt:`` section is in use
  (:mod:`.adaptation`);
* :func:`run_with_admm`: the whole run of ``dds`` and ``mbir``, given their sampler;
* :func:`run_sampler`: one k-diffusion style sampler (:mod:`mbir_batch.kernels.diffusion`) over the
  slab, with the denoiser batched slab-split invariantly, the Karras schedule, per-slice noise and
  the step events.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch
from torch import Tensor

from ..kernels.admm import AdmmState, admm_tv_step
from ..kernels.comm import Comm
from ..kernels.diffusion import NoisePrefetch, get_sigmas_karras, slice_noise
from ..kernels.lam_auto import LamAutoReport, LamAutoSettings, cross_validate
from ..kernels.tv import DiffZ
from ..solve import SlabProblem, SlabState, StepEvent, check_finite
from .adaptation import Adaptation
from .base import MethodConfig, SettingError, admm_aux, setting, take_admm

log = logging.getLogger(__name__)

LAM_AUTO = LamAutoSettings()
"""The ``lam: auto`` knobs (candidates 0.003, 0.01, 0.03, 0.1, 0.3; 15 steps; 10 % held out, the
same entries in every slice); code defaults, not config keys."""

LAM_KEYS = ("lam_auto", "lam_auto_candidates", "lam_auto_errors")
"""The checkpoint names of a ``lam: auto`` choice in ``SlabState.aux``: ``[lam, nfe_per_slice,
seconds]``, the grid and its held-out errors (float64), so a resumed run keeps the same lam."""


@dataclass(frozen=True)
class DiffusionConfig(MethodConfig):
    """Knobs every diffusion method has.

    Attributes
    ----------
    steps : sampler steps (``nfe_per_step`` denoiser evaluations each).
    cg_iters : CG iterations of the data step.
    sigma_min, sigma_max : the VE noise range of the Karras schedule, clipped to the range the
        denoiser supports (:func:`sampler_sigmas`).
    batch : slices per denoiser batch.
    schedule : ``karras`` (Karras et al. 2022, Eq. 5, over [sigma_min, sigma_max]) or ``model``: the
        model's own timesteps as its original code samples them (DDS's uniform skip t = 980, 960,
        ..., 0 for a 1000-step VP model; score_sde's geometric grid; EDM's Karras schedule over the
        model's range); ``sigma_min``/``sigma_max`` then do not apply.
    """

    nfe_per_step: ClassVar[int] = 1
    steps: int = setting(50, at_least=1)
    cg_iters: int = setting(20, at_least=1)
    sigma_min: float = setting(0.005, above=0)
    sigma_max: float = setting(10.0, above=0)
    batch: int = setting(32, at_least=1)
    schedule: str = setting("karras", choices=("karras", "model"))

    def check(self) -> None:
        if self.sigma_min >= self.sigma_max:
            raise SettingError(f"sigma_min ({self.sigma_min}) must be below sigma_max ({self.sigma_max})",
                               "sigma_min", "sigma_max")

    @property
    def nfe(self) -> int:
        return self.nfe_per_step * self.steps

    @property
    def total_steps(self) -> int:
        return self.steps


class DataStep(Protocol):
    """A sampler's data-consistency step ``x -> x``, with what it carries and reports."""

    info: dict[str, float]

    def __call__(self, x: Tensor) -> Tensor: ...

    def aux(self) -> dict[str, Tensor]:
        """The variables it carries, by checkpoint name (``SlabState.aux``)."""
        ...


def supported_sigmas(denoiser: torch.nn.Module | None) -> tuple[float, float]:
    """The image-space noise range a denoiser supports: its ``sigma_min``/``sigma_max`` (every model
    :func:`mbir_batch.kernels.priors.load_denoiser` returns), its config's (the project's own
    :class:`~mbir_batch.kernels.denoiser.Denoiser`), or unbounded."""
    for holder in (denoiser, getattr(denoiser, "config", None)):
        low, high = getattr(holder, "sigma_min", None), getattr(holder, "sigma_max", None)
        if low is not None and high is not None:
            return float(low), float(high)
    return 0.0, math.inf


def karras_range(cfg: DiffusionConfig, denoiser: torch.nn.Module | None) -> tuple[float, float]:
    """``[sigma_min, sigma_max]`` of the config clipped to the denoiser's supported range.

    Raises
    ------
    SettingError : the two ranges do not overlap.
    """
    low, high = supported_sigmas(denoiser)
    sigma_min, sigma_max = max(cfg.sigma_min, low), min(cfg.sigma_max, high)
    if sigma_min >= sigma_max:
        raise SettingError(f"sigma_min/sigma_max [{cfg.sigma_min}, {cfg.sigma_max}] lie outside the range the "
                           f"denoiser supports [{low}, {high}]", "sigma_min", "sigma_max")
    return sigma_min, sigma_max


def sampler_sigmas(cfg: DiffusionConfig, denoiser: torch.nn.Module | None) -> Tensor:
    """The ``steps + 1`` sigmas of the run, descending to 0 (float64, on the host).

    ``schedule: karras``: :func:`~mbir_batch.kernels.diffusion.get_sigmas_karras` over
    :func:`karras_range`. ``schedule: model``: the denoiser's ``model_schedule(steps)``.

    Raises
    ------
    SettingError : ``schedule: model`` with a denoiser that has no discrete schedule.
    """
    if cfg.schedule == "model":
        schedule = getattr(denoiser, "model_schedule", None)
        if schedule is None:
            raise SettingError("schedule: 'model' needs a denoiser loaded by mbir_batch.load_denoiser (it "
                               "knows the model's own timesteps); use 'karras'", "schedule")
        return schedule(cfg.steps).to(torch.float64).cpu()
    return get_sigmas_karras(cfg.steps, *karras_range(cfg, denoiser))


def start_sigma(cfg: DiffusionConfig, denoiser: torch.nn.Module | None) -> float:
    """The noise level of the initial sample: the (clipped) ``sigma_max``, or the model schedule's first."""
    if cfg.schedule == "model":
        return float(sampler_sigmas(cfg, denoiser)[0])
    return karras_range(cfg, denoiser)[1]


def noisy_start(problem: SlabProblem, cfg: DiffusionConfig, *, device: torch.device,
                denoiser: torch.nn.Module | None = None) -> Tensor:
    """``sigma_0 * n_{-1}``: noise draw -1 of the slab's global slices (any split, any device), at
    the first noise level of the run (:func:`start_sigma`)."""
    return start_sigma(cfg, denoiser) * slice_noise(cfg.seed, -1, problem.slice_indices, problem.slice_shape,
                                                    device=device)


def noisy_start_with_admm(problem: SlabProblem, cfg: DiffusionConfig, *, device: torch.device,
                          denoiser: torch.nn.Module | None = None) -> SlabState:
    """The initial state of ``dds`` and ``mbir``: :func:`noisy_start` and ADMM ``z = w = 0`` (slab-shaped)."""
    x = noisy_start(problem, cfg, device=device, denoiser=denoiser)
    return SlabState(step=0, x=x, aux=admm_aux(AdmmState(z=DiffZ.zeros(x), w=DiffZ.zeros(x))))


class CarriedAdmmTvZ:
    """One ADMM-TV-z iteration (:func:`~mbir_batch.kernels.admm.admm_tv_step` with ``D_z``) per call.

    ``state`` holds (z, w) between calls: each sampler step starts from the previous step's
    splitting variable and dual instead of zeros (DiffusionMBIR Sec. 3.2; DDS Sec. 3.3).
    """

    def __init__(self, problem: SlabProblem, cfg: Any, state: AdmmState, comm: Comm,
                 chosen: LamAutoReport | None = None) -> None:
        self.problem, self.cfg, self.comm = problem, cfg, comm
        self.state = state
        self.tv = DiffZ(comm)
        self.chosen = chosen
        self.info: dict[str, float] = {} if chosen is None else lam_info(chosen)

    def __call__(self, x: Tensor) -> Tensor:
        operator, cfg = self.problem.operator, self.cfg
        x, self.state, info = admm_tv_step(x, self.state, A=operator.A, AT=operator.AT, aty=self.problem.aty,
                                           tv=self.tv, rho=cfg.rho, lam=cfg.lam, cg_iters=cfg.cg_iters, comm=self.comm)
        self.info.update(info.as_dict())
        return x

    def aux(self) -> dict[str, Tensor]:
        aux = admm_aux(self.state)
        if self.chosen is not None:
            aux.update(lam_aux(self.chosen))
        return aux


def lam_aux(report: LamAutoReport) -> dict[str, Tensor]:
    """A ``lam: auto`` choice under its checkpoint names (:data:`LAM_KEYS`), float64 on the host."""
    head = [report.lam, float(report.nfe_per_slice), report.seconds]
    values = (head, list(report.candidates), list(report.errors))
    return {key: torch.tensor(value, dtype=torch.float64) for key, value in zip(LAM_KEYS, values)}


def take_lam(aux: dict[str, Tensor]) -> LamAutoReport | None:
    """Remove a ``lam: auto`` choice from ``aux`` and return it (``None``: the state has none)."""
    if LAM_KEYS[0] not in aux:
        return None
    head, candidates, errors = (aux.pop(key).double().cpu().tolist() for key in LAM_KEYS)
    return LamAutoReport(lam=head[0], candidates=tuple(candidates), errors=tuple(errors),
                         nfe_per_slice=int(head[1]), seconds=head[2])


def lam_info(report: LamAutoReport) -> dict[str, float]:
    """The choice as step-event ``info``: ``lam``, ``lam_auto_s``, ``lam_auto_nfe`` (per slice) and
    ``lam_cv_error[<candidate>]`` per candidate."""
    info = {"lam": report.lam, "lam_auto_s": report.seconds, "lam_auto_nfe": float(report.nfe_per_slice)}
    info.update((f"lam_cv_error[{lam:g}]", error) for lam, error in zip(report.candidates, report.errors))
    return info


def resolve_lam(problem: SlabProblem, cfg: Any, aux: dict[str, Tensor], *, start: int, sample: Callable[..., Tensor],
                comm: Comm, denoiser: torch.nn.Module, device: torch.device,
                settings: LamAutoSettings = LAM_AUTO) -> LamAutoReport | None:
    """The ``lam: auto`` choice of a run: taken from ``aux`` (a resumed run), or, before the first
    step of a fresh run, chosen by :func:`~mbir_batch.kernels.lam_auto.cross_validate`; ``None``
    when ``cfg.lam`` is a number.

    Each candidate is the method's own sampler (``sample``) for ``settings.steps`` steps on the
    whole volume, every slab on its own slices through ``comm`` as in the main run, with the data
    term of the kept measurement entries only. Every slab calls this together.

    Raises
    ------
    ValueError : a state past step 0 without a choice (not a state of a ``lam: auto`` run).
    """
    chosen = take_lam(aux)  # taken out of aux in every case: the data step carries it on
    if cfg.lam != "auto":
        return None
    if chosen is not None:
        return chosen
    if start != 0:
        raise ValueError(f"{cfg.method}: lam is 'auto' but the state at step {start} holds no chosen lam; it is not "
                         "a state of a lam: auto run")

    def reconstruct(operator: Any, measurements: Tensor, lam: float) -> Tensor:
        short = dataclasses.replace(cfg, steps=settings.steps, lam=lam)
        fit = dataclasses.replace(problem, operator=operator, measurements=measurements)
        x = noisy_start(fit, short, device=device, denoiser=denoiser)
        data_step = CarriedAdmmTvZ(fit, short, AdmmState(z=DiffZ.zeros(x), w=DiffZ.zeros(x)), comm)
        x = run_sampler(fit, short, x, start=0, sample=sample, data_step=data_step, denoiser=denoiser,
                        device=device, callback=None)
        return x.clamp(0.0, 1.0)

    report = cross_validate(reconstruct, problem.operator, problem.measurements, z0=problem.z0, depth=problem.depth,
                            seed=cfg.seed, settings=settings, comm=comm,
                            nfe_per_run=cfg.nfe_per_step * settings.steps,
                            measured=getattr(problem.operator, "mask", None))
    if comm.rank == 0:
        log.info("%s lam auto: chose lam %.4g from %s (held-out errors %s), %d NFE per slice, %.1f s", cfg.method,
                 report.lam, list(report.candidates), [f"{e:.4g}" for e in report.errors], report.nfe_per_slice,
                 report.seconds)
    return report


def admm_data_step(problem: SlabProblem, cfg: Any, aux: dict[str, Tensor], *, start: int,
                   sample: Callable[..., Tensor], comm: Comm, denoiser: torch.nn.Module,
                   device: torch.device) -> CarriedAdmmTvZ:
    """The :class:`CarriedAdmmTvZ` of ``dds`` / ``mbir`` from a state's ``aux`` (its (z, w) are
    taken out of it), with ``lam: auto`` resolved (:func:`resolve_lam`); its ``cfg`` holds the
    lam in use, its ``chosen`` the choice."""
    chosen = resolve_lam(problem, cfg, aux, start=start, sample=sample, comm=comm, denoiser=denoiser, device=device)
    if chosen is not None:
        cfg = dataclasses.replace(cfg, lam=chosen.lam)
    return CarriedAdmmTvZ(problem, cfg, take_admm(aux, cfg.method), comm, chosen)


def make_adaptation(problem: SlabProblem, cfg: Any, aux: dict[str, Tensor], *, start: int, comm: Comm,
                    denoiser: torch.nn.Module) -> Adaptation | None:
    """The run's :class:`~.adaptation.Adaptation` when its ``adapt:`` section is in use (adapting, or
    an adapter given), else ``None`` (and nothing changes). Every slab calls this together."""
    section = getattr(cfg, "adapt", None)
    if section is None or not section.in_use:
        return None
    return Adaptation(section, denoiser, problem, comm, seed=cfg.seed, sigmas=sampler_sigmas(cfg, denoiser), aux=aux,
                      start=start)


def run_with_admm(problem: SlabProblem, cfg: Any, state: SlabState, *, sample: Callable[..., Tensor], comm: Comm,
                  denoiser: torch.nn.Module, device: torch.device,
                  callback: Callable[[StepEvent], None] | None) -> Tensor:
    """The run of ``dds`` and ``mbir`` from ``state``: the carried ADMM-TV-z data step (``lam: auto``
    resolved), the adaptation when its section is in use, ``sample`` from ``state.step``; returns
    the slab clamped to [0, 1] (:class:`~mbir_batch.solve.SolverDivergedError` on NaN/inf).

    ``state`` is consumed: its starting (z, w) are dropped after the first step; the starting x
    stays alive for the run (one slab), as the sampler holds its argument however it is passed.
    """
    start = state.step
    x, aux = state.release()
    data_step = admm_data_step(problem, cfg, aux, start=start, sample=sample, comm=comm, denoiser=denoiser,
                               device=device)
    adaptation = make_adaptation(problem, data_step.cfg, aux, start=start, comm=comm, denoiser=denoiser)
    x = run_sampler(problem, data_step.cfg, x, start=start, sample=sample, data_step=data_step, denoiser=denoiser,
                    device=device, callback=callback, adaptation=adaptation)
    return check_finite(x, problem, data_step.cfg).clamp(0.0, 1.0)


def run_sampler(problem: SlabProblem, cfg: DiffusionConfig, x: Tensor, *, start: int, sample: Callable[..., Tensor],
                data_step: DataStep, denoiser: torch.nn.Module, device: torch.device,
                callback: Callable[[StepEvent], None] | None, adaptation: Adaptation | None = None) -> Tensor:
    """Run ``sample(denoise, x, sigmas, data_step=, noise=, start=, callback=)`` from step ``start``.

    Parameters
    ----------
    problem, cfg : the slab and the method's config.
    x : the sample at ``sigmas[start]`` (the noisy start, or a resumed state's ``x``).
    start : the first step to run.
    sample : :func:`~mbir_batch.kernels.diffusion.sample_dds` or ``sample_mbir`` with the method's
        own arguments bound (``functools.partial``).
    data_step : the data-consistency step; its ``aux()`` goes into every step's state.
    denoiser : D(x, sigma), applied slice-wise in batches.
    device : where the slab lives.
    callback : receives a :class:`StepEvent` after every step; the last one carries the
        adaptation's :class:`~.adaptation.AdapterSnapshot` in ``adapter``.
    adaptation : test-time adaptation (:func:`make_adaptation`): its LoRA copy of the denoiser
        runs, its rounds run before the planned steps, its state joins every step's ``aux``.

    Returns
    -------
    x : the sampler's result (not clamped).
    """
    from ..kernels.denoiser import denoise_slab  # diffusers: imported only when a sampler runs

    # The schedule stays on the host: float(sigmas[i]) must not synchronise the device.
    sigmas = sampler_sigmas(cfg, denoiser)
    clock = {"t": time.perf_counter()}
    if adaptation is not None:
        denoiser = adaptation.model

    # Slab boundaries fall on chunk boundaries: batches that divide the chunk never straddle a
    # slab, so every slice is denoised with the same companions for any split (bit-identical
    # volumes on CPU for 1, 2, 3 ... workers). On CUDA (bf16, cuDNN autotuning: never
    # bit-identical across splits) the configured batch keeps the GPU busy instead.
    chunk = problem.chunk_z
    batch = math.gcd(cfg.batch, chunk) if chunk and device.type == "cpu" else cfg.batch

    def denoise(x: Tensor, sigma: float) -> Tensor:
        return denoise_slab(denoiser, x, float(sigma), batch=batch, first_slice=problem.z0)

    def on_step(event: dict[str, Any]) -> None:
        if callback is None:
            return
        now = time.perf_counter()
        seconds, clock["t"] = now - clock["t"], now
        step = int(event["step"]) + 1
        slices = (problem.z1 - problem.z0) * cfg.nfe_per_step
        aux, info, adapter = data_step.aux(), dict(data_step.info), None
        if adaptation is not None:
            aux.update(adaptation.aux())
            info.update(adaptation.info)
            adapter = adaptation.snapshot() if step == cfg.steps else None
        callback(StepEvent(step, cfg.steps, SlabState(step, event["x"], aux), seconds,
                           slices / max(seconds, 1e-9), info, adapter))

    # On CUDA the next CPU noise draw overlaps the current step; the values are the same.
    if device.type == "cuda":
        noise = NoisePrefetch(cfg.seed, problem.slice_indices, problem.slice_shape, device)
    else:
        def noise(index: int) -> Tensor:
            return slice_noise(cfg.seed, index, problem.slice_indices, problem.slice_shape, device=device)
    try:
        hook = {} if adaptation is None else {"before_step": adaptation.before_step}
        return sample(denoise, x, sigmas, data_step=data_step, noise=noise, start=start, callback=on_step, **hook)
    finally:
        if isinstance(noise, NoisePrefetch):
            noise.close()
