"""OpenAI-compatible HTTP server over the engine (FastAPI + uvicorn).

One thread owns the engine and runs ``step()`` while there is work; HTTP handlers talk to it through a
command queue and get outputs back on per-request asyncio queues, so the engine itself stays
single-threaded. A client that disconnects mid-stream has its request aborted and its KV blocks freed.
On SIGTERM/Ctrl-C (``serve(shutdown_timeout=)``) running requests get that many seconds to finish; those still
running then are aborted with a 503 (streams: an error event) and the process exits.
"""

from __future__ import annotations

import asyncio
import collections
import json
import queue
import threading
import time
import uuid
from typing import Annotated, Any, AsyncIterator, Callable, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from lmforge.errors import LmforgeError
from lmforge.engine.engine import Engine, RequestOutput
from lmforge.engine.sequence import SamplingParams


# ---- the engine thread ----------------------------------------------------------------------------
RATE_WINDOW_S = 30.0  # lmforge_generation_tokens_per_second: tokens generated over the last this many seconds


class ShuttingDown(Exception):
    """The server is shutting down and aborted this request (a 503 for the client)."""


class AsyncEngine:
    """Runs ``engine.step()`` on its own thread; ``submit`` returns an async iterator of outputs.

    ``clock`` (monotonic seconds) times the generated-token rate; tests inject a fake one."""

    def __init__(self, engine: Engine, clock: Callable[[], float] = time.monotonic,
                 rate_window: float = RATE_WINDOW_S) -> None:
        self.engine = engine
        self.commands: queue.Queue = queue.Queue()
        self.listeners: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self.started = time.time()
        self.generated_tokens = 0  # since start-up: a Prometheus counter
        self.clock, self.rate_window, self._born = clock, rate_window, clock()
        self._recent: collections.deque[tuple[float, int]] = collections.deque()  # (time, tokens) per step
        self._count_lock = threading.Lock()
        self._drain_deadline: float | None = None  # set by drain(): abort what still runs after it
        self._wake = threading.Event()
        self._stop = False
        self.thread = threading.Thread(target=self._run, name="lmforge-engine", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self._stop:
            while True:  # apply queued adds/aborts between steps
                try:
                    kind, args = self.commands.get_nowait()
                except queue.Empty:
                    break
                if kind == "add":
                    request_id, prompt, params = args
                    if self._drain_deadline is not None:  # shutting down: take no new work
                        self._deliver(request_id, ShuttingDown("the server is shutting down"))
                        continue
                    try:
                        self.engine.add_request(prompt, params, request_id=request_id)
                    except Exception as e:  # a bad request must never take the engine thread down
                        self._deliver(request_id, e if isinstance(e, LmforgeError) else RuntimeError(str(e)))
                else:
                    self.engine.abort(args)
                    self.listeners.pop(args, None)
            if self._drain_deadline is not None and time.monotonic() >= self._drain_deadline:
                for request_id in list(self.listeners):  # the grace period is over
                    out = self.engine.abort(request_id)
                    done = sum(len(o.token_ids) for o in out.outputs) if out is not None else 0
                    self._deliver(request_id, ShuttingDown(
                        f"the server is shutting down; the request was aborted after {done} generated tokens"))
            if not self.engine.has_unfinished():
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            try:
                outputs = self.engine.step()
            except Exception as e:  # never leave clients hanging: fail every open request
                for request_id in list(self.listeners):
                    self.engine.abort(request_id)
                    self._deliver(request_id, e)
                continue
            self._count(sum(len(o.delta_token_ids) for out in outputs for o in out.outputs))
            for out in outputs:
                self._deliver(out.request_id, out)

    def _count(self, tokens: int) -> None:
        now = self.clock()
        with self._count_lock:
            self.generated_tokens += tokens
            if tokens:
                self._recent.append((now, tokens))
            self._prune(now)

    def _prune(self, now: float) -> None:
        while self._recent and self._recent[0][0] <= now - self.rate_window:
            self._recent.popleft()

    def token_rate(self) -> float:
        """Generated tokens per second over the last ``rate_window`` seconds (since start-up if shorter)."""
        now = self.clock()
        with self._count_lock:
            self._prune(now)
            tokens = sum(n for _, n in self._recent)
        return tokens / max(min(self.rate_window, now - self._born), 1e-9)

    def _deliver(self, request_id: str, item: Any) -> None:
        target = self.listeners.get(request_id)
        if target is None:
            return
        loop, q = target
        loop.call_soon_threadsafe(q.put_nowait, item)
        if isinstance(item, Exception) or (isinstance(item, RequestOutput) and item.finished):
            self.listeners.pop(request_id, None)

    async def submit(self, prompt: str | list[int], params: SamplingParams) -> AsyncIterator[RequestOutput]:
        request_id = uuid.uuid4().hex
        q: asyncio.Queue = asyncio.Queue()
        self.listeners[request_id] = (asyncio.get_running_loop(), q)
        self.commands.put(("add", (request_id, prompt, params)))
        self._wake.set()
        finished = False
        try:
            while True:
                item = await q.get()
                if isinstance(item, Exception):
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            if not finished:  # client went away or the handler failed: free the blocks
                self.commands.put(("abort", request_id))
                self._wake.set()

    def drain(self, grace: float) -> None:
        """Begin shutting down: refuse new requests; abort those still running ``grace`` seconds from now.
        Safe to call from a signal handler."""
        if self._drain_deadline is None:
            self._drain_deadline = time.monotonic() + max(grace, 0.0)
        self._wake.set()

    def close(self) -> None:
        self._stop = True
        self._wake.set()
        self.thread.join(timeout=5)


# ---- request schemas (OpenAI's field names) ---------------------------------------------------------
def _integral(value: Any) -> Any:
    """JSON Schema counts 1.0 as an integer; true/false and "1" are not."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def Int(**bounds: Any) -> Any:
    """An integer field that also takes integral floats (bounds first, so /openapi.json shows them)."""
    return Annotated[int, Field(**bounds), BeforeValidator(_integral)]

class _Common(BaseModel):
    # The bounds are in the schema (so /openapi.json documents them) and are checked again by SamplingParams.
    model_config = ConfigDict(extra="ignore", strict=True)  # no "1.0" -> 1 or 0 -> False coercions
    model: str | None = None
    max_tokens: Int(ge=1) | None = None
    max_completion_tokens: Int(ge=1) | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: Int(ge=1, le=16) = 1
    stop: Annotated[str, Field(min_length=1)] | list[Annotated[str, Field(min_length=1)]] | None = None
    stream: bool = False
    seed: Int(ge=-2**63, le=2**64 - 1) | None = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    # extensions vLLM users expect
    top_k: Int(ge=-1) = 0
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0)
    guided_json: dict[str, Any] | None = None
    guided_regex: Annotated[str, Field(min_length=1)] | None = None


class CompletionRequest(_Common):
    prompt: Annotated[str, Field(min_length=1)] | Annotated[list[Int(ge=0)], Field(min_length=1)]
    logprobs: Int(ge=0, le=20) | None = None
    echo: bool = False


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[TextPart] | None = None  # only text parts: this server has no image/audio input


class ChatRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: Int(ge=0, le=20) | None = None
    response_format: dict[str, Any] | None = None


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail


STREAMING = {200: {"description": "a completion, or with stream=true a text/event-stream of chunks",
                   "content": {"application/json": {}, "text/event-stream": {}}}}
ERRORS = {400: {"model": ErrorBody, "description": "invalid request, e.g. max_tokens + prompt tokens beyond the "
                                                 "model's context length"},
          401: {"model": ErrorBody, "description": "missing or wrong API key"},
          404: {"model": ErrorBody, "description": "unknown model"},
          500: {"model": ErrorBody, "description": "engine failure"},
          503: {"model": ErrorBody, "description": "the server is shutting down (the request was aborted)"}}
CONTEXT_DOC = ("`max_tokens` (or `max_completion_tokens`) plus the prompt's tokens must fit the model's context "
               "length, else 400: \"max_tokens (X) + prompt tokens (Y) exceeds the model's context length (Z)\". ")
COMPLETIONS_DOC = ("OpenAI text completion. " + CONTEXT_DOC +
                   "Without max_tokens at most 16 tokens are generated (OpenAI's default), fewer if the context "
                   "ends first.")
CHAT_DOC = ("OpenAI chat completion (the model's chat template). " + CONTEXT_DOC +
            "Without max_tokens generation may run to the end of the context (or of the KV pool, if smaller).")


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind


def _error(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}}, status_code=status)


def _grammar(req: _Common) -> dict[str, Any]:
    """SamplingParams fields for structured output, from vLLM-style guided_* or OpenAI response_format."""
    fmt = getattr(req, "response_format", None) or {}
    kind = fmt.get("type", "text")
    if kind == "json_schema":
        spec = fmt.get("json_schema") or {}
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
            raise APIError(400, "response_format.json_schema.schema must be a JSON schema object", "response_format")
        return {"json_schema": spec["schema"]}
    if kind == "json_object":
        return {"json_object": True}
    if kind != "text":
        raise APIError(400, f"response_format type {kind!r} is not supported (text, json_object, json_schema)",
                       "response_format")
    if req.guided_json is not None:
        return {"json_schema": req.guided_json}
    if req.guided_regex is not None:
        return {"regex": req.guided_regex}
    return {}


def _max_tokens(req: _Common, engine: Engine, prompt_len: int, default: int | None) -> int:
    """The request's max_tokens, checked against the context; when omitted ``default`` (None: the rest of the
    context), never past the context or the KV pool."""
    context = engine.max_model_len
    field = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    asked = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    if prompt_len >= context:
        raise APIError(400, f"prompt has {prompt_len} tokens; the model's context length is {context}, which "
                            f"leaves room for at most {context - 1} prompt tokens")
    if asked is not None:
        if asked + prompt_len > context:
            raise APIError(400, f"{field} ({asked}) + prompt tokens ({prompt_len}) exceeds the model's context "
                                f"length ({context})", field)
        return asked
    bm = engine.block_manager
    room = min(context, bm.num_blocks * bm.block_size) - prompt_len
    return max(1, room if default is None else min(default, room))


def _params(req: _Common, logprobs: int | None, max_tokens: int) -> SamplingParams:
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    params = SamplingParams(temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, min_p=req.min_p,
                            repetition_penalty=req.repetition_penalty, frequency_penalty=req.frequency_penalty,
                            presence_penalty=req.presence_penalty, seed=req.seed, stop=stop, n=req.n,
                            max_tokens=max_tokens, logprobs=logprobs, **_grammar(req))
    try:
        return params.validate()
    except LmforgeError as e:
        raise APIError(400, str(e)) from None


def _content_text(content: str | list[TextPart] | None) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    return "".join(part.text for part in content)


# ---- the app -------------------------------------------------------------------------------------
def build_app(engine: Engine, model_name: str, api_key: str | None = None,
              clock: Callable[[], float] = time.monotonic) -> FastAPI:
    """The app; ``app.state.runner.drain(seconds)`` starts a graceful shutdown (``serve`` does on SIGTERM)."""
    app = FastAPI(title="lmforge", version="0.1")
    runner = AsyncEngine(engine, clock=clock)
    app.state.runner = runner
    tokenizer = engine.tokenizer

    @app.on_event("shutdown")
    def _shutdown() -> None:
        runner.close()

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return _error(exc.status, exc.message, exc.param, exc.kind)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        # e.g. a body that cannot be parsed, an unknown route or method: still an OpenAI-style error body
        response = _error(exc.status_code, str(exc.detail),
                          kind="invalid_request_error" if exc.status_code < 500 else "server_error")
        response.headers.update(exc.headers or {})  # keeps e.g. the Allow header of a 405
        return response

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        if first.get("type") == "json_invalid":
            return _error(400, "request body is not valid JSON")
        return _error(400, f"{where or 'body'}: {first.get('msg', 'invalid request')}", where or None)

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if api_key and request.url.path.startswith("/v1/"):
            if request.headers.get("authorization", "") != f"Bearer {api_key}":
                return _error(401, "invalid or missing API key", kind="authentication_error")
        return await call_next(request)

    def check_model(name: str | None) -> None:
        if name not in (None, "", model_name):
            raise APIError(404, f"model {name!r} does not exist; this server serves {model_name!r}", "model",
                           "not_found_error")

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models", responses={401: ERRORS[401]})
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": int(runner.started),
                                            "owned_by": "lmforge"}]}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics() -> PlainTextResponse:
        sched, bm = engine.scheduler, engine.block_manager
        used = bm.num_blocks - bm.num_free_blocks
        lines = [
            "# TYPE lmforge_requests_running gauge", f"lmforge_requests_running {len(sched.running)}",
            "# TYPE lmforge_requests_waiting gauge", f"lmforge_requests_waiting {len(sched.waiting)}",
            "# TYPE lmforge_kv_blocks_used gauge", f"lmforge_kv_blocks_used {used}",
            "# TYPE lmforge_kv_blocks_total gauge", f"lmforge_kv_blocks_total {bm.num_blocks}",
            "# HELP lmforge_generation_tokens_total tokens generated since start-up (use rate() over it)",
            "# TYPE lmforge_generation_tokens_total counter",
            f"lmforge_generation_tokens_total {runner.generated_tokens}",
            "# HELP lmforge_generated_tokens_total the same counter under its old name",
            "# TYPE lmforge_generated_tokens_total counter", f"lmforge_generated_tokens_total {runner.generated_tokens}",
            f"# HELP lmforge_generation_tokens_per_second tokens generated per second over the last "
            f"{runner.rate_window:g} s",
            "# TYPE lmforge_generation_tokens_per_second gauge",
            f"lmforge_generation_tokens_per_second {runner.token_rate():.3f}",
        ]
        if engine.drafter is not None:
            lines += ["# TYPE lmforge_draft_tokens_proposed_total counter",
                      f"lmforge_draft_tokens_proposed_total {engine.stats['draft_proposed']}",
                      "# TYPE lmforge_draft_tokens_accepted_total counter",
                      f"lmforge_draft_tokens_accepted_total {engine.stats['draft_accepted']}"]
        return PlainTextResponse("\n".join(lines) + "\n")

    async def run(prompt, params: SamplingParams, stream: bool, render):
        try:
            outputs = runner.submit(prompt, params)
            first = await outputs.__anext__()  # surfaces request errors as a 400 before streaming starts
        except ShuttingDown as e:
            raise APIError(503, str(e), kind="server_error") from None
        except LmforgeError as e:
            raise APIError(400, str(e)) from None
        except RuntimeError as e:
            raise APIError(500, f"internal error: {e}", kind="server_error") from None
        except StopAsyncIteration:
            raise APIError(500, "the engine returned nothing", kind="server_error") from None
        if not stream:
            last = first
            try:
                async for last in outputs:
                    pass
            except ShuttingDown as e:
                raise APIError(503, str(e), kind="server_error") from None
            except RuntimeError as e:
                raise APIError(500, f"internal error: {e}", kind="server_error") from None
            return JSONResponse(render.full(last))

        async def events() -> AsyncIterator[str]:
            try:
                for chunk in render.chunks(first):
                    yield f"data: {json.dumps(chunk)}\n\n"
                async for out in outputs:
                    for chunk in render.chunks(out):
                        yield f"data: {json.dumps(chunk)}\n\n"
                yield "data: [DONE]\n\n"
            except ShuttingDown as e:  # an OpenAI-style error event; clients raise it
                error = {"message": str(e), "type": "server_error", "param": None, "code": None}
                yield f"data: {json.dumps({'error': error})}\n\n"
            finally:
                await outputs.aclose()  # on disconnect: abort and free blocks

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/completions", responses={**STREAMING, **ERRORS}, description=COMPLETIONS_DOC)
    async def completions(req: CompletionRequest):
        check_model(req.model)
        prompt = req.prompt
        if isinstance(prompt, str):
            if tokenizer is None:
                raise APIError(400, "this model has no tokenizer; send token ids as the prompt", "prompt")
            prompt = tokenizer.encode(prompt)  # what the engine would do; the context check needs the count
        params = _params(req, req.logprobs, _max_tokens(req, engine, len(prompt), default=16))
        return await run(prompt, params, req.stream, _CompletionRender(model_name, params.n))

    @app.post("/v1/chat/completions", responses={**STREAMING, **ERRORS}, description=CHAT_DOC)
    async def chat(req: ChatRequest):
        check_model(req.model)
        if tokenizer is None or tokenizer.chat_template is None:
            raise APIError(400, "this model has no chat template; use /v1/completions", "messages")
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": _content_text(m.content)}
                    for m in req.messages]
        try:
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        except LmforgeError as e:
            raise APIError(400, str(e), "messages") from None
        params = _params(req, req.top_logprobs if req.logprobs else None,
                         _max_tokens(req, engine, len(ids), default=None))
        return await run(ids, params, req.stream, _ChatRender(model_name, params.n, tokenizer))

    return app


class _CompletionRender:
    def __init__(self, model: str, n: int) -> None:
        self.id, self.model, self.created, self.n = f"cmpl-{uuid.uuid4().hex}", model, int(time.time()), n

    def _usage(self, out: RequestOutput) -> dict[str, int]:
        completion = sum(len(o.token_ids) for o in out.outputs)
        return {"prompt_tokens": len(out.prompt_token_ids), "completion_tokens": completion,
                "total_tokens": len(out.prompt_token_ids) + completion}

    def full(self, out: RequestOutput) -> dict[str, Any]:
        choices = [{"index": o.index, "text": o.text, "finish_reason": o.finish_reason,
                    "logprobs": {"token_logprobs": o.logprobs} if o.logprobs is not None else None}
                   for o in out.outputs]
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": choices, "usage": self._usage(out)}

    def chunks(self, out: RequestOutput) -> list[dict[str, Any]]:
        return [{"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                 "choices": [{"index": o.index, "text": o.delta_text, "finish_reason": o.finish_reason,
                              "logprobs": None}]}
                for o in out.outputs if o.delta_text or o.finish_reason]


class _ChatRender(_CompletionRender):
    def __init__(self, model: str, n: int, tokenizer: Any = None) -> None:
        super().__init__(model, n)
        self.tokenizer = tokenizer
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.started: set[int] = set()

    def _logprobs(self, o) -> dict[str, Any] | None:
        if o.logprobs is None or self.tokenizer is None:
            return None
        piece = lambda t: self.tokenizer.decode([t], skip_special_tokens=False)  # noqa: E731
        tops = o.top_logprobs or [{}] * len(o.logprobs)
        return {"content": [{"token": piece(t), "logprob": lp,
                             "top_logprobs": [{"token": piece(k), "logprob": v} for k, v in top.items()]}
                            for t, lp, top in zip(o.token_ids, o.logprobs, tops)]}

    def full(self, out: RequestOutput) -> dict[str, Any]:
        choices = [{"index": o.index, "message": {"role": "assistant", "content": o.text},
                    "finish_reason": o.finish_reason, "logprobs": self._logprobs(o)} for o in out.outputs]
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": choices, "usage": self._usage(out)}

    def chunks(self, out: RequestOutput) -> list[dict[str, Any]]:
        chunks = []
        for o in out.outputs:
            if not (o.delta_text or o.finish_reason) and o.index in self.started:
                continue
            delta: dict[str, Any] = {"content": o.delta_text}
            if o.index not in self.started:  # the first chunk of a choice names the role
                delta["role"] = "assistant"
                self.started.add(o.index)
            chunks.append({"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                           "model": self.model,
                           "choices": [{"index": o.index, "delta": delta, "finish_reason": o.finish_reason}]})
        return chunks


def serve(model_path: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          model_name: str | None = None, shutdown_timeout: float = 5.0, **engine_kwargs: Any) -> None:
    """Serve until SIGTERM/Ctrl-C; then running requests get ``shutdown_timeout`` seconds to finish before they
    are aborted (503, or an error event on a stream) and the process exits."""
    import uvicorn
    from pathlib import Path

    if shutdown_timeout < 0:
        raise LmforgeError(f"shutdown_timeout must be >= 0 seconds, got {shutdown_timeout}")
    engine = Engine(model_path, **engine_kwargs)
    app = build_app(engine, model_name or Path(model_path).name, api_key)

    class _Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            app.state.runner.drain(shutdown_timeout)
            super().handle_exit(sig, frame)

    # uvicorn's own limit is the backstop: past it, it cancels whatever request task still has not answered.
    config = uvicorn.Config(app, host=host, port=port, log_level="info",
                            timeout_graceful_shutdown=shutdown_timeout + 2.0)
    _Server(config).run()
