"""The one completion API: greedy equals reference decoding, n samples share their prompt's KV blocks,
seeded sampling does not depend on batching, and the stop check costs O(1) per token."""

from __future__ import annotations

import pytest
import torch

from lmforge.engine import Engine, SamplingParams
from lmforge.engine.complete import complete
from lmforge.models.generate import generate

from .conftest import CharTokenizer
from .test_engine_parity import make_prompts


def test_greedy_equals_reference_and_mode_is_kept(tiny_model):
    model = tiny_model("qwen2").train()
    prompts = make_prompts(seed=3, count=6)
    outs = complete(model, prompts, SamplingParams(temperature=0, max_tokens=9, ignore_eos=True), max_num_seqs=3)
    assert model.training  # complete() put it back in train mode
    model.eval()
    for prompt, samples in zip(prompts, outs):
        assert len(samples) == 1 and samples[0].finish_reason == "length"
        assert samples[0].token_ids == generate(model, torch.tensor([prompt]), max_new_tokens=9, eos_ids=())[0].tolist()


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_n_samples_compute_the_prompt_once(tiny_model, prefix_caching):
    model = tiny_model("llama")
    prompt = list(range(10, 50))  # 40 tokens: 2 full blocks of 16 and 8 more
    engine = Engine(model, block_size=16, num_blocks=64, enable_prefix_caching=prefix_caching)
    params = SamplingParams(n=4, temperature=1.0, seed=0, max_tokens=6, ignore_eos=True)
    [out] = engine.generate([prompt], params)
    # The first sample computes the prompt; the others fork from it (its 2 full blocks shared, the partly
    # filled third copied) and each then computes only its own new tokens.
    assert engine.stats["prompt_computed_tokens"] == 40
    assert engine.stats["computed_tokens"] == 40 + 4 * 5
    assert engine.block_manager.num_free_blocks == 64  # every block, shared or copied, came back
    # Each sample is what it would be alone (same seed + index): forking changes no token.
    for i, sample in enumerate(out.outputs):
        alone = Engine(model, block_size=16, num_blocks=64)
        one = SamplingParams(n=1, temperature=1.0, seed=i, max_tokens=6, ignore_eos=True)
        assert sample.token_ids == alone.generate([prompt], one)[0].outputs[0].token_ids
    engine = Engine(model, block_size=16, num_blocks=64)
    engine.generate([prompt] * 3, SamplingParams(temperature=0, max_tokens=1))  # repeated prompts share full blocks
    assert engine.stats["computed_tokens"] == 40 + 2 * (40 - 32)


def test_forks_that_do_not_fit_queue_and_reuse_the_prefix_cache(tiny_model):
    model = tiny_model("llama")
    prompt = list(range(10, 50))
    params = SamplingParams(n=4, temperature=1.0, seed=0, max_tokens=6, ignore_eos=True)
    reference = [c.token_ids for c in Engine(model, block_size=16, num_blocks=64).generate([prompt], params)[0].outputs]
    engine = Engine(model, block_size=16, num_blocks=64, max_num_seqs=2)  # one fork fits, two queue
    [out] = engine.generate([prompt], params)
    assert [c.token_ids for c in out.outputs] == reference
    assert engine.stats["prompt_computed_tokens"] == 40 + 2 * (40 - 32)


def test_seeded_samples_do_not_depend_on_batching(tiny_model):
    model = tiny_model("mistral")
    prompts = make_prompts(seed=5, count=4)
    params = SamplingParams(n=3, temperature=1.0, top_p=0.9, seed=11, max_tokens=6, ignore_eos=True)
    wide = complete(model, prompts, params, max_num_seqs=64)
    narrow = complete(model, prompts, params, max_num_seqs=2, max_num_batched_tokens=16)
    ids = [[c.token_ids for c in samples] for samples in wide]
    assert ids == [[c.token_ids for c in samples] for samples in narrow]
    assert len({tuple(x) for samples in ids for x in samples}) > 1  # samples differ from each other


class CountingTokenizer(CharTokenizer):
    def __init__(self) -> None:
        self.decoded_ids = 0

    def decode(self, ids) -> str:
        ids = list(ids)
        self.decoded_ids += len(ids)
        return super().decode(ids)


def test_stop_check_decodes_a_bounded_window_per_token(tiny_model):
    """Detokenization is incremental: decoding work grows linearly with the output, not quadratically."""
    model = tiny_model("llama")
    tok = CountingTokenizer()
    out = complete(model, [[30, 31, 32]], SamplingParams(temperature=0, max_tokens=400, ignore_eos=True,
                                                         stop=["never-produced"]), tokenizer=tok)[0][0]
    assert len(out.token_ids) == 400 and out.text == CharTokenizer().decode(out.token_ids)
    assert tok.decoded_ids - 400 <= 6 * 400  # re-decoding the whole output each token would be ~80,000
