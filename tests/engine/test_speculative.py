"""The speculative rejection rule keeps the target distribution exactly (the engine tests cover decoding)."""

from __future__ import annotations

import torch

from lmforge.engine.speculative import verify


def test_rejection_rule_preserves_target_distribution():
    """Draft x ~ q, then verify: the emitted first token must be distributed as p, whatever q is."""
    p = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.25, 0.25, 0.25, 0.25]])
    q = torch.tensor([[0.1, 0.1, 0.4, 0.4]])
    g = torch.Generator().manual_seed(0)
    trials, counts = 6000, torch.zeros(4)
    for _ in range(trials):
        x = int(torch.multinomial(q[0], 1, generator=g))
        n_ok, nxt = verify(p, q, [x], g)
        counts[x if n_ok else nxt] += 1
    assert torch.allclose(counts / trials, p[0], atol=0.02)
