"""Hostile requests against one `lmforge serve`, interleaved with normal ones (issue 18).

    python benchmarks/server_stress.py              # ~2-3 minutes on 2 CPU cores
    python benchmarks/server_stress.py --quick      # fewer requests

Builds a small random chat model (BPE tokenizer + Llama, saved in the HF format), starts `lmforge serve` on
127.0.0.1 with its default limits in a subprocess, and runs two phases with the same normal traffic (short
completions and chats, greedy, a few at a time):

  1. baseline: normal requests only;
  2. attack: the same normal requests while other clients send what issue 18 lists: 50 MB chat bodies, a
     10-million-character prompt, 1.5 M messages, a 900,000-character prompt under the limits (templated and
     tokenized on the worker threads), enums of 10,000 and 100,000 strings as guided_json / response_format,
     200,000 stop strings with n=16, non-streaming n=16 requests whose clients disconnect, lone surrogates,
     and slow clients (request heads and bodies trickled byte by byte).

Prints normal-request latency p50/p99 in both phases, the server's peak memory, the answers the hostile
requests got, the 5xx count (target 0), lost normal requests (target 0: every one must get its 200), and
whether the engine was idle after the attack (dropped requests aborted). The server is stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

WORDS = ["river", "stone", "cloud", "music", "paper", "sugar", "light", "table", "green", "apple", "north",
         "winter", "garden", "silver", "engine", "market", "forest", "signal", "bridge", "harbor"]


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))]


def build_model(path: Path) -> Path:
    from lmforge import save_model
    from lmforge.data.tokenizer import train_bpe_tokenizer
    from lmforge.models.config import Config
    from lmforge.models.model import Transformer

    rng = random.Random(0)
    tok = train_bpe_tokenizer([" ".join(rng.choice(WORDS) for _ in range(50)) for _ in range(200)], vocab_size=1024)
    cfg = Config.from_hf({"model_type": "llama", "vocab_size": 1024, "hidden_size": 128,
                          "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
                          "num_key_value_heads": 2, "max_position_embeddings": 2048, "eos_token_id": tok.eos_ids})
    return save_model(Transformer(cfg).init_weights(std=0.02, seed=0), path, tokenizer=tok)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MemoryWatch(threading.Thread):
    """Samples the server's resident memory (Linux /proc) every 50 ms; ``peak`` also reads VmHWM."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.samples, self.stop = pid, [], threading.Event()

    def _field(self, name: str) -> int:
        try:
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith(name + ":"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 0

    def run(self) -> None:
        while not self.stop.is_set():
            self.samples.append(self._field("VmRSS"))
            time.sleep(0.05)

    def peak(self) -> int:
        return max([self._field("VmHWM"), *self.samples])


# ---- traffic ----------------------------------------------------------------------------------------
def normal_body(i: int) -> tuple[str, dict]:
    words = f"{i} " + " ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(8))  # unique per request
    if i % 2:
        return "/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": words}],
                                        "max_tokens": 16, "temperature": 0}
    return "/v1/completions", {"model": "m", "prompt": words, "max_tokens": 16, "temperature": 0}


async def normal_traffic(client, base: str, count: int, workers: int, results: dict, first: int = 0) -> None:
    queue = collections.deque(range(first, first + count))

    async def worker() -> None:
        while queue:
            i = queue.popleft()
            route, body = normal_body(i)
            t = time.perf_counter()
            try:
                r = await client.post(base + route, json=body, timeout=120)
                status = r.status_code
            except Exception as e:  # noqa: BLE001 - a lost request is what we count
                status = type(e).__name__
            results["latency"].append(time.perf_counter() - t)
            results["status"][status] += 1
            if status == 200:
                results["tokens"].append(r.json()["usage"]["completion_tokens"])

    await asyncio.gather(*(worker() for _ in range(workers)))


def hostile_bodies() -> list[tuple[str, str, bytes, dict]]:
    """(label, route, body, options) for each hostile request kind; built before the clock starts."""
    def chat(content: str, **kw) -> dict:
        return {"model": "m", "messages": [{"role": "user", "content": content}], **kw}

    def enum(n: int) -> dict:
        return {"type": "string", "enum": [f"value-{i}" for i in range(n)]}

    def dumps(x: object) -> bytes:
        return json.dumps(x).encode()

    return [
        ("50 MB chat body", "/v1/chat/completions", dumps(chat("x" * (50 << 20), max_tokens=4)), {}),
        ("10 M-char prompt", "/v1/completions", dumps({"model": "m", "prompt": "river " * 1_666_667,
                                                        "max_tokens": 4}), {}),
        ("1.5 M messages", "/v1/chat/completions",
         dumps({"model": "m", "messages": [{"role": "user", "content": ""}] * 1_500_000, "max_tokens": 2}), {}),
        ("900 k-char prompt (under limits)", "/v1/chat/completions", dumps(chat("stone " * 150_000, max_tokens=4)),
         {}),
        ("enum 10,000 guided_json", "/v1/completions",
         dumps({"model": "m", "prompt": "the", "max_tokens": 8, "guided_json": enum(10_000)}), {}),
        ("enum 100,000 response_format", "/v1/chat/completions",
         dumps(chat("x", max_tokens=8, response_format={"type": "json_schema",
                                                        "json_schema": {"name": "e", "schema": enum(100_000)}})), {}),
        ("200,000 stop strings, n=16", "/v1/completions",
         dumps({"model": "m", "prompt": "the", "max_tokens": 64, "n": 16,
                "stop": [f"stop-{i}" for i in range(200_000)]}), {}),
        ("lone surrogate", "/v1/chat/completions",
         b'{"model": "m", "messages": [{"role": "user", "content": "a \\ud800 b"}], "max_tokens": 4}', {}),
        ("n=16 non-streaming, client drops", "/v1/completions",
         dumps({"model": "m", "prompt": "the", "max_tokens": 400, "n": 16, "temperature": 1.0}), {"timeout": 0.5}),
    ]


async def hostile_traffic(client, base: str, rounds: int, results: dict, drops: int) -> None:
    bodies = hostile_bodies()

    async def send(label: str, route: str, body: bytes, timeout: float) -> None:
        try:
            r = await client.post(base + route, content=body, headers={"Content-Type": "application/json"},
                                  timeout=timeout)
            status = r.status_code
            if not r.headers.get("content-type", "").startswith("application/json"):
                results["non_json"] += 1
        except Exception as e:  # noqa: BLE001 - recorded: a reset upload or the client's own timeout
            status = type(e).__name__
        results["hostile"][label][status] += 1

    for _ in range(rounds):
        for label, route, body, opts in bodies:
            if label.startswith("n=16"):
                await asyncio.gather(*(send(label, route, body, opts["timeout"]) for _ in range(drops // rounds)))
            else:
                await send(label, route, body, 120)
            await asyncio.sleep(0.2)


async def slow_clients(host: str, port: int, count: int, results: dict) -> None:
    """Half trickle a request head, half a body, one byte a second: each must be cut off by the server."""

    async def one(i: int) -> None:
        reader, writer = await asyncio.open_connection(host, port)
        if i % 2:
            data = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        else:
            writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n")
            data = b'{"model": "m", "prompt": "' + b"x" * 500
        start = time.perf_counter()
        try:
            for byte in data:  # one byte, then wait up to a second for the server to answer or hang up
                writer.write(bytes([byte]))
                await writer.drain()
                try:
                    reply = await asyncio.wait_for(reader.read(200), timeout=1.0)
                except asyncio.TimeoutError:
                    continue
                results["slow"][reply.split(b"\r\n", 1)[0].decode(errors="replace") or "closed"] += 1
                results["slow_held_s"].append(time.perf_counter() - start)
                return
        except (ConnectionError, OSError):
            results["slow"]["closed"] += 1
            results["slow_held_s"].append(time.perf_counter() - start)
            return
        finally:
            writer.close()
        results["slow"]["never cut off"] += 1

    async def guarded(i: int) -> None:
        try:
            await asyncio.wait_for(one(i), timeout=90)
        except asyncio.TimeoutError:
            results["slow"]["never cut off"] += 1

    await asyncio.gather(*(guarded(i) for i in range(count)))


async def engine_idle(client, base: str, seconds: float = 15.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        text = (await client.get(base + "/metrics", timeout=10)).text
        running = next(int(line.split()[1]) for line in text.splitlines() if line.startswith("lmforge_requests_running "))
        waiting = next(int(line.split()[1]) for line in text.splitlines() if line.startswith("lmforge_requests_waiting "))
        if running == 0 and waiting == 0:
            return True
        await asyncio.sleep(0.2)
    return False


async def run(base: str, port: int, args, memory: MemoryWatch) -> dict:
    import httpx

    limits = httpx.Limits(max_connections=64, max_keepalive_connections=16)
    out: dict = {}
    async with httpx.AsyncClient(limits=limits) as client:
        for i in range(4):  # warm-up
            route, body = normal_body(i)
            await client.post(base + route, json=body, timeout=120)
        baseline = {"latency": [], "status": collections.Counter(), "tokens": []}
        await normal_traffic(client, base, args.normal, args.workers, baseline, first=10_000)
        out["baseline"] = baseline
        out["rss_before"] = memory.samples[-1] if memory.samples else 0

        attack = {"latency": [], "status": collections.Counter(), "tokens": []}
        hostile = {"hostile": collections.defaultdict(collections.Counter), "non_json": 0,
                   "slow": collections.Counter(), "slow_held_s": []}
        started = time.perf_counter()
        async with httpx.AsyncClient(limits=limits) as evil:
            await asyncio.gather(normal_traffic(client, base, args.normal, args.workers, attack, first=20_000),
                                 hostile_traffic(evil, base, args.rounds, hostile, args.drops),
                                 slow_clients("127.0.0.1", port, args.slow, hostile))
        out["attack_s"] = time.perf_counter() - started
        out["attack"], out["hostile"] = attack, hostile
        out["idle_after"] = await engine_idle(client, base)
        after = {"latency": [], "status": collections.Counter(), "tokens": []}  # the machine may have drifted
        await normal_traffic(client, base, args.normal, args.workers, after, first=30_000)
        out["after"] = after
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer requests (a smoke run)")
    p.add_argument("--normal", type=int, default=60, help="normal requests per phase")
    p.add_argument("--workers", type=int, default=3, help="normal requests in flight at once")
    p.add_argument("--rounds", type=int, default=2, help="times each hostile request kind is sent")
    p.add_argument("--drops", type=int, default=30, help="n=16 non-streaming requests whose clients drop")
    p.add_argument("--slow", type=int, default=20, help="slow clients (trickled heads and bodies)")
    args = p.parse_args()
    if args.quick:
        args.normal, args.rounds, args.drops, args.slow = 16, 1, 6, 4

    tmp = Path(tempfile.mkdtemp(prefix="lmforge-stress-"))
    model = build_model(tmp / "m")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    log = open(tmp / "server.log", "w")  # noqa: SIM115 - the server writes to it until the end
    server = subprocess.Popen([sys.executable, "-m", "lmforge.cli", "serve", "--model", str(model), "--host",
                               "127.0.0.1", "--port", str(port), "--device", "cpu", "--served-model-name", "m"],
                              stdout=log, stderr=subprocess.STDOUT, env=env)
    memory = MemoryWatch(server.pid)
    try:
        import httpx

        deadline = time.monotonic() + 120
        while True:
            if server.poll() is not None:
                raise SystemExit(f"the server died on start-up:\n{(tmp / 'server.log').read_text()[-3000:]}")
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("the server did not come up within 120 s")
            time.sleep(0.3)
        memory.start()
        out = asyncio.run(run(base, port, args, memory))
    finally:
        memory.stop.set()
        peak = memory.peak()
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()

    normal = out["baseline"]["status"] + out["attack"]["status"] + out["after"]["status"]
    fivexx = sum(n for s, n in normal.items() if isinstance(s, int) and s >= 500)
    fivexx += sum(n for c in out["hostile"]["hostile"].values() for s, n in c.items() if isinstance(s, int) and s >= 500)
    lost = sum(n for s, n in normal.items() if s != 200)
    print(f"\nlmforge serve (default limits), random 2-layer model; {args.normal} normal requests per phase, "
          f"{args.workers} at a time; attack phase {out['attack_s']:.0f} s\n")
    print("| normal requests | latency p50 | latency p99 | mean completion tokens |")
    print("| --- | --- | --- | --- |")
    for label, key in (("without attack (before)", "baseline"), ("under attack", "attack"),
                       ("without attack (after)", "after")):
        lat, toks = out[key]["latency"], out[key]["tokens"]
        print(f"| {label} | {pct(lat, 50) * 1000:.0f} ms | {pct(lat, 99) * 1000:.0f} ms | "
              f"{sum(toks) / max(len(toks), 1):.1f} |")
    print(f"\nserver peak memory: {peak / 2**30:.2f} GB (after start-up and warm-up: {out['rss_before'] / 2**30:.2f} GB)")
    print(f"5xx answers: {fivexx} (target 0)")
    print(f"lost normal requests: {lost} of {3 * args.normal} (target 0)")
    print(f"engine idle after the attack (dropped requests aborted): {out['idle_after']}")
    print(f"hostile answers that were not JSON: {out['hostile']['non_json']}\n")
    print("| hostile request | answers |")
    print("| --- | --- |")
    for label, counter in out["hostile"]["hostile"].items():
        print(f"| {label} | {', '.join(f'{s}: {n}' for s, n in counter.items())} |")
    held = out["hostile"]["slow_held_s"]
    print(f"| slow clients (trickled heads/bodies) | {', '.join(f'{s}: {n}' for s, n in out['hostile']['slow'].items())}"
          f"{f'; cut off after {max(held):.1f} s at most' if held else ''} |")
    return 0 if fivexx == 0 and lost == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
