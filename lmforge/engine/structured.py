"""Structured output: JSON-schema, JSON and regex constrained decoding through xgrammar.

xgrammar compiles the grammar against the tokenizer's vocabulary once; per sequence a matcher tracks the
grammar state and fills a token bitmask before each sample, so only tokens that keep the output valid can
be drawn. Compiled grammars are cached by their source (a bounded LRU), so many requests with one schema
compile once. Object properties come out in the order the schema declares them.

Compiling can take long (it grows faster than linearly with, e.g., a schema's enum size), so it runs on
this backend's own worker thread(s): ``compile_async`` returns a future that a server awaits with a time
limit, keeping the engine's thread free; one schema being compiled for many requests is compiled once.
xgrammar releases the GIL while it compiles, so a compile does not stall Python threads either.
"""

from __future__ import annotations

import collections
import json
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from lmforge.errors import LmforgeError

GRAMMAR_CACHE_SIZE = 64  # compiled grammars kept (least recently used dropped first)


def _xgrammar():
    try:
        import xgrammar
    except ImportError:
        raise LmforgeError("structured output needs the xgrammar package: pip install xgrammar") from None
    return xgrammar


def grammar_key(kind: str, source: Any) -> tuple[str, str]:
    """(kind, source text): the cache key of a grammar. A JSON schema given as a dict is serialised keeping
    its declared key order (xgrammar emits properties in that order, as OpenAI does; sorting would reorder
    the output) and must be JSON."""
    if kind == "json_schema":
        if isinstance(source, dict):
            source = json.dumps(source, separators=(",", ":"))
        try:
            json.loads(source)
        except (TypeError, json.JSONDecodeError) as e:
            raise LmforgeError(f"invalid json schema: not JSON ({e})") from None
    return kind, str(source or "")


class GrammarBackend:
    """Compiles grammars for one tokenizer and model vocabulary (the model's may be padded beyond it)."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: list[int], cache_size: int = GRAMMAR_CACHE_SIZE,
                 workers: int = 1) -> None:
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
        # xgrammar's own cache is unbounded; ours (below) is an LRU of cache_size grammars.
        self.compiler = xgr.GrammarCompiler(info, cache_enabled=False)
        self.cache_size = cache_size
        self._cache: collections.OrderedDict[tuple[str, str], Any] = collections.OrderedDict()
        self._pending: dict[tuple[str, str], Future] = {}
        self._lock = threading.Lock()
        # Bounded: costly schemas queue here instead of taking every core. A compile cannot be interrupted,
        # so callers bound the schema's size; a compile that outlives its request still fills the cache.
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="lmforge-grammar")

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

    def _compile_and_store(self, key: tuple[str, str]):
        compiled = self._compile_uncached(*key)
        with self._lock:
            self._cache[key] = compiled
            self._cache.move_to_end(key)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return compiled

    def cached(self, kind: str, source: Any):
        """The compiled grammar if it is in the cache, else None."""
        key = grammar_key(kind, source)
        with self._lock:
            compiled = self._cache.get(key)
            if compiled is not None:
                self._cache.move_to_end(key)
            return compiled

    def compile_async(self, kind: str, source: Any) -> Future:
        """A future of the compiled grammar, compiled on this backend's worker thread (or at once from the
        cache). Requests for a grammar already being compiled share that compile."""
        key = grammar_key(kind, source)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                done: Future = Future()
                done.set_result(self._cache[key])
                return done
            future = self._pending.get(key)
            if future is None:
                future = self._pool.submit(self._compile_and_store, key)
                self._pending[key] = future
                future.add_done_callback(lambda _f, key=key: self._forget(key))
            return future

    def _forget(self, key: tuple[str, str]) -> None:
        with self._lock:
            self._pending.pop(key, None)

    def compile(self, kind: str, source: Any):
        """The compiled grammar (cached), compiling it now if needed: blocks until it is done."""
        return self.compile_async(kind, source).result()

    def constraint(self, kind: str, source: Any = None, compiled: Any = None) -> Constraint:
        """A fresh grammar state for one sequence; ``compiled`` skips the compile (see ``compile_async``)."""
        return Constraint(compiled if compiled is not None else self.compile(kind, source), self.vocab_size,
                          self.stop_token)


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
