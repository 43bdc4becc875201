"""Fixtures shared by every test folder."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture
def one_thread():
    """One intra-op thread for the test (restored after): on the shared 2-core CI machine, OpenMP
    barriers across two busy cores cost more than they gain for tiny convolutions."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
