"""Paths of the pretrained-model fixtures (``tests/fixtures/pretrained/``, see its README)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "pretrained"
ADM_DIR = FIXTURES / "adm-tiny"
NCSNPP_DIR = FIXTURES / "ncsnpp-tiny"


@pytest.fixture(scope="session")
def adm_golden() -> dict[str, np.ndarray]:
    """The arrays of ``adm-tiny/golden.npz`` (DDS's own outputs)."""
    with np.load(ADM_DIR / "golden.npz") as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="session")
def ncsnpp_golden() -> dict[str, np.ndarray]:
    """The arrays of ``ncsnpp-tiny/golden.npz`` (DiffusionMBIR's own outputs)."""
    with np.load(NCSNPP_DIR / "golden.npz") as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(autouse=True)
def _tiny_networks_one_thread(one_thread):
    """Tiny networks run fastest on one thread, and far faster on a busy shared CPU."""
    yield
