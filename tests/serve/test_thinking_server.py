"""Budget forcing through the HTTP server with the real `openai` client: the budget fields arrive in
``extra_body``; the forced close shows in the text, the stream and the per-token logprobs; bad budgets and a
model without the delimiter tokens are 400s with OpenAI's error body."""

from __future__ import annotations

import pytest
import torch

from ..models.thinking_model import END, save_thinking_model
from .tiny_server import running

openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    from lmforge.engine.engine import Engine
    from lmforge.serve.server import build_app

    root = tmp_path_factory.mktemp("think")
    with_delims = Engine(save_thinking_model(root / "think"), max_num_batched_tokens=64)
    without = Engine(save_thinking_model(root / "plain", delimiters=False), max_num_batched_tokens=64)
    with running(build_app(with_delims, "think")) as base, running(build_app(without, "plain")) as plain_base:
        yield {"think": (base, with_delims), "plain": (plain_base, without)}


def client(servers, name: str = "think"):
    return openai.OpenAI(base_url=servers[name][0] + "/v1", api_key="unused", max_retries=0, timeout=60)


MESSAGES = [{"role": "user", "content": "hello"}]


def reference_text(engine, prompt_ids: list[int], new_tokens: int, **budget) -> str:
    """What ``generate`` writes with the same budget: the server's text must be exactly this."""
    from lmforge.models.generate import generate
    from lmforge.models.thinking import ThinkingBudget

    tok = engine.tokenizer
    out = generate(engine.model, torch.tensor([prompt_ids]), max_new_tokens=new_tokens, eos_ids=(),
                   thinking_budget=ThinkingBudget.from_tokenizer(tok, **budget))
    return tok.decode(out[0].tolist())


def test_chat_with_max_thinking_tokens_closes_exactly_at_the_cap(servers):
    engine = servers["think"][1]
    c = client(servers)
    r = c.chat.completions.create(model="think", messages=MESSAGES, max_tokens=20, temperature=0, logprobs=True,
                                  extra_body={"max_thinking_tokens": 8, "answer_prefix": " the answer is"})
    pieces = [t.token for t in r.choices[0].logprobs.content]
    assert len(pieces) == 20 and pieces[8] == END and pieces.count(END) == 1  # 8 thinking tokens, then </think>
    text = r.choices[0].message.content
    ids = engine.tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True)
    assert text == reference_text(engine, ids, 20, max_tokens=8, answer_prefix=" the answer is")
    assert "</think> the answer is" in text
    unbudgeted = c.chat.completions.create(model="think", messages=MESSAGES, max_tokens=20, temperature=0)
    assert END not in unbudgeted.choices[0].message.content  # without the budget this model never closes
    streamed = c.chat.completions.create(model="think", messages=MESSAGES, max_tokens=20, temperature=0, stream=True,
                                         extra_body={"max_thinking_tokens": 8, "answer_prefix": " the answer is"})
    assert "".join(ch.choices[0].delta.content or "" for ch in streamed if ch.choices) == text


def test_completion_whose_prompt_opens_thinking(servers):
    engine = servers["think"][1]
    prompt = "the quick brown fox <think>"
    r = client(servers).completions.create(model="think", prompt=prompt, max_tokens=12, temperature=0,
                                           extra_body={"max_thinking_tokens": 4})
    text = r.choices[0].text
    assert text == reference_text(engine, engine.tokenizer.encode(prompt), 12, max_tokens=4)
    assert END in text


@pytest.mark.parametrize("extra, max_tokens, message", [
    ({"max_thinking_tokens": -1}, 20, "max_thinking_tokens: Input should be greater than or equal to 0"),
    ({"min_thinking_tokens": -1}, 20, "min_thinking_tokens: Input should be greater than or equal to 0"),
    ({"max_thinking_tokens": 4, "min_thinking_tokens": 6}, 20,
     "min_thinking_tokens (6) is larger than max_thinking_tokens (4)"),
    ({"max_thinking_tokens": 20}, 20, "max_thinking_tokens (20) must be below max_tokens (20)"),
    ({"max_thinking_tokens": 4, "thinking_delimiters": ["<think>"]}, 20, "thinking_delimiters: List should have"),
    ({"max_thinking_tokens": 4, "thinking_delimiters": ["<reason>", "</reason>"]}, 20,
     "the tokenizer has no token '<reason>' (the start thinking delimiter)"),
    ({"max_thinking_tokens": "4"}, 20, "max_thinking_tokens: Input should be a valid integer"),
    ({"max_thinking_tokens": 4, "guided_regex": "[a-z]+"}, 20, "cannot be combined with structured output"),
])
def test_bad_budgets_are_400s_with_an_openai_error_body(servers, extra, max_tokens, message):
    with pytest.raises(openai.BadRequestError) as e:
        client(servers).chat.completions.create(model="think", messages=MESSAGES, max_tokens=max_tokens,
                                                extra_body=extra)
    body = e.value.response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == "invalid_request_error"
    assert message in body["error"]["message"], body


def test_a_model_without_the_delimiter_tokens_is_a_400(servers):
    c = client(servers, "plain")
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="plain", prompt="hello", max_tokens=8, extra_body={"max_thinking_tokens": 4})
    message = e.value.response.json()["error"]["message"]
    assert "the tokenizer has no token '<think>' (the start thinking delimiter)" in message
    # the same server still answers requests without a budget
    assert c.completions.create(model="plain", prompt="hello", max_tokens=4, temperature=0).choices[0].finish_reason
