"""Issue 18 (server): one request or client cannot decide how much CPU, memory or engine time is spent.

Each test uses small limits configured on the app, so no test needs a 50 MB body; each asserts a status code
(and an OpenAI-shaped error) and that a normal request still completes afterwards.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import uuid

import httpx
import pytest

from .tiny_server import running, save_tiny_chat_model

pytest.importorskip("uvicorn")

KEY = "sekrit"
AUTH = {"Authorization": f"Bearer {KEY}"}
NORMAL = {"model": "tiny", "prompt": "the quick", "max_tokens": 4, "temperature": 0}
LONG = 20000  # tokens the regex below forces (no stop token can come first): far longer than any test waits


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return save_tiny_chat_model(tmp_path_factory.mktemp("hard") / "tiny", layers=1, heads=2, kv_heads=1,
                                context=LONG + 64)


@pytest.fixture(scope="module")
def limits():
    from lmforge.serve.server import ServerLimits

    return ServerLimits(max_body_bytes=64 << 10, max_messages=16, max_prompt_chars=20_000, max_stop=4,
                        max_stop_chars=32, max_schema_bytes=4096, max_n=4, grammar_timeout_s=0.5,
                        max_concurrent_requests=3, body_timeout_s=1.0, header_timeout_s=1.0, keep_alive_s=1)


@pytest.fixture(scope="module")
def server(model_path, limits):
    from lmforge.engine.engine import Engine
    from lmforge.serve.server import build_app, uvicorn_settings

    app = build_app(Engine(model_path, max_num_seqs=8, max_num_batched_tokens=64), "tiny", api_key=KEY,
                    limits=limits)
    with running(app, **uvicorn_settings(limits)) as base:
        yield base, app


def post(base: str, route: str, body: dict | bytes, timeout: float = 60, **kw) -> httpx.Response:
    if isinstance(body, bytes):
        return httpx.post(base + route, content=body, headers={**AUTH, "Content-Type": "application/json"},
                          timeout=timeout, **kw)
    return httpx.post(base + route, json=body, headers=AUTH, timeout=timeout, **kw)


def assert_error(r: httpx.Response, status: int, *words: str) -> None:
    assert r.status_code == status, (r.status_code, r.text[:300])
    assert r.headers["content-type"].startswith("application/json"), r.headers
    message = r.json()["error"]["message"]
    assert all(w in message for w in words), message


def assert_normal_request_works(base: str) -> None:
    r = post(base, "/v1/completions", NORMAL, timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] >= 1


def wait_idle(app, seconds: float = 10.0) -> bool:
    engine, deadline = app.state.runner.engine, time.monotonic() + seconds
    while engine.has_unfinished() and time.monotonic() < deadline:
        time.sleep(0.05)
    return not engine.has_unfinished()


# ---- request size: body, messages, characters --------------------------------------------------------
def test_oversized_body_is_a_413_before_parsing(server):
    base, _ = server
    big = json.dumps({"model": "tiny", "prompt": "x" * (100 << 10)}).encode()
    assert_error(post(base, "/v1/completions", big), 413, "65536")

    def chunks():  # no Content-Length: counted while it streams in
        yield b'{"model": "tiny", "prompt": "'
        for _ in range(100):
            yield b"y" * 1024
        yield b'"}'

    r = httpx.post(base + "/v1/completions", content=chunks(), headers={**AUTH, "Content-Type": "application/json"},
                   timeout=30)
    assert_error(r, 413, "65536")
    assert_normal_request_works(base)


def test_message_count_and_characters_are_bounded(server):
    base, _ = server
    many = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}] * 17, "max_tokens": 2}
    assert_error(post(base, "/v1/chat/completions", many), 400, "messages", "at most 16")
    long_prompt = {"model": "tiny", "prompt": "z" * 20_001, "max_tokens": 2}
    assert_error(post(base, "/v1/completions", long_prompt), 400, "prompt", "20000")
    # each message under the per-field bound, together over it: refused before the template runs
    split = {"model": "tiny", "max_tokens": 2,
             "messages": [{"role": "user", "content": "a" * 12_000}, {"role": "user", "content": "b" * 12_000}]}
    assert_error(post(base, "/v1/chat/completions", split), 400, "24000 characters", "20000")
    assert_normal_request_works(base)


def test_n_and_stop_lists_are_bounded(server):
    base, _ = server
    assert_error(post(base, "/v1/completions", {**NORMAL, "n": 5}), 400, "n")
    assert_error(post(base, "/v1/completions", {**NORMAL, "stop": [f"s{i}" for i in range(5)]}), 400, "stop")
    assert_error(post(base, "/v1/completions", {**NORMAL, "stop": ["q" * 33]}), 400, "stop")
    r = post(base, "/v1/completions", {**NORMAL, "n": 4, "stop": ["zz", "qq"]})
    assert r.status_code == 200 and len(r.json()["choices"]) == 4, r.text


def test_limits_are_documented_in_openapi(server, limits):
    base, _ = server
    spec = httpx.get(base + "/openapi.json", timeout=30).json()
    text = json.dumps(spec)
    schemas = spec["components"]["schemas"]
    chat = schemas["ChatRequest"]["properties"]
    assert chat["messages"]["maxItems"] == limits.max_messages
    assert chat["n"]["maximum"] == limits.max_n
    assert f'"maxLength": {limits.max_prompt_chars}' in text and f'"maxItems": {limits.max_stop}' in text
    assert f"at most {limits.max_schema_bytes} bytes" in text
    for status in ("408", "413", "429"):
        assert status in spec["paths"]["/v1/chat/completions"]["post"]["responses"]


def test_lone_surrogate_is_a_400_not_a_500(server):
    base, _ = server
    chat = (b'{"model": "tiny", "messages": [{"role": "user", "content": "hi \\ud800 there"}], '
            b'"max_tokens": 2}')
    for route, body in (("/v1/chat/completions", chat),
                        ("/v1/completions", b'{"model": "tiny", "prompt": "x\\udfff", "max_tokens": 2}')):
        assert_error(post(base, route, body), 400, "surrogate")
    assert_normal_request_works(base)


# ---- templating and tokenizing off the event loop --------------------------------------------------------
def test_template_and_tokenizer_run_off_the_event_loop(model_path, limits):
    import asyncio

    from fastapi.testclient import TestClient

    from lmforge.engine.engine import Engine
    from lmforge.serve.server import build_app

    engine = Engine(model_path, max_num_batched_tokens=64)
    tok = engine.tokenizer
    on_loop: list[str] = []

    def spy(name, fn):
        def wrapped(*a, **k):
            try:
                asyncio.get_running_loop()
                on_loop.append(name)  # called on the event loop's thread: every other request waits
            except RuntimeError:
                pass
            return fn(*a, **k)
        return wrapped

    for name in ("apply_chat_template", "render_chat", "encode", "encode_batch"):
        setattr(tok, name, spy(name, getattr(tok, name)))
    with TestClient(build_app(engine, "tiny", limits=limits)) as c:
        r = c.post("/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                                                 "max_tokens": 2})
        assert r.status_code == 200, r.text
        assert c.post("/v1/completions", json=NORMAL).status_code == 200
    assert on_loop == []


# ---- grammars: bounded size, compiled off the engine thread with a time limit, cached ---------------------
def test_oversized_schema_is_a_400(server):
    base, _ = server
    schema = {"type": "string", "enum": [f"value{i}" for i in range(1000)]}
    assert_error(post(base, "/v1/completions", {**NORMAL, "guided_json": schema}), 400, "bytes", "4096")
    body = {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 4,
            "response_format": {"type": "json_schema", "json_schema": {"name": "e", "schema": schema}}}
    assert_error(post(base, "/v1/chat/completions", body), 400, "bytes")
    assert_normal_request_works(base)


def test_slow_grammar_compile_times_out_off_the_engine_thread_and_is_cached(model_path):
    pytest.importorskip("xgrammar")
    from lmforge.engine.engine import Engine
    from lmforge.serve.server import ServerLimits, build_app

    # ~6 s to compile with this vocabulary, 20x the limit (the size limit is raised so that the time limit is what
    # acts); values unique to this run, so no earlier compile of the same schema can answer it
    run = uuid.uuid4().hex[:8]
    schema = {"type": "string", "enum": [f"value{i}{run}" for i in range(20_000)]}
    limits = ServerLimits(max_schema_bytes=1 << 20, grammar_timeout_s=0.3)
    app = build_app(Engine(model_path, max_num_batched_tokens=64), "tiny", limits=limits)
    with running(app) as base:
        r = httpx.post(base + "/v1/completions", json={**NORMAL, "guided_json": schema}, timeout=60)
        assert_error(r, 400, "did not compile within 0.3 s")
        backend = app.state.runner.engine.grammar_backend()
        # The engine thread is free while the compile goes on: a normal request is served meanwhile.
        r = httpx.post(base + "/v1/completions", json=NORMAL, timeout=30)
        assert r.status_code == 200, r.text
        deadline = time.monotonic() + 120
        while backend.cached("json_schema", schema) is None and time.monotonic() < deadline:
            time.sleep(0.1)
        # the compile that outlived its request filled the cache: the same schema is now served at once
        r = httpx.post(base + "/v1/completions", json={**NORMAL, "guided_json": schema}, timeout=60)
        assert r.status_code == 200, r.text


# ---- disconnects ---------------------------------------------------------------------------------------
def test_non_streaming_request_is_aborted_when_its_client_disconnects(server):
    pytest.importorskip("xgrammar")
    base, app = server
    body = {"model": "tiny", "prompt": "the", "max_tokens": LONG, "n": 2, "temperature": 1.0, "seed": 0,
            "guided_regex": f"[0-9]{{{LONG}}}"}
    with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes its connection
        httpx.post(base + "/v1/completions", json=body, headers=AUTH, timeout=1.5)
    assert wait_idle(app), "the engine kept generating for a client that had gone"
    assert_normal_request_works(base)


# ---- slow clients, connection and request limits, the key compare ------------------------------------------
def _port(base: str) -> int:
    return int(base.rsplit(":", 1)[1])


def test_slow_request_head_is_cut_off(server):
    base, _ = server
    with socket.create_connection(("127.0.0.1", _port(base)), timeout=10) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")  # ... and the rest never comes
        try:
            closed = s.recv(1024) == b""
        except (TimeoutError, ConnectionResetError) as e:
            closed = isinstance(e, ConnectionResetError)
        assert closed, "the server held a connection whose request head never completed"
    assert_normal_request_works(base)


def test_slow_request_body_is_a_408(server):
    base, _ = server
    with socket.create_connection(("127.0.0.1", _port(base)), timeout=10) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode() +
                  b"\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"model\"")
        reply = b""
        while b"}}" not in reply:  # the head and the JSON body may come in separate reads
            chunk = s.recv(4096)
            if not chunk:
                break
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
    assert b'"error"' in reply
    assert_normal_request_works(base)


def test_requests_in_flight_are_limited_with_a_429(server, limits):
    base, _ = server
    held = []
    try:
        for _ in range(limits.max_concurrent_requests):  # each holds a slot while its body never arrives
            s = socket.create_connection(("127.0.0.1", _port(base)), timeout=10)
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode() +
                      b"\r\nContent-Length: 50\r\n\r\n{")
            held.append(s)
        time.sleep(0.2)
        r = post(base, "/v1/completions", NORMAL)
        assert_error(r, 429, "in flight")
        assert r.headers.get("retry-after") == "1"
        assert httpx.get(base + "/health", timeout=10).status_code == 200  # monitoring is exempt
    finally:
        for s in held:
            s.close()
    deadline = time.monotonic() + 10
    while post(base, "/v1/completions", NORMAL).status_code == 429 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert_normal_request_works(base)


def test_uvicorn_gets_the_connection_limits(limits):
    from lmforge.serve.server import uvicorn_settings

    settings = uvicorn_settings(limits)
    assert settings["limit_concurrency"] == limits.max_connections
    assert settings["timeout_keep_alive"] == limits.keep_alive_s
    assert settings["h11_max_incomplete_event_size"] == limits.max_header_bytes


def test_api_key_is_compared_in_constant_time(server, monkeypatch):
    import lmforge.serve.server as srv

    base, _ = server
    calls = []
    real = srv.hmac.compare_digest
    monkeypatch.setattr(srv.hmac, "compare_digest", lambda a, b: calls.append((a, b)) or real(a, b))
    r = httpx.post(base + "/v1/completions", json=NORMAL, headers={"Authorization": "Bearer wrong"}, timeout=30)
    assert_error(r, 401, "API key")
    assert calls and calls[-1] == (b"Bearer wrong", b"Bearer " + KEY.encode())
    assert_normal_request_works(base)


def test_every_error_is_openai_json(server, monkeypatch):
    base, app = server
    assert_error(httpx.get(base + "/v1/nothing", headers=AUTH, timeout=30), 404, "Not Found")
    assert_error(httpx.get(base + "/v1/completions", headers=AUTH, timeout=30), 405, "Not Allowed")
    assert_error(httpx.post(base + "/v1/completions", json=NORMAL, timeout=30), 401, "API key")
    runner = app.state.runner

    def broken(*a, **k):
        raise ValueError("simulated bug")

    monkeypatch.setattr(runner, "submit", broken)
    assert_error(post(base, "/v1/completions", NORMAL), 500, "simulated bug")
    monkeypatch.undo()
    assert_normal_request_works(base)


def test_serve_flags_come_from_server_limits():
    import argparse

    from lmforge.serve.cli import _serve_args
    from lmforge.serve.limits import ServerLimits, limits_from_args

    p = argparse.ArgumentParser()
    _serve_args(p)
    args = p.parse_args(["--model", "m", "--max-body-bytes", "1234", "--grammar-timeout-s", "2.5", "--max-n", "2"])
    assert limits_from_args(args) == ServerLimits(max_body_bytes=1234, grammar_timeout_s=2.5, max_n=2)
    with pytest.raises(Exception, match="max_stop must be a positive"):
        ServerLimits(max_stop=0)


# ---- a chat template that would burn unbounded CPU ------------------------------------------------------
def test_costly_chat_template_is_a_400_and_others_still_run(tmp_path):
    from fastapi.testclient import TestClient

    from lmforge.data.tokenizer import load_tokenizer
    from lmforge.engine.engine import Engine
    from lmforge.serve.server import ServerLimits, build_app

    path = save_tiny_chat_model(tmp_path / "m", layers=1, heads=2, kv_heads=1)
    tok = load_tokenizer(path)
    # nested loops: 10^10 iterations unbounded; the render's step/time budget stops it
    tok.chat_template = ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
                         "{{ messages[0]['content'] }}")
    engine = Engine(path, tokenizer=tok, max_num_batched_tokens=64)
    result: dict = {}

    def call():
        with TestClient(build_app(engine, "tiny", limits=ServerLimits(template_timeout_s=2.0))) as c:
            result["chat"] = c.post("/v1/chat/completions", json={"model": "tiny", "max_tokens": 2,
                                                                   "messages": [{"role": "user", "content": "x"}]})
            result["normal"] = c.post("/v1/completions", json=NORMAL)

    t = threading.Thread(target=call, daemon=True)
    t.start()
    t.join(timeout=120)
    assert not t.is_alive(), "the chat template ran without a bound"
    assert_error(result["chat"], 400, "chat template")
    assert result["normal"].status_code == 200
