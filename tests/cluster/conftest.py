"""Shared fixtures of the cluster tests: one small embedded Ray for the whole session.

Ray costs about 2.5 s to start and 0.35 GB, so the tests share one instance with an explicit
CPU count (logical CPUs: three slab actors fit on a 2-core machine) and a small object store.
Every test that creates actors kills them itself; Ray is shut down at the end of the session.
"""

from __future__ import annotations

import os

import pytest

RAY_CPUS = 4
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
