"""slurm/mbir-ray.sbatch for real: a single-node SLURM on localhost runs a Ray cluster and a job.

The cluster comes from the repository's own ``slurm/local-cluster.sh`` (it installs SLURM and munge
with apt-get when they are absent). Where that cannot work, the test is skipped and the reason names
what is missing: root, the SLURM commands and apt-get, or packages that apt-get could not install
(e.g. no network). When everything it needs is present but the cluster does not start, the test
FAILS with the log tail. The node advertises one fake GPU so that the GPU hand-off
(SLURM_GPUS_ON_NODE / CUDA_VISIBLE_DEVICES -> ray start --num-gpus) is checked too; the
reconstruction itself is CPU. A cluster that was already running before the test is left running.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mbir_batch.output import OutputStore

REPO = Path(__file__).resolve().parents[2]
LOCAL_CLUSTER = REPO / "slurm" / "local-cluster.sh"
CLUSTER_ENV = {"MBIR_LOCAL_GPUS": "1"}
MISSING_PREREQUISITE = 77  # local-cluster.sh's exit status when the machine lacks something it needs

pytestmark = pytest.mark.slurm


def _bash(script: str, timeout: float, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", script], cwd=REPO, check=False, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **CLUSTER_ENV, **env})


def _cluster(command: str, timeout: float) -> subprocess.CompletedProcess:
    return _bash(f"bash {shlex.quote(str(LOCAL_CLUSTER))} {command}", timeout=timeout)


def _missing_reason(stderr: str) -> str:
    """The script's "[local-cluster] missing: ..." line (the whole stderr tail if it has none)."""
    lines = [line for line in stderr.splitlines() if line.startswith("[local-cluster] missing:")]
    return lines[-1].removeprefix("[local-cluster] ") if lines else stderr[-1000:]


@pytest.fixture(scope="module")
def slurm():
    if shutil.which("bash") is None:
        pytest.skip("missing: bash (slurm/local-cluster.sh and the sbatch scripts are bash)")
    assert LOCAL_CLUSTER.is_file(), f"{LOCAL_CLUSTER} is part of the repository but is not there"
    was_running = _cluster("status", timeout=60).returncode == 0
    started = _cluster("start", timeout=420)
    if started.returncode == MISSING_PREREQUISITE:
        pytest.skip(f"no local SLURM: {_missing_reason(started.stderr)}")
    if started.returncode != 0 or "local SLURM ready" not in started.stdout:
        if not was_running:  # leave the machine as it was: stop what this start got going
            _cluster("stop", timeout=180)
        pytest.fail(f"slurm/local-cluster.sh start exited {started.returncode} although its prerequisites are "
                    f"present:\n{started.stdout}\n{started.stderr[-3000:]}")
    yield
    if not was_running:
        stopped = _cluster("stop", timeout=180)
        assert stopped.returncode == 0, f"slurm/local-cluster.sh stop:\n{stopped.stdout}\n{stopped.stderr[-3000:]}"


def test_sbatch_starts_ray_and_reconstructs(slurm, tmp_path):
    ct_dataset = tmp_path / "ct.zarr"
    simulate = subprocess.run([str(Path(sys.prefix) / "bin" / "mbir-batch"), "simulate", "--size", "16", "--depth",
                               "24", "--views", "8", "--out", str(ct_dataset)], check=False, capture_output=True,
                              text=True)
    assert simulate.returncode == 0, simulate.stderr
    output = tmp_path / "slurm.admm-tv.zarr"
    log = tmp_path / "job.out"
    q = shlex.quote
    submit = (f"jid=$(sbatch --parsable --gpus=1 --cpus-per-task=2 -o {q(str(log))} slurm/mbir-ray.sbatch "
              f"{q(str(ct_dataset))} --method admm-tv --steps 3 --workers 2 --out {q(str(output))}) || exit 90; "
              f"bash {q(str(LOCAL_CLUSTER))} wait \"$jid\" 240")
    done = _bash(submit, timeout=300, MBIR_VENV=sys.prefix, MBIR_RAY_DASHBOARD="0",
                 MBIR_RAY_OBJECT_STORE_BYTES=str(80 * 1024 * 1024))
    job_log = log.read_text() if log.exists() else "(no job log)"
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}\n--- job log ---\n{job_log}"
    assert "1 GPUs (CUDA_VISIBLE_DEVICES=0)" in job_log, job_log
    assert "Ray cluster up: 1 node(s)" in job_log and "Ray cluster stopped" in job_log, job_log
    store = OutputStore.open(output, mode="r")
    assert store.complete and store.attrs["workers"] == 2 and store.attrs["method"] == "admm-tv"
