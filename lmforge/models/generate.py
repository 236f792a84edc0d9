"""Autoregressive decoding with the static KV cache: greedy and sampled (temperature, top-k, top-p)."""

from __future__ import annotations

import weakref
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch
from torch import Tensor

from lmforge.errors import LmforgeError
from lmforge.models.llava import text_decoder
from lmforge.models.model import Hook, Transformer
from lmforge.models.sampling import sampling_probs
from lmforge.models.steering import Steering
from lmforge.models.thinking import ThinkingBudget, check_budget_numbers


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
                    seed: int | None = None, compile: bool = False,
                    hooks: Mapping[str, Hook | Sequence[Hook]] | None = None,
                    steering: Steering | None = None,
                    thinking_budget: ThinkingBudget | None = None,
                    pixel_values: Tensor | None = None, aspect_ratio_ids: Tensor | None = None,
                    aspect_ratio_mask: Tensor | None = None,
                    cross_attention_mask: Tensor | None = None) -> Iterator[Tensor]:
    """Yield the next token of every row ([B] tensor) per step; stops when all rows hit EOS.

    ``eos_ids``: the ids that end a row; None (the default) means the model's own end-of-sequence and
    end-of-turn ids (``default_eos_ids``), an empty list or tuple means none (always ``max_new_tokens``).
    Rows that finished keep yielding their EOS id so shapes stay rectangular.
    ``input_ids`` [B, T] is left-padded where ``attention_mask`` is 0.
    ``compile``: run the one-token decode step through ``torch.compile`` (the first call per model and cache
    size pays the compilation; the prompt itself runs eagerly).
    ``hooks``: forward hooks (``Transformer.forward``) run on the prompt and on every decode step.
    ``steering``: a ``Steering`` (vector and scale) added at its layers' ``hook_resid_post`` on every token,
    prompt included; it is checked against the model's width first.
    ``thinking_budget``: budget forcing (``lmforge.models.thinking``; ``ThinkingBudget.from_tokenizer``): each
    row's thinking is closed at the cap and extended below the minimum; forced tokens replace the sampled ones,
    one per step, exactly as the engine appends them.
    ``pixel_values``: a LLaVA's images (``lmforge.data.image_processor.load_processor``), spliced into the prompt
    at its image placeholders for the prefill; the language model then decodes from its KV cache as for text.
    A Mllama (Llama 3.2 Vision) takes its processor's ``aspect_ratio_ids``, ``aspect_ratio_mask`` and
    ``cross_attention_mask`` too: the prefill computes the image keys/values of its cross-attention layers once,
    the KV cache keeps them, and each new token sees the images as the prompt's last token does.
    """
    multimodal = model
    model = text_decoder(model, pixel_values)  # the Transformer that decodes (a LLaVA's language model)
    hooks = _merge_hooks(model, hooks, steering)
    if compile and hooks:
        # The compiled step is traced with the hook closures inlined and guarded on their identity, so every
        # call with new hooks would recompile (and past the cache limit silently run eagerly).
        raise LmforgeError("generate(compile=True) cannot run hooks or steering: the compiled decode step is "
                           "traced without them; pass compile=False")
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
        eos_ids = default_eos_ids(multimodal)  # a LLaVA keeps its generation_config.json, not its decoder
    eos = torch.tensor(list(dict.fromkeys(int(i) for i in eos_ids)), device=device, dtype=torch.long)
    done = torch.zeros(b, dtype=torch.bool, device=device)
    budget = _RowBudgets(thinking_budget, input_ids, attention_mask, model.config.vocab_size, max_new_tokens) \
        if thinking_budget is not None else None
    cache_len = t + max_new_tokens
    compiled = None
    if compile:
        cache_len = -(-cache_len // COMPILE_BUCKET) * COMPILE_BUCKET
        compiled = compiled_forward(model)
    cache = model.new_cache(b, cache_len)
    if multimodal is model:
        logits = model(input_ids, attention_mask, cache=cache, logits_to_keep=1, hooks=hooks)[:, -1]
    else:  # the vision-language model's own forward on the prompt and images; every later token is a plain id
        image_inputs = {name: value for name, value in (("aspect_ratio_ids", aspect_ratio_ids),
                                                        ("aspect_ratio_mask", aspect_ratio_mask),
                                                        ("cross_attention_mask", cross_attention_mask))
                        if value is not None}
        logits = multimodal(input_ids, attention_mask, pixel_values=pixel_values, cache=cache, logits_to_keep=1,
                            hooks=hooks, **image_inputs)[:, -1]
    for step in range(max_new_tokens):
        token = sample_next(logits, temperature, top_k, top_p, generator)
        if budget is not None:
            token = budget.step(token, done)
        if eos.numel():
            token = torch.where(done, eos[0], token)
            done |= torch.isin(token, eos)
        yield token
        if bool(done.all()) or step == max_new_tokens - 1:
            return
        if hooks:  # decode_step's one-token SlotStep, with the hooks passed through
            step_kv = cache.begin_slot(b, model.attention_windows)
            logits = model(token[:, None], cache=step_kv, hooks=hooks)[:, -1]
        else:
            logits = model.decode_step(token, cache, compiled)


class _RowBudgets:
    """Budget forcing for a batch: one ``ThinkingState`` per row, and per row the forced tokens still to come
    (they are fed one per step, so the static cache stays one token per step)."""

    def __init__(self, budget: ThinkingBudget, input_ids: Tensor, attention_mask: Tensor, vocab_size: int,
                 max_new_tokens: int) -> None:
        if not isinstance(budget, ThinkingBudget):
            raise LmforgeError(f"thinking_budget must be a lmforge.models.thinking.ThinkingBudget, got "
                               f"{type(budget).__name__}")
        check_budget_numbers(budget.min_tokens, budget.max_tokens, max_new_tokens, "max_new_tokens")
        outside = sorted(t for t in budget.token_ids if t >= vocab_size)
        if outside:
            raise LmforgeError(f"the thinking budget uses token ids {outside}, outside the model's vocabulary of "
                               f"{vocab_size}")
        rows = [ids[mask.bool()].tolist() for ids, mask in zip(input_ids.cpu(), attention_mask.cpu())]
        self.states = [budget.start(row) for row in rows]  # left padding is not part of a row's prompt
        self.pending: list[list[int]] = [[] for _ in rows]

    def step(self, token: Tensor, done: Tensor) -> Tensor:
        """This step's tokens [B]: the sampled ones, or what the budget puts in their place."""
        chosen, finished = token.tolist(), done.tolist()
        for row, state in enumerate(self.states):
            if finished[row]:
                continue
            if not self.pending[row]:
                self.pending[row] = state.advance(chosen[row])
            chosen[row] = self.pending[row].pop(0)
        return torch.tensor(chosen, device=token.device, dtype=token.dtype)


def _merge_hooks(model: Transformer, hooks: Mapping[str, Hook | Sequence[Hook]] | None,
                 steering: Steering | None) -> dict[str, list[Hook]] | None:
    """One hooks mapping: the caller's first, then the steering additions (a no-op scale adds nothing)."""
    merged: dict[str, list[Hook]] = {}
    for name, fns in (hooks or {}).items():
        merged[name] = list(fns) if isinstance(fns, (list, tuple)) else [fns]
    if steering is not None:
        if not isinstance(steering, Steering):
            raise LmforgeError(f"steering must be a lmforge.models.steering.Steering, got {type(steering).__name__}")
        steering.vector.check(model)
        if not steering.is_noop:
            for name, fn in steering.hooks().items():
                merged.setdefault(name, []).append(fn)
    model.check_hook_names(merged)  # a misspelt name would otherwise be silently never called
    return merged or None


def generate(model: Transformer, input_ids: Tensor, attention_mask: Tensor | None = None, **kwargs) -> Tensor:
    """New tokens [B, N] (N <= max_new_tokens); see ``generate_stream`` for the arguments."""
    steps = list(generate_stream(model, input_ids, attention_mask, **kwargs))
    if not steps:
        return torch.empty(input_ids.shape[0], 0, dtype=torch.long)
    return torch.stack(steps, dim=1).cpu()
