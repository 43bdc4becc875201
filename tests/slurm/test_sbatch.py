"""slurm/mbir-ray.sbatch for real: a single-node SLURM on localhost runs a Ray cluster and a job.

Needs root (it installs and starts SLURM through ../shared/slurm_local.sh, beside the clone).
Without root or without that script the test FAILS with a message: it is a CI requirement, not
an optional extra. The node advertises one fake GPU so that the GPU hand-off (SLURM_GPUS_ON_NODE /
CUDA_VISIBLE_DEVICES -> ray start --num-gpus) is checked too; the reconstruction itself is CPU.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mbir_batch.output import OutputStore

REPO = Path(__file__).resolve().parents[2]
SLURM_LOCAL = REPO.parent / "shared" / "slurm_local.sh"
SLURM_ENV = {"SLURM_LOCAL_GPUS": "1", "SLURM_LOCAL_ACCOUNTING": "0"}

pytestmark = pytest.mark.slurm


def _bash(script: str, timeout: float, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", script], cwd=REPO, check=False, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **SLURM_ENV, **env})


@pytest.fixture(scope="module")
def slurm():
    if os.geteuid() != 0:
        pytest.fail("the SLURM test needs root to start a local SLURM (slurm_local.sh); run the tests as root")
    if not SLURM_LOCAL.is_file():
        pytest.fail(f"{SLURM_LOCAL} not found: CI keeps shared/ beside the clone")
    started = _bash(f"bash {SLURM_LOCAL} start", timeout=300)
    if "slurm ready" not in started.stdout:
        pytest.fail(f"slurm_local.sh start failed:\n{started.stdout}\n{started.stderr[-3000:]}")
    yield
    _bash(f"bash {SLURM_LOCAL} stop", timeout=120)


def test_sbatch_starts_ray_and_reconstructs(slurm, tmp_path):
    ct_dataset = tmp_path / "ct.zarr"
    simulate = subprocess.run([str(Path(sys.prefix) / "bin" / "mbir-batch"), "simulate", "--size", "16", "--depth",
                               "24", "--views", "8", "--out", str(ct_dataset)], check=False, capture_output=True,
                              text=True)
    assert simulate.returncode == 0, simulate.stderr
    output = tmp_path / "slurm.admm-tv.zarr"
    log = tmp_path / "job.out"
    submit = (f"source {SLURM_LOCAL}; "
              f"jid=$(sbatch --parsable --gpus=1 --cpus-per-task=2 -o {log} slurm/mbir-ray.sbatch "
              f"{ct_dataset} --method admm-tv --steps 3 --workers 2 --out {output}) || exit 90; "
              f"slurm_local_wait \"$jid\" 240")
    venv = Path(sys.prefix)
    done = _bash(submit, timeout=300, MBIR_VENV=str(venv), MBIR_RAY_DASHBOARD="0",
                 MBIR_RAY_OBJECT_STORE_BYTES=str(80 * 1024 * 1024))
    job_log = log.read_text() if log.exists() else "(no job log)"
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}\n--- job log ---\n{job_log}"
    assert "1 GPUs (CUDA_VISIBLE_DEVICES=0)" in job_log, job_log
    assert "Ray cluster up: 1 node(s)" in job_log and "Ray cluster stopped" in job_log, job_log
    store = OutputStore.open(output, mode="r")
    assert store.complete and store.attrs["workers"] == 2 and store.attrs["method"] == "admm-tv"
