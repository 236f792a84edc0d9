"""Budget forcing in the paged engine: the same tokens as ``generate`` (greedy, token for token), forced tokens
fed as a chunk with the KV kept consistent (preemption, speculative decoding, the prefix cache), streaming, stop
rules and max_tokens over forced tokens, and the bad inputs."""

from __future__ import annotations

import pytest
import torch

from lmforge.engine import Engine, SamplingParams
from lmforge.errors import LmforgeError
from lmforge.models.generate import generate
from lmforge.models.thinking import ThinkingBudget

from ..models.thinking_model import END, closing, thinking_model, thinking_tokenizer
from .conftest import CharTokenizer


@pytest.fixture(scope="module")
def tiny():
    tok = thinking_tokenizer()
    return tok, thinking_model(tok), tok.backend.token_to_id(END)


def prompts(tok) -> list[list[int]]:
    """Two chat prompts (the template opens <think>) and one plain text prompt (nothing opens it)."""
    chats = [tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True)
             for t in ("hello", "the quick brown fox jumps over the lazy dog")]
    return chats + [tok.encode("the lazy dog")]


def reference(model, ids: list[int], max_tokens: int, budget: ThinkingBudget | None, steering=None) -> list[int]:
    return generate(model, torch.tensor([ids]), max_new_tokens=max_tokens, eos_ids=(), thinking_budget=budget,
                    steering=steering)[0].tolist()


def greedy(max_tokens: int = 24, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kw)


def test_engine_closes_at_the_cap_token_for_token_with_generate(tiny):
    tok, model, end = tiny
    engine = Engine(model, tok, block_size=4, num_blocks=64)
    params = greedy(max_thinking_tokens=8, answer_prefix=" the answer is")
    budget = engine.thinking_budget(params)
    outs = engine.generate(prompts(tok), params)
    for ids, out in zip(prompts(tok), outs):
        assert out.outputs[0].token_ids == reference(model, ids, 24, budget)
    chat = outs[0].outputs[0].token_ids
    assert chat.index(end) == 8 and chat.count(end) == 1  # exactly 8 thinking tokens, then </think>
    assert chat[9:9 + len(budget.answer_prefix_ids)] == list(budget.answer_prefix_ids)
    assert "</think> the answer is" in outs[0].outputs[0].text
    assert end not in outs[2].outputs[0].token_ids  # the plain prompt never thinks: the budget stays out


def test_engine_extends_below_the_minimum_token_for_token_with_generate(tiny):
    tok, model, end = tiny
    eager, steering = closing(model, end)
    engine = Engine(eager, tok, block_size=4, num_blocks=64)
    ids = prompts(tok)[0]
    for min_t, max_t, expected_waits in ((5, 11, 3), (4, 11, 2), (5, 5, None)):
        params = greedy(12, min_thinking_tokens=min_t, max_thinking_tokens=max_t, steering=steering)
        budget = engine.thinking_budget(params)
        wait = list(budget.extension_ids)
        out = engine.generate([ids], params)[0].outputs[0].token_ids
        assert out == reference(eager, ids, 12, budget, steering)
        if expected_waits is not None:  # "Wait" is 2 tokens: the first count >= min ends the extensions
            assert out[:2 * expected_waits + 1] == wait * expected_waits + [end]
        else:  # min == max == 5: the third extension is cut after its first token by the cap
            assert out[:6] == wait * 2 + wait[:1] + [end]


def test_sampled_outputs_keep_the_bounds(tiny):
    tok, model, end = tiny
    engine = Engine(model, tok, block_size=4, num_blocks=128)
    params = SamplingParams(temperature=1.5, max_tokens=20, ignore_eos=True, n=6, seed=3,
                            min_thinking_tokens=3, max_thinking_tokens=6)
    closes = []
    for o in engine.generate([prompts(tok)[0]], params)[0].outputs:
        # the thinking started in the prompt, so its tokens are everything before the first </think>
        closes.append(o.token_ids.index(end))
    assert all(3 <= c <= 6 for c in closes), closes
    assert 6 in closes  # the cap closed at least one sample


def test_forced_tokens_arrive_in_one_step_and_stream_whole(tiny):
    tok, model, end = tiny
    engine = Engine(model, tok, block_size=4, num_blocks=64)
    params = greedy(20, max_thinking_tokens=5, answer_prefix=" the answer is")
    deltas = [o.outputs[0].delta_token_ids for o in engine.stream(prompts(tok)[0], params)]
    full = [t for d in deltas for t in d]
    assert full == reference(model, prompts(tok)[0], 20, engine.thinking_budget(params))
    prefix = list(engine.thinking_budget(params).answer_prefix_ids)
    assert [d for d in deltas if end in d] == [[full[4], end, *prefix]]  # the 5th token, then the forced chunk


def test_forced_chunks_survive_preemption_speculation_and_the_prefix_cache(tiny):
    tok, model, end = tiny
    params = greedy(30, max_thinking_tokens=6, answer_prefix=" the answer is")
    budget = ThinkingBudget.from_tokenizer(tok, max_tokens=6, answer_prefix=" the answer is")
    want = [reference(model, ids, 30, budget) for ids in prompts(tok)]
    tight = Engine(model, tok, block_size=4, num_blocks=24, max_num_seqs=3, max_num_batched_tokens=16)
    assert [o.outputs[0].token_ids for o in tight.generate(prompts(tok) * 2, params)] == want * 2
    assert tight.scheduler.num_preemptions > 0
    spec = Engine(model, tok, block_size=4, num_blocks=64, draft_model=model, num_speculative_tokens=3)
    assert [o.outputs[0].token_ids for o in spec.generate(prompts(tok), params)] == want
    assert spec.stats["draft_proposed"] == 0  # budgeted sequences decode plainly
    cached = Engine(model, tok, block_size=4, num_blocks=64)
    first = [o.outputs[0].token_ids for o in cached.generate(prompts(tok), params)]
    again = cached.generate(prompts(tok), params)
    assert first == want and [o.outputs[0].token_ids for o in again] == want
    assert again[0].num_cached_tokens > 0


def test_stop_rules_and_max_tokens_cover_forced_tokens(tiny):
    tok, model, end = tiny
    engine = Engine(model, tok, block_size=4, num_blocks=64)
    ids = prompts(tok)[0]
    full = engine.generate([ids], greedy(20, max_thinking_tokens=4, answer_prefix=" the answer is"))[0].outputs[0]
    # max_tokens ends the output inside the forced tokens: a prefix of the full output
    cut = engine.generate([ids], greedy(7, max_thinking_tokens=4, answer_prefix=" the answer is"))[0].outputs[0]
    assert cut.token_ids == full.token_ids[:7] and cut.finish_reason == "length"
    by_token = engine.generate([ids], greedy(20, max_thinking_tokens=4, stop_token_ids=[end]))[0].outputs[0]
    assert by_token.token_ids == full.token_ids[:5] and by_token.finish_reason == "stop"
    by_text = engine.generate([ids], greedy(20, max_thinking_tokens=4, stop=["</think>"]))[0].outputs[0]
    assert by_text.finish_reason == "stop" and by_text.text == full.text[:full.text.index("</think>")]


def test_forced_tokens_report_certain_logprobs(tiny):
    tok, model, end = tiny
    engine = Engine(model, tok, block_size=4, num_blocks=64)
    out = engine.generate([prompts(tok)[0]], greedy(10, max_thinking_tokens=3, answer_prefix=" so", logprobs=2))
    o = out[0].outputs[0]
    assert len(o.logprobs) == len(o.token_ids) == len(o.top_logprobs) == 10
    assert all(lp < 0 for lp in o.logprobs[:3])  # sampled by the model
    forced = 1 + len(tok.encode(" so", add_special_tokens=False))
    assert o.logprobs[3:3 + forced] == [0.0] * forced and o.top_logprobs[3:3 + forced] == [{}] * forced


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_thinking_tokens=-1), "max_thinking_tokens must be an integer >= 0, got -1"),
    (dict(min_thinking_tokens=-3), "min_thinking_tokens must be an integer >= 0, got -3"),
    (dict(min_thinking_tokens=6, max_thinking_tokens=5),
     "min_thinking_tokens (6) is larger than max_thinking_tokens (5)"),
    (dict(max_thinking_tokens=16), "max_thinking_tokens (16) must be below max_tokens (16)"),
    (dict(min_thinking_tokens=20), "min_thinking_tokens (20) must be below max_tokens (16)"),
    (dict(max_thinking_tokens=4, thinking_delimiters=("<think>",)), "thinking_delimiters must be two different"),
    (dict(max_thinking_tokens=4, thinking_delimiters=("<t>", "<t>")), "thinking_delimiters must be two different"),
    (dict(min_thinking_tokens=2, thinking_extension=""), "thinking_extension must be a non-empty string"),
    (dict(max_thinking_tokens=4, answer_prefix=""), "answer_prefix must be None or a non-empty string"),
    (dict(max_thinking_tokens=4, regex="[a-z]+"), "cannot be combined with structured output"),
])
def test_bad_budgets_are_refused_by_sampling_params(kwargs, message):
    with pytest.raises(LmforgeError) as e:
        SamplingParams(max_tokens=16, **kwargs).validate()
    assert message in str(e.value)


def test_budgets_the_model_cannot_run_are_one_clear_error(tiny, tiny_model):
    tok, model, end = tiny
    ids = prompts(tok)[0]
    plain_tok = thinking_tokenizer(delimiters=False)
    with pytest.raises(LmforgeError, match=r"the tokenizer has no token '<think>' \(the start thinking delimiter\)"):
        Engine(thinking_model(plain_tok), plain_tok).add_request(ids[:3], greedy(max_thinking_tokens=4))
    with pytest.raises(LmforgeError, match=r"has no token '<reason>'"):
        Engine(model, tok).add_request(ids, greedy(max_thinking_tokens=4, thinking_delimiters=("<reason>", END)))
    with pytest.raises(LmforgeError, match="budget forcing .* needs a tokenizer"):
        Engine(model).add_request(ids, greedy(max_thinking_tokens=4))
    with pytest.raises(LmforgeError, match="needs a tokenizer that can look up tokens"):
        Engine(tiny_model("llama"), CharTokenizer()).add_request([30, 31], greedy(max_thinking_tokens=4))
    small = tiny_model("llama")  # 128 ids: this tokenizer's <think> (300) is past its embedding
    with pytest.raises(LmforgeError, match=r"token ids \[.*300.*\], outside the model's vocabulary of 128"):
        Engine(small, tok).add_request([5, 6], greedy(max_thinking_tokens=4))
