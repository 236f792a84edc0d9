"""A tiny random Llama with a byte-level BPE tokenizer in one HF directory (lm-eval can load it too)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

TEXTS = ["Which is larger, 12 or 47?\nAnswer: 47", "Question: What is 3 + 4?\nAnswer: 7",
         "def add(a, b):\n    return a + b\n", "the quick brown fox jumps over the lazy dog. " * 4]


def make_model_dir(path: Path, seed: int = 0, max_positions: int = 256) -> Path:
    import transformers

    from lmforge.data.tokenizer import train_bpe_tokenizer

    tok = train_bpe_tokenizer(TEXTS * 20, vocab_size=320)
    tok.save(path)
    config = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=max_positions, bos_token_id=tok.bos_id,
                                      eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # random init is near-uniform; sharpen it so choices and argmaxes differ
        model.lm_head.weight.mul_(20)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("tiny_llama"))
