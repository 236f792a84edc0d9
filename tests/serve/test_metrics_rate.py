"""/metrics: tokens/s over a recent window (not the lifetime average) and a raw counter for Prometheus rate()."""

from __future__ import annotations

import pytest

from .tiny_server import save_tiny_chat_model


class FakeClock:
    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} missing from /metrics:\n{text}")


@pytest.fixture(scope="module")
def app_and_clock(tmp_path_factory):
    from lmforge.engine.engine import Engine
    from lmforge.serve.server import build_app

    path = save_tiny_chat_model(tmp_path_factory.mktemp("metrics") / "tiny", layers=1, heads=2, kv_heads=1)
    clock = FakeClock()
    return build_app(Engine(path, max_num_batched_tokens=64), "tiny", clock=clock), clock


def test_tokens_per_second_is_windowed_and_counter_is_exposed(app_and_clock):
    from fastapi.testclient import TestClient

    from lmforge.serve.server import RATE_WINDOW_S

    app, clock = app_and_clock
    body = {"model": "tiny", "prompt": "the quick", "max_tokens": 8, "temperature": 0}
    with TestClient(app) as c:
        clock.now = 100.0
        first = c.post("/v1/completions", json=body).json()["usage"]["completion_tokens"]
        text = c.get("/metrics").text
        assert "# TYPE lmforge_generation_tokens_total counter" in text
        assert _metric(text, "lmforge_generation_tokens_total") == first
        assert _metric(text, "lmforge_generation_tokens_per_second") == pytest.approx(first / RATE_WINDOW_S, abs=1e-3)

        clock.now += 3600.0  # an idle hour: the lifetime average (first / 3700 s) is not the current rate
        text = c.get("/metrics").text
        assert _metric(text, "lmforge_generation_tokens_per_second") == 0.0
        assert _metric(text, "lmforge_generation_tokens_total") == first  # the counter never goes down

        second = c.post("/v1/completions", json=body).json()["usage"]["completion_tokens"]
        clock.now += 10.0
        text = c.get("/metrics").text
        assert _metric(text, "lmforge_generation_tokens_per_second") == pytest.approx(second / RATE_WINDOW_S, abs=1e-3)
        assert _metric(text, "lmforge_generation_tokens_total") == first + second

        clock.now += RATE_WINDOW_S  # the burst has left the window
        assert _metric(c.get("/metrics").text, "lmforge_generation_tokens_per_second") == 0.0


def test_rate_soon_after_start_up_divides_by_uptime(tmp_path):
    """Before a whole window has passed the rate is over the time since start-up, not the full window."""
    from lmforge.serve.server import AsyncEngine

    class Idle:  # the engine thread only asks whether there is work
        def has_unfinished(self) -> bool:
            return False

    clock = FakeClock(50.0)
    runner = AsyncEngine(Idle(), clock=clock, rate_window=30.0)
    try:
        clock.now = 55.0
        runner._count(20)
        assert runner.token_rate() == pytest.approx(20 / 5.0)
        clock.now = 80.0
        assert runner.token_rate() == pytest.approx(20 / 30.0)
        clock.now = 85.1
        assert runner.token_rate() == 0.0 and runner.generated_tokens == 20
    finally:
        runner.close()
