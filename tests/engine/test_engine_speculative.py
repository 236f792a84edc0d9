"""Speculative decoding inside the engine: greedy output equals plain greedy decoding under continuous
batching, chunked prefill, prefix sharing and preemption; sampled output keeps the target's distribution."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lmforge.errors import LmforgeError
from lmforge.models.model import Transformer
from lmforge.engine import Engine, SamplingParams
from lmforge.engine.speculative import warp

from .test_engine_parity import MAX_NEW, assert_no_leak, make_prompts, reference

GREEDY = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)


@pytest.mark.parametrize("family", ["llama", "mistral", "gemma2"])
def test_greedy_equals_reference_under_pressure(family, tiny_model):
    target, draft = tiny_model(family, seed=1), tiny_model(family, seed=2)  # a poor draft: many rejections
    prompts = make_prompts()
    engine = Engine(target, block_size=4, num_blocks=48, max_num_seqs=6, max_num_batched_tokens=24,
                    draft_model=draft, num_speculative_tokens=3)
    outs = engine.generate(prompts, GREEDY)
    assert [o.outputs[0].token_ids for o in outs] == reference(target, prompts)
    assert all(o.outputs[0].finish_reason == "length" for o in outs)
    assert engine.scheduler.num_preemptions > 0 and engine.block_manager.hit_tokens > 0
    assert engine.stats["draft_proposed"] > 0
    assert_no_leak(engine)


def test_perfect_draft_accepts_everything_in_fewer_steps(tiny_model):
    target = tiny_model("llama")
    prompts = make_prompts(seed=3, count=4)
    plain = Engine(target, block_size=8, num_blocks=64)
    spec = Engine(target, block_size=8, num_blocks=64, draft_model=target, num_speculative_tokens=4)
    a, b = plain.generate(prompts, GREEDY), spec.generate(prompts, GREEDY)
    assert [o.outputs[0].token_ids for o in a] == [o.outputs[0].token_ids for o in b]
    assert spec.stats["draft_accepted"] == spec.stats["draft_proposed"] > 0
    # 16 tokens: 1 after the prompt, then rounds of 4 guesses + 1 bonus (the last round shortened by max_tokens)
    assert spec.stats["steps"] < plain.stats["steps"] / 2
    assert_no_leak(spec)


def test_stop_inside_accepted_guesses_trims(tiny_model):
    target = tiny_model("llama")
    prompt = make_prompts(seed=4, count=1)[0]
    ref = reference(target, [prompt])[0]
    stop = ref[6]
    engine = Engine(target, block_size=8, num_blocks=64, draft_model=target, num_speculative_tokens=4)
    out = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=MAX_NEW, stop_token_ids=[stop]))[0]
    assert out.outputs[0].token_ids == ref[:ref.index(stop) + 1]
    assert out.outputs[0].finish_reason == "stop"
    assert_no_leak(engine)


def test_sampled_joint_distribution_is_the_targets(tiny_model):
    """First token: plain sampling; second: a draft guess through the rejection rule. Their joint frequencies
    over 3,000 samples pass a chi-square test against the target's exact top-4 distributions."""
    target, draft = tiny_model("llama", seed=1), tiny_model("llama", seed=2)
    prompt = make_prompts(seed=5, count=1)[0]
    params = SamplingParams(temperature=1.0, top_k=4, max_tokens=3, n=3000, seed=0, ignore_eos=True)
    engine = Engine(target, block_size=8, num_blocks=2048, max_num_seqs=3000, max_num_batched_tokens=8192,
                    draft_model=draft, num_speculative_tokens=2)
    out = engine.generate([prompt], params)[0]
    assert engine.stats["draft_proposed"] > 0 and engine.stats["draft_accepted"] < engine.stats["draft_proposed"]
    counts: dict[tuple[int, int], int] = {}
    for o in out.outputs:
        key = tuple(o.token_ids[:2])
        counts[key] = counts.get(key, 0) + 1
    with torch.no_grad():
        p1 = warp(target(torch.tensor([prompt]))[0, -1], params)[0]
        firsts = p1.nonzero().flatten().tolist()
        rows = torch.tensor([prompt + [t] for t in firsts])
        p2 = warp(target(rows)[:, -1], params)
    expected = {(t1, t2): float(p1[t1] * p2[i, t2]) * len(out.outputs)
                for i, t1 in enumerate(firsts) for t2 in p2[i].nonzero().flatten().tolist()}
    assert set(counts) <= set(expected)
    chi2 = sum((counts.get(k, 0) - e) ** 2 / e for k, e in expected.items())
    dof = len(expected) - 1
    assert chi2 < dof + 5 * (2 * dof) ** 0.5, (chi2, dof)  # ~p < 1e-4 for these dof; a wrong rule is far off

    # The draft's distributions differ clearly from the target's, so accepting its guesses as they come
    # would fail the test.
    with torch.no_grad():
        q2 = warp(draft(rows)[:, -1], params)
    assert (q2 - p2).abs().sum(-1).min() > 0.5


def test_speculation_skips_penalised_and_logprob_requests(tiny_model):
    target = tiny_model("llama")
    prompts = make_prompts(seed=6, count=2)[:2]
    engine = Engine(target, block_size=8, num_blocks=64, draft_model=target, num_speculative_tokens=3)
    outs = engine.generate(prompts, [SamplingParams(temperature=0, max_tokens=8, repetition_penalty=1.3),
                                     SamplingParams(temperature=0, max_tokens=8, logprobs=2)])
    assert engine.stats["draft_proposed"] == 0
    assert len(outs[1].outputs[0].logprobs) == 8
    plain = Engine(target, block_size=8, num_blocks=64)
    ref = plain.generate(prompts, [SamplingParams(temperature=0, max_tokens=8, repetition_penalty=1.3),
                                   SamplingParams(temperature=0, max_tokens=8, logprobs=2)])
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in ref]


def test_draft_with_another_vocabulary_is_refused(tiny_model):
    target = tiny_model("llama")
    other = Transformer(dataclasses.replace(target.config, vocab_size=target.config.vocab_size + 8))
    with pytest.raises(LmforgeError, match="vocabulary"):
        Engine(target, draft_model=other)
