"""Autoregressive decoding with the static KV cache: greedy and sampled (temperature, top-k, top-p)."""

from __future__ import annotations

import weakref
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import Tensor

from lmforge.models.model import Transformer
from lmforge.models.sampling import sampling_probs


def sample_next(logits: Tensor, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                generator: torch.Generator | None = None) -> Tensor:
    """Pick next tokens from logits [B, V]: argmax when temperature == 0, else sample."""
    if temperature <= 0.0:
        return logits.argmax(-1)
    probs = sampling_probs(logits, temperature, top_k or 0, 1.0 if top_p is None else top_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def token_id_list(value: Any) -> list[int]:
    """An ``eos_token_id`` field (an int, a list of ints, or null) as a list."""
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, (list, tuple)):
        return [i for i in value if isinstance(i, int) and not isinstance(i, bool)]
    return []


def default_eos_ids(model: Transformer) -> list[int]:
    """The ids that end a reply by default: ``eos_token_id`` of the checkpoint's ``generation_config.json``
    (often a list with the end-of-turn token, e.g. ``<|im_end|>`` or ``<|eot_id|>``; ``load_model`` keeps
    it as ``model.generation_config``) followed by ``config.json``'s, without repeats."""
    generation_config = getattr(model, "generation_config", None) or {}
    found = token_id_list(generation_config.get("eos_token_id")) + token_id_list(model.config.eos_token_id)
    return [i for i in dict.fromkeys(found) if 0 <= i < model.config.vocab_size]


_COMPILED: "weakref.WeakKeyDictionary[Transformer, Callable]" = weakref.WeakKeyDictionary()
COMPILE_BUCKET = 256  # compiled decoding rounds the cache length up to this, so few lengths get traced


def compiled_forward(model: Transformer) -> Callable:
    """``model.forward`` under ``torch.compile`` (Inductor, no CUDA graphs) for ``decode_step``, built once per
    model: the one-token step has fixed shapes, so it is traced once per cache size."""
    if model not in _COMPILED:
        _COMPILED[model] = torch.compile(model.forward, dynamic=False)
    return _COMPILED[model]


@torch.inference_mode()
def generate_stream(model: Transformer, input_ids: Tensor, attention_mask: Tensor | None = None,
                    max_new_tokens: int = 32, temperature: float = 0.0, top_k: int | None = None,
                    top_p: float | None = None, eos_ids: Iterable[int] | None = None,
                    seed: int | None = None, compile: bool = False) -> Iterator[Tensor]:
    """Yield the next token of every row ([B] tensor) per step; stops when all rows hit EOS.

    ``eos_ids``: the ids that end a row; None (the default) means the model's own end-of-sequence and
    end-of-turn ids (``default_eos_ids``), an empty list or tuple means none (always ``max_new_tokens``).
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
    if eos_ids is None:
        eos_ids = default_eos_ids(model)
    eos = torch.tensor(list(dict.fromkeys(int(i) for i in eos_ids)), device=device, dtype=torch.long)
    done = torch.zeros(b, dtype=torch.bool, device=device)
    cache_len = t + max_new_tokens
    compiled = None
    if compile:
        cache_len = -(-cache_len // COMPILE_BUCKET) * COMPILE_BUCKET
        compiled = compiled_forward(model)
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
        logits = model.decode_step(token, cache, compiled)


def generate(model: Transformer, input_ids: Tensor, attention_mask: Tensor | None = None, **kwargs) -> Tensor:
    """New tokens [B, N] (N <= max_new_tokens); see ``generate_stream`` for the arguments."""
    steps = list(generate_stream(model, input_ids, attention_mask, **kwargs))
    if not steps:
        return torch.empty(input_ids.shape[0], 0, dtype=torch.long)
    return torch.stack(steps, dim=1).cpu()
