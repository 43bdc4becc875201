"""The reconstruction of one z-slab, whatever the method: state, checkpoint hooks, divergence check.

One :class:`SlabSolver` owns the slices ``[z0, z1)`` of a volume of ``depth`` slices. It looks its
method up in the registry (:mod:`mbir_batch.methods`, one module per method) and runs it:

=========  ===================================================================================
fbp        FBP for CT, zero-filled inverse for MRI (no iterations)
admm-tv    ADMM with anisotropic 3D TV, the model-based baseline
dds        DDS (Chung, Lee, Ye, ICLR 2024): Tweedie x0, ADMM-TV-z with a few CG steps, DDIM
mbir       DiffusionMBIR (Chung et al., CVPR 2023): VE predictor-corrector, one ADMM-TV-z step
slice2d    ``dds`` without the z coupling: plain CG on the data term, slice-independent prior
=========  ===================================================================================

Communication is injected: with a ``LocalComm`` this is the single-process solver, with a
``TorchDistComm`` every actor runs the same code on its slab and the CG dot products and
D_z halos are exchanged. Noise is drawn per *global* slice index, so the volume is the same for
any split of the slabs.

Checkpoint hooks: every completed step reaches the ``callback`` as a :class:`StepEvent` whose
``state`` resumes the run (``SlabState.to_numpy`` / ``from_numpy``, arrays ``step``, ``x`` and the
method's ``aux``, e.g. ``admm_z``, ``admm_w``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch
from torch import Tensor

from .errors import SolverDivergedError
from .kernels.comm import Comm
from .kernels.operators import Operator

if TYPE_CHECKING:
    from .methods.base import MethodConfig


@dataclass
class SlabProblem:
    """The measurements and forward operator of the slices ``[z0, z1)`` of a ``depth``-slice volume."""

    z0: int
    z1: int
    depth: int
    operator: Operator
    measurements: Tensor
    chunk_z: int | None = None

    @classmethod
    def from_dataset(cls, dataset, z0: int, z1: int, device: str | torch.device = "cpu") -> SlabProblem:
        measurements = torch.as_tensor(np.asarray(dataset.read_measurements(z0, z1))).to(device)
        operator = dataset.operator(z0, z1, device=device)
        return cls(z0=z0, z1=z1, depth=dataset.meta.volume_shape[0], operator=operator, measurements=measurements,
                   chunk_z=dataset.chunk_z)

    @property
    def slice_shape(self) -> tuple[int, int]:
        return tuple(self.operator.domain_shape)

    @property
    def slice_indices(self) -> Tensor:
        return torch.arange(self.z0, self.z1)

    @cached_property
    def aty(self) -> Tensor:
        """``A^T y`` of this slab (computed once, on first use)."""
        return self.operator.AT(self.measurements)


@dataclass
class SlabState:
    """Everything needed to resume a slab at ``step``: the iterate and the method's other variables.

    Attributes
    ----------
    step : steps done.
    x : the iterate (the slab, or the diffusion sample).
    aux : the method's carried variables by checkpoint name, e.g. the ADMM ``admm_z`` and
        ``admm_w`` (empty for methods without any).

    The sampler noise is a function of (seed, step, global slice), so no RNG state is carried.
    """

    step: int
    x: Tensor
    aux: dict[str, Tensor] = field(default_factory=dict)

    def release(self) -> tuple[Tensor, dict[str, Tensor]]:
        """Hand over ``(x, aux)`` and drop this state's references to them.

        A method's ``run`` calls this so the starting variables (for ADMM-TV also the starting
        slab) are freed as the run replaces them instead of staying alive for the whole run: 2 slab
        copies fewer for dds and mbir, 7 for admm-tv. The returned dict is the state's own; a
        method takes its tensors out of it (``dict.pop``) so that it holds none of them either.
        """
        x, aux = self.x, self.aux
        self.x, self.aux = None, {}  # type: ignore[assignment]
        return x, aux

    def to_numpy(self) -> dict[str, np.ndarray]:
        arrays = {"step": np.asarray(self.step, dtype=np.int64), "x": self.x.detach().cpu().numpy()}
        arrays.update((name, value.detach().cpu().numpy()) for name, value in self.aux.items())
        return arrays

    @classmethod
    def from_numpy(cls, arrays: dict[str, np.ndarray], device: str | torch.device = "cpu") -> SlabState:
        def tensor(name: str) -> Tensor:
            return torch.from_numpy(np.array(arrays[name], copy=True)).to(device)

        aux = {name: tensor(name) for name in arrays if name not in ("step", "x")}
        return cls(step=int(np.asarray(arrays["step"])), x=tensor("x"), aux=aux)


@dataclass
class StepEvent:
    """Progress of one completed step, handed to the ``run`` callback."""

    step: int
    total: int
    state: SlabState
    seconds: float
    slices_per_s: float
    info: dict[str, float] = field(default_factory=dict)
    adapter: Any = None
    """The last step of a run with test-time adaptation: its
    :class:`~mbir_batch.methods.adaptation.AdapterSnapshot` (to keep with the output)."""


def check_finite(x: Tensor, problem: SlabProblem, cfg: MethodConfig) -> Tensor:
    """``x``, or :class:`SolverDivergedError` if it holds NaN/inf (call it before any clamp).

    The message names the method, the slices and the method's solver settings.
    """
    if not bool(torch.isfinite(x).all()):
        settings = cfg.to_dict()
        knobs = ", ".join(f"{key} {settings[key]}" for key in ("rho", "lam", "cg_iters") if key in settings)
        raise SolverDivergedError(f"{cfg.method} diverged on slices [{problem.z0}, {problem.z1}): the result holds NaN "
                                  f"or inf values ({knobs}); nothing was written for them")
    return x


class SlabSolver:
    """Reconstruct one slab with the method of ``cfg``; see the module docstring."""

    def __init__(
        self,
        problem: SlabProblem,
        cfg: MethodConfig,
        *,
        comm: Comm,
        denoiser: torch.nn.Module | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        from .methods import get  # the method modules build on this module's state types

        self.method = get(cfg.method)
        if self.method.needs_model and denoiser is None:
            raise ValueError(f"method {cfg.method!r} needs a denoiser")
        self.problem = problem
        self.cfg = cfg
        self.comm = comm
        self.denoiser = denoiser
        self.device = torch.device(device)
        if self.device.type == "cuda":
            # Slice shapes are fixed for the whole run: let cuDNN pick its fastest kernels once.
            torch.backends.cudnn.benchmark = True

    @property
    def total_steps(self) -> int:
        return self.cfg.total_steps

    @property
    def aty(self) -> Tensor:
        """``A^T y`` of the slab (the problem's)."""
        return self.problem.aty

    def initial_state(self) -> SlabState:
        return self.method.initial_state(self.problem, self.cfg, device=self.device, denoiser=self.denoiser)

    def run(self, state: SlabState, *, callback: Callable[[StepEvent], None] | None = None) -> Tensor:
        """Run steps ``state.step .. total_steps - 1`` and return the slab volume (float32, on CPU).

        ``state`` is consumed (see :meth:`SlabState.release`): afterwards its ``x`` is None and its
        ``aux`` empty. Keep a copy if you need the starting point again.

        Raises
        ------
        SolverDivergedError : the result holds NaN or inf.
        """
        x = self.method.run(self.problem, self.cfg, state, comm=self.comm, denoiser=self.denoiser,
                            device=self.device, callback=callback)
        return x.float().cpu()


def reconstruct(problem: SlabProblem, cfg: MethodConfig, *, comm: Comm, denoiser=None,
                device: str | torch.device = "cpu",
                callback: Callable[[StepEvent], None] | None = None) -> Tensor:
    """Convenience: solve one slab from the start (used by tests and single-process runs)."""
    solver = SlabSolver(problem, cfg, comm=comm, denoiser=denoiser, device=device)
    return solver.run(solver.initial_state(), callback=callback)
