"""Model tests use tiny tensors: one intra-op thread is as fast as two, and with the cores contended by
other processes a second thread makes every op wait for it (measured 25x slower per training step)."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
