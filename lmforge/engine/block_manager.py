"""Paged KV-cache bookkeeping: fixed-size blocks, reference counts, and prefix caching of full blocks.

A full block is identified by a chain hash ``hash((parent_hash, its token ids))``, so equal hashes mean
equal prefixes up to and including the block. The first block's parent is the sequence's ``cache_salt``
(None, or the key of its steering vector and scale): steered KV never mixes with other KV. When a sequence is admitted its leading full blocks are
looked up; hits are shared (ref count + 1) and their tokens are not recomputed. Blocks are only ever
written while not full, so sharing full blocks needs no copy-on-write.

The n samples of one request fork after the prompt's prefill (``fork``): the full blocks are shared and
only the partly filled last block is copied, so the prompt is computed once.

Free blocks live in two pools: never-hashed ones (used first) and cached ones whose ref count fell to 0
(kept in LRU order and evicted, dropping their hash, only when the first pool is empty).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from typing import Callable

from lmforge.engine.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_count = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self.block_tokens: list[tuple[int, ...] | None] = [None] * num_blocks  # guards against hash collisions
        self.hash_to_block: dict[int, int] = {}
        self._free: deque[int] = deque(range(num_blocks))
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached, unreferenced; oldest first
        self.hit_tokens = 0  # total prompt tokens served from the cache (stats)
        # Called as on_free(block, cached) when a block's last reference goes (cached: it stays in the prefix
        # cache); a quantized KV pool uses it to release or finish the block's float staging copy.
        self.on_free: Callable[[int, bool], None] | None = None

    # ---- queries -------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self._free) + len(self._evictable)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def match_prefix(self, seq: Sequence) -> list[int]:
        """Cached blocks holding seq's leading tokens. The last token is never a hit: its logits are needed."""
        if not self.enable_prefix_caching:
            return []
        tokens, bs = seq.tokens, self.block_size
        hits: list[int] = []
        parent: object = seq.cache_salt
        for i in range((len(tokens) - 1) // bs):
            chunk = tuple(tokens[i * bs:(i + 1) * bs])
            h = hash((parent, chunk))
            block = self.hash_to_block.get(h)
            if block is None or self.block_tokens[block] != chunk:
                break
            hits.append(block)
            parent = h
        return hits

    def can_allocate(self, hits: list[int], num_tokens: int) -> bool:
        """Whether a new sequence can hold ``num_tokens`` tokens, reusing the cached blocks ``hits``."""
        revived = sum(1 for b in hits if self.ref_count[b] == 0)  # they leave the free pool too
        return self.blocks_needed(num_tokens) - len(hits) + revived <= self.num_free_blocks

    def can_fork(self, parent: Sequence) -> bool:
        """Whether a copy of ``parent``'s blocks can be made (one new block when its last one is partly filled)."""
        return parent.num_computed_tokens % self.block_size == 0 or self.num_free_blocks >= 1

    def can_append(self, seq: Sequence, num_new_tokens: int) -> bool:
        need = self.blocks_needed(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        return need <= self.num_free_blocks

    # ---- mutations -----------------------------------------------------------------------------
    def allocate(self, seq: Sequence, hits: list[int]) -> None:
        """Admit seq: take the prefix-cache hits (marking those tokens computed)."""
        assert not seq.block_table, "sequence already holds blocks"
        for b in hits:
            if self.ref_count[b] == 0:
                self._evictable.pop(b)
            self.ref_count[b] += 1
        seq.block_table = list(hits)
        seq.block_hashes = [self.block_hash[b] for b in hits]
        seq.num_computed_tokens = len(hits) * self.block_size
        seq.num_cached_tokens = seq.num_computed_tokens
        self.hit_tokens += seq.num_computed_tokens

    def append_slots(self, seq: Sequence, num_new_tokens: int) -> None:
        """Grow seq's block table to cover its next ``num_new_tokens`` tokens."""
        need = self.blocks_needed(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        for _ in range(need):
            seq.block_table.append(self._take())

    def commit(self, seq: Sequence) -> None:
        """After a step: register seq's newly full and computed blocks in the prefix cache."""
        if not self.enable_prefix_caching:
            return
        bs, tokens = self.block_size, None
        while (len(seq.block_hashes) + 1) * bs <= seq.num_computed_tokens:
            tokens = tokens or seq.tokens
            i = len(seq.block_hashes)
            chunk = tuple(tokens[i * bs:(i + 1) * bs])
            h = hash((seq.block_hashes[-1] if seq.block_hashes else seq.cache_salt, chunk))
            seq.block_hashes.append(h)
            block = seq.block_table[i]
            if h not in self.hash_to_block:  # else an equal block was computed concurrently: keep that one
                self.hash_to_block[h] = block
                self.block_hash[block], self.block_tokens[block] = h, chunk

    def fork(self, parent: Sequence, child: Sequence) -> tuple[int, int] | None:
        """Give ``child`` (holding nothing) ``parent``'s computed KV: its full blocks shared (ref count + 1), its
        partly filled last block copied into a new one, since both will write to it. Returns that copy as
        (source block, new block) for the runner to copy, or None when every block is full."""
        assert not child.block_table, "sequence already holds blocks"
        bs, computed = self.block_size, parent.num_computed_tokens
        full = computed // bs
        for b in parent.block_table[:full]:
            self.ref_count[b] += 1
        child.block_table = list(parent.block_table[:full])
        child.block_hashes = list(parent.block_hashes[:full])
        child.num_computed_tokens = child.num_cached_tokens = computed
        if computed % bs == 0:
            return None
        new = self._take()
        child.block_table.append(new)
        return parent.block_table[full], new

    def free(self, seq: Sequence) -> None:
        # Tail first, so the LRU pool evicts a chain's deepest blocks (useless without their parents) first.
        for b in reversed(seq.block_table):
            self.ref_count[b] -= 1
            assert self.ref_count[b] >= 0, f"block {b} freed twice"
            if self.ref_count[b] == 0:
                if self.block_hash[b] is not None:
                    self._evictable[b] = None
                else:
                    self._free.append(b)
                if self.on_free is not None:
                    self.on_free(b, self.block_hash[b] is not None)
        seq.block_table, seq.block_hashes = [], []
        seq.num_computed_tokens = 0

    def _take(self) -> int:
        if self._free:
            b = self._free.popleft()
        else:
            b, _ = self._evictable.popitem(last=False)
            del self.hash_to_block[self.block_hash[b]]
            self.block_hash[b] = self.block_tokens[b] = None
        assert self.ref_count[b] == 0
        self.ref_count[b] = 1
        return b

    def reset_prefix_cache(self) -> None:
        """Forget all cached (unreferenced) blocks, e.g. after the weights change."""
        while self._evictable:
            b, _ = self._evictable.popitem(last=False)
            del self.hash_to_block[self.block_hash[b]]
            self.block_hash[b] = self.block_tokens[b] = None
            self._free.append(b)
