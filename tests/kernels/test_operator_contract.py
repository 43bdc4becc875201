"""The operator contract, run on every linear operator of ``mbir_batch.kernels``.

Each operator class gets the same checks (STYLE.md, "For this project" 2 and 6):

* shapes and dtypes: ``A`` maps a slab to its range, ``AT`` maps back to the slab's shape and dtype;
  the measurement operators satisfy the :class:`~mbir_batch.kernels.operators.Operator` protocol;
* adjointness ``<A x, y> = <x, A^T y>`` for random ``x`` and ``y``;
* sharded equals whole: the slab operators applied to 2 and 3 slabs (the TV operators with their
  halos exchanged through a simulated comm) give exactly the whole volume's result;
* CUDA equals CPU where a GPU exists.

A class with ``A`` and ``AT`` in a kernel module that has no case in :data:`CASES` fails
:func:`test_every_operator_class_has_a_contract_case`, so a new operator gets these checks as soon
as it is written.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import mbir_batch.kernels
import numpy as np
import pytest
import torch
from mbir_batch.kernels.comm import Comm, LocalComm
from mbir_batch.kernels.lam_auto import MaskedOperator, holdout_mask
from mbir_batch.kernels.mri import CartesianMRI, gaussian_1d_mask, random_2d_mask
from mbir_batch.kernels.operators import Operator, default_det_count, operator_from_geometry
from mbir_batch.kernels.radon import ParallelBeam
from mbir_batch.kernels.tv import DiffZ, Gradient3D

DEPTH, SLICE = 6, (12, 10)


@dataclass(frozen=True)
class Case:
    """How to build one operator and what its range looks like.

    Attributes
    ----------
    cls : the operator class.
    make : ``make(comm, cache_dir) -> operator`` for the whole volume (``comm`` matters only to the
        TV operators, which exchange halos through it).
    slab : ``slab(operator, z0, z1) -> operator`` for slices ``[z0, z1)`` (default: the same operator).
    range_z_axis : the z axis of ``A x`` (1 for the stacked 3D gradient).
    measurement : whether it is a measurement operator (the ``Operator`` protocol).
    """

    cls: type
    make: Callable[[Comm, Path], object]
    slab: Callable[[object, int, int], object] = lambda op, z0, z1: op
    range_z_axis: int = 0
    measurement: bool = True


def _ct(cache: Path, angles: np.ndarray, projector: str = "linear") -> ParallelBeam:
    return ParallelBeam(shape=SLICE, angles_deg=list(angles), det_count=default_det_count(SLICE), cache_dir=cache,
                        projector=projector)


def _masked(operator) -> MaskedOperator:
    """``operator`` restricted to the kept entries of a lam-auto hold-out mask (10 % held out per slice)."""
    held = holdout_mask(0.1, 7, range(DEPTH), operator.range_shape, per_slice=True)
    return MaskedOperator(operator, ~held)


CASES = {
    "ParallelBeam-7view": Case(ParallelBeam, lambda comm, cache: _ct(cache, np.linspace(0, 180, 7, endpoint=False))),
    "ParallelBeam-90deg-strip": Case(ParallelBeam, lambda comm, cache: _ct(cache, np.arange(0.0, 90.0, 6.0), "strip")),
    "CartesianMRI-2d-mask": Case(CartesianMRI, lambda comm, cache: CartesianMRI(gaussian_1d_mask(SLICE, 4.0, seed=1))),
    "CartesianMRI-3d-mask": Case(CartesianMRI,
                                 lambda comm, cache: CartesianMRI(random_2d_mask((DEPTH, *SLICE), 3.0, seed=2)),
                                 slab=lambda op, z0, z1: op.slab(z0, z1)),
    "MaskedOperator-ct": Case(MaskedOperator,
                              lambda comm, cache: _masked(_ct(cache, np.linspace(0, 180, 7, endpoint=False))),
                              slab=lambda op, z0, z1: op.slab(z0, z1)),
    "MaskedOperator-mri-3d-mask": Case(MaskedOperator,
                                       lambda comm, cache: _masked(CartesianMRI(random_2d_mask((DEPTH, *SLICE), 3.0,
                                                                                               seed=2))),
                                       slab=lambda op, z0, z1: op.slab(z0, z1)),
    "DiffZ": Case(DiffZ, lambda comm, cache: DiffZ(comm), measurement=False),
    "Gradient3D": Case(Gradient3D, lambda comm, cache: Gradient3D(0.7, comm), range_z_axis=1, measurement=False),
}


@pytest.fixture(params=list(CASES))
def case(request) -> Case:
    return CASES[request.param]


def _volume(gen: torch.Generator) -> torch.Tensor:
    return torch.randn(DEPTH, *SLICE, generator=gen)


def _range_sample(op, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    ax = op.A(x)
    return torch.randn(ax.shape, generator=gen, dtype=ax.dtype)


def test_every_operator_class_has_a_contract_case():
    """Every public class with ``A`` and ``AT`` in a kernel module is covered by :data:`CASES`."""
    covered = {case.cls for case in CASES.values()}
    found = set()
    for module_info in pkgutil.iter_modules(mbir_batch.kernels.__path__):
        if module_info.ispkg:
            continue
        module = importlib.import_module(f"mbir_batch.kernels.{module_info.name}")
        for name, cls in inspect.getmembers(module, inspect.isclass):
            own = cls.__module__ == module.__name__ and not name.startswith("_")
            protocol = getattr(cls, "_is_protocol", False)
            if own and not protocol and callable(getattr(cls, "A", None)) and callable(getattr(cls, "AT", None)):
                found.add(cls)
    assert found, "no operator classes found: the discovery itself is broken"
    assert found <= covered, f"operators without a contract case: {sorted(c.__name__ for c in found - covered)}"


def test_shapes_and_dtypes(case, radon_cache, gen):
    op = case.make(LocalComm(), radon_cache)
    x = _volume(gen)
    y = op.A(x)
    back = op.AT(y)
    assert back.shape == x.shape and back.dtype == x.dtype
    if case.measurement:
        assert isinstance(op, Operator)
        assert tuple(op.domain_shape) == SLICE
        assert tuple(y.shape) == (DEPTH, *op.range_shape)
        assert y.dtype == (torch.complex64 if isinstance(getattr(op, "operator", op), CartesianMRI) else torch.float32)
    else:
        assert tuple(y.shape) == op.output_shape(tuple(x.shape)) and y.dtype == x.dtype
        assert torch.equal(op.zeros(x), torch.zeros(op.output_shape(tuple(x.shape))))


def test_adjointness(case, contract, radon_cache, gen):
    op = case.make(LocalComm(), radon_cache)
    x = _volume(gen)
    contract.check_adjoint(op.A, op.AT, x, _range_sample(op, x, gen))


@pytest.mark.parametrize("pieces", [2, 3])
def test_sharded_equals_whole(case, radon_cache, gen, sharded, bounds, pieces):
    whole_op = case.make(LocalComm(), radon_cache)
    x = _volume(gen)
    y = _range_sample(whole_op, x, gen)
    spans = bounds(DEPTH, pieces)

    def slab(comm):
        z0, z1 = spans[comm.rank]
        op = case.slab(case.make(comm, radon_cache) if not case.measurement else whole_op, z0, z1)
        return op.A(x[z0:z1]), op.AT(y.narrow(case.range_z_axis, z0, z1 - z0))

    results = sharded(slab, pieces)
    assert torch.equal(torch.cat([r[0] for r in results], dim=case.range_z_axis), whole_op.A(x))
    assert torch.equal(torch.cat([r[1] for r in results]), whole_op.AT(y))


def test_cuda_equals_cpu(case, contract, radon_cache, gen, cuda):
    contract.check_devices_match(case.make(LocalComm(), radon_cache), _volume(gen), device=cuda)


@pytest.mark.parametrize("modality", ["ct", "mri"])
def test_operator_from_geometry_builds_the_contract_geometry(modality, radon_cache, gen):
    """The factory's operator is the one the data contract describes (DESIGN.md)."""
    x = _volume(gen)
    if modality == "ct":
        geometry = {"kind": "parallel", "angles_deg": [0.0, 45.0, 90.0], "det_count": 17, "det_spacing": 1.5}
        expected = ParallelBeam(shape=SLICE, angles_deg=[0.0, 45.0, 90.0], det_count=17, det_spacing=1.5,
                                cache_dir=radon_cache)
        op = operator_from_geometry("ct", geometry, (DEPTH, *SLICE), cache_dir=radon_cache)
    else:
        mask = gaussian_1d_mask(SLICE, 4.0, seed=3)
        expected = CartesianMRI(mask)
        op = operator_from_geometry("mri", {"kind": "cartesian", "mask": "mask"}, (DEPTH, *SLICE), mask=mask.numpy())
    assert type(op) is type(expected) and torch.equal(op.A(x), expected.A(x))


def test_operator_from_geometry_refuses_what_it_cannot_build():
    with pytest.raises(ValueError, match="needs its sampling mask"):
        operator_from_geometry("mri", {"kind": "cartesian", "mask": "mask"}, SLICE)
    with pytest.raises(ValueError, match="kind 'parallel', got 'fan'"):
        operator_from_geometry("ct", {"kind": "fan"}, SLICE)
    with pytest.raises(ValueError, match="unknown modality 'pet'"):
        operator_from_geometry("pet", {}, SLICE)


def test_default_det_count_covers_the_slice_diagonal():
    assert default_det_count((64, 64)) == 92  # ceil(64 sqrt 2) = 91, plus one
    assert default_det_count((3, 4)) == 6 and default_det_count((3, 4), det_spacing=2.0) == 4
