"""Test helper, not a test: the driver of one admm-tv job as its own process.

usage: python -m driver_main DATASET OUTPUT RAY_ADDRESS

With ``MBIR_TEST_SIGKILL_AFTER_CHECKPOINT=1`` the process SIGKILLs itself as soon as it has
recorded the first complete checkpoint step, which is exactly "the driver died after a checkpoint"
without any race against the workers. Run it again without that variable to resume.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from mbir_batch.cluster.group import ProgressEvent
from mbir_batch.cluster.job import run_jobs
from mbir_batch.cluster.plan import JobSpec
from mbir_batch.config import load_config


def main(dataset: str, output: str, address: str) -> None:
    cfg = load_config("svct-8view", "admm-tv", iters=int(os.environ["ADMM_ITERS"]),
                      cg_iters=int(os.environ["ADMM_CG_ITERS"]))
    die = os.environ.get("MBIR_TEST_SIGKILL_AFTER_CHECKPOINT") == "1"

    def progress(event: ProgressEvent) -> None:
        if die and event.checkpoint_step is not None:
            print(f"killing the driver after checkpoint step {event.checkpoint_step}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)

    run_jobs([JobSpec(Path(dataset), Path(output), cfg)], workers=1, address=address, checkpoint_every=2,
             progress=progress, message=print, poll_s=0.05)


if __name__ == "__main__":
    main(*sys.argv[1:4])
