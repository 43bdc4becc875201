"""Communication between slab workers: a torch.distributed implementation of ``Comm``.

DiffusionMBIR's data step (Chung et al., CVPR 2023, Sec. 3) couples the slices of the volume in
two ways only, and this module provides exactly those two (DESIGN.md, "Distribution"):

* the halo exchange for the forward difference along z, ``(D_z x)[k] = x[k+1] - x[k]``: every slab
  needs the last slice of the slab before it and the first slice of the slab after it;
* the global sums behind every CG dot product ``<a, b> = sum_r <a_r, b_r>`` (an all-reduce).

Per CG iteration a rank therefore sends O(H * W) bytes, independent of the volume depth.

Ranks are ordered by slab position along z: rank ``r`` owns the ``r``-th slab from the top.
``TorchDistComm`` joins a process group through a TCP rendezvous whose address the driver hands
out (as Ray Train's torch backend does): NCCL when the slabs live on GPUs, gloo on CPU.
:class:`~mbir_batch.kernels.comm.LocalComm` (one process, whole volume) lives in
:mod:`mbir_batch.kernels.comm`, with the ``Comm`` protocol both satisfy.
"""

from __future__ import annotations

import socket
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["TorchDistComm", "default_backend", "free_port", "node_ip"]


def default_backend(device: str | torch.device) -> str:
    """``"nccl"`` for CUDA devices, ``"gloo"`` otherwise."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def node_ip() -> str:
    """The IP address other nodes of the cluster reach this process at (Ray's view of the node)."""
    import ray

    return ray.util.get_node_ip_address()


def free_port() -> int:
    """A TCP port that is free on this node right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return int(sock.getsockname()[1])


class TorchDistComm:
    """A :class:`~mbir_batch.kernels.comm.Comm` over a ``torch.distributed`` process group.

    Parameters
    ----------
    rank : this slab's index along z (0 = first slab).
    world_size : number of slabs.
    backend : ``"nccl"`` (tensors on the current CUDA device) or ``"gloo"`` (CPU tensors).
    addr, port : the TCP rendezvous (rank 0's node and a port free there), chosen by the driver.
    timeout_s : how long a collective may block before it raises; when a peer dies the driver
        kills the whole group long before this.

    Notes
    -----
    ``bytes_sent`` counts payload bytes this rank handed to the network layer: the full tensor of
    every all-reduce and every halo slice it sent. Protocol overhead and the algorithm-dependent
    forwarding inside a ring all-reduce are not counted.
    """

    def __init__(self, rank: int, world_size: int, backend: str = "gloo", *, addr: str, port: int,
                 timeout_s: float = 600.0) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside a world of {world_size}")
        if backend not in ("gloo", "nccl"):
            raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
        if dist.is_initialized():
            raise RuntimeError("this process already belongs to a torch.distributed process group")
        self.rank = rank
        self.world_size = world_size
        self.backend = backend
        self._bytes_sent = 0
        self._device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        dist.init_process_group(backend, init_method=f"tcp://{addr}:{port}", rank=rank,
                                world_size=world_size, timeout=timedelta(seconds=timeout_s))

    def _to_wire(self, t: Tensor) -> Tensor:
        return t.detach().to(self._device).contiguous()

    def all_reduce_sum(self, t: Tensor) -> Tensor:
        """Return the sum of ``t`` over all ranks (a new tensor on ``t``'s device)."""
        buffer = self._to_wire(t).clone()
        dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
        self._bytes_sent += buffer.numel() * buffer.element_size()
        return buffer.to(t.device)

    def halo_exchange(self, first: Tensor, last: Tensor) -> tuple[Tensor | None, Tensor | None]:
        """Send ``first`` to the previous slab and ``last`` to the next; receive theirs.

        Returns ``(prev_last, next_first)``: the last slice of the previous slab and the first slice
        of the next one, ``None`` at the ends of the volume. All sends and receives of one exchange
        are posted together (``batch_isend_irecv``), so no ordering between ranks can deadlock.
        """
        has_prev, has_next = self.rank > 0, self.rank < self.world_size - 1
        ops: list[dist.P2POp] = []
        prev_last = next_first = None
        if has_prev:
            prev_last = torch.empty(last.shape, dtype=last.dtype, device=self._device)
            ops.append(dist.P2POp(dist.irecv, prev_last, self.rank - 1))
            ops.append(dist.P2POp(dist.isend, self._to_wire(first), self.rank - 1))
        if has_next:
            next_first = torch.empty(first.shape, dtype=first.dtype, device=self._device)
            ops.append(dist.P2POp(dist.irecv, next_first, self.rank + 1))
            ops.append(dist.P2POp(dist.isend, self._to_wire(last), self.rank + 1))
        if ops:
            for request in dist.batch_isend_irecv(ops):
                request.wait()
        self._bytes_sent += (has_prev * first.numel() * first.element_size()
                             + has_next * last.numel() * last.element_size())
        return (None if prev_last is None else prev_last.to(first.device),
                None if next_first is None else next_first.to(last.device))

    def bytes_sent(self) -> int:
        """Payload bytes this rank has sent so far (see the class notes)."""
        return self._bytes_sent

    def barrier(self) -> None:
        """Block until every rank arrives (used around checkpoints and teardown)."""
        dist.barrier()

    def close(self) -> None:
        """Leave and destroy the process group."""
        if dist.is_initialized():
            dist.destroy_process_group()
