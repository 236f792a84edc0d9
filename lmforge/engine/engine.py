"""The serving engine: requests in, tokens out, many requests sharing every forward pass.

    engine = Engine("path/to/model", max_num_seqs=32)
    outs = engine.generate(["Hello", "Once upon a time"], SamplingParams(temperature=0, max_tokens=32))

With ``draft_model=`` (same vocabulary, smaller) every step also speculates: see ``speculative.py``.

A server drives ``add_request`` / ``step`` / ``abort`` itself (one driver: ``step`` hands each output to
its caller only once); ``stream`` is the one-request version of that loop.
"""

from __future__ import annotations

import hashlib
import itertools
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from lmforge.data.tokenizer import IncrementalDecoder
from lmforge.errors import LmforgeError
from lmforge.models.device import keep_freed_cpu_memory, pick_device
from lmforge.models.generate import token_id_list
from lmforge.models.model import Transformer
from lmforge.models.thinking import ThinkingBudget
from lmforge.engine.block_manager import BlockManager
from lmforge.engine.kv_quant import parse_kv_cache_dtype
from lmforge.engine.model_runner import Feed, ModelRunner, QuantizedModelRunner
from lmforge.engine.sampler import Sampler
from lmforge.engine.scheduler import Scheduler
from lmforge.engine.sequence import SamplingParams, Sequence
from lmforge.engine.speculative import Drafter, speculates, verify, warp

CPU_KV_CACHE_BYTES = 1 << 30  # default pool size on CPU; on CUDA a share of the free memory


@dataclass
class CompletionOutput:
    index: int
    text: str  # "" without a tokenizer
    token_ids: list[int]
    finish_reason: str | None  # None while running; "stop" | "length" | "abort"
    logprobs: list[float] | None = None
    top_logprobs: list[dict[int, float]] | None = None
    delta_text: str = ""  # what is new since the previous output of this request (streaming)
    delta_token_ids: list[int] = field(default_factory=list)


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0  # prompt tokens of the first sample served from the prefix cache


class StopStrings:
    """A request's stop strings, compiled once: one regex over the escaped alternatives (the scan runs in C,
    not a Python loop over the list) and the longest length, which bounds how far back a new match can
    start. Per token only the newly decoded piece plus ``longest - 1`` characters before it are searched."""

    def __init__(self, stops: list[str]) -> None:
        self.longest = max(len(s) for s in stops)
        # Longest first: at one start position the longer alternative wins (the cut point is the same).
        self.pattern = re.compile("|".join(re.escape(s) for s in sorted(set(stops), key=len, reverse=True)))

    def find(self, text: str, new_from: int) -> int:
        """Start of the earliest stop string at or after ``longest - 1`` characters before ``new_from`` (where
        the newly decoded text begins; an earlier match would have been found a token ago); -1 if none."""
        m = self.pattern.search(text, max(new_from - self.longest + 1, 0))
        return m.start() if m else -1


@dataclass
class _Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    stop: StopStrings | None = None
    hold: int = 0  # characters held back from streaming: a stop string's prefix may end the text so far
    # Samples 1..n-1 of an n > 1 request before the first is prefilled: they fork from it then (``_fork``).
    followers: list[Sequence] = field(default_factory=list)


class Engine:
    def __init__(self, model_or_path: Transformer | str | Path, tokenizer=None, block_size: int = 16,
                 num_blocks: int | None = None, max_num_seqs: int = 64, max_num_batched_tokens: int = 512,
                 enable_prefix_caching: bool = True, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32, max_model_len: int | None = None,
                 kv_cache_bytes: int | None = None, draft_model: Transformer | str | Path | None = None,
                 num_speculative_tokens: int = 4, kv_cache_dtype: str = "auto", kv_residual_length: int = 0,
                 packed_weights: bool | None = None) -> None:
        """``packed_weights``: give the float32 linears a oneDNN-packed copy of their weights
        (``lmforge.models.packed``: matmuls of 4-32 rows 1.1-1.7x faster on a CPU, one more copy of the weights
        in memory). None (default): for a model the engine loads itself from a path; True also swaps a model
        object's linears in place (training it still works: the copy is re-packed after an update).
        ``kv_cache_dtype``: "auto" (the model's dtype), or a quantized KV cache (``kv_quant``): "kivi2" /
        "kivi4" (KIVI: keys per channel over each block's tokens, values per token, 2/4 bits) or "int8"
        (per token). A sequence's partly filled block, plus ``kv_residual_length`` tokens (whole blocks) of
        full ones behind it, stay in full precision. ``kv_cache_bytes`` then budgets the quantized bytes plus
        the float staging slots (``max_num_seqs`` blocks' worth, more with a residual window)."""
        from lmforge.models.checkpoint import load_model

        # device None: a model object stays where it is; a checkpoint loads on the CPU.
        if isinstance(model_or_path, nn.Module):
            model = model_or_path if device is None else model_or_path.to(pick_device(device))
        else:
            model = load_model(model_or_path, dtype=dtype, device=device or "cpu")
            if tokenizer is None and (Path(model_or_path) / "tokenizer.json").is_file():
                from lmforge.data.tokenizer import load_tokenizer

                tokenizer = load_tokenizer(model_or_path)
        # A LLaVA-style model: the engine runs its language model; the vision tower and projector turn a request's
        # images into features once, when it is added, and the runner splices them in at the image tokens.
        self.vision_model = None
        if not isinstance(model, Transformer):
            decoder = getattr(model, "language_model", None)
            if isinstance(decoder, Transformer) and decoder.config.cross_attention_layers:
                raise LmforgeError("Mllama-style cross-attention models do not run in the paged engine yet (their "
                                   "image keys/values are per sequence, not paged); use lmforge.models.generate")
            if not isinstance(decoder, Transformer) or not hasattr(model, "image_features"):
                raise LmforgeError(f"the engine runs decoder models and LLaVA-style vision-language models, not a "
                                   f"{type(model).__name__}")
            self.vision_model, model = model.eval(), decoder
        self.model = model.eval()
        self.packed_weights = self._pack(model, packed_weights, owned=not isinstance(model_or_path, nn.Module))
        if model.device.type == "cpu":
            keep_freed_cpu_memory()  # every step's temporaries would otherwise be page-faulted in afresh
        self.draft = None
        if draft_model is not None:
            draft = draft_model.to(model.device) if isinstance(draft_model, Transformer) else \
                load_model(draft_model, dtype=dtype, device=model.device)
            self._pack(draft, packed_weights, owned=not isinstance(draft_model, nn.Module))
            if draft.config.vocab_size != model.config.vocab_size:
                raise LmforgeError(f"draft model vocabulary ({draft.config.vocab_size}) differs from the target's "
                                   f"({model.config.vocab_size}); speculative decoding needs the same tokenizer")
            if num_speculative_tokens < 1:
                raise LmforgeError(f"num_speculative_tokens must be >= 1, got {num_speculative_tokens}")
            self.draft = draft.eval()
        self.num_speculative_tokens = num_speculative_tokens if self.draft is not None else 0
        self.kv_format = parse_kv_cache_dtype(kv_cache_dtype)
        self.kv_cache_dtype = kv_cache_dtype
        if self.kv_format is None and kv_residual_length:
            raise LmforgeError("kv_residual_length applies to a quantized KV cache; kv_cache_dtype is 'auto'")
        if self.kv_format is not None:
            if self.draft is not None:
                # A verification writes KV for draft tokens that may be rejected; a block filled by them would
                # be quantized before its final tokens are known.
                raise LmforgeError(f"kv_cache_dtype {kv_cache_dtype!r} cannot be combined with speculative "
                                   "decoding (draft_model); use kv_cache_dtype='auto' with a draft model")
            if kv_residual_length < 0 or kv_residual_length % block_size:
                raise LmforgeError(f"kv_residual_length must be a multiple of block_size ({block_size}) and >= 0, "
                                   f"got {kv_residual_length}")
        residual_blocks = kv_residual_length // block_size
        # Float staging slots: one partly filled block per running sequence; with a window, its full blocks
        # too, and as many again while a step slides windows (old blocks are freed only after the step).
        self.kv_staging_slots = max_num_seqs * (1 + residual_blocks) * (2 if residual_blocks else 1) \
            if self.kv_format is not None else 0
        self.tokenizer = tokenizer
        cfg = model.config
        self.max_model_len = max_model_len or cfg.max_position_embeddings
        if tokenizer is not None:
            self.eos_ids = set(tokenizer.eos_ids)
        else:
            self.eos_ids = set(token_id_list(cfg.eos_token_id))
        if num_blocks is None:
            num_blocks = self._default_num_blocks(block_size, max_num_seqs, kv_cache_bytes)
        self.block_manager = BlockManager(num_blocks, block_size, enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, max_num_seqs, max_num_batched_tokens,
                                   num_lookahead_slots=self.num_speculative_tokens)
        if self.kv_format is None:
            self.runner = ModelRunner(model, num_blocks, block_size)
        else:
            self.runner = QuantizedModelRunner(model, num_blocks, block_size, self.kv_format,
                                               self.kv_staging_slots, residual_blocks)
            self.block_manager.on_free = self.runner.on_block_freed
        self.drafter = Drafter(self.draft, num_blocks, block_size) if self.draft is not None else None
        self.sampler = Sampler()
        self.requests: dict[str, _Request] = {}
        self._ids = itertools.count()
        # prompt_tokens: asked for (length x n); prompt_computed_tokens: of those, the ones the model computed
        # rather than took from the prefix cache (how much n samples of one prompt share).
        self.stats = {"steps": 0, "prompt_tokens": 0, "prompt_computed_tokens": 0, "computed_tokens": 0,
                      "generated_tokens": 0,
                      "draft_proposed": 0, "draft_accepted": 0}

    @staticmethod
    def _pack(model: Transformer, packed_weights: bool | None, owned: bool) -> bool:
        from lmforge.models.packed import is_packed, pack_linears, why_not_packable

        if packed_weights is None:
            packed_weights = owned and why_not_packable(model) is None
        if packed_weights and not is_packed(model):
            pack_linears(model)
        return packed_weights

    _grammar_lock = threading.Lock()  # a server builds the backend on a worker thread, not the engine's

    def grammar_backend(self):
        """The structured-output backend (``lmforge.engine.structured.GrammarBackend``), built on first use.
        A server compiles grammars through it ahead of ``add_request(..., grammar=)``."""
        with self._grammar_lock:
            if getattr(self, "_grammar_backend", None) is None:
                if self.tokenizer is None:
                    raise LmforgeError("structured output needs a tokenizer")
                from lmforge.engine.structured import GrammarBackend

                self._grammar_backend = GrammarBackend(self.tokenizer, self.model.config.vocab_size,
                                                       sorted(self.eos_ids))
            return self._grammar_backend


    def thinking_budget(self, params: SamplingParams) -> ThinkingBudget | None:
        """The request's budget forcing as token ids (None if it asks for none); the delimiters are looked up in
        the tokenizer. Raises LmforgeError for budgets this model cannot run (a server calls it ahead for a 400)."""
        if not params.thinking_budgeted:
            return None
        if self.tokenizer is None:
            raise LmforgeError("budget forcing (max/min_thinking_tokens) needs a tokenizer to find the thinking "
                               "delimiters; pass Engine(tokenizer=...)")
        budget = ThinkingBudget.from_tokenizer(
            self.tokenizer, max_tokens=params.max_thinking_tokens, min_tokens=params.min_thinking_tokens,
            delimiters=params.thinking_delimiters, extension=params.thinking_extension,
            answer_prefix=params.answer_prefix)
        vocab = self.model.config.vocab_size
        outside = sorted(t for t in budget.token_ids if t >= vocab)
        if outside:  # added tokens past the embedding: an index error deep in the model otherwise
            raise LmforgeError(f"the thinking delimiters/extension use token ids {outside}, outside the model's "
                               f"vocabulary of {vocab}")
        return budget

    def _detokenizer(self) -> IncrementalDecoder:
        make = getattr(self.tokenizer, "incremental_decoder", None)
        return make() if make is not None else IncrementalDecoder(self.tokenizer.decode)  # a stand-in tokenizer

    def kv_bytes_per_token(self) -> float:
        """Bytes of KV one token takes in a block of the pool (all layers; staging slots not counted)."""
        bs = self.block_manager.block_size
        if self.kv_format is None:
            return ModelRunner.bytes_per_block(self.model, bs) / bs
        return QuantizedModelRunner.quantized_bytes_per_block(self.model, bs, self.kv_format) / bs

    def _default_num_blocks(self, block_size: int, max_num_seqs: int, budget: int | None) -> int:
        per_block = ModelRunner.bytes_per_block(self.model, block_size)
        reserved = 0
        if self.kv_format is not None:
            reserved = self.kv_staging_slots * per_block  # float staging slots, same shape as a float block
            per_block = QuantizedModelRunner.quantized_bytes_per_block(self.model, block_size, self.kv_format)
        if self.draft is not None:  # the draft's pool uses the same block ids
            per_block += ModelRunner.bytes_per_block(self.draft, block_size)
        if budget is None:
            if self.model.device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(self.model.device)
                budget = int(free * 0.8)
            else:
                budget = CPU_KV_CACHE_BYTES
        enough = max_num_seqs * -(-self.max_model_len // block_size)  # more could never be used at once
        if reserved and budget - reserved < per_block:
            raise LmforgeError(f"kv_cache_bytes {budget} cannot hold the {self.kv_staging_slots} float staging "
                               f"blocks ({reserved} bytes) of kv_cache_dtype {self.kv_cache_dtype!r} plus one "
                               f"block; raise it or lower max_num_seqs")
        return max(1, min((budget - reserved) // per_block, enough))

    # ---- requests ---------------------------------------------------------------------------------
    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None, grammar: object = None,
                    pixel_values: torch.Tensor | None = None) -> str:
        """Queue a request; its id. ``grammar``: ``params.grammar`` already compiled
        (``grammar_backend().compile_async``), so this call does not compile it (compiling can take seconds).
        ``pixel_values`` [images, 3, H, W] (a LLaVA-style model's processor's): the prompt holds each image's
        placeholder already expanded (``processor.expand``), one run of image tokens per image, in order."""
        params = (params or SamplingParams()).validate()
        if params.steering is not None:  # a vector made for another model: one clear error, not a shape error
            name = params.steering.name
            params.steering.vector.check(self.model, f"steering vector {name!r}" if name else "steering vector")
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise LmforgeError("a text prompt needs a tokenizer; pass token ids or Engine(tokenizer=...)")
            prompt_ids = self.tokenizer.encode(prompt)
        else:
            prompt_ids = [int(t) for t in prompt]
        vocab = self.model.config.vocab_size
        if not prompt_ids:
            raise LmforgeError("the prompt is empty")
        if any(t < 0 or t >= vocab for t in prompt_ids):
            raise LmforgeError(f"prompt token ids must be in [0, {vocab})")
        if len(prompt_ids) >= self.max_model_len:
            raise LmforgeError(f"prompt has {len(prompt_ids)} tokens; the model takes at most "
                               f"{self.max_model_len - 1} to leave room for one new token")
        bm = self.block_manager
        need = bm.blocks_needed(min(len(prompt_ids) + params.max_tokens, self.max_model_len))
        if need > bm.num_blocks:
            raise LmforgeError(f"request needs {need} KV blocks but the pool has {bm.num_blocks}; "
                               f"lower max_tokens or raise num_blocks")
        request_id = request_id if request_id is not None else str(next(self._ids))
        if request_id in self.requests:
            raise LmforgeError(f"request id {request_id!r} is already in use")
        images = self._image_features(prompt_ids, pixel_values) if (
            pixel_values is not None or self.vision_model is not None) else None
        if images is not None and self.draft is not None:
            raise LmforgeError("requests with images cannot use speculative decoding (the draft model sees no images)")
        seqs = [Sequence(next(self._ids), request_id, i, prompt_ids, params, self.model.device)
                for i in range(params.n)]
        if images is not None:
            for seq in seqs:
                seq.set_images(*images)
        if self.tokenizer is not None:
            for seq in seqs:
                seq.detokenizer = self._detokenizer()
        if params.grammar is not None:
            kind, source = params.grammar
            compiled = grammar if grammar is not None else self.grammar_backend().compile(kind, source)
            for seq in seqs:
                seq.constraint = self.grammar_backend().constraint(kind, compiled=compiled)
        budget = self.thinking_budget(params)
        if budget is not None:
            for seq in seqs:
                seq.thinking = budget.start(prompt_ids)
        stop = StopStrings(params.stop) if params.stop else None
        # Only the first sample is prefilled; the others fork from it when its prompt is computed, so the
        # prompt's KV is computed once for all n and they share it.
        self.requests[request_id] = _Request(request_id, prompt_ids, params, seqs, stop,
                                             stop.longest - 1 if stop is not None else 0, followers=seqs[1:])
        self.scheduler.add(seqs[0])
        self.stats["prompt_tokens"] += len(prompt_ids) * params.n
        return request_id

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request now and free its blocks; its final output, or None if it is unknown."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        for seq in req.seqs:
            if not seq.is_finished:
                self.scheduler.finish(seq, "abort")
        return self._output(req)

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    @torch.inference_mode()
    def _image_features(self, prompt_ids: list[int], pixel_values: torch.Tensor | None
                        ) -> tuple[torch.Tensor, torch.Tensor, str] | None:
        """(image token positions, their features, a key of the pixels) for a request; None for a text-only one.
        The image token count must be images x tokens per image: one clear error otherwise."""
        vision = self.vision_model
        if vision is None:
            raise LmforgeError("pixel_values were given but the engine's model is a text-only model")
        image_token = vision.config.image_token_id
        positions = torch.tensor([i for i, t in enumerate(prompt_ids) if t == image_token], dtype=torch.long)
        if pixel_values is None:
            if len(positions):
                raise LmforgeError(f"the prompt holds {len(positions)} image tokens (id {image_token}) but no "
                                   "pixel_values were given")
            return None
        if pixel_values.dim() != 4:
            raise LmforgeError(f"pixel_values must be [images, channels, height, width], got {list(pixel_values.shape)}")
        if getattr(vision, "fastv_keep", 1.0) < 1:
            # FastV ranks image tokens by the attention of the prompt's last token, which a chunked prefill reaches
            # only after earlier chunks stored every image token in every layer; one block table per sequence
            # cannot hold fewer tokens in later layers either.
            raise LmforgeError("FastV pruning (fastv_keep < 1) does not run in the paged engine: use "
                               "visual_token_fraction (HiRED-style, before the decoder) here, or generate()")
        per_image = vision.tokens_per_image  # under a visual token budget, fewer tokens (and KV blocks)
        if len(positions) != pixel_values.shape[0] * per_image:
            raise LmforgeError(f"the prompt holds {len(positions)} image tokens but {pixel_values.shape[0]} image(s) "
                               f"need {pixel_values.shape[0] * per_image} ({per_image} each): expand the placeholders "
                               "with the model's processor")
        features = vision.image_features(pixel_values.to(vision.device)).flatten(0, 1).to(self.model.dtype)
        key = hashlib.sha256(pixel_values.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        # The same pixels under another token budget are other features: the budget salts the key too.
        key.update(repr([getattr(vision, name, None) for name in ("visual_token_fraction",
                                                                  "visual_token_merge")]).encode())
        key = key.hexdigest()
        return positions, features, key

    # ---- the loop -----------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one scheduler step; outputs (cumulative, with deltas) of the requests that gained tokens."""
        batch = self.scheduler.schedule()
        if not batch:
            if self.scheduler.has_work():
                raise RuntimeError("scheduler made no progress (KV pool too small for any waiting request?)")
            return []
        drafts = self.drafter.propose(batch, self._speculation(batch)) if self.drafter is not None else {}
        feeds = []
        for j, item in enumerate(batch):
            seq, start = item.seq, item.seq.num_computed_tokens
            tokens = seq.tokens[start:start + item.num_tokens]
            if j in drafts:  # the target scores the pending token and every guess: k + 1 distributions
                feeds.append(Feed(tokens + drafts[j][0], start, seq.block_table, 1 + len(drafts[j][0])))
            else:
                feeds.append(Feed(tokens, start, seq.block_table, int(item.samples), seq.params.steering,
                                  seq.image_rows(start, len(tokens))))
        logits = self.runner.run(feeds)
        self.scheduler.postprocess(batch)
        self.stats["steps"] += 1
        self.stats["computed_tokens"] += sum(len(f.tokens) for f in feeds)
        # Fed positions [computed - fed, computed) inside the prompt (a recompute after preemption counts again).
        self.stats["prompt_computed_tokens"] += sum(
            max(0, min(it.seq.num_computed_tokens, len(it.seq.prompt_ids))
                - (it.seq.num_computed_tokens - it.num_tokens)) for it in batch)
        plain_rows, plain, verified, row = [], [], [], 0
        for j, (item, feed) in enumerate(zip(batch, feeds)):
            if j in drafts:
                verified.append((item.seq, logits[row:row + feed.num_logits], *drafts[j]))
            elif feed.num_logits:
                plain_rows.append(row)
                plain.append(item.seq)
            row += feed.num_logits
        for seq, r in list(zip(plain, plain_rows)):
            if not seq.output_ids and self.requests[seq.request_id].followers:
                forked = self._fork(seq, self.requests[seq.request_id])
                plain += forked  # they sample their first token from the leader's logits
                plain_rows += [r] * len(forked)
        touched: dict[str, _Request] = {}
        if plain:
            self._sample(logits[plain_rows], plain)
        for seq, target_logits, guesses, q in verified:
            self._accept(seq, target_logits, guesses, q)
        for seq in plain + [v[0] for v in verified]:
            touched[seq.request_id] = self.requests[seq.request_id]
        outputs = []
        for req in touched.values():
            out = self._output(req)
            if out.finished:
                del self.requests[req.request_id]
            outputs.append(out)
        return outputs

    def _fork(self, leader: Sequence, req: _Request) -> list[Sequence]:
        """The request's other samples take the leader's just-computed prompt KV (shared full blocks, a copy of
        the partly filled last one) and run from now on; those that do not fit (no free block, or max_num_seqs
        reached) queue as usual and get the full blocks back from the prefix cache."""
        forked = []
        for seq in req.followers:
            if self.block_manager.can_fork(leader) and len(self.scheduler.running) < self.scheduler.max_num_seqs:
                copy = self.block_manager.fork(leader, seq)
                if copy is not None:
                    self.runner.copy_block(*copy)
                    if self.drafter is not None:  # the draft pool is indexed by the same block tables
                        self.drafter.runner.copy_block(*copy)
                seq.num_draft_computed = min(leader.num_draft_computed, seq.num_computed_tokens)
                self.scheduler.adopt(seq)
                forked.append(seq)
            else:
                self.scheduler.add(seq)
        req.followers = []
        return forked

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> None:
        """One new token per sequence through the batched sampler (penalties, grammars, logprobs)."""
        raw = None
        if any(seq.constraint is not None for seq in seqs):
            # Logprobs describe the model's own distribution, so keep it before the grammar masks tokens.
            raw = logits.clone() if any(s.params.logprobs is not None for s in seqs) else None
            for i, seq in enumerate(seqs):
                if seq.constraint is not None:
                    seq.constraint.mask_(logits[i])
        result = self.sampler(logits, seqs, raw_logits=raw)
        for i, seq in enumerate(seqs):
            sampled = result.tokens[i]
            if seq.thinking is None:
                tokens = [sampled]
            else:  # budget forcing: the sampled token, or what replaces it, then any forced tokens
                tokens = seq.thinking.advance(sampled)
            for j, token in enumerate(tokens):
                if seq.params.logprobs is not None:
                    # Forced tokens were not drawn from the model: certain (log 1), no alternatives.
                    kept = j == 0 and token == sampled
                    seq.logprobs.append(result.logprobs[i] if kept else 0.0)
                    seq.top_logprobs.append(result.top_logprobs[i] if kept else {})
                if self._emit(seq, token):
                    break  # finished (a stop, or max_tokens inside the forced tokens)

    def _speculation(self, batch) -> dict[int, int]:
        """Draft length per batch entry that speculates this step: decodes with reserved lookahead slots,
        never past max_tokens or the context length."""
        ks = {}
        for j, item in enumerate(batch):
            seq = item.seq
            # Budget-forced tokens are not drafts a verifier can accept: such sequences decode plainly.
            if item.lookahead and item.samples and item.num_tokens == 1 and speculates(seq.params) \
                    and seq.thinking is None:
                k = min(item.lookahead, seq.params.max_tokens - len(seq.output_ids) - 1,
                        self.max_model_len - seq.num_tokens - 1)
                if k > 0:
                    ks[j] = k
        return ks

    def _accept(self, seq: Sequence, target_logits: torch.Tensor, guesses: list[int], q: torch.Tensor) -> None:
        """Keep the guesses the target agrees with (exact rejection rule) plus the target's next token."""
        if seq.params.greedy:  # the rule reduces to: keep guesses while they equal the target's argmax
            best = target_logits.argmax(-1).tolist()
            n_ok = next((i for i, g in enumerate(guesses) if g != best[i]), len(guesses))
            nxt = best[n_ok]
        else:
            n_ok, nxt = verify(warp(target_logits, seq.params), q, guesses, seq.generator)
        self.stats["draft_proposed"] += len(guesses)
        self.stats["draft_accepted"] += n_ok
        before = seq.num_tokens
        Drafter.accepted(seq, before, len(guesses), n_ok)
        for token in guesses[:n_ok] + [nxt]:
            if self._emit(seq, token):
                return  # finished: its blocks are already freed
        seq.num_computed_tokens += n_ok  # the target computed the accepted guesses' KV while verifying
        self.block_manager.commit(seq)

    def _emit(self, seq: Sequence, token: int) -> bool:
        """Append one sampled token; True if that finished the sequence."""
        seq.output_ids.append(token)
        self.stats["generated_tokens"] += 1
        if seq.constraint is not None:
            seq.constraint.accept(token)
        reason = self._check_stop(seq, token)
        if reason is None and seq.constraint is not None and seq.constraint.done:
            reason = "stop"  # the grammar is complete (its stop token was accepted)
        if reason is not None:
            if seq.detokenizer is not None and reason != "stop_string":
                seq.text += seq.detokenizer.flush()  # a held-back incomplete character, if any
            self.scheduler.finish(seq, "stop" if reason == "stop_string" else reason)
        return reason is not None

    def _check_stop(self, seq: Sequence, token: int) -> str | None:
        """Stop token, stop string or length. The text grows by the new token's piece (incremental
        detokenization) and only the tail a new match could touch is searched: O(1) per token in the output
        length."""
        p = seq.params
        if seq.detokenizer is not None:
            before = len(seq.text)
            seq.text += seq.detokenizer.add(token)
            stop = self.requests[seq.request_id].stop
            if stop is not None and len(seq.text) > before:
                # A new match must end in the new piece: search it plus the longest stop's length - 1 before
                # it, never the whole text, and the whole list in one C-level regex scan.
                cut = stop.find(seq.text, before)
                if cut >= 0:
                    seq.text = seq.text[:cut]
                    return "stop_string"
        if token in p.stop_token_ids or (not p.ignore_eos and token in self.eos_ids):
            return "stop"
        if len(seq.output_ids) >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            return "length"
        return None

    def _output(self, req: _Request) -> RequestOutput:
        hold = req.hold  # computed once per request, not per step from the whole stop list
        outs = []
        for seq in req.seqs:
            text = seq.text
            if not seq.is_finished and hold:  # hold back what may still turn into a stop string
                text = text[:len(text) - hold]
            delta_text = text[seq.sent_chars:] if len(text) > seq.sent_chars else ""
            delta_ids = seq.output_ids[seq.sent_tokens:]
            seq.sent_chars, seq.sent_tokens = max(seq.sent_chars, len(text)), len(seq.output_ids)
            want_lp = req.params.logprobs is not None
            outs.append(CompletionOutput(
                seq.index, text, list(seq.output_ids), seq.finish_reason,
                list(seq.logprobs) if want_lp else None,
                list(seq.top_logprobs) if want_lp and req.params.logprobs else None,
                delta_text, delta_ids))
        finished = all(s.is_finished for s in req.seqs)
        return RequestOutput(req.request_id, req.prompt_ids, outs, finished, req.seqs[0].num_cached_tokens)

    # ---- conveniences --------------------------------------------------------------------------------
    def generate(self, prompts: list[str | list[int]],
                 params: SamplingParams | list[SamplingParams] | None = None) -> list[RequestOutput]:
        """Run all prompts to completion together; outputs in prompt order."""
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise LmforgeError(f"{len(prompts)} prompts but {len(params)} sampling params")
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, params)]
        wanted, done = set(ids), {}
        while len(done) < len(ids):
            for out in self.step():
                if out.finished and out.request_id in wanted:
                    done[out.request_id] = out
        return [done[i] for i in ids]

    def stream(self, prompt: str | list[int], params: SamplingParams | None = None,
               request_id: str | None = None) -> Iterator[RequestOutput]:
        """Yield this request's output after every step that extends it (use ``delta_text``); closing the
        generator early aborts the request."""
        rid = self.add_request(prompt, params, request_id)
        finished = False
        try:
            while not finished:
                for out in self.step():
                    if out.request_id == rid:
                        finished = out.finished
                        yield out
        finally:
            if not finished:
                self.abort(rid)
