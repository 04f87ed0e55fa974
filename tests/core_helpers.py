"""Shared by the core tests: a one-thread fixture; tiny modules and reference site lists come from the dev kit."""

from __future__ import annotations

import pytest
import torch

from ht_devkit.core_models import TinyNet, sdxl_reference_sites  # noqa: F401  (re-exported for the tests)


@pytest.fixture(autouse=True)
def single_thread():
    """Run each core test on one torch thread (restored afterwards).

    Tiny ops on a shared 2-core machine are 10-30x slower with two threads fighting other processes;
    importing this fixture into a test module makes it autouse there.
    """
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
