"""BlockManager: allocation, reference counts, prefix-cache hits, LRU eviction, no leaks."""

from __future__ import annotations

from lmforge.engine.block_manager import BlockManager
from lmforge.engine.sequence import SamplingParams, Sequence

BS = 4


def seq(tokens: list[int], sid: int = 0) -> Sequence:
    return Sequence(sid, str(sid), 0, tokens, SamplingParams())


def run_prefill(bm: BlockManager, s: Sequence) -> None:
    """Admit s and pretend its whole prompt was computed in one step."""
    hits = bm.match_prefix(s)
    assert bm.can_allocate(hits, s.num_tokens)
    bm.allocate(s, hits)
    bm.append_slots(s, s.num_tokens - s.num_computed_tokens)
    s.num_computed_tokens = s.num_tokens
    bm.commit(s)


def test_allocate_append_free_roundtrip():
    bm = BlockManager(8, BS)
    s = seq(list(range(10)))
    run_prefill(bm, s)
    assert len(s.block_table) == 3 and bm.num_free_blocks == 5
    assert len(s.block_hashes) == 2  # only the two full blocks are cacheable
    s.output_ids += [50, 51]  # decode: token 11 still fits block 3, token 12 needs a fourth
    assert bm.can_append(s, 1)
    bm.append_slots(s, 1)
    s.num_computed_tokens += 1
    assert len(s.block_table) == 3
    bm.append_slots(s, 1)
    s.num_computed_tokens += 1
    bm.commit(s)
    assert len(s.block_table) == 3 and len(s.block_hashes) == 3
    s.output_ids.append(52)
    bm.append_slots(s, 1)
    assert len(s.block_table) == 4
    bm.free(s)
    assert bm.num_free_blocks == 8 and all(c == 0 for c in bm.ref_count) and s.block_table == []


def test_shared_prefix_reuses_blocks_and_counts_refs():
    bm = BlockManager(16, BS)
    prefix = list(range(100, 112))  # three full blocks
    a, b = seq(prefix + [1, 2], 0), seq(prefix + [3], 1)
    run_prefill(bm, a)
    hits = bm.match_prefix(b)
    assert hits == a.block_table[:3]
    run_prefill(bm, b)
    assert b.num_cached_tokens == 12 and bm.hit_tokens == 12  # 12 tokens not recomputed
    assert b.block_table[:3] == a.block_table[:3] and b.block_table[3] != a.block_table[3]
    assert [bm.ref_count[x] for x in a.block_table] == [2, 2, 2, 1]
    bm.free(a)
    assert [bm.ref_count[x] for x in b.block_table] == [1, 1, 1, 1]
    bm.free(b)
    assert bm.num_free_blocks == 16 and all(c == 0 for c in bm.ref_count)


def test_last_token_is_never_a_hit():
    bm = BlockManager(8, BS)
    a = seq(list(range(8)))
    run_prefill(bm, a)
    bm.free(a)
    again = seq(list(range(8)), 1)
    assert len(bm.match_prefix(again)) == 1  # block 2 holds the last token, whose logits we need
    assert len(bm.match_prefix(seq(list(range(9)), 2))) == 2


def test_different_prefix_breaks_the_chain():
    bm = BlockManager(8, BS)
    run_prefill(bm, seq([1, 2, 3, 4, 5, 6, 7, 8, 9]))
    assert bm.match_prefix(seq([0, 2, 3, 4, 5, 6, 7, 8, 9], 1)) == []  # same second block, other parent
    assert len(bm.match_prefix(seq([1, 2, 3, 4, 0, 6, 7, 8, 9], 2))) == 1


def test_unreferenced_cached_blocks_are_reused_then_evicted_lru():
    bm = BlockManager(4, BS)
    a = seq(list(range(8)) + [99])
    run_prefill(bm, a)
    bm.free(a)
    assert bm.num_free_blocks == 4 and len(bm.hash_to_block) == 2
    # Reviving cached blocks takes them out of the free pool.
    b = seq(list(range(8)) + [98], 1)
    hits = bm.match_prefix(b)
    assert len(hits) == 2 and bm.can_allocate(hits, 9)
    run_prefill(bm, b)
    assert bm.num_free_blocks == 1
    bm.free(b)
    # A sequence needing every block evicts the cached ones (deepest first) and drops their hashes.
    c = seq(list(range(50, 62)) + [1], 2)
    run_prefill(bm, c)
    assert bm.num_free_blocks == 0 and bm.match_prefix(seq(list(range(9)), 3)) == []
    assert not bm.can_append(c, 4)
    bm.free(c)
    assert bm.num_free_blocks == 4


def test_prefix_caching_off():
    bm = BlockManager(8, BS, enable_prefix_caching=False)
    a = seq(list(range(9)))
    run_prefill(bm, a)
    assert bm.match_prefix(seq(list(range(9)), 1)) == [] and not bm.hash_to_block
    bm.free(a)
    assert bm.num_free_blocks == 8
