"""Tiny random models (saved in the HF format, loaded by lmforge) shared by the engine and serving tests."""

from __future__ import annotations

import pytest

from lmforge.models.checkpoint import load_model

from ..models.hf_factory import save_hf_model

pytest.importorskip("transformers")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """tiny_model(family) -> a Transformer, built once per family per session."""
    cache = {}

    def get(family: str, seed: int = 1):
        if (family, seed) not in cache:
            path = save_hf_model(family, tmp_path_factory.mktemp(family), seed=seed)
            cache[family, seed] = load_model(path)
        return cache[family, seed]

    return get


class CharTokenizer:
    """Stand-in tokenizer (the engine only needs encode / decode / eos_ids): id i <-> one letter."""

    eos_ids: list[int] = []

    def encode(self, text: str) -> list[int]:
        return [ord(c) - 97 + 26 for c in text]

    def decode(self, ids) -> str:
        return "".join(chr(97 + i % 26) for i in ids)


@pytest.fixture(autouse=True)
def _single_thread(one_thread):
    """Every engine test runs on one intra-op thread (see tests/conftest.py)."""
