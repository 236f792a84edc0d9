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


@pytest.fixture(scope="session")
def tiny_llava_dir(tmp_path_factory):
    """One tiny random CLIP + Llama LLaVA directory (weights, image processor, tokenizer), saved once for every test
    that only reads it; each test module loads its own model from it."""
    from .models.test_quant_vlm import save_tiny_vlm

    return save_tiny_vlm("llava", tmp_path_factory.mktemp("tiny_llava"))
