"""Shared fixtures for the kernel tests: the operator contract (shapes, dtype, adjointness,
CPU-vs-CUDA agreement) that every linear operator in ``mbir_batch.kernels`` must meet."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import Tensor


def real_inner(u: Tensor, v: Tensor) -> float:
    """``Re sum conj(u) v`` in float64 (the inner product the adjoints are exact for)."""
    if u.is_complex() or v.is_complex():
        return float(torch.sum(torch.conj(u.to(torch.complex128)) * v.to(torch.complex128)).real)
    return float(torch.sum(u.double() * v.double()))


@dataclass
class OperatorContract:
    """Checks for an operator object with ``A`` and ``AT``."""

    def check_shapes(self, op, x: Tensor, y_shape: tuple[int, ...], y_dtype: torch.dtype) -> Tensor:
        """``A x`` has ``y_shape``/``y_dtype``; ``AT`` maps back to ``x``'s shape and dtype."""
        y = op.A(x)
        assert tuple(y.shape) == tuple(y_shape), f"A: shape {tuple(y.shape)} != {y_shape}"
        assert y.dtype == y_dtype, f"A: dtype {y.dtype} != {y_dtype}"
        back = op.AT(y)
        assert back.shape == x.shape, f"AT: shape {tuple(back.shape)} != {tuple(x.shape)}"
        assert back.dtype == x.dtype, f"AT: dtype {back.dtype} != {x.dtype}"
        return y

    def check_adjoint(
        self, forward: Callable[[Tensor], Tensor], adjoint: Callable[[Tensor], Tensor], x: Tensor, y: Tensor,
        tol: float = 1e-5,
    ) -> float:
        """``|<A x, y> - <x, A^T y>| / (||A x|| ||y||) < tol``; returns the ratio."""
        ax = forward(x)
        aty = adjoint(y)
        lhs, rhs = real_inner(ax, y), real_inner(x, aty)
        scale = float(torch.linalg.vector_norm(ax.double() if not ax.is_complex() else ax.to(torch.complex128)))
        scale *= float(torch.linalg.vector_norm(y.double() if not y.is_complex() else y.to(torch.complex128)))
        assert scale > 0, "adjoint check needs A x != 0 and y != 0"
        ratio = abs(lhs - rhs) / scale
        assert ratio < tol, f"adjoint mismatch: <Ax,y>={lhs}, <x,ATy>={rhs}, relative {ratio:.2e}"
        return ratio

    def check_operator(self, op, x: Tensor, y_dtype: torch.dtype, gen: torch.Generator, tol: float = 1e-5) -> None:
        """Shapes, dtype and adjointness against a random ``y`` of the range."""
        ax = op.A(x)
        y = torch.randn(ax.shape, generator=gen, dtype=ax.dtype)
        self.check_shapes(op, x, tuple(ax.shape), y_dtype)
        self.check_adjoint(op.A, op.AT, x, y, tol)

    def check_devices_match(self, op, x: Tensor, device: str = "cuda", rtol: float = 1e-4) -> None:
        """``A`` and ``AT`` agree between CPU and ``device`` (``op`` is moved there and back)."""
        y_cpu = op.A(x)
        back_cpu = op.AT(y_cpu)
        op.to(device)
        try:
            y_dev = op.A(x.to(device))
            back_dev = op.AT(y_dev)
        finally:
            op.to("cpu")
        for name, cpu, dev in (("A", y_cpu, y_dev), ("AT", back_cpu, back_dev)):
            assert dev.device.type == torch.device(device).type, f"{name} result not on {device}"
            err = float(torch.linalg.vector_norm(dev.cpu() - cpu) / torch.linalg.vector_norm(cpu))
            assert err < rtol, f"{name}: CPU vs {device} relative difference {err:.2e}"


@pytest.fixture
def contract() -> OperatorContract:
    """The operator contract checks."""
    return OperatorContract()


@pytest.fixture
def gen() -> torch.Generator:
    """A seeded CPU generator (tests are deterministic)."""
    return torch.Generator().manual_seed(1234)


@pytest.fixture
def cuda() -> str:
    """The CUDA device name; skips the test (with the reason) when there is no GPU."""
    if not torch.cuda.is_available():
        pytest.skip("CPU-vs-CUDA check: torch.cuda.is_available() is False on this machine")
    return "cuda"


@pytest.fixture(scope="session")
def radon_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One matrix cache folder for the whole session (keeps the tests off ``~/.cache``)."""
    return tmp_path_factory.mktemp("radon-cache")


class ThreadComm:
    """A :class:`~mbir_batch.kernels.comm.Comm` for slabs simulated as threads of one process.

    Every rank runs the same kernel in its own thread; collectives meet at a barrier.
    Sums are taken in rank order, so every rank sees the same value.
    """

    def __init__(self, world: _ThreadWorld, rank: int) -> None:
        self._world = world
        self.rank = rank
        self.world_size = world.size
        self._bytes = 0

    def all_reduce_sum(self, t: Tensor) -> Tensor:
        world = self._world
        world.slots[self.rank] = t.clone()
        world.barrier.wait()
        total = world.slots[0].clone()
        for other in world.slots[1:]:
            total = total + other
        world.barrier.wait()
        self._bytes += t.numel() * t.element_size()
        return total

    def halo_exchange(self, first: Tensor, last: Tensor) -> tuple[Tensor | None, Tensor | None]:
        world = self._world
        world.firsts[self.rank], world.lasts[self.rank] = first.clone(), last.clone()
        world.barrier.wait()
        prev_last = world.lasts[self.rank - 1] if self.rank > 0 else None
        next_first = world.firsts[self.rank + 1] if self.rank < self.world_size - 1 else None
        world.barrier.wait()
        self._bytes += (self.rank > 0) * first.numel() * first.element_size()
        self._bytes += (self.rank < self.world_size - 1) * last.numel() * last.element_size()
        return prev_last, next_first

    def bytes_sent(self) -> int:
        return self._bytes


class _ThreadWorld:
    def __init__(self, size: int) -> None:
        self.size = size
        self.barrier = threading.Barrier(size, timeout=60)
        self.slots: list = [None] * size
        self.firsts: list = [None] * size
        self.lasts: list = [None] * size


def run_sharded(fn: Callable[[ThreadComm], object], world_size: int) -> list:
    """Run ``fn(comm)`` on ``world_size`` simulated slabs (threads); results in rank order."""
    world = _ThreadWorld(world_size)
    results: list = [None] * world_size
    errors: list[BaseException] = []

    def target(rank: int) -> None:
        try:
            results[rank] = fn(ThreadComm(world, rank))
        except Exception as err:  # noqa: BLE001 - re-raised in the test thread below
            errors.append(err)
            world.barrier.abort()

    threads = [threading.Thread(target=target, args=(rank,)) for rank in range(world_size)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results


@pytest.fixture
def sharded() -> Callable[[Callable[[ThreadComm], object], int], list]:
    """``sharded(fn, world_size)``: run a slab kernel on simulated slabs (see :func:`run_sharded`)."""
    return run_sharded


def split_bounds(depth: int, pieces: int) -> list[tuple[int, int]]:
    """Contiguous, near-equal ``[z0, z1)`` ranges covering ``depth`` slices."""
    edges = [round(i * depth / pieces) for i in range(pieces + 1)]
    return list(itertools.pairwise(edges))


@pytest.fixture
def bounds() -> Callable[[int, int], list[tuple[int, int]]]:
    """``bounds(depth, pieces)``: the slab ranges of a split (see :func:`split_bounds`)."""
    return split_bounds
