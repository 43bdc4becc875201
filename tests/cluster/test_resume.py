"""A driver killed with SIGKILL after a checkpoint: the same command again resumes and matches."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np

from mbir_batch.output import OutputStore, output_status

HERE = Path(__file__).parent


def _driver(dataset, output, address, cfg, **env) -> subprocess.CompletedProcess:
    environment = {**os.environ, "ADMM_ITERS": str(cfg.iters), "ADMM_CG_ITERS": str(cfg.cg_iters), **env}
    return subprocess.run([sys.executable, str(HERE / "driver_main.py"), str(dataset), str(output), address],
                          env=environment, check=False, capture_output=True, text=True, timeout=120)


def test_sigkilled_driver_resumes_from_last_complete_step(ray_session, ct_dataset, admm_runs, admm_cfg, tmp_path):
    address = ray_session.get_runtime_context().gcs_address
    output = tmp_path / "resumed.zarr"
    first = _driver(ct_dataset, output, address, admm_cfg, MBIR_TEST_SIGKILL_AFTER_CHECKPOINT="1")
    assert first.returncode == -signal.SIGKILL, first.stdout + first.stderr
    assert output_status(output) == "incomplete"
    store = OutputStore.open(output, mode="r")
    recorded = store.checkpoints.last_recorded
    assert recorded is not None and recorded > 0 and store.checkpoints.recorded[-1] == recorded
    store.checkpoints.verify(recorded, "z0-24")  # the one slab's checkpoint carries its checksums

    second = _driver(ct_dataset, output, address, admm_cfg)
    assert second.returncode == 0, second.stdout + second.stderr
    match = re.search(r"resuming \S+ from step (\d+)", second.stdout)
    assert match and int(match.group(1)) == recorded, second.stdout
    attrs = OutputStore.open(output, mode="r").attrs
    assert attrs["complete"] is True and attrs["resumed_from"] == recorded
    np.testing.assert_array_equal(OutputStore.open(output, mode="r").read_volume(),
                                  OutputStore.open(admm_runs[1], mode="r").read_volume())
