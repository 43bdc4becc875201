"""``lam: auto``: the z-TV weight chosen per volume by measurement-domain cross-validation.

Hold-out cross-validation (Stone, J. R. Stat. Soc. B 36, 1974) over the measurement entries, the
"measurement splitting" of self-supervised reconstruction (SSDU: Yaman et al., Magn. Reson. Med.
84, 2020), applied to the one weight a DiffusionMBIR / DDS data step has (lam in
``min 1/2 ||A x - y||^2 + lam ||D_z x||_1``):

1. Split the entries of ``y`` with a 0/1 mask ``M`` (True = held out; :func:`holdout_mask`), drawn
   from (seed, global slice), so a slice's mask does not depend on the slab split. Keep
   ``K = 1 - M``.
2. For each candidate ``lam_k``, reconstruct from the kept entries alone: the data term of the
   short reconstruction is ``1/2 ||A_fit x - K y||^2`` with ``A_fit = K A``
   (:class:`MaskedOperator`; ``A_fit^T A_fit = A^T K A`` is symmetric, so CG stays valid).
3. Score how well ``x_k`` predicts what it never saw (global sums over all slices)::

       e_k = sum_z ||M_z (A x_k - y)_z||^2 / sum_z ||M_z y_z||^2

4. ``lam = argmin_k e_k``, refined by the vertex of the parabola through the minimum and its two
   neighbours in ``log lam`` (:func:`parabola_vertex`), clipped to that bracket.

Split invariance: the per-slice error sums are gathered exactly (:func:`gather_slices`: every
rank fills only its own rows of a zero ``(depth, k)`` table and one all-reduce adds zeros to them)
and then summed over slices in global order with ``math.fsum`` (exactly rounded), so every rank of
every split takes the same decision from the same per-slice values.

======  ====================  =====================================================
symbol  variable              meaning
======  ====================  =====================================================
M       ``held``              held-out entries (bool, ``(Z, *range_shape)``)
K       ``keep``              kept entries, ``1 - M``
A_fit   ``MaskedOperator``    ``K A``
e_k     ``errors[k]``         held-out relative squared error of candidate k
======  ====================  =====================================================
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .comm import Comm
from .diffusion import slice_seed

__all__ = ["LamAutoReport", "LamAutoSettings", "MaskedOperator", "choose_lam", "cross_validate", "gather_slices",
           "heldout_sums", "holdout_mask", "parabola_vertex"]

Reconstruct = Callable[[Any, Tensor, float], Tensor]

#: The draw index of the hold-out masks in :func:`~.diffusion.slice_seed` (the samplers use -1, 0, 1, ...).
HOLDOUT_DRAW = -(1 << 20)
#: The slice key of the shared mask (``per_slice=False``): every slice draws the mask of this key.
SHARED_SLICE = -1


@dataclass(frozen=True)
class LamAutoSettings:
    """Knobs of ``lam: auto``.

    Attributes
    ----------
    candidates : the lam grid, positive and ascending (log-spaced by default).
    steps : sampler steps of each short cross-validation run.
    fraction : the held-out fraction of the measured entries of each slice, in (0, 1).
    per_slice : a different mask per slice (True), or the same entries held out in every slice
        (False, the default): with per-slice masks D_z can fill a held-out entry from the
        neighbouring slices, which see it, and that flatters large lam (measured on 64^2 x 16
        torso slabs, 8-view CT: per-slice masks chose lam 0.02 where the best is 0.01, shared
        masks 0.009).
    refine : refine the grid minimum by :func:`parabola_vertex` (else return the grid minimum).
    """

    candidates: tuple[float, ...] = (0.003, 0.01, 0.03, 0.1, 0.3)
    steps: int = 15
    fraction: float = 0.1
    per_slice: bool = False
    refine: bool = True

    def __post_init__(self) -> None:
        grid = self.candidates
        if len(grid) < 1 or grid[0] <= 0 or any(b <= a for a, b in zip(grid, grid[1:])):
            raise ValueError(f"LamAutoSettings: candidates must be positive and ascending, got {grid}")
        if self.steps < 1:
            raise ValueError(f"LamAutoSettings: steps must be >= 1, got {self.steps}")
        if not 0.0 < self.fraction < 1.0:
            raise ValueError(f"LamAutoSettings: fraction must be in (0, 1), got {self.fraction}")


class MaskedOperator:
    """``A_fit = K A``: the operator restricted to the kept entries ``K`` (0/1) of the slab.

    ``A_fit(x) = K * A(x)`` and ``A_fit^T(r) = A^T(K * r)``, its exact adjoint (``K`` is real and
    diagonal), so ``1/2 ||A_fit x - K y||^2`` is the data term over the kept entries only.

    Parameters
    ----------
    operator : a slice-wise operator (``A``, ``AT``, ``domain_shape``, ``range_shape``).
    keep : ``(Z, *range_shape)`` 0/1 (bool or float) for the slab's slices.
    """

    def __init__(self, operator: Any, keep: Tensor) -> None:
        if tuple(keep.shape[1:]) != tuple(operator.range_shape):
            raise ValueError(f"MaskedOperator: keep has slices {tuple(keep.shape[1:])}, the operator's range is "
                             f"{tuple(operator.range_shape)}")
        self.operator = operator
        self.keep = keep.to(torch.float32)

    @property
    def domain_shape(self) -> tuple[int, ...]:
        return tuple(self.operator.domain_shape)

    @property
    def range_shape(self) -> tuple[int, ...]:
        return tuple(self.operator.range_shape)

    def A(self, x: Tensor) -> Tensor:
        """``K * A(x)``."""
        return self.operator.A(x) * self.keep

    def AT(self, r: Tensor) -> Tensor:
        """``A^T(K * r)``, the exact adjoint of :meth:`A`."""
        return self.operator.AT(r * self.keep)

    def direct_inverse(self, y: Tensor) -> Tensor:
        """The wrapped operator's one-shot inverse of the kept entries (held-out entries read as 0)."""
        return self.operator.direct_inverse(y * self.keep)

    def slab(self, z0: int, z1: int) -> MaskedOperator:
        """The operator for slices ``[z0, z1)`` of this one (the wrapped operator's own slab, if it has one)."""
        inner = self.operator.slab(z0, z1) if hasattr(self.operator, "slab") else self.operator
        return MaskedOperator(inner, self.keep[z0:z1])

    def to(self, device: torch.device | str) -> MaskedOperator:
        """Move the wrapped operator and the mask to ``device``, in place; returns ``self``."""
        self.operator.to(device)
        self.keep = self.keep.to(device)
        return self


def holdout_mask(fraction: float, seed: int, slice_indices: Sequence[int] | Tensor, range_shape: Sequence[int], *,
                 measured: Tensor | None = None, per_slice: bool = False) -> Tensor:
    """The held-out entries of the given GLOBAL slices: bool ``(len(slice_indices), *range_shape)``.

    Slice ``z`` draws a random permutation of its entries from a generator seeded by
    ``slice_seed(seed, HOLDOUT_DRAW, z)`` (``z = SHARED_SLICE`` for every slice when not
    ``per_slice``) and holds out the first ``round(fraction * n_z)`` of its ``n_z`` measured entries
    in that order. The mask of a slice is thus a function of (seed, z) alone: any slab split
    gives the same masks.

    Parameters
    ----------
    fraction : held-out fraction, in (0, 1).
    seed : the run's seed.
    slice_indices : global indices of the slab's slices.
    range_shape : the shape of one slice of the measurements.
    measured : bool, ``range_shape`` or ``(Z, *range_shape)``: the entries that are measurements
        (e.g. the sampled k-space of MRI); ``None``: every entry.
    per_slice : one mask per slice (True) or the shared mask (False).
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"holdout_mask: fraction must be in (0, 1), got {fraction}")
    zs = slice_indices.tolist() if isinstance(slice_indices, Tensor) else list(slice_indices)
    shape = tuple(int(n) for n in range_shape)
    entries = math.prod(shape)
    if measured is None:
        measured = torch.ones(shape, dtype=torch.bool)
    measured = measured.to("cpu", torch.bool).expand(len(zs), *shape).reshape(len(zs), entries)
    held = torch.zeros((len(zs), entries), dtype=torch.bool)
    gen = torch.Generator()
    for row, z in enumerate(zs):
        gen.manual_seed(slice_seed(int(seed), HOLDOUT_DRAW, int(z) if per_slice else SHARED_SLICE))
        order = torch.randperm(entries, generator=gen)
        candidates = order[measured[row, order]]
        held[row, candidates[: round(fraction * len(candidates))]] = True
    return held.reshape(len(zs), *shape)


def heldout_sums(operator: Any, x: Tensor, measurements: Tensor, held: Tensor) -> Tensor:
    """Per slice ``||M_z (A x - y)_z||^2`` (float64, ``(Z,)``; ``|.|^2`` for complex measurements)."""
    residual = (operator.A(x) - measurements) * held
    return torch.sum(torch.abs(residual).double() ** 2, dim=tuple(range(1, residual.dim())))


def gather_slices(values: Tensor, z0: int, depth: int, comm: Comm) -> Tensor:
    """The ``(depth, k)`` table of every slab's ``(Z, k)`` per-slice ``values`` (rows ``z0 ..``), exactly.

    Each rank writes its rows into zeros and one ``comm.all_reduce_sum`` adds the tables: every
    entry is one rank's value plus zeros, which is exact in floating point, so the table is the
    same bits for any split (unlike an all-reduce of partial sums, whose grouping follows the
    split). ``depth * k`` numbers travel, a few kB for a thousand slices.
    """
    table = torch.zeros((depth, values.shape[1]), dtype=values.dtype, device=values.device)
    table[z0:z0 + values.shape[0]] = values
    return comm.all_reduce_sum(table).cpu()


def parabola_vertex(logs: Sequence[float], errors: Sequence[float]) -> float:
    """The vertex of the parabola through the minimum of ``errors`` and its two neighbours.

    With the minimum at index k and points ``(t_j, e_j)``, j = k-1, k, k+1 (``t = log lam``), the
    parabola ``e = a t^2 + b t + c`` through them has its vertex at ``t* = -b / (2 a)``; it is
    clipped to ``[t_{k-1}, t_{k+1}]``. A minimum at either end of the grid, or three points that
    are not convex (``a <= 0``), give ``t_k`` itself: the grid is never extrapolated.
    """
    k = min(range(len(errors)), key=errors.__getitem__)
    if k == 0 or k == len(errors) - 1:
        return float(logs[k])
    (t0, t1, t2), (e0, e1, e2) = logs[k - 1:k + 2], errors[k - 1:k + 2]
    denominator = (t0 - t1) * (t0 - t2) * (t1 - t2)
    a = (t2 * (e1 - e0) + t1 * (e0 - e2) + t0 * (e2 - e1)) / denominator
    b = (t2 * t2 * (e0 - e1) + t1 * t1 * (e2 - e0) + t0 * t0 * (e1 - e2)) / denominator
    if not a > 0:
        return float(t1)
    return float(min(max(-b / (2 * a), t0), t2))


def choose_lam(candidates: Sequence[float], errors: Sequence[float], *, refine: bool = True) -> float:
    """The candidate with the smallest error (NaN counts as +inf), refined in ``log lam`` by
    :func:`parabola_vertex` when ``refine`` (a vertex at a grid point returns that candidate exactly).

    Raises
    ------
    ValueError : no finite error (every candidate diverged).
    """
    finite = [e if math.isfinite(e) else math.inf for e in errors]
    if not any(math.isfinite(e) for e in finite):
        raise ValueError(f"lam auto: every candidate {list(candidates)} gave a non-finite held-out error")
    best = min(range(len(finite)), key=finite.__getitem__)
    logs = [math.log(c) for c in candidates]
    vertex = parabola_vertex(logs, finite) if refine and len(candidates) >= 3 else logs[best]
    return float(candidates[best]) if vertex == logs[best] else math.exp(vertex)


@dataclass(frozen=True)
class LamAutoReport:
    """What ``lam: auto`` chose and what it cost.

    Attributes
    ----------
    lam : the chosen weight.
    candidates, errors : the grid and its held-out errors ``e_k``.
    nfe_per_slice : denoiser evaluations per slice of all the cross-validation runs.
    seconds : wall time of the cross-validation on this rank.
    """

    lam: float
    candidates: tuple[float, ...]
    errors: tuple[float, ...]
    nfe_per_slice: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {"lam": self.lam, "candidates": list(self.candidates), "errors": list(self.errors),
                "nfe_per_slice": self.nfe_per_slice, "seconds": self.seconds}


def cross_validate(reconstruct: Reconstruct, operator: Any, measurements: Tensor, *, z0: int, depth: int, seed: int,
                   settings: LamAutoSettings, comm: Comm, nfe_per_run: int = 0,
                   measured: Tensor | None = None) -> LamAutoReport:
    """Choose lam by hold-out cross-validation (the module docstring); every slab calls it together.

    Parameters
    ----------
    reconstruct : ``reconstruct(fit_operator, fit_measurements, lam) -> x``, a short reconstruction
        of this slab from the kept entries (a collective call: its CG dots and D_z halos go
        through the same ``comm`` on every rank).
    operator, measurements : the slab's operator and measurements ``(Z, *range_shape)``.
    z0, depth : the slab's first global slice and the volume's depth.
    seed : the run's seed (the masks' seed).
    settings : the grid, the held-out fraction, the mask kind and the refinement.
    comm : the slab communicator.
    nfe_per_run : denoiser evaluations per slice of one ``reconstruct`` (for the report).
    measured : which entries are measurements (see :func:`holdout_mask`).

    Returns
    -------
    report : :class:`LamAutoReport`, the same ``lam``, ``errors`` on every rank.
    """
    started = time.perf_counter()
    slices = torch.arange(z0, z0 + measurements.shape[0])
    held = holdout_mask(settings.fraction, seed, slices, operator.range_shape, measured=measured,
                        per_slice=settings.per_slice).to(measurements.device)
    keep = ~held
    fit = MaskedOperator(operator, keep)
    fit_measurements = measurements * keep
    columns = [torch.sum(torch.abs(measurements * held).double() ** 2, dim=tuple(range(1, measurements.dim())))]
    for lam in settings.candidates:
        x = reconstruct(fit, fit_measurements, float(lam))
        columns.append(heldout_sums(operator, x, measurements, held))
    table = gather_slices(torch.stack(columns, dim=1), z0, depth, comm).tolist()
    sums = [math.fsum(row[k] for row in table) for k in range(len(columns))]
    errors = tuple(total / sums[0] if sums[0] > 0 else math.nan for total in sums[1:])
    lam = choose_lam(settings.candidates, errors, refine=settings.refine)
    return LamAutoReport(lam=lam, candidates=tuple(settings.candidates), errors=errors,
                         nfe_per_slice=nfe_per_run * len(settings.candidates),
                         seconds=time.perf_counter() - started)
