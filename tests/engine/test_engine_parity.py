"""Greedy tokens from the engine (many requests at once, chunked prefill, shared prefixes, forced
preemption) equal one-request-at-a-time decoding with the reference ``lmforge.models.generate``."""

from __future__ import annotations

import pytest
import torch

from lmforge.models.generate import generate
from lmforge.engine import Engine, SamplingParams

MAX_NEW = 16


def make_prompts(seed: int = 0, count: int = 10) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    shared = torch.randint(3, 128, (37,), generator=g).tolist()  # 9 full blocks of 4, then a partial one
    prompts = []
    for i in range(count):
        tail = torch.randint(3, 128, (int(torch.randint(1, 25, (1,), generator=g)),), generator=g).tolist()
        prompts.append(shared + tail if i % 2 == 0 else tail)
    prompts.append(shared[:20])  # a pure prefix of another prompt
    return prompts


def reference(model, prompts: list[list[int]]) -> list[list[int]]:
    return [generate(model, torch.tensor([p]), max_new_tokens=MAX_NEW, eos_ids=())[0].tolist() for p in prompts]


def assert_no_leak(engine: Engine) -> None:
    bm = engine.block_manager
    assert not engine.requests and not engine.scheduler.has_work()
    assert bm.num_free_blocks == bm.num_blocks and all(c == 0 for c in bm.ref_count)


@pytest.mark.parametrize("family", ["llama", "mistral", "gemma2"])  # plain, sliding window, soft-capping
def test_greedy_matches_reference_under_pressure(family, tiny_model):
    model = tiny_model(family)
    prompts = make_prompts()
    # 40 blocks of 4 tokens hold ~3 of these sequences: preemption is certain; 24-token budget chunks prompts.
    engine = Engine(model, block_size=4, num_blocks=40, max_num_seqs=6, max_num_batched_tokens=24)
    outs = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True))
    assert [o.outputs[0].token_ids for o in outs] == reference(model, prompts)
    assert all(o.outputs[0].finish_reason == "length" for o in outs)
    assert engine.scheduler.num_preemptions > 0
    assert engine.block_manager.hit_tokens > 0
    # The prefix cache saved work: fewer tokens went through the model than prompts + outputs hold.
    assert engine.stats["computed_tokens"] < engine.stats["prompt_tokens"] + engine.stats["generated_tokens"]
    assert_no_leak(engine)


@pytest.mark.parametrize("family", ["mixtral", "gpt2", "qwen2"])  # MoE, learned positions, qkv bias
def test_greedy_matches_reference_other_families(family, tiny_model):
    model = tiny_model(family)
    prompts = make_prompts(seed=1, count=6)
    engine = Engine(model, block_size=8, num_blocks=64, max_num_seqs=4, max_num_batched_tokens=32)
    outs = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True))
    assert [o.outputs[0].token_ids for o in outs] == reference(model, prompts)
    assert_no_leak(engine)


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_roomy_pool_and_no_prefix_cache(prefix_caching, tiny_model):
    model = tiny_model("llama")
    prompts = make_prompts(seed=2, count=6)
    engine = Engine(model, block_size=16, max_num_seqs=64, max_num_batched_tokens=2048,
                    enable_prefix_caching=prefix_caching)
    outs = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True))
    assert [o.outputs[0].token_ids for o in outs] == reference(model, prompts)
    assert engine.scheduler.num_preemptions == 0
    if not prefix_caching:
        assert engine.block_manager.hit_tokens == 0
    assert_no_leak(engine)


def test_second_round_hits_the_prefix_cache(tiny_model):
    model = tiny_model("llama")
    prompt = make_prompts()[0]
    engine = Engine(model, block_size=4, num_blocks=64)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    first = engine.generate([prompt], params)[0]
    computed = engine.stats["computed_tokens"]
    second = engine.generate([prompt], params)[0]
    assert second.outputs[0].token_ids == first.outputs[0].token_ids
    assert second.num_cached_tokens == (len(prompt) - 1) // 4 * 4
    # Only the uncached tail of the prompt plus the decode steps ran the second time.
    assert engine.stats["computed_tokens"] - computed == len(prompt) - second.num_cached_tokens + 7
    assert_no_leak(engine)
