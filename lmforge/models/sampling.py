"""The one set of sampling filters: ``generate``, speculative decoding and the engine's batched sampler all
turn logits into the distribution they sample from here."""

from __future__ import annotations

import torch
from torch import Tensor


def filter_logits(logits: Tensor, top_k: Tensor | int = 0, top_p: Tensor | float = 1.0,
                  min_p: Tensor | float = 0.0) -> Tensor:
    """Set to -inf what top-k (k, 0 = off), top-p and min-p (relative to the top token's probability) drop,
    in that order, from ``logits`` [B, V]. Each setting is one number or one per row ([B]). The most likely
    token always survives."""
    b, v = logits.shape
    top_k, top_p, min_p = (torch.as_tensor(x, device=logits.device).expand(b) for x in (top_k, top_p, min_p))
    sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
    rank = torch.arange(v, device=logits.device)[None]
    drop = rank >= torch.where(top_k > 0, top_k, v)[:, None]
    probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(-1)
    # top-p over what top-k kept: drop a token once the tokens ranked above it reach p.
    drop |= (probs.cumsum(-1) - probs) >= top_p[:, None].to(probs.dtype)
    drop |= probs < min_p[:, None].to(probs.dtype) * probs[:, :1]
    drop[:, 0] = False
    return logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))


def sampling_probs(logits: Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0,
                   min_p: float = 0.0) -> Tensor:
    """Probabilities [B, V] that one setting samples from (one-hot on the argmax when temperature == 0)."""
    logits = logits.float().reshape(-1, logits.shape[-1])
    if temperature <= 0.0:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    x = logits / temperature
    if top_k > 0 or top_p < 1.0 or min_p > 0.0:
        x = filter_logits(x, top_k, top_p, min_p)
    return x.softmax(-1)
