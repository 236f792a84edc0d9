"""The generation engine: paged KV cache, continuous batching, chunked prefill, prefix caching, speculative
decoding, structured output. The OpenAI server (``lmforge.serve``), evaluation, rejection sampling and RL
rollouts all generate through it."""

from lmforge.engine.engine import CompletionOutput, Engine, RequestOutput
from lmforge.engine.sequence import SamplingParams

__all__ = ["CompletionOutput", "Engine", "RequestOutput", "SamplingParams"]
