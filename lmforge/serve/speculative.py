"""Speculative decoding: a small draft model proposes k tokens, the target checks them all in one forward
pass, and the rejection rule of Leviathan et al. / Chen et al. (2023) keeps the output distributed exactly
as the target's (greedy: token-identical to greedy target decoding).

Two users of the same rule (``warp`` + ``verify``):
  - ``Drafter``: inside the paged ``Engine`` (``Engine(..., draft_model=...)``), batched over all decoding
    sequences of a step. The draft keeps its own KV pool indexed by the *same* block tables as the target,
    so prefix sharing, preemption and freeing need no extra bookkeeping; the target then verifies every
    sequence's guesses inside the step's one mixed batch.
  - ``speculative_generate``: one request with static ``KVCache``s (rejected tokens dropped with ``crop``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lmforge.models.model import Transformer
from lmforge.serve.model_runner import Feed, ModelRunner
from lmforge.serve.sampler import filter_logits
from lmforge.serve.scheduler import ScheduledSeq
from lmforge.serve.sequence import SamplingParams, Sequence


@dataclass
class SpeculativeResult:
    token_ids: list[int]
    finish_reason: str  # "stop" | "length"
    proposed: int  # draft tokens proposed
    accepted: int  # ... and accepted by the target
    target_calls: int  # target forward passes after the prompt

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / max(self.proposed, 1)


def warp(logits: Tensor, params: SamplingParams) -> Tensor:
    """Probabilities [..., V] the request samples from (temperature, top-k/top-p/min-p); one-hot if greedy."""
    logits = logits.float().reshape(-1, logits.shape[-1])
    if params.greedy:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    x = logits / params.temperature
    if params.top_k > 0 or params.top_p < 1.0 or params.min_p > 0.0:
        rows = x.shape[0]
        x = filter_logits(x, torch.full((rows,), max(params.top_k, 0)), torch.full((rows,), params.top_p),
                          torch.full((rows,), params.min_p))
    return x.softmax(-1)


def _draw(probs: Tensor, generator: torch.Generator | None) -> int:
    return int(torch.multinomial(probs.to(generator.device if generator is not None else "cpu"), 1,
                                 generator=generator))


def verify(p: Tensor, q: Tensor, draft: list[int], generator: torch.Generator | None = None) -> tuple[int, int]:
    """Accept a prefix of ``draft`` (k tokens drawn from q [k, V]) against target probabilities p [k+1, V].

    Token i is kept with probability min(1, p_i(x) / q_i(x)); at the first rejection the replacement is
    drawn from normalise(max(0, p_i - q_i)); if all k survive, a bonus token is drawn from p_k.
    Returns (number accepted, the token that follows them).
    """
    for i, x in enumerate(draft):
        px, qx = float(p[i, x]), float(q[i, x])
        u = float(torch.rand((), generator=generator))
        if qx > 0 and u * qx < px:  # u < px / qx without dividing by zero
            continue
        residual = (p[i] - q[i]).clamp_(min=0)
        total = float(residual.sum())
        # total == 0 only if p_i == q_i, where every draft is accepted; guard against rounding anyway.
        return i, _draw(residual / total if total > 0 else p[i], generator)
    return len(draft), _draw(p[len(draft)], generator)


@torch.inference_mode()
def speculative_generate(target: Transformer, draft: Transformer, prompt_ids: list[int],
                         params: SamplingParams, k: int = 4, eos_ids: set[int] | None = None) -> SpeculativeResult:
    """Decode one prompt with target + draft (same tokenizer / vocabulary)."""
    params.validate()
    if k < 1:
        raise ValueError("k must be >= 1")
    device = target.device
    generator = torch.Generator(device="cpu")
    generator.manual_seed(params.seed) if params.seed is not None else generator.seed()
    stops = set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos_ids or ()))
    capacity = len(prompt_ids) + params.max_tokens + k + 1
    t_cache, d_cache = target.new_cache(1, capacity), draft.new_cache(1, capacity)

    def feed(model: Transformer, cache, ids: list[int]) -> Tensor:
        return model(torch.tensor([ids], device=device), cache=cache)[0]  # [T, V]

    full = list(prompt_ids)  # prompt + emitted tokens
    p_first = warp(feed(target, t_cache, full)[-1], params)[0]
    full.append(_draw(p_first, generator))  # the first token needs no draft
    t_len, d_len = len(prompt_ids), 0  # how much of ``full`` each cache holds (the draft's prefill is lazy)
    proposed = accepted = calls = 0
    while not (full[-1] in stops or len(full) - len(prompt_ids) >= params.max_tokens):
        # Draft k tokens one by one (its first call also catches up on what the target produced).
        d_logits = feed(draft, d_cache, full[d_len:])[-1]
        guesses, q_rows = [], []
        for j in range(k):
            q_rows.append(warp(d_logits, params)[0])
            guesses.append(_draw(q_rows[-1], generator))
            if j < k - 1:
                d_logits = feed(draft, d_cache, [guesses[-1]])[-1]
        # The target scores the newest token and all guesses in one pass: k + 1 next-token distributions.
        p = warp(feed(target, t_cache, full[t_len:] + guesses)[-(k + 1):], params)
        calls += 1
        n_ok, nxt = verify(p, torch.stack(q_rows), guesses, generator)
        proposed, accepted = proposed + k, accepted + n_ok
        base = len(full)
        full += guesses[:n_ok] + [nxt]
        # nxt is fed next round; the draft never fed its own last guess.
        t_len, d_len = base + n_ok, base + min(n_ok, k - 1)
        t_cache.crop(t_len)
        d_cache.crop(d_len)
    out = full[len(prompt_ids):]
    # Trim to the first stop token / max_tokens (a round can overshoot both).
    for i, t in enumerate(out):
        if t in stops:
            return SpeculativeResult(out[:i + 1], "stop", proposed, accepted, calls)
    return SpeculativeResult(out[:params.max_tokens], "length", proposed, accepted, calls)


def speculates(params: SamplingParams) -> bool:
    """Requests the engine speculates for: the rule needs p and q to be the distributions actually sampled
    from, so penalties (which change along the draft), grammars and logprobs take the plain path."""
    return (params.grammar is None and params.logprobs is None and params.repetition_penalty == 1.0
            and not params.frequency_penalty and not params.presence_penalty)


class Drafter:
    """Batched draft proposals for the engine. ``seq.num_draft_computed`` (set here) counts the tokens whose
    draft KV is in the draft pool; it lags the target by at most one token after a fully accepted round."""

    def __init__(self, draft: Transformer, num_blocks: int, block_size: int) -> None:
        self.runner = ModelRunner(draft.eval(), num_blocks, block_size)

    @torch.no_grad()
    def propose(self, batch: list[ScheduledSeq], ks: dict[int, int]) -> dict[int, tuple[list[int], Tensor]]:
        """Guesses and their draft distributions q [k, V] for batch entries ``ks`` (index -> k >= 1). Prefill
        chunks of speculating sequences run through the draft in the same pass, keeping its KV complete."""
        feeds, owners = [], []
        for j, item in enumerate(batch):
            seq = item.seq
            if j not in ks and not (item.num_tokens > 1 and speculates(seq.params)):
                continue
            end = seq.num_computed_tokens + item.num_tokens
            start = min(seq.num_draft_computed, seq.num_computed_tokens)  # preemption resets the latter
            feeds.append(Feed(seq.tokens[start:end], start, seq.block_table, 1 if j in ks else 0))
            seq.num_draft_computed = end
            if j in ks:
                owners.append(j)
        if not feeds:
            return {}
        logits = self.runner.run(feeds)  # one row per speculating sequence
        if not owners:
            return {}
        guesses: dict[int, list[int]] = {j: [] for j in owners}
        qs: dict[int, list[Tensor]] = {j: [] for j in owners}
        for step in range(max(ks.values())):
            if step:
                owners = [j for j in owners if ks[j] > step]
                feeds = [Feed([guesses[j][-1]], batch[j].seq.num_tokens + step - 1, batch[j].seq.block_table)
                         for j in owners]
                logits = self.runner.run(feeds)
            for row, j in enumerate(owners):
                seq = batch[j].seq
                q = warp(logits[row], seq.params)[0]
                qs[j].append(q)
                guesses[j].append(_draw(q, seq.generator) if not seq.params.greedy else int(q.argmax()))
        return {j: (guesses[j], torch.stack(qs[j])) for j in guesses}

    @staticmethod
    def accepted(seq: Sequence, num_tokens_before: int, k: int, n_ok: int) -> None:
        """After verification: the draft's KV is valid up to the last accepted guess it was fed."""
        seq.num_draft_computed = num_tokens_before + min(n_ok, k - 1)
