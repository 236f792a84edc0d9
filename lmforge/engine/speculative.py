"""Speculative decoding: a small draft model proposes k tokens, the target checks them all in one forward
pass, and the rejection rule of Leviathan et al. / Chen et al. (2023) keeps the output distributed exactly
as the target's (greedy: token-identical to greedy target decoding).

``Drafter`` runs it inside the paged ``Engine`` (``Engine(..., draft_model=...)``), batched over all decoding
sequences of a step. The draft keeps its own KV pool indexed by the *same* block tables as the target,
so prefix sharing, preemption and freeing need no extra bookkeeping; the target then verifies every
sequence's guesses inside the step's one mixed batch.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lmforge.models.model import Transformer
from lmforge.models.sampling import sampling_probs
from lmforge.engine.model_runner import Feed, ModelRunner
from lmforge.engine.scheduler import ScheduledSeq
from lmforge.engine.sequence import SamplingParams, Sequence


def warp(logits: Tensor, params: SamplingParams) -> Tensor:
    """Probabilities [..., V] the request samples from (temperature, top-k/top-p/min-p); one-hot if greedy."""
    return sampling_probs(logits, params.temperature, max(params.top_k, 0), params.top_p, params.min_p)


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


def speculates(params: SamplingParams) -> bool:
    """Requests the engine speculates for: the rule needs p and q to be the distributions actually sampled
    from, so penalties (which change along the draft), grammars and logprobs take the plain path. So does
    steering: the unsteered draft would guess for a different distribution (and mostly be rejected)."""
    return (params.grammar is None and params.logprobs is None and params.repetition_penalty == 1.0
            and not params.frequency_penalty and not params.presence_penalty
            and (params.steering is None or params.steering.is_noop))


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
