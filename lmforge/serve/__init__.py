"""Serving: the OpenAI-compatible HTTP server over ``lmforge.engine`` (re-exported here for convenience)."""

from lmforge.engine import CompletionOutput, Engine, RequestOutput, SamplingParams

__all__ = ["CompletionOutput", "Engine", "RequestOutput", "SamplingParams"]
