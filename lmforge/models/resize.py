"""Grow a model's vocabulary for tokens added to its tokenizer (e.g. ``<think>`` / ``</think>``).

New rows start at the mean of the existing rows (Hewitt 2021, "Initializing new word embeddings"): a random
or zero row would give the new tokens logits unlike any real token's, and the first steps of finetuning would
be spent undoing that; at the mean the new tokens' logits start at the average logit, and the model's
distribution over the old tokens is nearly unchanged (exactly unchanged where the new tokens are not scored).
"""

from __future__ import annotations

import torch
from torch import nn

from lmforge.errors import LmforgeError
from lmforge.models.model import Transformer


def _grown(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """``weight`` [V, H] with ``rows - V`` rows appended, each the mean of the existing rows (in float32, so a
    bf16 model's mean is not rounded row by row)."""
    mean = weight.detach().float().mean(dim=0, keepdim=True).to(weight.dtype)
    return torch.cat([weight.detach(), mean.expand(rows - weight.shape[0], -1)], dim=0)


def resize_token_embeddings(model: Transformer, vocab_size: int) -> Transformer:
    """Grow ``model``'s input embedding and LM head to ``vocab_size`` rows in place, new rows mean-initialised,
    and set ``config.vocab_size``. Tied embeddings stay one tensor. The same size is a no-op; shrinking is
    refused (it would silently delete tokens the tokenizer may still produce)."""
    old = model.config.vocab_size
    if vocab_size == old:
        return model
    if vocab_size < old:
        raise LmforgeError(f"cannot shrink the vocabulary from {old} to {vocab_size} tokens")
    embed = model.model.embed_tokens
    new_embed = nn.Embedding(vocab_size, embed.embedding_dim, device=embed.weight.device, dtype=embed.weight.dtype)
    with torch.no_grad():
        new_embed.weight.copy_(_grown(embed.weight, vocab_size))
    new_embed.weight.requires_grad_(embed.weight.requires_grad)
    model.model.embed_tokens = new_embed
    head = model.lm_head
    if model.config.tie_embeddings:
        new_head = nn.Linear(head.in_features, vocab_size, bias=False, device=head.weight.device,
                             dtype=head.weight.dtype)
        new_head.weight = new_embed.weight  # one parameter, as Transformer.__init__ ties them
    else:
        if head.bias is not None:
            raise LmforgeError("resizing an LM head with a bias is not supported")
        new_head = nn.Linear(head.in_features, vocab_size, bias=False, device=head.weight.device,
                             dtype=head.weight.dtype)
        with torch.no_grad():
            new_head.weight.copy_(_grown(head.weight, vocab_size))
        new_head.weight.requires_grad_(head.weight.requires_grad)
    model.lm_head = new_head
    model.config.vocab_size = vocab_size
    return model


__all__ = ["resize_token_embeddings"]
