"""SamplingParams validation, the sampler's math on hand-made logits, and sampling through the engine."""

from __future__ import annotations

import math

import pytest
import torch

from lmforge.errors import LmforgeError
from lmforge.engine import Engine, SamplingParams
from lmforge.engine.sampler import Sampler, apply_penalties
from lmforge.models.sampling import filter_logits
from lmforge.engine.sequence import Sequence

from .conftest import CharTokenizer


@pytest.mark.parametrize("kwargs, message", [
    (dict(top_p=0.0), "top_p must be in (0, 1]"),
    (dict(top_p=1.5), "top_p must be in (0, 1]"),
    (dict(temperature=-1), "temperature must be >= 0"),
    (dict(top_k=-3), "top_k must be"),
    (dict(min_p=2.0), "min_p must be in [0, 1]"),
    (dict(repetition_penalty=0.0), "repetition_penalty must be > 0"),
    (dict(frequency_penalty=3.0), "frequency_penalty must be in [-2, 2]"),
    (dict(presence_penalty=-2.5), "presence_penalty must be in [-2, 2]"),
    (dict(max_tokens=0), "max_tokens must be >= 1"),
    (dict(n=0), "n must be >= 1"),
    (dict(logprobs=-1), "logprobs must be"),
    (dict(stop=[""]), "stop strings must be non-empty"),
    (dict(stop_token_ids=[-1]), "stop_token_ids"),
])
def test_validation_errors(kwargs, message):
    with pytest.raises(LmforgeError, match=message.replace("(", r"\(").replace("[", r"\[")):
        SamplingParams(**kwargs).validate()


def test_valid_params_pass_and_stop_string_is_listed():
    p = SamplingParams(temperature=0.7, top_p=0.9, top_k=40, min_p=0.05, stop="x", seed=3).validate()
    assert p.stop == ["x"]


def test_engine_rejects_bad_requests(tiny_model):
    engine = Engine(tiny_model("llama"), block_size=4, num_blocks=8)
    with pytest.raises(LmforgeError, match="top_p"):
        engine.add_request([5, 6], SamplingParams(top_p=0))
    with pytest.raises(LmforgeError, match="needs a tokenizer"):
        engine.add_request("hello")
    with pytest.raises(LmforgeError, match="token ids must be in"):
        engine.add_request([1000])
    with pytest.raises(LmforgeError, match="KV blocks"):
        engine.add_request([5] * 20, SamplingParams(max_tokens=40))
    assert not engine.requests


# ---- the math on hand-made tensors ------------------------------------------------------------------
def test_penalties_match_definitions():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0]])
    one = torch.tensor([1.0])
    out = apply_penalties(logits, [[0]], [[1, 2, 2]], torch.tensor([2.0]), torch.zeros(1), torch.zeros(1))
    # repetition: seen tokens 0 (prompt), 1, 2 (output): positive / 2, negative * 2
    assert torch.allclose(out, torch.tensor([[1.0, -2.0, 0.25, 3.0, -2.0]]))
    out = apply_penalties(logits, [[0]], [[1, 2, 2]], one, torch.tensor([0.5]), torch.zeros(1))
    assert torch.allclose(out, torch.tensor([[2.0, -1.5, -0.5, 3.0, -2.0]]))  # - 0.5 * count, output only
    out = apply_penalties(logits, [[0]], [[1, 2, 2]], one, torch.zeros(1), torch.tensor([0.3]))
    assert torch.allclose(out, torch.tensor([[2.0, -1.3, 0.2, 3.0, -2.0]]))  # - 0.3 once per present token
    # rows are independent
    two = apply_penalties(logits.repeat(2, 1), [[], [0]], [[], [1, 2, 2]], torch.tensor([1.0, 2.0]),
                          torch.zeros(2), torch.zeros(2))
    assert torch.equal(two[0], logits[0]) and torch.allclose(two[1], torch.tensor([1.0, -2.0, 0.25, 3.0, -2.0]))


def test_filters():
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    keep = lambda k=0, p=1.0, m=0.0: (filter_logits(logits, torch.tensor([k]), torch.tensor([p]),  # noqa: E731
                                                    torch.tensor([m])) > -math.inf)[0].tolist()
    assert keep(k=2) == [True, True, False, False, False]
    assert keep(p=0.6) == [True, True, False, False, False]  # 0.5 < 0.6, 0.5 + 0.2 >= 0.6
    assert keep(p=0.5) == [True, False, False, False, False]
    assert keep(p=0.01) == [True, False, False, False, False]  # the top token always survives
    assert keep(m=0.3) == [True, True, True, False, False]  # >= 0.3 * 0.5
    assert keep() == [True] * 5


def _seqs(params_list):
    return [Sequence(i, str(i), 0, [3, 4], p) for i, p in enumerate(params_list)]


def test_top_k_one_is_greedy_and_logprobs():
    torch.manual_seed(0)
    logits = torch.randn(6, 50)
    seqs = _seqs([SamplingParams(temperature=1.5, top_k=1, logprobs=3)] * 3 + [SamplingParams(temperature=0)] * 3)
    res = Sampler()(logits, seqs)
    assert res.tokens == logits.argmax(-1).tolist()
    logp = torch.log_softmax(logits, -1)
    assert res.logprobs == pytest.approx(logp.max(-1).values.tolist(), abs=1e-6)
    assert list(res.top_logprobs[0]) == logp[0].topk(3).indices.tolist() and res.top_logprobs[3] == {}


def test_seeded_rows_do_not_depend_on_the_batch():
    torch.manual_seed(1)
    logits = torch.randn(4, 100)
    p = SamplingParams(temperature=1.0, seed=7)
    alone = [Sampler()(logits[i:i + 1], _seqs([p])).tokens[0] for i in range(4)]
    together = Sampler()(logits, _seqs([p] * 4)).tokens
    assert alone == together


def test_sampling_follows_the_distribution():
    probs = torch.tensor([0.6, 0.3, 0.1])
    seq = _seqs([SamplingParams(temperature=1.0, seed=0)])
    counts = torch.zeros(3)
    for _ in range(3000):
        counts[Sampler()(probs.log()[None], seq).tokens[0]] += 1
    assert torch.allclose(counts / 3000, probs, atol=0.03)


# ---- through the engine ------------------------------------------------------------------------------
PROMPTS = [[5, 9, 17, 33, 2 + 3 * i] for i in range(5)]


def test_seeded_requests_reproducible_and_n(tiny_model):
    model = tiny_model("llama")
    p = SamplingParams(temperature=1.0, top_p=0.95, seed=123, max_tokens=12, n=3, ignore_eos=True)
    a = Engine(model, block_size=4, num_blocks=64).generate(PROMPTS, p)
    # Different batching (one request at a time, other traffic mixed in) must not change seeded samples.
    engine = Engine(model, block_size=8, num_blocks=64, max_num_batched_tokens=16)
    engine.add_request([7, 7, 7], SamplingParams(temperature=1.0, max_tokens=5))
    b = engine.generate(PROMPTS, p)
    for x, y in zip(a, b):
        assert len(x.outputs) == 3 and [o.index for o in x.outputs] == [0, 1, 2]
        assert [o.token_ids for o in x.outputs] == [o.token_ids for o in y.outputs]
        assert all(len(o.token_ids) == 12 and o.finish_reason == "length" for o in x.outputs)
    assert len({tuple(o.token_ids) for o in a[0].outputs}) > 1  # the n samples differ


def test_top_k_one_through_engine_equals_greedy(tiny_model):
    engine = Engine(tiny_model("mistral"), block_size=4, num_blocks=64)
    greedy = engine.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
    top1 = engine.generate(PROMPTS, SamplingParams(temperature=2.0, top_k=1, max_tokens=10, ignore_eos=True))
    assert [o.outputs[0].token_ids for o in greedy] == [o.outputs[0].token_ids for o in top1]


def test_max_tokens_stop_ids_and_logprobs(tiny_model):
    engine = Engine(tiny_model("llama"), block_size=4, num_blocks=64)
    out = engine.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=7, ignore_eos=True, logprobs=2))[0]
    ids = out.outputs[0].token_ids
    assert len(ids) == 7 and out.outputs[0].finish_reason == "length"
    assert len(out.outputs[0].logprobs) == 7 and all(len(d) == 2 for d in out.outputs[0].top_logprobs)
    assert all(lp == pytest.approx(max(d.values())) for lp, d in zip(out.outputs[0].logprobs,
                                                                       out.outputs[0].top_logprobs))  # greedy
    stop = engine.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=7, stop_token_ids=[ids[3]],
                                                        ignore_eos=True))[0].outputs[0]
    first = ids.index(ids[3])
    assert stop.token_ids == ids[:first + 1] and stop.finish_reason == "stop"


def test_stop_strings_trimmed_and_streaming(tiny_model):
    engine = Engine(tiny_model("llama"), tokenizer=CharTokenizer(), block_size=4, num_blocks=64)
    plain = engine.generate(["hello"], SamplingParams(temperature=0, max_tokens=16))[0].outputs[0]
    assert len(plain.text) == 16
    stop = plain.text[6:8]
    cut = plain.text.find(stop)
    out = engine.generate(["hello"], SamplingParams(temperature=0, max_tokens=16, stop=["zzzzz", stop]))[0]
    assert out.outputs[0].text == plain.text[:cut] and out.outputs[0].finish_reason == "stop"
    # Streaming: the deltas add up to the final text; nothing of the stop string leaks out first.
    pieces, last = [], None
    for last in engine.stream("hello", SamplingParams(temperature=0, max_tokens=16, stop=[stop])):
        pieces.append(last.outputs[0].delta_text)
    assert last.finished and "".join(pieces) == plain.text[:cut]
    assert not engine.requests and engine.block_manager.num_free_blocks == 64


def test_abort_frees_blocks(tiny_model):
    engine = Engine(tiny_model("llama"), block_size=4, num_blocks=64, max_num_batched_tokens=8)
    a = engine.add_request(list(range(3, 30)), SamplingParams(max_tokens=50))
    b = engine.add_request(list(range(3, 20)), SamplingParams(max_tokens=50))
    for _ in range(5):
        engine.step()
    out = engine.abort(a)
    assert out.finished and out.outputs[0].finish_reason == "abort"
    assert engine.abort("nope") is None
    stream = engine.stream([4, 5, 6], SamplingParams(max_tokens=50))
    next(stream)
    stream.close()  # a client going away aborts its request
    engine.abort(b)
    bm = engine.block_manager
    assert not engine.requests and not engine.scheduler.has_work()
    assert bm.num_free_blocks == 64 and all(c == 0 for c in bm.ref_count)


def test_out_of_range_seed_is_rejected_up_front():
    from lmforge.errors import LmforgeError
    from lmforge.engine.sequence import SamplingParams

    SamplingParams(seed=2**64 - 2, n=2).validate()
    with pytest.raises(LmforgeError, match="seed must be in"):
        SamplingParams(seed=2**64, n=1).validate()
    with pytest.raises(LmforgeError, match="seed must be in"):
        SamplingParams(seed=2**64 - 1, n=2).validate()
