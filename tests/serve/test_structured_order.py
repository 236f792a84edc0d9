"""response_format json_schema output keeps the schema's property order (as OpenAI does), not alphabetical."""

from __future__ import annotations

import json

import pytest

from .tiny_server import save_tiny_chat_model

pytest.importorskip("xgrammar")

# Declared order name, age, hobbies; alphabetical would be age, hobbies, name.
SCHEMA = {"type": "object",
          "properties": {"name": {"type": "string", "maxLength": 6},
                         "age": {"type": "integer", "minimum": 0, "maximum": 99},
                         "hobbies": {"type": "array", "items": {"type": "string", "maxLength": 5}, "maxItems": 2}},
          "required": ["name", "age", "hobbies"], "additionalProperties": False}


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    from fastapi.testclient import TestClient

    from lmforge.engine.engine import Engine
    from lmforge.serve.server import build_app

    path = save_tiny_chat_model(tmp_path_factory.mktemp("order") / "tiny", layers=1, heads=2, kv_heads=1, context=512)
    with TestClient(build_app(Engine(path, max_num_batched_tokens=64), "tiny")) as c:
        yield c


@pytest.mark.parametrize("seed", [0, 1])
def test_json_schema_keys_come_in_declared_order(client, seed):
    r = client.post("/v1/chat/completions", json={
        "model": "tiny", "messages": [{"role": "user", "content": "a person"}], "max_tokens": 300,
        "temperature": 0.8, "seed": seed,
        "response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "stop", choice
    # strict=False: xgrammar's string rule admits raw control characters, which a random model samples.
    pairs = json.loads(choice["message"]["content"], strict=False, object_pairs_hook=list)
    assert [k for k, _ in pairs] == ["name", "age", "hobbies"]


def test_a_reordered_schema_is_its_own_grammar(client):
    """The grammar cache must not conflate two schemas that differ only in property order."""
    reordered = {**SCHEMA, "properties": dict(reversed(list(SCHEMA["properties"].items())))}
    for schema, order in ((SCHEMA, ["name", "age", "hobbies"]), (reordered, ["hobbies", "age", "name"])):
        r = client.post("/v1/completions", json={
            "model": "tiny", "prompt": "the", "max_tokens": 300, "temperature": 0.8, "seed": 0,
            "guided_json": schema})
        assert r.status_code == 200, r.text
        pairs = json.loads(r.json()["choices"][0]["text"], strict=False, object_pairs_hook=list)
        assert [k for k, _ in pairs] == order
