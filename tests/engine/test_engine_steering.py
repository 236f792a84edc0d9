"""Per-request steering in the engine: token-identical to ``generate(steering=...)``, unsteered neighbours
untouched, prefix cache never shared across different interventions, speculation skipped, clear errors."""

from __future__ import annotations

import pytest
import torch

from lmforge.engine import Engine, SamplingParams
from lmforge.errors import LmforgeError
from lmforge.models.generate import generate
from lmforge.models.steering import Steering, SteeringVector

MAX_NEW = 12


def vector(model, layers=(0, 1), seed=0, width=None) -> SteeringVector:
    g = torch.Generator().manual_seed(seed)
    width = width or model.config.hidden_size
    return SteeringVector({i: torch.randn(width, generator=g) for i in layers})


def prompts(seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    shared = torch.randint(3, 128, (18,), generator=g).tolist()
    return [shared + torch.randint(3, 128, (n,), generator=g).tolist() for n in (3, 9, 1, 14)] + [shared[:7]]


def reference(model, prompt, steering=None) -> list[int]:
    return generate(model, torch.tensor([prompt]), max_new_tokens=MAX_NEW, eos_ids=(), steering=steering)[0].tolist()


def params(steering=None) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True, steering=steering)


@pytest.mark.parametrize("family", ["llama", "gemma2"])  # plain; post-norms, soft-capping, sliding window
def test_steered_and_unsteered_requests_share_batches_exactly(family, tiny_model):
    model = tiny_model(family)
    layers = tuple(range(model.config.num_layers))
    happy, sad = Steering(vector(model, layers, seed=1), 6.0), Steering(vector(model, (1,), seed=2), -8.0)
    ps = prompts()
    plan = [happy, None, sad, happy, None]  # mixed in one batch; the 24-token budget chunks the prompts
    engine = Engine(model, block_size=4, num_blocks=64, max_num_seqs=5, max_num_batched_tokens=24)
    outs = engine.generate(ps, [params(s) for s in plan])
    got = [o.outputs[0].token_ids for o in outs]
    want = [reference(model, p, s) for p, s in zip(ps, plan)]
    assert got == want
    # The vectors matter (else the equality above proves nothing about steering).
    assert want[0] != reference(model, ps[0]) and want[2] != reference(model, ps[2])
    bm = engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks and not engine.requests


def test_prefix_cache_is_not_shared_across_steering(tiny_model):
    model = tiny_model("llama")
    prompt = prompts()[1]  # 27 tokens: 6 full blocks of 4
    happy = vector(model, seed=1)
    engine = Engine(model, block_size=4, num_blocks=64)

    def run(steering):
        out = engine.generate([prompt], params(steering))[0]
        return out.num_cached_tokens, out.outputs[0].token_ids

    cached, plain = run(None)
    assert cached == 0
    assert run(None)[0] == 24  # unsteered repeats hit the cache
    cached, steered = run(Steering(happy, 5.0))
    assert cached == 0 and steered == reference(model, prompt, Steering(happy, 5.0)) != plain
    cached, again = run(Steering(SteeringVector(dict(happy.directions)), 5.0))  # equal vector, another object
    assert cached == 24 and again == steered
    assert run(Steering(happy, 4.0))[0] == 0  # another scale is another intervention
    assert run(Steering(vector(model, seed=3), 5.0))[0] == 0  # another vector too
    assert run(Steering(happy, 0.0)) == (24, plain)  # scale 0 is no steering: it shares the unsteered blocks


def test_n_samples_of_a_steered_prompt_share_its_computed_blocks(tiny_model):
    model = tiny_model("llama")
    prompt = prompts()[3]
    steering = Steering(vector(model, seed=1), 5.0)
    engine = Engine(model, block_size=4, num_blocks=64, max_num_batched_tokens=64)
    out = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True, n=3,
                                                   steering=steering))[0]
    want = reference(model, prompt, steering)
    assert [o.token_ids for o in out.outputs] == [want] * 3
    assert engine.stats["prompt_computed_tokens"] == len(prompt)  # the others forked from the first's steered KV


def test_steered_requests_skip_speculation(tiny_model):
    model = tiny_model("llama")
    ps = prompts()[:2]
    steering = Steering(vector(model, seed=1), 6.0)
    engine = Engine(model, block_size=8, num_blocks=64, draft_model=model, num_speculative_tokens=3)
    steered = engine.generate([ps[0]], params(steering))[0]
    assert steered.outputs[0].token_ids == reference(model, ps[0], steering)
    assert engine.stats["draft_proposed"] == 0  # the unsteered draft never guessed for it
    plain = engine.generate([ps[1]], params())[0]
    assert plain.outputs[0].token_ids == reference(model, ps[1]) and engine.stats["draft_proposed"] > 0


def test_wrong_width_or_type_is_rejected_at_add_request(tiny_model):
    model = tiny_model("llama")
    engine = Engine(model, block_size=4, num_blocks=16)
    narrow = Steering(vector(model, width=16), 1.0, name="narrow")
    with pytest.raises(LmforgeError, match="steering vector 'narrow' has width 16 but the model's hidden size is 64"):
        engine.add_request([3, 4, 5], params(narrow))
    with pytest.raises(LmforgeError, match="layer 5 but the model has 2 layers"):
        engine.add_request([3, 4, 5], params(Steering(vector(model, layers=(5,)), 1.0)))
    with pytest.raises(LmforgeError, match="steering must be"):
        engine.add_request([3, 4, 5], params(("happy", 2.0)))
    assert not engine.requests and not engine.scheduler.has_work()
