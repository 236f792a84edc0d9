"""The runner's batched path for short feeds (decode tokens and speculative verifications, up to
``SHORT_FEED_TOKENS`` each) mixed with long prefill chunks in one step: every logit equals the model's own forward
over each whole sequence, with a sliding window (Mistral) and soft-capping (Gemma 2) too."""

from __future__ import annotations

import pytest
import torch

from lmforge.engine.model_runner import SHORT_FEED_TOKENS, Feed, ModelRunner


@pytest.mark.parametrize("family", ["llama", "mistral", "gemma2"])
def test_mixed_short_and_long_feeds_equal_the_full_forward(family, tiny_model):
    model = tiny_model(family)
    bs = 4
    runner = ModelRunner(model, num_blocks=64, block_size=bs)
    g = torch.Generator().manual_seed(0)
    # (already cached tokens, new tokens, logits wanted): a decode step, a 3-token verification, an 8-token one
    # (the largest short feed), a short prompt from scratch, and a 20-token chunk after 9 cached tokens.
    shapes = [(13, 1, 1), (10, 3, 3), (7, SHORT_FEED_TOKENS, SHORT_FEED_TOKENS), (0, 5, 1), (9, 20, 2)]
    seqs = [torch.randint(3, 128, (done + new,), generator=g).tolist() for done, new, _ in shapes]
    tables, next_block = [], 0
    for seq in seqs:
        n = -(-len(seq) // bs)
        tables.append(list(range(next_block, next_block + n)))
        next_block += n
    # Fill the cached part of every sequence first, in one step of long-enough feeds (a plain prefill).
    runner.run([Feed(seq[:done], 0, table, 1) for seq, table, (done, _, _) in zip(seqs, tables, shapes) if done])
    feeds = [Feed(seq[done:], done, table, k) for seq, table, (done, new, k) in zip(seqs, tables, shapes)]
    logits = runner.run(feeds)
    row = 0
    with torch.inference_mode():
        for seq, (done, new, k) in zip(seqs, shapes):
            want = model(torch.tensor([seq]))[0, -k:].float()
            assert (logits[row:row + k] - want).abs().max().item() < 1e-4
            row += k
    assert row == logits.shape[0]
