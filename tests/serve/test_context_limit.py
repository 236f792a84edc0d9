"""max_tokens + prompt tokens beyond the model's context is a 400 naming the numbers (as OpenAI and vLLM do)."""

from __future__ import annotations

import re

import pytest

from .tiny_server import save_tiny_chat_model

CONTEXT = 128


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    from fastapi.testclient import TestClient

    from lmforge.engine.engine import Engine
    from lmforge.serve.server import build_app

    path = save_tiny_chat_model(tmp_path_factory.mktemp("ctx") / "tiny", layers=1, heads=2, kv_heads=1,
                                context=CONTEXT)
    with TestClient(build_app(Engine(path, max_num_batched_tokens=64), "tiny")) as c:
        yield c


ENDPOINTS = {"/v1/completions": {"prompt": "the quick brown fox"},
             "/v1/chat/completions": {"messages": [{"role": "user", "content": "the quick brown fox"}]}}


@pytest.mark.parametrize("route", list(ENDPOINTS))
@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
def test_max_tokens_past_the_context_is_a_400(client, route, field):
    r = client.post(route, json={"model": "tiny", **ENDPOINTS[route], field: 100_000})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    m = re.fullmatch(rf"{field} \(100000\) \+ prompt tokens \((\d+)\) exceeds the model's context length "
                     rf"\({CONTEXT}\)", error["message"])
    assert m, error["message"]
    assert error["param"] == field and error["type"] == "invalid_request_error"


@pytest.mark.parametrize("route", list(ENDPOINTS))
def test_max_tokens_that_exactly_fills_the_context_is_served(client, route):
    over = client.post(route, json={"model": "tiny", **ENDPOINTS[route], "max_tokens": CONTEXT})
    prompt_tokens = int(re.search(r"prompt tokens \((\d+)\)", over.json()["error"]["message"]).group(1))
    r = client.post(route, json={"model": "tiny", **ENDPOINTS[route], "max_tokens": CONTEXT - prompt_tokens,
                                 "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] == prompt_tokens
    assert r.json()["usage"]["completion_tokens"] <= CONTEXT - prompt_tokens


@pytest.mark.parametrize("route, most", [("/v1/completions", 16), ("/v1/chat/completions", None)])
def test_omitted_max_tokens_still_works(client, route, most):
    """Completions default to 16 tokens (OpenAI's legacy default); chat may use the rest of the context."""
    r = client.post(route, json={"model": "tiny", **ENDPOINTS[route], "temperature": 0})
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    assert 1 <= usage["completion_tokens"] <= (most or CONTEXT - usage["prompt_tokens"])
    assert usage["total_tokens"] <= CONTEXT


def test_omitted_max_tokens_with_a_nearly_full_context(client):
    """A prompt that leaves fewer than 16 tokens of room still works without max_tokens (stops at the context)."""
    ids = [5] * (CONTEXT - 4)
    r = client.post("/v1/completions", json={"model": "tiny", "prompt": ids, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] <= 4


def test_prompt_that_fills_the_context_is_a_400(client):
    r = client.post("/v1/completions", json={"model": "tiny", "prompt": [5] * CONTEXT, "max_tokens": 1})
    assert r.status_code == 400 and "prompt has 128 tokens" in r.json()["error"]["message"], r.text
    assert "context length is 128" in r.json()["error"]["message"]


def test_endpoint_descriptions_document_the_limit(client):
    paths = client.get("/openapi.json").json()["paths"]
    for route in ENDPOINTS:
        assert "exceeds the model's context length" in paths[route]["post"]["description"]
