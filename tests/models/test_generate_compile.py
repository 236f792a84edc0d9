"""generate(compile=True) runs the decode step through torch.compile: same greedy tokens as eager."""

from __future__ import annotations

import pytest
import torch

from lmforge import load_model
from lmforge.models import generate

from .hf_factory import left_padded_batch, save_hf_model

pytest.importorskip("transformers")


@pytest.mark.slow  # compiling takes ~10 s per model on a small CPU
@pytest.mark.parametrize("family", ["llama", "mistral", "gemma2"])  # plain, sliding window, soft-capping
def test_compiled_greedy_matches_eager(family, tmp_path):
    model = load_model(save_hf_model(family, tmp_path / family, seed=4))
    ids, mask = left_padded_batch(seed=5, length=12)
    eager = generate(model, ids, mask, max_new_tokens=16)
    compiled = generate(model, ids, mask, max_new_tokens=16, compile=True)
    assert torch.equal(compiled, eager)
    assert torch.equal(generate(model, ids, mask, max_new_tokens=16, compile=True), eager)  # reuses the compile
