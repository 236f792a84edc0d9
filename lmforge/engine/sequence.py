"""What a request asks for (``SamplingParams``) and where one of its samples stands (``Sequence``)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch
from torch import Tensor

from lmforge.errors import LmforgeError
from lmforge.models.steering import Steering
from lmforge.models.thinking import DEFAULT_DELIMITERS, DEFAULT_EXTENSION, ThinkingState, check_budget_numbers


@dataclass
class SamplingParams:
    """Decoding settings of one request. ``temperature == 0`` is greedy (then top_*/min_p/seed are moot).

    Penalties follow the usual definitions: ``repetition_penalty`` (CTRL / HF) divides positive logits and
    multiplies negative ones of every token seen in prompt or output; ``frequency_penalty`` and
    ``presence_penalty`` (OpenAI) subtract ``f * count + p * (count > 0)`` over output tokens only.
    ``logprobs``: None for none, 0 for the chosen token's log-probability, k > 0 for the top-k as well
    (log-probabilities of the model's raw distribution, before penalties and temperature).
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None  # sample i of the request uses seed + i
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    max_tokens: int = 16
    n: int = 1
    logprobs: int | None = None
    # structured output (at most one): a JSON schema (dict or JSON text), any JSON object, or a regex
    json_schema: dict | str | None = None
    json_object: bool = False
    regex: str | None = None
    # a steering vector at a scale, added to the residual stream of this request only (see model_runner)
    steering: Steering | None = None
    # budget forcing (s1; lmforge.models.thinking): thinking between the delimiters (tokens of the tokenizer)
    # is closed after max_thinking_tokens (then answer_prefix), and below min_thinking_tokens an end delimiter
    # is replaced by thinking_extension. Counted in tokens.
    max_thinking_tokens: int | None = None
    min_thinking_tokens: int = 0
    thinking_delimiters: tuple[str, str] = DEFAULT_DELIMITERS
    thinking_extension: str = DEFAULT_EXTENSION
    answer_prefix: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if isinstance(self.thinking_delimiters, list):  # JSON and argparse give lists; keep it hashable
            self.thinking_delimiters = tuple(self.thinking_delimiters)

    def validate(self) -> "SamplingParams":
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise LmforgeError(msg)

        need(self.temperature >= 0.0, f"temperature must be >= 0, got {self.temperature}")
        need(0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1], got {self.top_p}")
        need(self.top_k == -1 or self.top_k >= 0, f"top_k must be -1, 0 (off) or positive, got {self.top_k}")
        need(0.0 <= self.min_p <= 1.0, f"min_p must be in [0, 1], got {self.min_p}")
        need(self.repetition_penalty > 0.0, f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        need(-2.0 <= self.frequency_penalty <= 2.0,
             f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}")
        need(-2.0 <= self.presence_penalty <= 2.0, f"presence_penalty must be in [-2, 2], got {self.presence_penalty}")
        need(isinstance(self.max_tokens, int) and self.max_tokens >= 1,
             f"max_tokens must be >= 1, got {self.max_tokens}")
        need(isinstance(self.n, int) and self.n >= 1, f"n must be >= 1, got {self.n}")
        need(self.logprobs is None or (isinstance(self.logprobs, int) and self.logprobs >= 0),
             f"logprobs must be None or >= 0, got {self.logprobs}")
        need(all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty strings")
        need(all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids), "stop_token_ids must be token ids (>= 0)")
        need(self.seed is None or isinstance(self.seed, int), f"seed must be an int, got {self.seed!r}")
        # torch generators take seeds in [-2**63, 2**64 - 1]; sample i uses seed + i.
        need(self.seed is None or -2**63 <= self.seed <= 2**64 - self.n,
             f"seed must be in [-2**63, 2**64 - n], got {self.seed}")
        need(sum(x is not None and x is not False for x in (self.json_schema, self.json_object or None, self.regex)) <= 1,
             "use at most one of json_schema, json_object and regex")
        need(self.steering is None or isinstance(self.steering, Steering),
             f"steering must be a lmforge.models.steering.Steering, got {type(self.steering).__name__}")
        if self.thinking_budgeted:
            check_budget_numbers(self.min_thinking_tokens, self.max_thinking_tokens, self.max_tokens)
            delims = self.thinking_delimiters
            need(isinstance(delims, tuple) and len(delims) == 2 and all(isinstance(d, str) and d for d in delims)
                 and delims[0] != delims[1],
                 f"thinking_delimiters must be two different non-empty strings (start, end), got {delims!r}")
            need(isinstance(self.thinking_extension, str) and (self.thinking_extension or not self.min_thinking_tokens),
                 f"thinking_extension must be a non-empty string, got {self.thinking_extension!r}")
            need(self.answer_prefix is None or (isinstance(self.answer_prefix, str) and self.answer_prefix != ""),
                 f"answer_prefix must be None or a non-empty string, got {self.answer_prefix!r}")
            # A grammar constrains every output token; forced delimiters and extensions would break it.
            need(self.grammar is None, "budget forcing (max/min_thinking_tokens) cannot be combined with "
                                       "structured output (json_schema, json_object, regex)")
        return self

    @property
    def thinking_budgeted(self) -> bool:
        """Whether this request asks for budget forcing."""
        return self.max_thinking_tokens is not None or bool(self.min_thinking_tokens)

    @property
    def grammar(self) -> tuple[str, object] | None:
        """(kind, source) of the output constraint, or None."""
        if self.json_schema is not None:
            return "json_schema", self.json_schema
        if self.regex is not None:
            return "regex", self.regex
        if self.json_object:
            return "json", None
        return None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    """One sample of a request: its tokens, KV blocks, and how many of its tokens have KV computed.

    ``num_computed_tokens`` counts tokens whose keys/values are in the cache (prefix-cache hits included);
    the tokens after it are fed to the model next. A decode step feeds the last sampled token, or with budget
    forcing also the tokens forced after it (one short chunk).
    """

    def __init__(self, seq_id: int, request_id: str, index: int, prompt_ids: list[int],
                 params: SamplingParams, device: torch.device | str = "cpu") -> None:
        self.seq_id, self.request_id, self.index = seq_id, request_id, index
        self.prompt_ids = list(prompt_ids)
        # Equal prompts (n samples, repeats) share KV blocks. A steered request's KV differs from an unsteered
        # (or otherwise steered) one's, so its steering key salts the prompt key and the prefix-cache block
        # hashes (BlockManager): only requests with the same intervention share blocks.
        steering = params.steering
        self.cache_salt: str | None = steering.key if steering is not None and not steering.is_noop else None
        self.prompt_key = self._salted_prompt_key()  # stored: the scheduler reads it every step
        self.output_ids: list[int] = []
        # LLaVA-style images: the prompt positions of the image tokens and their features [k, hidden] (set_images)
        self.image_positions: Tensor | None = None
        self.image_embeds: Tensor | None = None
        self.params = params
        self.status = SequenceStatus.WAITING
        self.finish_reason: str | None = None  # "stop" | "length" | "abort"
        self.block_table: list[int] = []
        self.block_hashes: list[int] = []  # chain hashes of the leading full, computed blocks
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0  # prompt tokens served from the prefix cache (stats)
        self.num_preemptions = 0
        self.num_draft_computed = 0  # speculative decoding: tokens whose draft-model KV is in the draft pool
        self.logprobs: list[float] = []
        self.top_logprobs: list[dict[int, float]] = []
        self.text = ""  # decoded output, stop string trimmed (when a tokenizer is known)
        self.detokenizer = None  # lmforge.data.tokenizer.IncrementalDecoder: grows ``text`` token by token
        self.sent_tokens = 0  # streaming: tokens / characters already reported
        self.sent_chars = 0
        self.generator: torch.Generator | None = None
        self.constraint = None  # structured output: lmforge.engine.structured.Constraint
        self.thinking: ThinkingState | None = None  # budget forcing: set by the engine from the request's budget
        if params.seed is not None:
            self.generator = torch.Generator(device=device).manual_seed(params.seed + index)

    def set_images(self, positions: Tensor, embeds: Tensor, key: str) -> None:
        """The prompt's image features: ``embeds`` [k, hidden] at prompt ``positions`` [k]. ``key`` (a hash of
        the pixels) salts the prefix-cache hashes and the prompt key: equal images and text share KV blocks,
        different images never do (nor their text blocks before the image: a coarser key than vLLM's per block)."""
        self.image_positions, self.image_embeds = positions, embeds
        self.cache_salt = f"{self.cache_salt or ''}|image:{key}"
        self.prompt_key = self._salted_prompt_key()

    def _salted_prompt_key(self) -> int:
        prompt = tuple(self.prompt_ids)
        return hash((self.cache_salt, prompt) if self.cache_salt else prompt)

    def image_rows(self, start: int, n: int) -> tuple[Tensor, Tensor] | None:
        """(offsets in [0, n), features) of the image tokens among positions [start, start + n); None if none."""
        if self.image_positions is None:
            return None
        inside = (self.image_positions >= start) & (self.image_positions < start + n)
        if not bool(inside.any()):
            return None
        return self.image_positions[inside] - start, self.image_embeds[inside]

    @property
    def tokens(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def __repr__(self) -> str:
        return (f"Sequence(id={self.seq_id}, {self.status.value}, prompt={len(self.prompt_ids)}, "
                f"out={len(self.output_ids)}, computed={self.num_computed_tokens}, blocks={self.block_table})")
