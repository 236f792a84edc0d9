"""Property-based fuzzing of the HTTP API from its own /openapi.json: never a 5xx, errors are OpenAI-shaped."""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402

from .tiny_server import save_tiny_chat_model  # noqa: E402


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    from lmforge.engine.engine import Engine
    from lmforge.serve.server import build_app

    path = save_tiny_chat_model(tmp_path_factory.mktemp("fuzz") / "tiny", layers=1, heads=2, kv_heads=1)
    return build_app(Engine(path, max_num_batched_tokens=64), "tiny")


def test_fuzz_never_5xx(app):
    from fastapi.testclient import TestClient

    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    failures = []
    with TestClient(app) as client:
        for operation in schema.get_all_operations():
            op = operation.ok()

            @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None,
                      derandomize=True)  # the same cases every run: CI stays reproducible
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
