"""Property-based fuzzing of the HTTP API from its own /openapi.json: never a 5xx, errors are OpenAI-shaped."""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402


def _app(tmp_path_factory):
    from lmforge import save_model
    from lmforge.data.tokenizer import train_bpe_tokenizer
    from lmforge.models.config import Config
    from lmforge.models.model import Transformer
    from lmforge.serve.engine import Engine
    from lmforge.serve.server import build_app

    root = tmp_path_factory.mktemp("fuzz")
    tok = train_bpe_tokenizer(["hello world, the quick brown fox jumps over the lazy dog. " * 30], vocab_size=300)
    cfg = Config.from_hf(dict(model_type="llama", vocab_size=300, hidden_size=32, intermediate_size=64,
                              num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                              max_position_embeddings=128, eos_token_id=tok.eos_ids))
    save_model(Transformer(cfg).init_weights(std=0.2, seed=0), root / "tiny", tokenizer=tok)
    return build_app(Engine(root / "tiny", max_num_batched_tokens=64), "tiny")


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    return _app(tmp_path_factory)


def test_fuzz_never_5xx(app):
    from fastapi.testclient import TestClient

    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    failures = []
    with TestClient(app) as client:
        for operation in schema.get_all_operations():
            op = operation.ok()

            @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
            @given(case=op.as_strategy())
            def check(case):
                body = None if type(case.body).__name__ == "NotSet" else case.body
                response = client.request(case.method, case.formatted_path, json=body,
                                          headers={k: v for k, v in (case.headers or {}).items()})
                if response.status_code >= 500:
                    failures.append((case.method, case.formatted_path, body, response.text[:200]))
                elif response.status_code >= 400:
                    assert "error" in response.json() and "message" in response.json()["error"]

            check()
    assert not failures, failures[:3]
