"""The one batched completion call every offline generator uses: the quickstarts' accuracy, eval's generative
tasks, rejection sampling and GRPO/PPO rollouts.

    outs = complete(model, [prompt_ids, ...], SamplingParams(n=8, temperature=1.0, max_tokens=64, seed=0),
                    tokenizer=tokenizer)
    outs[i][j].token_ids, outs[i][j].text, outs[i][j].finish_reason   # prompt i, sample j

It runs a fresh paged ``Engine`` over the model as it is now (so weights updated between calls are used, and
no prefix cache outlives them): continuous batching across prompts, and the n samples of a prompt share its
KV blocks through the prefix cache.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from lmforge.engine.engine import CPU_KV_CACHE_BYTES, CompletionOutput, Engine
from lmforge.engine.model_runner import ModelRunner
from lmforge.engine.sequence import SamplingParams
from lmforge.errors import LmforgeError
from lmforge.models.model import Transformer

BLOCK_SIZE = 16


def complete(model: Transformer, prompts: Sequence[Sequence[int]], params: SamplingParams, tokenizer: Any = None,
             max_num_seqs: int = 256, max_num_batched_tokens: int = 2048,
             kv_cache_bytes: int = CPU_KV_CACHE_BYTES) -> list[list[CompletionOutput]]:
    """``params.n`` completions of each prompt (token ids), in prompt order.

    Stops at the tokenizer's end-of-sequence ids (or the config's without a tokenizer), ``stop`` strings and
    ``stop_token_ids``; ``token_ids`` keep a stop token. ``params.seed``: prompt i's sample j uses
    ``seed + i * n + j``, so a seeded call is reproducible whatever the batching. Leaves the model in the
    train/eval mode it had.
    """
    if not prompts:
        return []
    params.validate()
    if any(not p for p in prompts):
        raise LmforgeError("every prompt needs at least one token")
    # A KV pool no larger than this call can use (prefix sharing needs fewer), capped by ``kv_cache_bytes``.
    blocks = sum(params.n * -(-(len(p) + params.max_tokens) // BLOCK_SIZE) for p in prompts)
    per_block = ModelRunner.bytes_per_block(model, BLOCK_SIZE)
    num_blocks = max(1, min(blocks, kv_cache_bytes // per_block))
    was_training = model.training
    try:
        engine = Engine(model, tokenizer, block_size=BLOCK_SIZE, num_blocks=num_blocks, max_num_seqs=max_num_seqs,
                        max_num_batched_tokens=max_num_batched_tokens)
        per_prompt = [params if params.seed is None else dataclasses.replace(params, seed=params.seed + i * params.n)
                      for i in range(len(prompts))]
        outs = engine.generate([list(p) for p in prompts], per_prompt)
    finally:
        model.train(was_training)
    return [o.outputs for o in outs]
