"""Fixtures shared by the training tests."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def one_torch_thread():
    """1 intra-op thread for the module: 2 OpenMP threads on the shared, contended CPU ran tiny UNets ~50x slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
