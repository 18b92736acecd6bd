"""Routing tests use tiny tensors: run torch single-threaded so that a busy CPU (another test run,
a build) cannot stall every op on an OpenMP barrier. The previous thread count is restored."""

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _single_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
