"""Tiny-model fixtures shared by the RL tests (GRPO, PPO, the shared loop, quickstart-align)."""

from __future__ import annotations

import pytest

from lmforge.data.tokenizer import train_bpe_tokenizer


@pytest.fixture(autouse=True)
def _single_thread(one_thread):
    """Every alignment test runs on one intra-op thread (see tests/conftest.py)."""


@pytest.fixture(scope="module")
def tok():
    """A 300-token BPE over a yes/no vocabulary; modules with their own corpus define their own ``tok``."""
    return train_bpe_tokenizer(["yes no maybe " * 20, "Answer yes or no."] * 10, vocab_size=300)
