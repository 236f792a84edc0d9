"""The serving engine: requests in, tokens out, many requests sharing every forward pass.

    engine = Engine("path/to/model", max_num_seqs=32)
    outs = engine.generate(["Hello", "Once upon a time"], SamplingParams(temperature=0, max_tokens=32))

With ``draft_model=`` (same vocabulary, smaller) every step also speculates: see ``speculative.py``.

A server drives ``add_request`` / ``step`` / ``abort`` itself (one driver: ``step`` hands each output to
its caller only once); ``stream`` is the one-request version of that loop.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from lmforge.data.tokenizer import IncrementalDecoder
from lmforge.errors import LmforgeError
from lmforge.models.device import pick_device
from lmforge.models.generate import token_id_list
from lmforge.models.model import Transformer
from lmforge.engine.block_manager import BlockManager
from lmforge.engine.model_runner import Feed, ModelRunner
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


@dataclass
class _Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]


class Engine:
    def __init__(self, model_or_path: Transformer | str | Path, tokenizer=None, block_size: int = 16,
                 num_blocks: int | None = None, max_num_seqs: int = 64, max_num_batched_tokens: int = 512,
                 enable_prefix_caching: bool = True, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32, max_model_len: int | None = None,
                 kv_cache_bytes: int | None = None, draft_model: Transformer | str | Path | None = None,
                 num_speculative_tokens: int = 4) -> None:
        from lmforge.models.checkpoint import load_model

        # device None: a model object stays where it is; a checkpoint loads on the CPU.
        if isinstance(model_or_path, Transformer):
            model = model_or_path if device is None else model_or_path.to(pick_device(device))
        else:
            model = load_model(model_or_path, dtype=dtype, device=device or "cpu")
            if tokenizer is None and (Path(model_or_path) / "tokenizer.json").is_file():
                from lmforge.data.tokenizer import load_tokenizer

                tokenizer = load_tokenizer(model_or_path)
        self.model = model.eval()
        self.draft = None
        if draft_model is not None:
            draft = draft_model.to(model.device) if isinstance(draft_model, Transformer) else \
                load_model(draft_model, dtype=dtype, device=model.device)
            if draft.config.vocab_size != model.config.vocab_size:
                raise LmforgeError(f"draft model vocabulary ({draft.config.vocab_size}) differs from the target's "
                                   f"({model.config.vocab_size}); speculative decoding needs the same tokenizer")
            if num_speculative_tokens < 1:
                raise LmforgeError(f"num_speculative_tokens must be >= 1, got {num_speculative_tokens}")
            self.draft = draft.eval()
        self.num_speculative_tokens = num_speculative_tokens if self.draft is not None else 0
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
        self.runner = ModelRunner(model, num_blocks, block_size)
        self.drafter = Drafter(self.draft, num_blocks, block_size) if self.draft is not None else None
        self.sampler = Sampler()
        self.requests: dict[str, _Request] = {}
        self._ids = itertools.count()
        self.stats = {"steps": 0, "prompt_tokens": 0, "computed_tokens": 0, "generated_tokens": 0,
                      "draft_proposed": 0, "draft_accepted": 0}

    def _grammar(self):
        if getattr(self, "_grammar_backend", None) is None:
            if self.tokenizer is None:
                raise LmforgeError("structured output needs a tokenizer")
            from lmforge.engine.structured import GrammarBackend

            self._grammar_backend = GrammarBackend(self.tokenizer, self.model.config.vocab_size, sorted(self.eos_ids))
        return self._grammar_backend

    def _detokenizer(self) -> IncrementalDecoder:
        make = getattr(self.tokenizer, "incremental_decoder", None)
        return make() if make is not None else IncrementalDecoder(self.tokenizer.decode)  # a stand-in tokenizer

    def _default_num_blocks(self, block_size: int, max_num_seqs: int, budget: int | None) -> int:
        per_block = ModelRunner.bytes_per_block(self.model, block_size)
        if self.draft is not None:  # the draft's pool uses the same block ids
            per_block += ModelRunner.bytes_per_block(self.draft, block_size)
        if budget is None:
            if self.model.device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(self.model.device)
                budget = int(free * 0.8)
            else:
                budget = CPU_KV_CACHE_BYTES
        enough = max_num_seqs * -(-self.max_model_len // block_size)  # more could never be used at once
        return max(1, min(budget // per_block, enough))

    # ---- requests ---------------------------------------------------------------------------------
    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None) -> str:
        params = (params or SamplingParams()).validate()
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
        seqs = [Sequence(next(self._ids), request_id, i, prompt_ids, params, self.model.device)
                for i in range(params.n)]
        if self.tokenizer is not None:
            for seq in seqs:
                seq.detokenizer = self._detokenizer()
        if params.grammar is not None:
            kind, source = params.grammar
            for seq in seqs:
                seq.constraint = self._grammar().constraint(kind, source)
        self.requests[request_id] = _Request(request_id, prompt_ids, params, seqs)
        for seq in seqs:
            self.scheduler.add(seq)
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
                feeds.append(Feed(tokens, start, seq.block_table, int(item.samples)))
        logits = self.runner.run(feeds)
        self.scheduler.postprocess(batch)
        self.stats["steps"] += 1
        self.stats["computed_tokens"] += sum(len(f.tokens) for f in feeds)
        plain_rows, plain, verified, row = [], [], [], 0
        for j, (item, feed) in enumerate(zip(batch, feeds)):
            if j in drafts:
                verified.append((item.seq, logits[row:row + feed.num_logits], *drafts[j]))
            elif feed.num_logits:
                plain_rows.append(row)
                plain.append(item.seq)
            row += feed.num_logits
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
            if seq.params.logprobs is not None:
                seq.logprobs.append(result.logprobs[i])
                seq.top_logprobs.append(result.top_logprobs[i])
            self._emit(seq, result.tokens[i])

    def _speculation(self, batch) -> dict[int, int]:
        """Draft length per batch entry that speculates this step: decodes with reserved lookahead slots,
        never past max_tokens or the context length."""
        ks = {}
        for j, item in enumerate(batch):
            seq = item.seq
            if item.lookahead and item.samples and item.num_tokens == 1 and speculates(seq.params):
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
            if p.stop and len(seq.text) > before:
                lookback = max(before - max(len(s) for s in p.stop) + 1, 0)
                hits = [i for i in (seq.text.find(s, lookback) for s in p.stop) if i >= 0]
                if hits:
                    seq.text = seq.text[:min(hits)]
                    return "stop_string"
        if token in p.stop_token_ids or (not p.ignore_eos and token in self.eos_ids):
            return "stop"
        if len(seq.output_ids) >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            return "length"
        return None

    def _output(self, req: _Request) -> RequestOutput:
        hold = max((len(s) for s in req.params.stop), default=1) - 1
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
