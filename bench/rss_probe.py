"""The resident memory of a fresh Python after a process's size-independent setup (``bench/memory.py``).

Run as its own process, it performs the named steps in order and prints its ``VmRSS`` in bytes:

``actor``     the imports of a SlabWorker actor (ray, torch, zarr, the solver, dataset, output,
              worker, dist_comm modules), one torch thread, and the operator of DATASET's first 8 slices
``denoiser``  the denoiser module (diffusers) and the model MODEL
``driver``    the imports of ``mbir-batch submit`` (the CLI, the driver, the dataset module)
``scoring``   the scoring imports (``mbir_batch.metrics``: scikit-image)

    python bench/rss_probe.py actor denoiser --dataset big.zarr --model fixture.json

Standard library only at import time, so the number is what the steps cost and nothing else.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable

ACTOR_MODULES = ("ray", "torch", "zarr", "mbir_batch.solve", "mbir_batch.dataset", "mbir_batch.output",
                 "mbir_batch.cluster.worker", "mbir_batch.cluster.dist_comm")
DRIVER_MODULES = ("mbir_batch.cli", "mbir_batch.cluster.job", "mbir_batch.dataset")


def vm_rss() -> int:
    """This process's ``VmRSS`` in bytes."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/self/status has no VmRSS line")


def _imports(*names: str) -> None:
    for name in names:
        importlib.import_module(name)


def actor(args: argparse.Namespace) -> None:
    _imports(*ACTOR_MODULES)
    import torch
    from mbir_batch.dataset import open_dataset

    torch.set_num_threads(1)
    args.keep.append(open_dataset(args.dataset, verify_data=False).operator(0, 8))


def denoiser(args: argparse.Namespace) -> None:
    from mbir_batch.kernels.priors import load_denoiser

    args.keep.append(load_denoiser(args.model))


STEPS: dict[str, Callable[[argparse.Namespace], None]] = {
    "actor": actor,
    "denoiser": denoiser,
    "driver": lambda args: _imports(*DRIVER_MODULES),
    "scoring": lambda args: _imports("mbir_batch.metrics"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("steps", nargs="+", choices=sorted(STEPS))
    parser.add_argument("--dataset", default=None, help="the dataset of the actor step")
    parser.add_argument("--model", default=None, help="the model of the denoiser step")
    args = parser.parse_args(argv)
    args.keep = []  # what the steps built stays alive until VmRSS is read
    for step in args.steps:
        STEPS[step](args)
    print(vm_rss())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
