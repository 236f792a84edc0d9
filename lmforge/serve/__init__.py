"""Serving: paged KV cache, continuous batching, chunked prefill, prefix caching."""

from lmforge.serve.engine import CompletionOutput, Engine, RequestOutput
from lmforge.serve.sequence import SamplingParams

__all__ = ["CompletionOutput", "Engine", "RequestOutput", "SamplingParams"]
