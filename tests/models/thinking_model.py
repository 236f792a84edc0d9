"""A tiny reasoning-model stand-in for the budget-forcing tests: a BPE tokenizer with ``<think>``/``</think>``
as added tokens (not special, as Qwen3 ships them, so they show in decoded text), a chat template whose
generation prompt opens ``<think>``, and random weights edited so that the model's behaviour at the delimiters
is known rather than hoped for:

  - ``thinking_model``: the LM-head rows of ``<think>``, ``</think>`` and the end-of-sequence token are zero,
    so their logit is 0 while some other of the ~300 random logits is always positive: greedy decoding never
    opens, closes or ends by itself (only the budget can close its thinking);
  - ``closing``: the same model plus a steering vector that makes ``</think>`` the argmax at every position
    (a model that always wants to stop thinking: what the minimum must overrule).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

CORPUS = "hello world, the quick brown fox jumps over the lazy dog. Wait, so the answer is 42. "
THINK_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n<think>\n' }}{% endif %}"
)
START, END = "<think>", "</think>"


def thinking_tokenizer(delimiters: bool = True):
    """The tokenizer; ``delimiters=False``: the same without ``<think>``/``</think>`` (for the error paths)."""
    from tokenizers import AddedToken

    from lmforge.data.tokenizer import Tokenizer, train_bpe_tokenizer

    tok = train_bpe_tokenizer([CORPUS * 30], vocab_size=300, chat_template=THINK_TEMPLATE)
    if delimiters:
        tok.backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in (START, END)])
        # rebuilt so everything derived from the backend at construction sees the added tokens
        tok = Tokenizer(tok.backend, special_tokens=tok.special_tokens, chat_template=THINK_TEMPLATE)
    return tok


def thinking_model(tok, seed: int = 0):
    from lmforge.models.config import Config
    from lmforge.models.model import Transformer

    cfg = Config.from_hf(dict(model_type="llama", vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                              max_position_embeddings=256, eos_token_id=tok.eos_ids))
    model = Transformer(cfg).init_weights(std=0.2, seed=seed).eval()
    silent = [i for i in (tok.backend.token_to_id(START), tok.backend.token_to_id(END), *tok.eos_ids) if i is not None]
    with torch.no_grad():
        model.lm_head.weight[silent] = 0.0
    return model


def closing(model, end_id: int):
    """(a copy of ``model`` whose ``</think>`` row is the longest, a Steering that makes it the argmax).

    The steering adds a huge multiple of ``u / g`` (g: the final norm's gain) to the last block's output, so the
    normalised hidden state is ~ ``u / rms`` at every position and logit j ~ W_j . u, largest for W_end = u."""
    from lmforge.models.steering import Steering, SteeringVector

    model = copy.deepcopy(model)
    w = model.lm_head.weight
    g = torch.Generator().manual_seed(7)
    u = torch.randn(w.shape[1], generator=g)
    u = u / u.norm() * 4 * float(w.detach().norm(dim=1).max())
    with torch.no_grad():
        w[end_id] = u
    gain = model.model.norm.weight.detach().float()
    vector = SteeringVector({model.config.num_layers - 1: u / gain}, model_hint="llama")
    return model, Steering(vector, 1000.0)


def save_thinking_model(path: Path, delimiters: bool = True) -> Path:
    from lmforge import save_model

    tok = thinking_tokenizer(delimiters)
    return save_model(thinking_model(tok), path, tokenizer=tok)
