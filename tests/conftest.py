"""Fixtures shared across test areas."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def one_thread():
    """Tiny models: intra-op threads only add overhead (and spin badly on a busy 2-core machine).
    Areas of tiny-model tests turn it on for every test in their conftest."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
