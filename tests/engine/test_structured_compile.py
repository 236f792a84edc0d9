"""Grammar compiles: off the caller's thread, shared by concurrent requests for one schema, a bounded LRU
cache, and an engine that takes an already-compiled grammar without compiling on its own thread."""

from __future__ import annotations

import threading

import pytest

from ..serve.tiny_server import save_tiny_chat_model

pytest.importorskip("xgrammar")


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from lmforge.engine.engine import Engine

    return Engine(save_tiny_chat_model(tmp_path_factory.mktemp("gc") / "tiny", layers=1, heads=2, kv_heads=1),
                  max_num_batched_tokens=64)


def schema(i: int) -> dict:
    return {"type": "object", "properties": {f"k{i}": {"type": "integer"}}, "required": [f"k{i}"]}


def test_compile_runs_on_the_backend_thread_and_is_shared(engine, monkeypatch):
    backend = engine.grammar_backend()
    threads, gate = [], threading.Event()
    real = backend._compile_uncached

    def slow(kind, source):
        threads.append(threading.current_thread().name)
        gate.wait(10)
        return real(kind, source)

    monkeypatch.setattr(backend, "_compile_uncached", slow)
    first = backend.compile_async("json_schema", schema(100))
    second = backend.compile_async("json_schema", schema(100))  # the same schema while it compiles
    assert second is first
    gate.set()
    assert first.result(timeout=30) is not None
    assert threads == [threads[0]] and threads[0].startswith("lmforge-grammar")
    assert backend.compile_async("json_schema", schema(100)).result(timeout=1) is first.result()


def test_cache_is_a_bounded_lru(engine, monkeypatch):
    backend = engine.grammar_backend()
    monkeypatch.setattr(backend, "cache_size", 3)
    for i in range(5):
        backend.compile("json_schema", schema(i))
    assert len(backend._cache) <= 3
    assert backend.cached("json_schema", schema(4)) is not None and backend.cached("json_schema", schema(0)) is None


def test_bad_schema_is_an_lmforge_error_through_the_future(engine):
    from lmforge.errors import LmforgeError

    with pytest.raises(LmforgeError, match="invalid json schema"):
        engine.grammar_backend().compile_async("json_schema", {"type": 5}).result(timeout=30)


def test_add_request_with_a_compiled_grammar_does_not_compile(engine, monkeypatch):
    from lmforge.engine.sequence import SamplingParams

    backend = engine.grammar_backend()
    compiled = backend.compile("regex", "[0-9]{3}")
    monkeypatch.setattr(backend, "compile", lambda *a, **k: pytest.fail("compiled on the engine's thread"))
    monkeypatch.setattr(backend, "compile_async", lambda *a, **k: pytest.fail("compiled on the engine's thread"))
    params = SamplingParams(max_tokens=5, temperature=1.0, seed=0, regex="[0-9]{3}")
    rid = engine.add_request("the", params, grammar=compiled)
    out = None
    while engine.has_unfinished():
        for o in engine.step():
            if o.request_id == rid:
                out = o
    assert out is not None and len(out.outputs[0].text) == 3 and out.outputs[0].text.isdigit()
