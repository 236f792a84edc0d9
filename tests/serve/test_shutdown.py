"""Graceful shutdown: running requests get a bounded grace period, then are aborted (503 / an error event),
and the server process exits; nothing waits on a long generation."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from .tiny_server import free_port, running, save_tiny_chat_model

pytest.importorskip("uvicorn")
pytest.importorskip("xgrammar")

# The regex admits no stop token before LONG digits (one token each): the random model cannot end early.
LONG = 30000


def _long_body(stream: bool) -> dict:
    return {"model": "tiny", "prompt": "the", "max_tokens": LONG, "temperature": 1.0, "seed": 0, "stream": stream,
            "guided_regex": f"[0-9]{{{LONG}}}"}


def _call(base: str, stream: bool, results: dict, key: str) -> None:
    """One long request; records (status, JSON body or the SSE data lines) or ("closed", error)."""
    try:
        with httpx.Client(timeout=httpx.Timeout(90.0)) as c:
            if stream:
                with c.stream("POST", base + "/v1/completions", json=_long_body(True)) as r:
                    results[key] = (r.status_code, [line[6:] for line in r.iter_lines() if line.startswith("data: ")])
            else:
                r = c.post(base + "/v1/completions", json=_long_body(False))
                results[key] = (r.status_code, r.json())
    except httpx.TransportError as e:  # a closed connection is an acceptable answer, a hang is not
        results[key] = ("closed", repr(e))


def _running(base: str) -> int:
    for line in httpx.get(base + "/metrics", timeout=10).text.splitlines():
        if line.startswith("lmforge_requests_running "):
            return int(line.split()[1])
    return 0


def _wait_running(base: str, n: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while _running(base) < n:
        assert time.monotonic() < deadline, "the long requests never started"
        time.sleep(0.05)


def _start_long_requests(base: str, results: dict) -> list[threading.Thread]:
    """A plain and a streaming long request on their own threads, both running on the server on return."""
    threads = [threading.Thread(target=_call, args=(base, s, results, k), daemon=True)
               for s, k in ((False, "plain"), (True, "stream"))]
    for t in threads:
        t.start()
    _wait_running(base, 2)
    return threads


def _check_answers(results: dict) -> None:
    status, body = results["plain"]
    assert status in (200, 503, "closed"), results["plain"]  # finished, aborted, or dropped: never a 500
    if status == 503:
        assert "shutting down" in body["error"]["message"] and body["error"]["type"] == "server_error"
    status, lines = results["stream"]
    if status != "closed":
        assert status == 200 and lines, results["stream"]
        assert lines[-1] == "[DONE]" or "shutting down" in json.loads(lines[-1])["error"]["message"], lines[-3:]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return save_tiny_chat_model(tmp_path_factory.mktemp("shutdown") / "tiny", layers=1, heads=2, kv_heads=1,
                                context=LONG + 64)


def test_drain_aborts_running_requests_after_the_grace(model_path):
    """In-process: drain(grace) lets requests run for the grace, then answers them with 503 / an error event."""
    from lmforge.engine.engine import Engine
    from lmforge.serve.server import build_app

    app = build_app(Engine(model_path, max_num_seqs=2), "tiny")
    runner = app.state.runner
    with running(app) as base:
        results: dict = {}
        threads = _start_long_requests(base, results)
        started = time.monotonic()
        runner.drain(0.5)
        for t in threads:
            t.join(timeout=30)
        assert not any(t.is_alive() for t in threads), "a client hung after drain()"
        assert time.monotonic() - started < 15
        assert results["plain"][0] == 503, results["plain"]  # LONG tokens cannot finish in 0.5 s
        assert "shutting down" in results["plain"][1]["error"]["message"]
        assert "shutting down" in json.loads(results["stream"][1][-1])["error"]["message"]
        # new work is refused while draining
        r = httpx.post(base + "/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 2}, timeout=30)
        assert r.status_code == 503, r.text
        deadline = time.monotonic() + 10
        while runner.engine.has_unfinished() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not runner.engine.has_unfinished()


def test_sigterm_with_a_long_request_in_flight_exits_within_the_grace(model_path, tmp_path):
    grace, margin = 2.0, 10.0  # margin: process teardown on a busy CI machine
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    log_path = tmp_path / "server.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "lmforge.cli", "serve", "--model", str(model_path),
                                 "--port", str(port), "--device", "cpu", "--max-num-seqs", "2",
                                 "--shutdown-timeout", str(grace)], stdout=log, stderr=subprocess.STDOUT, env=env)
    threads: list[threading.Thread] = []
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, f"the server died on start-up:\n{log_path.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "the server did not come up"
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        results: dict = {}
        threads = _start_long_requests(base, results)
        time.sleep(0.3)
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace + margin)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running {grace + margin:.0f} s after SIGTERM:\n{log_path.read_text()[-3000:]}")
        took = time.monotonic() - sent
        assert took >= grace - 0.5, f"exited after {took:.1f} s: the grace period was not given"
        for t in threads:
            t.join(timeout=10)
        assert not any(t.is_alive() for t in threads), "a client hung after the server exited"
        _check_answers(results)
        # Our drain answered the requests; uvicorn's backstop (cancelling request tasks) was not needed.
        assert "timeout graceful shutdown exceeded" not in log_path.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
