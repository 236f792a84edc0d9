"""Autoregressive decoding with the static KV cache: greedy and sampled (temperature, top-k, top-p)."""

from __future__ import annotations

import weakref
from typing import Callable, Iterator

import torch
from torch import Tensor

from lmforge.models.model import Transformer


def sample_next(logits: Tensor, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                generator: torch.Generator | None = None) -> Tensor:
    """Pick next tokens from logits [B, V]: argmax when temperature == 0, else sample."""
    if temperature <= 0.0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0.0 < top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token when the tokens ranked above it already reach top_p (the top one always stays).
        drop_sorted = (cum - sorted_logits.softmax(-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


_COMPILED: "weakref.WeakKeyDictionary[Transformer, Callable]" = weakref.WeakKeyDictionary()
COMPILE_BUCKET = 256  # compiled decoding rounds the cache length up to this, so few lengths get traced


def compiled_decode_core(model: Transformer) -> Callable:
    """``model._decode_core`` under ``torch.compile`` (Inductor, no CUDA graphs), built once per model."""
    if model not in _COMPILED:
        _COMPILED[model] = torch.compile(model._decode_core, dynamic=False)
    return _COMPILED[model]


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Token-id lists -> ``(input_ids, attention_mask)`` [B, T], padded on the left as generation expects."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[row, width - len(p):] = 1
    return ids, mask


@torch.inference_mode()
def generate_stream(model: Transformer, input_ids: Tensor, attention_mask: Tensor | None = None,
                    max_new_tokens: int = 32, temperature: float = 0.0, top_k: int | None = None,
                    top_p: float | None = None, eos_ids: set[int] | list[int] | None = None,
                    seed: int | None = None, compile: bool = False) -> Iterator[Tensor]:
    """Yield the next token of every row ([B] tensor) per step; stops when all rows hit EOS.

    Rows that finished keep yielding their EOS id so shapes stay rectangular.
    ``input_ids`` [B, T] is left-padded where ``attention_mask`` is 0.
    ``compile``: run the one-token decode step through ``torch.compile`` (the first call per model and cache
    size pays the compilation; the prompt itself runs eagerly).
    """
    b, t = input_ids.shape
    device = model.device
    input_ids = input_ids.to(device)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    attention_mask = attention_mask.to(device)
    limit = model.config.max_position_embeddings
    if model.config.position_embedding == "learned" and t + max_new_tokens > limit:
        raise ValueError(f"prompt ({t}) + max_new_tokens ({max_new_tokens}) exceeds the context length {limit}")
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    eos = torch.tensor(sorted(eos_ids or []), device=device, dtype=torch.long)
    done = torch.zeros(b, dtype=torch.bool, device=device)
    cache_len = t + max_new_tokens
    core = None
    if compile:
        cache_len = -(-cache_len // COMPILE_BUCKET) * COMPILE_BUCKET
        core = compiled_decode_core(model)
    cache = model.new_cache(b, cache_len)
    logits = model(input_ids, attention_mask, cache=cache, logits_to_keep=1)[:, -1]
    for step in range(max_new_tokens):
        token = sample_next(logits, temperature, top_k, top_p, generator)
        if eos.numel():
            token = torch.where(done, eos[0], token)
            done |= torch.isin(token, eos)
        yield token
        if bool(done.all()) or step == max_new_tokens - 1:
            return
        logits = model.decode_step(token, cache, core)


def generate(model: Transformer, input_ids: Tensor, attention_mask: Tensor | None = None, **kwargs) -> Tensor:
    """New tokens [B, N] (N <= max_new_tokens); see ``generate_stream`` for the arguments."""
    steps = list(generate_stream(model, input_ids, attention_mask, **kwargs))
    if not steps:
        return torch.empty(input_ids.shape[0], 0, dtype=torch.long)
    return torch.stack(steps, dim=1).cpu()
