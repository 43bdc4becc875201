"""FBP for CT, the zero-filled inverse DFT for MRI: the one-shot reconstruction, no iterations.

FBP is Kak & Slaney (1988, Ch. 3) on the astra matrix (:meth:`.radon.ParallelBeam.fbp`); the
zero-filled inverse is ``Re F^H (M y)`` (:meth:`.mri.CartesianMRI.zero_filled`). Both are the
operator's ``direct_inverse`` (:class:`~mbir_batch.kernels.operators.Operator`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..kernels.comm import Comm
from ..solve import SlabProblem, SlabState, StepEvent
from .base import Method, MethodConfig


@dataclass(frozen=True)
class FbpConfig(MethodConfig):
    """FBP has no knobs but the (unused) ``seed`` every method records."""

    method = "fbp"


def initial_state(problem: SlabProblem, cfg: FbpConfig, *, device: torch.device,
                  denoiser: torch.nn.Module | None = None) -> SlabState:
    """A zero slab at step 0 (FBP starts from nothing)."""
    shape = (problem.z1 - problem.z0, *problem.slice_shape)
    return SlabState(step=0, x=torch.zeros(shape, dtype=torch.float32, device=device))


def run(problem: SlabProblem, cfg: FbpConfig, state: SlabState, *, comm: Comm, denoiser: torch.nn.Module | None,
        device: torch.device, callback: Callable[[StepEvent], None] | None) -> Tensor:
    """``x = direct_inverse(y)``, reported as step 1 of 1; ``state`` is ignored."""
    x = problem.operator.direct_inverse(problem.measurements)
    if callback is not None:
        callback(StepEvent(1, 1, SlabState(1, x), 0.0, 0.0))
    return x


METHOD = Method(name="fbp", label="FBP", config_type=FbpConfig, needs_model=False, steps_key=None,
                initial_state=initial_state, run=run)
