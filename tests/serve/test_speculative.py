"""Speculative decoding: greedy output equals target-only greedy; the rejection rule keeps p exactly."""

from __future__ import annotations

import pytest
import torch

from lmforge.models.generate import generate
from lmforge.serve import SamplingParams
from lmforge.serve.speculative import speculative_generate, verify

PROMPTS = [[5, 9, 17, 33, 40, 41], [100, 3], list(range(20, 50))]


@pytest.mark.parametrize("k", [1, 3, 5])
def test_greedy_equals_target_greedy(k, tiny_model):
    target, draft = tiny_model("llama", seed=1), tiny_model("llama", seed=2)  # a poor draft: many rejections
    params = SamplingParams(temperature=0, max_tokens=17, ignore_eos=True)
    for prompt in PROMPTS:
        ref = generate(target, torch.tensor([prompt]), max_new_tokens=17)[0].tolist()
        res = speculative_generate(target, draft, prompt, params, k=k)
        assert res.token_ids == ref and res.finish_reason == "length"
        assert res.proposed > 0 and res.target_calls < 17


def test_draft_equal_to_target_accepts_everything(tiny_model):
    target = tiny_model("mistral")
    res = speculative_generate(target, target, PROMPTS[2], SamplingParams(temperature=0, max_tokens=21,
                                                                          ignore_eos=True), k=4)
    assert res.acceptance_rate == 1.0 and res.target_calls == 4  # 1 + 4 rounds of (4 accepted + 1 bonus)
    assert res.token_ids == generate(target, torch.tensor([PROMPTS[2]]), max_new_tokens=21)[0].tolist()
    # Sampling with draft == target: p / q == 1, so every guess is accepted too.
    sampled = speculative_generate(target, target, PROMPTS[0], SamplingParams(temperature=1.0, seed=0,
                                                                               max_tokens=12, ignore_eos=True))
    assert sampled.acceptance_rate == 1.0 and len(sampled.token_ids) == 12


def test_stop_token_trims(tiny_model):
    target, draft = tiny_model("llama", seed=1), tiny_model("llama", seed=2)
    ref = generate(target, torch.tensor([PROMPTS[0]]), max_new_tokens=17)[0].tolist()
    res = speculative_generate(target, draft, PROMPTS[0], SamplingParams(temperature=0, max_tokens=17,
                                                                         stop_token_ids=[ref[5]]), k=4)
    assert res.token_ids == ref[:ref.index(ref[5]) + 1] and res.finish_reason == "stop"


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
