"""Continuous batching: every step picks which sequences run and how many of their tokens.

Each step has a token budget (``max_num_batched_tokens``) and a cap on running sequences
(``max_num_seqs``). Running sequences go first, oldest first: a decode costs one token (plus any tokens budget
forcing appended after it, fed as one chunk), an unfinished prompt takes the next chunk that fits (chunked
prefill), so long prompts never stall decodes. Leftover
budget admits waiting requests in arrival order; a prompt that a running sequence is still prefilling is
not prefilled twice at once (a repeat of it waits a step and shares its blocks; the n samples of one request
do not queue at all: they fork from the first once its prompt is computed, see ``Engine._fork``). When the KV pool runs dry, the
newest running sequence is preempted by recompute: its blocks are freed and it goes back to the front of the
queue (its tokens, prompt and output, are prefilled again later; the prefix cache usually hands most of them
back).
With speculative decoding (``num_lookahead_slots`` = k), a decode reserves KV slots and budget for k draft
tokens as well, and is granted fewer when the budget is short (``ScheduledSeq.lookahead``).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from lmforge.engine.block_manager import BlockManager
from lmforge.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_tokens: int  # tokens fed this step, starting at seq.num_computed_tokens
    lookahead: int = 0  # extra KV slots reserved after them for draft tokens (decodes only)

    @property
    def samples(self) -> bool:
        """Whether this step completes seq's known tokens, so its last logits give a new token."""
        return self.seq.num_computed_tokens + self.num_tokens == self.seq.num_tokens


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int = 64, max_num_batched_tokens: int = 512,
                 num_lookahead_slots: int = 0) -> None:
        self.bm = block_manager
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.num_lookahead_slots = num_lookahead_slots
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admission order: the last one is preempted first
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def adopt(self, seq: Sequence) -> bool:
        """Run ``seq``, which already holds its KV blocks (a fork), from the next step; False (nothing done)
        when ``max_num_seqs`` sequences already run."""
        if len(self.running) >= self.max_num_seqs:
            return False
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)
        return True

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[ScheduledSeq]:
        budget = self.max_num_batched_tokens
        batch: list[ScheduledSeq] = []
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            ahead = min(self.num_lookahead_slots, budget - 1) if seq.num_tokens - seq.num_computed_tokens == 1 else 0
            while not self.bm.can_append(seq, n + ahead):
                if ahead:  # speculation is optional: drop it before preempting anyone
                    ahead = 0
                    continue
                preempted = True
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    break
            else:
                self.bm.append_slots(seq, n + ahead)
                batch.append(ScheduledSeq(seq, n, ahead))
                budget -= n + ahead
                i += 1
                continue
            break  # seq itself was preempted: it was the newest, nothing after it
        if preempted:  # memory is tight: admitting more would only cause more thrashing
            return batch
        # A prompt being prefilled by a running sequence: its twins (repeated prompts, or samples that could not
        # fork) wait until its blocks are computed, then take them from the prefix cache.
        in_flight = ({s.prompt_key for s in self.running if s.num_computed_tokens < len(s.prompt_ids)}
                     if self.waiting else set())
        deferred: list[Sequence] = []
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            shareable = self.bm.enable_prefix_caching and len(seq.prompt_ids) > self.bm.block_size
            if shareable and not seq.output_ids and seq.prompt_key in in_flight:
                deferred.append(self.waiting.popleft())
                continue
            hits = self.bm.match_prefix(seq)
            cached = len(hits) * self.bm.block_size
            n = min(seq.num_tokens - cached, budget)
            if not self.bm.can_allocate(hits, cached + n):
                break
            self.waiting.popleft()
            self.bm.allocate(seq, hits)
            self.bm.append_slots(seq, n)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            batch.append(ScheduledSeq(seq, n))
            budget -= n
            if shareable:
                in_flight.add(seq.prompt_key)
        self.waiting.extendleft(reversed(deferred))
        return batch

    def postprocess(self, batch: list[ScheduledSeq]) -> None:
        """Mark the fed tokens computed (call before appending sampled tokens)."""
        for item in batch:
            item.seq.num_computed_tokens += item.num_tokens
            self.bm.commit(item.seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Retire seq (done or aborted) wherever it is, returning its blocks."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        self.bm.free(seq)
        seq.status, seq.finish_reason = SequenceStatus.FINISHED, reason

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.bm.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)
