"""Structured output: JSON-schema, JSON and regex constrained decoding through xgrammar.

xgrammar compiles the grammar against the tokenizer's vocabulary once; per sequence a matcher tracks the
grammar state and fills a token bitmask before each sample, so only tokens that keep the output valid can
be drawn. Compiled grammars are cached by their source, so many requests with one schema compile once.
Object properties come out in the order the schema declares them.
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

import torch

from lmforge.errors import LmforgeError


def _xgrammar():
    try:
        import xgrammar
    except ImportError:
        raise LmforgeError("structured output needs the xgrammar package: pip install xgrammar") from None
    return xgrammar


class GrammarBackend:
    """Compiles grammars for one tokenizer and model vocabulary (the model's may be padded beyond it)."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: list[int]) -> None:
        xgr = _xgrammar()
        backend = tokenizer.backend
        vocab = [""] * vocab_size
        for token, idx in backend.get_vocab(with_added_tokens=True).items():
            if idx < vocab_size:
                vocab[idx] = token
        # xgrammar reads the vocabulary's encoding (byte-level, byte-fallback, raw) from tokenizer.json.
        detected = xgr.TokenizerInfo._detect_metadata_from_hf(backend.to_str())
        info = xgr.TokenizerInfo(vocab, detected["vocab_type"], vocab_size=vocab_size,
                                 stop_token_ids=sorted(stop_token_ids), add_prefix_space=detected["add_prefix_space"])
        self.vocab_size = vocab_size
        self.stop_token = min(stop_token_ids) if stop_token_ids else None
        self.compiler = xgr.GrammarCompiler(info)
        self._compile = lru_cache(maxsize=64)(self._compile_uncached)

    def _compile_uncached(self, kind: str, source: str):
        try:
            # Compact JSON (no free whitespace): small models otherwise pad it with whitespace until max_tokens.
            if kind == "json_schema":
                return self.compiler.compile_json_schema(source, any_whitespace=False)
            if kind == "regex":
                return self.compiler.compile_regex(source)
            return self.compiler.compile_json_schema('{"type": "object"}', any_whitespace=False)
        except Exception as e:  # xgrammar reports bad schemas/regexes with several exception types
            raise LmforgeError(f"invalid {kind.replace('_', ' ')}: {e}") from None

    def constraint(self, kind: str, source: Any) -> "Constraint":
        if kind == "json_schema":
            if isinstance(source, dict):
                # Keep the declared key order: xgrammar emits properties in the order the schema lists them
                # (as OpenAI does), so sorting here would reorder the output. The text is also the cache key.
                source = json.dumps(source, separators=(",", ":"))
            try:
                json.loads(source)
            except (TypeError, json.JSONDecodeError) as e:
                raise LmforgeError(f"invalid json schema: not JSON ({e})") from None
        return Constraint(self._compile(kind, str(source or "")), self.vocab_size, self.stop_token)


class Constraint:
    """The grammar state of one sequence."""

    def __init__(self, compiled, vocab_size: int, stop_token: int | None = None) -> None:
        xgr = _xgrammar()
        self.matcher = xgr.GrammarMatcher(compiled)
        self.bitmask = xgr.allocate_token_bitmask(1, vocab_size)
        self._apply = xgr.apply_token_bitmask_inplace
        self.stop_token = stop_token
        self.dead_end = False  # the grammar admits no token of this vocabulary: the sequence is ended

    def mask_(self, logits_row: torch.Tensor) -> None:
        """Set the logits of tokens the grammar forbids to -inf (in place)."""
        self.matcher.fill_next_token_bitmask(self.bitmask)
        row = logits_row.view(1, -1)
        self._apply(row, self.bitmask.to(row.device))
        if not torch.isfinite(row).any():
            # No token can continue the grammar (e.g. a schema whose strings this vocabulary cannot spell):
            # end this sequence with its stop token rather than sampling garbage or failing the whole batch.
            self.dead_end = True
            if self.stop_token is not None:
                row[0, self.stop_token] = 0.0

    def accept(self, token: int) -> None:
        if self.dead_end or not self.matcher.accept_token(token):
            self.dead_end = True

    @property
    def done(self) -> bool:
        return self.dead_end or self.matcher.is_terminated()
