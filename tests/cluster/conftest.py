"""Shared fixtures of the cluster tests: one small embedded Ray for the whole session.

Ray costs about 2.5 s to start and 0.35 GB, so the tests share one instance with an explicit
CPU count (logical CPUs: six slab actors on a 2-core machine) and a small object store.
Every test that creates actors kills them itself; Ray is shut down at the end of the session.
"""

from __future__ import annotations

import os

import pytest

RAY_CPUS = 6  # logical: the 1-, 2- and 3-worker runs of one dataset go at once
OBJECT_STORE_BYTES = 80 * 1024 * 1024


@pytest.fixture(scope="session")
def ray_session():
    """An embedded local Ray (``address="local"``: never attach to someone else's cluster)."""
    ray = pytest.importorskip("ray")
    os.environ.setdefault("RAY_DISABLE_USAGE_STATS", "1")
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=RAY_CPUS, object_store_memory=OBJECT_STORE_BYTES,
                 include_dashboard=False, log_to_driver=False, namespace="mbir-batch-tests")
    yield ray
    ray.shutdown()


def make_ct_dataset(path, *, depth: int = 24, size: int = 16, views: int = 8, seed: int = 9001, reference: bool = True):
    """A tiny sparse-view CT dataset (procedural phantom, astra parallel beam), chunks of 8 slices."""
    import numpy as np
    import torch

    from mbir_batch.dataset import DatasetMeta, create_dataset
    from mbir_batch.kernels.radon import ParallelBeam
    from mbir_batch.phantoms import make_phantom

    volume = make_phantom(seed, size, depth)
    angles = [float(a) for a in np.linspace(0.0, 180.0, views, endpoint=False)]
    det_count = int(np.ceil(size * np.sqrt(2)))
    operator = ParallelBeam(shape=(size, size), angles_deg=angles, det_count=det_count)
    sinogram = operator.A(torch.from_numpy(volume)).numpy()
    meta = DatasetMeta(modality="ct", geometry={"kind": "parallel", "angles_deg": angles, "det_count": det_count,
                                                "det_spacing": 1.0}, volume_shape=volume.shape)
    return create_dataset(path, meta, sinogram=sinogram, reference=volume if reference else None, chunk_z=8)


@pytest.fixture(scope="session")
def make_ct():
    """:func:`make_ct_dataset` as a fixture (test modules cannot import this conftest)."""
    return make_ct_dataset


@pytest.fixture(scope="session")
def ct_dataset(tmp_path_factory):
    """Path of a 24x16x16 CT dataset shared by the end-to-end tests (never written to)."""
    path = tmp_path_factory.mktemp("data") / "tiny.zarr"
    make_ct_dataset(path)
    return path


@pytest.fixture(scope="session")
def tiny_denoiser(tmp_path_factory):
    """A random-init 16x16 denoiser saved with save_denoiser: a TEST FIXTURE for determinism checks.

    It only has to be deterministic and cheap; it is not a fallback model and its output is not
    meant to be a good reconstruction.
    """
    import torch

    from mbir_batch.kernels.denoiser import Denoiser, DenoiserConfig, save_denoiser

    torch.manual_seed(0)
    model = Denoiser(DenoiserConfig(resolution=16, channels=(8, 16), layers_per_block=1, norm_groups=4,
                                    attention_levels=(False, False)))
    stem = tmp_path_factory.mktemp("model") / "tiny-test-denoiser"
    json_path, _ = save_denoiser(model, stem, {"note": "random-init test fixture, never trained"})
    return json_path


ADMM_SETTINGS = {"iters": 24, "cg_iters": 5}
"""The admm-tv run every end-to-end test compares against (long enough to checkpoint and kill)."""


@pytest.fixture(scope="session")
def admm_cfg():
    """The admm-tv config of :data:`ADMM_SETTINGS`."""
    from mbir_batch.config import load_config

    return load_config("svct-8view", "admm-tv", **ADMM_SETTINGS)


@pytest.fixture(scope="session")
def admm_runs(ray_session, ct_dataset, admm_cfg, tmp_path_factory):
    """admm-tv with 1, 2 and 3 workers, run concurrently by one run_jobs call: {workers: output path}."""
    from mbir_batch.cluster.job import run_jobs
    from mbir_batch.cluster.plan import JobSpec

    root = tmp_path_factory.mktemp("admm")
    outputs = {workers: root / f"admm-{workers}.zarr" for workers in (1, 2, 3)}
    specs = [JobSpec(ct_dataset, out, admm_cfg, workers=workers) for workers, out in outputs.items()]
    summaries = run_jobs(specs, checkpoint_every=3)
    assert [s["status"] for s in summaries] == ["done"] * 3
    return outputs
