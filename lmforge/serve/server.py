"""OpenAI-compatible HTTP server over the engine (FastAPI + uvicorn).

One thread owns the engine and runs ``step()`` while there is work; HTTP handlers talk to it through a
command queue and get outputs back on per-request asyncio queues, so the engine itself stays
single-threaded. A client that disconnects mid-stream has its request aborted and its KV blocks freed.
On SIGTERM/Ctrl-C (``serve(shutdown_timeout=)``) running requests get that many seconds to finish; those still
running then are aborted with a 503 (streams: an error event) and the process exits.

No single request decides how much CPU, memory or engine time is spent (``ServerLimits``): bodies, messages,
characters, stop strings, schemas and ``n`` are bounded before any work is done; chat templates and the
tokenizer run on a small thread pool, not the event loop; grammars compile on their own thread with a time
limit; a client that goes away has its request aborted, streaming or not; slow clients are cut off.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hmac
import json
import queue
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Any, AsyncIterator, Callable, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field

from lmforge.data.tokenizer import TemplateLimits, chat_template_limits
from lmforge.errors import LmforgeError
from lmforge.serve.limits import ServerLimits
from lmforge.engine.engine import Engine, RequestOutput
from lmforge.engine.sequence import SamplingParams
from lmforge.models.steering import Steering, SteeringVector


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
                    request_id, prompt, params, grammar, pixel_values = args
                    if self._drain_deadline is not None:  # shutting down: take no new work
                        self._deliver(request_id, ShuttingDown("the server is shutting down"))
                        continue
                    try:
                        # grammar: compiled ahead by the handler, so this thread never waits on a compile
                        self.engine.add_request(prompt, params, request_id=request_id, grammar=grammar,
                                                pixel_values=pixel_values)
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

    async def submit(self, prompt: str | list[int], params: SamplingParams,
                     grammar: Any = None, pixel_values: Any = None) -> AsyncIterator[RequestOutput]:
        """Outputs of one request as the engine produces them; closing the iterator early aborts it.
        ``grammar``: the request's compiled grammar (``GrammarBackend.compile_async``), if it has one.
        ``pixel_values``: its images (a LLaVA-style model's processor's tensor)."""
        request_id = uuid.uuid4().hex
        q: asyncio.Queue = asyncio.Queue()
        self.listeners[request_id] = (asyncio.get_running_loop(), q)
        self.commands.put(("add", (request_id, prompt, params, grammar, pixel_values)))
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


MAX_STEERING_SCALE = 1000.0  # a bound against typos and overflow, above any useful scale of a unit vector
# Budget forcing's strings (delimiters, extension, answer prefix) are tokenized per request: keep them short.
MAX_THINKING_TEXT_CHARS = 256
THINKING_FIELDS = ("max_thinking_tokens", "min_thinking_tokens", "thinking_delimiters", "thinking_extension",
                   "answer_prefix")


class SteeringSpec(BaseModel):
    """``{"name": ..., "scale": ...}``: add ``scale`` times the named vector (``--steering-vector NAME=PATH``) to
    the residual stream at its layers, for this request only."""
    model_config = ConfigDict(extra="forbid", strict=True)
    name: Annotated[str, Field(min_length=1)]
    scale: float = Field(1.0, ge=-MAX_STEERING_SCALE, le=MAX_STEERING_SCALE)


def _utf8(text: str) -> str:
    """JSON may carry a lone surrogate (\\ud800), which no tokenizer can encode: a 400 here, not a 500 later."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"text is not valid Unicode: lone surrogate {text[e.start]!r} at character {e.start}") \
            from None
    return text


Text = Annotated[str, AfterValidator(_utf8)]
ThinkingText = Annotated[Text, Field(min_length=1, max_length=MAX_THINKING_TEXT_CHARS)]


class RequestModels:
    """The request schemas for one set of limits: the bounds are in the schema, so /openapi.json documents
    them, and pydantic enforces them before a handler (or the tokenizer) sees the request."""

    def __init__(self, limits: ServerLimits) -> None:
        lim = limits
        schema_doc = (f"a JSON schema; at most {lim.max_schema_bytes} bytes as compact JSON (else 400), compiled "
                      f"within {lim.grammar_timeout_s:g} s (else 400)")

        class _Common(BaseModel):
            # The bounds are in the schema and are checked again by SamplingParams.
            model_config = ConfigDict(extra="ignore", strict=True)  # no "1.0" -> 1 or 0 -> False coercions
            model: str | None = None
            max_tokens: Int(ge=1) | None = None
            max_completion_tokens: Int(ge=1) | None = None
            temperature: float = Field(1.0, ge=0.0, le=2.0)
            top_p: float = Field(1.0, gt=0.0, le=1.0)
            n: Int(ge=1, le=lim.max_n) = 1
            # A bounded stop list keeps the engine's per-token stop check cheap.
            stop: (Annotated[Text, Field(min_length=1, max_length=lim.max_stop_chars)]
                   | Annotated[list[Annotated[Text, Field(min_length=1, max_length=lim.max_stop_chars)]],
                               Field(max_length=lim.max_stop)]
                   | None) = None
            stream: bool = False
            seed: Int(ge=-2**63, le=2**64 - 1) | None = None
            presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
            frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
            # extensions vLLM users expect
            top_k: Int(ge=-1) = 0
            min_p: float = Field(0.0, ge=0.0, le=1.0)
            repetition_penalty: float = Field(1.0, gt=0.0)
            guided_json: dict[str, Any] | None = Field(None, description=schema_doc)
            guided_regex: Annotated[Text, Field(min_length=1, max_length=lim.max_schema_bytes)] | None = None
            # lmforge extension (the openai client sends it in extra_body): a steering vector the server registered
            steering: SteeringSpec | None = None
            # budget forcing (s1), also in extra_body: bounds on the model's thinking, in tokens
            max_thinking_tokens: Int(ge=0) | None = Field(None, description=(
                "force the end thinking delimiter after this many thinking tokens (then answer_prefix); must be "
                "below max_tokens"))
            min_thinking_tokens: Int(ge=0) | None = Field(None, description=(
                "below this many thinking tokens an end delimiter is replaced by thinking_extension"))
            thinking_delimiters: Annotated[list[ThinkingText], Field(min_length=2, max_length=2)] | None = Field(
                None, description="[start, end] tokens of the model's vocabulary (default [\"<think>\", \"</think>\"])")
            thinking_extension: ThinkingText | None = Field(None, description="default \"Wait\"")
            answer_prefix: ThinkingText | None = None

        class CompletionRequest(_Common):
            prompt: (Annotated[Text, Field(min_length=1, max_length=lim.max_prompt_chars)]
                     | Annotated[list[Int(ge=0)], Field(min_length=1, max_length=lim.max_prompt_chars)])
            logprobs: Int(ge=0, le=20) | None = None
            echo: bool = False

        class TextPart(BaseModel):
            model_config = ConfigDict(extra="ignore", strict=True)
            type: Literal["text"]
            text: Annotated[Text, Field(max_length=lim.max_prompt_chars)]

        class ImageURL(BaseModel):
            model_config = ConfigDict(extra="ignore", strict=True)
            url: Annotated[str, Field(max_length=lim.max_body_bytes)]
            detail: str | None = None

        class ImagePart(BaseModel):
            model_config = ConfigDict(extra="ignore", strict=True)
            type: Literal["image_url"]
            image_url: ImageURL

        class ChatMessage(BaseModel):
            model_config = ConfigDict(extra="ignore", strict=True)
            role: Literal["system", "user", "assistant", "tool", "developer"]
            # text parts, and images as data: URLs for a vision-language model (no audio)
            content: (Annotated[Text, Field(max_length=lim.max_prompt_chars)]
                      | Annotated[list[Annotated[TextPart | ImagePart, Field(discriminator="type")]],
                                  Field(max_length=lim.max_messages)] | None) = None

        class ChatRequest(_Common):
            messages: list[ChatMessage] = Field(
                min_length=1, max_length=lim.max_messages,
                description=f"at most {lim.max_messages} messages and {lim.max_prompt_chars} characters of "
                            "content in all (else 400)")
            logprobs: bool = False
            top_logprobs: Int(ge=0, le=20) | None = None
            response_format: dict[str, Any] | None = Field(None, description="json_schema: " + schema_doc)

        self.Common, self.CompletionRequest, self.ChatRequest = _Common, CompletionRequest, ChatRequest
        self.ChatMessage, self.TextPart = ChatMessage, TextPart


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
          408: {"model": ErrorBody, "description": "the request body did not arrive in time (body_timeout_s)"},
          413: {"model": ErrorBody, "description": "the request body is larger than max_body_bytes"},
          429: {"model": ErrorBody, "description": "too many requests in flight, or the grammar compiler is busy; "
                                                  "retry after the Retry-After seconds"},
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


def _schema(schema: dict[str, Any], max_bytes: int, param: str) -> dict[str, Any]:
    # Compile time grows faster than linearly with a schema's size (e.g. an enum of 10,000 strings takes
    # seconds, 100,000 minutes), and a compile cannot be interrupted: the size is the bound that holds.
    size = len(json.dumps(schema, separators=(",", ":")))
    if size > max_bytes:
        raise APIError(400, f"the JSON schema is {size} bytes as compact JSON; this server compiles schemas of at "
                            f"most {max_bytes} bytes", param)
    return schema


def _grammar(req: BaseModel, max_schema_bytes: int) -> dict[str, Any]:
    """SamplingParams fields for structured output, from vLLM-style guided_* or OpenAI response_format."""
    fmt = getattr(req, "response_format", None) or {}
    kind = fmt.get("type", "text")
    if kind == "json_schema":
        spec = fmt.get("json_schema") or {}
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
            raise APIError(400, "response_format.json_schema.schema must be a JSON schema object", "response_format")
        return {"json_schema": _schema(spec["schema"], max_schema_bytes, "response_format")}
    if kind == "json_object":
        return {"json_object": True}
    if kind != "text":
        raise APIError(400, f"response_format type {kind!r} is not supported (text, json_object, json_schema)",
                       "response_format")
    if req.guided_json is not None:
        return {"json_schema": _schema(req.guided_json, max_schema_bytes, "guided_json")}
    if req.guided_regex is not None:
        return {"regex": req.guided_regex}
    return {}


def _max_tokens(req: BaseModel, engine: Engine, prompt_len: int, default: int | None) -> int:
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


def _params(req: BaseModel, logprobs: int | None, max_tokens: int, limits: ServerLimits) -> SamplingParams:
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    params = SamplingParams(temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, min_p=req.min_p,
                            repetition_penalty=req.repetition_penalty, frequency_penalty=req.frequency_penalty,
                            presence_penalty=req.presence_penalty, seed=req.seed, stop=stop, n=req.n,
                            max_tokens=max_tokens, logprobs=logprobs, **_grammar(req, limits.max_schema_bytes),
                            **{k: getattr(req, k) for k in THINKING_FIELDS if getattr(req, k) is not None})
    try:
        return params.validate()
    except LmforgeError as e:
        raise APIError(400, str(e)) from None


def _content_text(content: Any) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    return "".join(part.text for part in content if part.type == "text")


def _decode_image(url: str, max_pixels: int, index: int) -> Any:
    """A chat request's ``image_url`` as a PIL image: data URLs only (``data:image/...;base64,...``); anything else,
    a corrupt payload, a non-image, or one over ``max_pixels`` is an ``APIError`` 400 naming the image."""
    import base64
    import binascii
    import io

    from PIL import Image, UnidentifiedImageError

    where = f"image {index}"
    if url.startswith(("http://", "https://")):
        raise APIError(400, f"{where}: image_url must be a data: URL (data:image/png;base64,...); this server "
                            "fetches nothing from the network", "messages")
    head, sep, payload = url.partition(",")
    if not sep or not head.startswith("data:image/") or not head.endswith(";base64"):
        raise APIError(400, f"{where}: image_url must be a base64 data URL of an image (data:image/<type>;base64,"
                            f"...), got one starting {url[:30]!r}", "messages")
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, f"{where}: the data URL's base64 payload is corrupt", "messages") from None
    try:
        image = Image.open(io.BytesIO(raw))  # reads the header only: the size is known before any decoding
        if image.width * image.height > max_pixels:
            raise APIError(400, f"{where} is {image.width}x{image.height} pixels; this server takes at most "
                                f"{max_pixels} pixels per image", "messages")
        image.load()
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError, SyntaxError, ValueError) as e:
        raise APIError(400, f"{where}: not a readable image ({type(e).__name__}: {e})", "messages") from None
    return image


# ---- the guard in front of the app ---------------------------------------------------------------------
class _Refused(Exception):
    """The guard answers this request itself (status, message) without calling the app."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


class _Guard:
    """Plain ASGI middleware: the API key (constant-time compare), the in-flight request limit, the body size
    (Content-Length, then counted while it streams in) and the body read deadline, all before any JSON is
    parsed. The body is buffered (at most ``max_body_bytes``) and replayed to the app."""

    EXEMPT = ("/health", "/metrics")  # monitoring keeps answering when the server is full

    def __init__(self, app: Any, limits: ServerLimits, api_key: str | None) -> None:
        self.app, self.limits = app, limits
        self.expected = f"Bearer {api_key}".encode() if api_key else None
        self.in_flight = 0

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        headers = dict(scope.get("headers") or [])  # ASGI servers give lower-case names as bytes
        # compare_digest: the time taken does not tell how much of a guessed key was right
        if self.expected is not None and path.startswith("/v1/") and \
                not hmac.compare_digest(headers.get(b"authorization", b""), self.expected):
            return await _error(401, "invalid or missing API key", kind="authentication_error")(scope, receive, send)
        if path in self.EXEMPT:
            return await self.app(scope, receive, send)
        if self.in_flight >= self.limits.max_concurrent_requests:
            response = _error(429, f"the server already has {self.in_flight} requests in flight (its limit); "
                                   "retry shortly", kind="rate_limit_error")
            response.headers["Retry-After"] = "1"
            return await response(scope, receive, send)
        self.in_flight += 1
        try:
            try:
                body = await self._read_body(headers, receive)
            except _Refused as e:
                return await _error(e.status, e.message, kind=e.kind)(scope, receive, send)
            if body is None:  # the client went away while sending
                return
            replayed = False

            async def replay() -> dict:
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()  # after the body: http.disconnect when the client goes away

            await self.app(scope, replay, send)
        finally:
            self.in_flight -= 1

    async def _read_body(self, headers: dict, receive: Callable) -> bytes | None:
        most = self.limits.max_body_bytes
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:  # (uvicorn's h11 refuses these itself; other servers may pass them on)
                raise _Refused(400, f"Content-Length is not a number: {declared[:40]!r}") from None
            if size > most:
                raise _Refused(413, f"the request body is {size} bytes; this server takes at most {most}")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.limits.body_timeout_s
        chunks, size = [], 0
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0.0))
            except asyncio.TimeoutError:
                raise _Refused(408, f"the request body did not arrive within {self.limits.body_timeout_s:g} s") \
                    from None
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > most:  # a chunked body, or one longer than its Content-Length said
                raise _Refused(413, f"the request body is over {most} bytes, the most this server takes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


async def _until_disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(request: Request, awaitable: Any) -> Any:
    """Await ``awaitable``; if the client disconnects first, cancel it (so a request being generated is
    aborted) and raise ClientGone."""
    task = asyncio.ensure_future(awaitable)
    watch = asyncio.ensure_future(_until_disconnected(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
            # let the cancellation run its cleanup (the abort) before going on
            with contextlib.suppress(BaseException):  # CancelledError, or whatever the cleanup raised
                await task
    if task.cancelled():
        raise ClientGone()
    return task.result()


def uvicorn_settings(limits: ServerLimits) -> dict[str, Any]:
    """uvicorn.Config keyword arguments for ``limits``: connection limit, keep-alive and request-head
    timeouts, request-head size."""
    return {"http": _h11_with_head_timeout(limits.header_timeout_s), "limit_concurrency": limits.max_connections,
            "timeout_keep_alive": limits.keep_alive_s, "h11_max_incomplete_event_size": limits.max_header_bytes}


def _h11_with_head_timeout(seconds: float) -> type:
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class _H11(H11Protocol):
        """uvicorn's h11 protocol plus a deadline for each request head. uvicorn waits indefinitely for the
        first request's head, and for the rest of any head once its first byte has arrived (its keep-alive
        timer only covers a fully idle connection), so a client trickling bytes could hold a connection."""

        _head_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)
            self._arm_head_timer()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm_head_timer()  # the next request's head on this keep-alive connection

        def handle_events(self) -> None:
            super().handle_events()
            if self.cycle is not None and not self.cycle.response_complete:
                self._cancel_head_timer()  # a head arrived: the body has its own deadline (body_timeout_s)

        def connection_lost(self, exc: Exception | None) -> None:
            self._cancel_head_timer()
            super().connection_lost(exc)

        def _arm_head_timer(self) -> None:
            self._cancel_head_timer()
            if not self.transport.is_closing():
                self._head_timer = self.loop.call_later(seconds, self._head_timed_out)

        def _cancel_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timed_out(self) -> None:
            self._head_timer = None
            waiting = self.cycle is None or self.cycle.response_complete
            if waiting and not self.transport.is_closing():
                self.transport.close()

    return _H11


# ---- the app -------------------------------------------------------------------------------------
def build_app(engine: Engine, model_name: str, api_key: str | None = None,
              clock: Callable[[], float] = time.monotonic,
              steering_vectors: dict[str, SteeringVector] | None = None,
              limits: ServerLimits | None = None, processor: Any = None) -> FastAPI:
    """The app; ``app.state.runner.drain(seconds)`` starts a graceful shutdown (``serve`` does on SIGTERM).
    ``steering_vectors``: name -> vector, what a request's ``"steering": {"name", "scale"}`` may pick.
    ``limits``: the per-request bounds (default ``ServerLimits()``). ``processor``: a LLaVA-style model's
    (``lmforge.data.image_processor.load_processor``): chat messages may then hold ``image_url`` parts."""
    limits = limits or ServerLimits()
    schemas = RequestModels(limits)
    steering_registry = dict(steering_vectors or {})
    for name, vector in steering_registry.items():  # a vector for another model fails at start-up, not per request
        vector.check(engine.model, f"steering vector {name!r}")
    app = FastAPI(title="lmforge", version="0.1")
    runner = AsyncEngine(engine, clock=clock)
    app.state.runner = runner
    app.state.limits = limits
    tokenizer = engine.tokenizer
    # Templates and the tokenizer take CPU time proportional to the request: never on the event loop, and
    # at most this many at once (the rest queue).
    workers = ThreadPoolExecutor(max_workers=limits.tokenizer_threads, thread_name_prefix="lmforge-tokenize")
    template_limits = TemplateLimits(max_seconds=limits.template_timeout_s,
                                     max_output_chars=2 * limits.max_prompt_chars + (1 << 16))

    async def off_loop(fn: Callable, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(workers, fn, *args)

    def encode(text: str) -> list[int]:
        # encode_batch releases the GIL while the Rust side works; encode does not (it would stall the loop)
        batch = getattr(tokenizer, "encode_batch", None)
        return batch([text])[0] if batch is not None else tokenizer.encode(text)

    def render_chat(messages: list[dict[str, str]]) -> list[int]:
        with chat_template_limits(template_limits):
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        # the template writes its own special tokens (as apply_chat_template's own encoding does)
        return tokenizer.encode_batch([text], add_special_tokens=False)[0]

    def render_chat_images(messages: list[dict[str, Any]], images: list[Any]) -> tuple[list[int], Any]:
        with chat_template_limits(template_limits):
            batch = processor.apply_chat_template(messages, images=images)
        return batch["input_ids"][0].tolist(), batch["pixel_values"]

    async def compile_grammar(params: SamplingParams) -> Any:
        """The request's grammar, compiled on the grammar backend's thread within grammar_timeout_s; the
        engine's thread only ever gets a compiled grammar."""
        if params.grammar is None:
            return None
        try:
            backend = await off_loop(engine.grammar_backend)  # built once (reads the vocabulary)
            future = backend.compile_async(*params.grammar)
        except LmforgeError as e:
            raise APIError(400, str(e)) from None
        waiter = asyncio.wrap_future(future)
        waiter.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved even if we stop waiting
        done, _ = await asyncio.wait({waiter}, timeout=limits.grammar_timeout_s)
        if not done:
            if future.running():
                raise APIError(400, f"the grammar did not compile within {limits.grammar_timeout_s:g} s; use a "
                                    "smaller schema (e.g. fewer enum values or properties)")
            raise APIError(429, f"the grammar compiler is busy with other requests' schemas; not started within "
                                f"{limits.grammar_timeout_s:g} s, retry shortly", kind="rate_limit_error")
        try:
            return waiter.result()
        except LmforgeError as e:
            raise APIError(400, str(e)) from None

    def steering(spec: SteeringSpec | None) -> Steering | None:
        if spec is None:
            return None
        vector = steering_registry.get(spec.name)
        if vector is None:
            known = ", ".join(repr(n) for n in sorted(steering_registry)) or "none (start the server with " \
                "--steering-vector NAME=PATH)"
            raise APIError(400, f"unknown steering vector {spec.name!r}; this server has: {known}", "steering.name")
        return Steering(vector, spec.scale, name=spec.name)

    def check_thinking(params: SamplingParams) -> None:
        """A budget this model cannot run (no such delimiter tokens, no tokenizer) is a 400 before any work."""
        try:
            engine.thinking_budget(params)
        except LmforgeError as e:
            raise APIError(400, str(e)) from None

    @app.on_event("shutdown")
    def _shutdown() -> None:
        runner.close()
        workers.shutdown(wait=False, cancel_futures=True)

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

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        # a bug still answers in the OpenAI shape (Starlette's default is a plain-text 500)
        return _error(500, f"internal error: {type(exc).__name__}: {exc}", kind="server_error")

    app.add_middleware(_Guard, limits=limits, api_key=api_key)

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

    async def run(request: Request, prompt, params: SamplingParams, stream: bool, render, pixel_values=None):
        grammar = await compile_grammar(params)
        try:
            outputs = runner.submit(prompt, params, grammar, pixel_values)
            # surfaces request errors as a 400 before streaming starts; a client gone meanwhile aborts it
            first = await _unless_disconnected(request, outputs.__anext__())
        except ClientGone:
            return _error(499, "the client closed the connection; the request was aborted")
        except ShuttingDown as e:
            raise APIError(503, str(e), kind="server_error") from None
        except LmforgeError as e:
            raise APIError(400, str(e)) from None
        except RuntimeError as e:
            raise APIError(500, f"internal error: {e}", kind="server_error") from None
        except StopAsyncIteration:
            raise APIError(500, "the engine returned nothing", kind="server_error") from None
        if not stream:
            async def rest() -> RequestOutput:
                last = first
                async for last in outputs:
                    pass
                return last

            try:
                # A non-streaming client that disconnects has its request aborted too, not generated for nobody.
                last = await _unless_disconnected(request, rest())
            except ClientGone:
                return _error(499, "the client closed the connection; the request was aborted")
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

    async def completions(req: Any, request: Request):
        check_model(req.model)
        prompt = req.prompt
        if isinstance(prompt, str):
            if tokenizer is None:
                raise APIError(400, "this model has no tokenizer; send token ids as the prompt", "prompt")
            prompt = await off_loop(encode, prompt)  # the engine would do it; the context check needs the count
        params = _params(req, req.logprobs, _max_tokens(req, engine, len(prompt), default=16), limits)
        params.steering = steering(req.steering)
        check_thinking(params)
        return await run(request, prompt, params, req.stream, _CompletionRender(model_name, params.n))

    async def chat(req: Any, request: Request):
        check_model(req.model)
        if tokenizer is None or tokenizer.chat_template is None:
            raise APIError(400, "this model has no chat template; use /v1/completions", "messages")
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": _content_text(m.content)}
                    for m in req.messages]
        chars = sum(len(m["content"]) for m in messages)
        if chars > limits.max_prompt_chars:
            raise APIError(400, f"the messages have {chars} characters of content; this server takes at most "
                                f"{limits.max_prompt_chars}", "messages")
        urls = [p.image_url.url for m in req.messages if isinstance(m.content, list) for p in m.content
                if p.type == "image_url"]
        pixel_values = None
        if urls:
            if processor is None:
                raise APIError(400, f"this model ({model_name}) takes no images; send text content only", "messages")
            if len(urls) > limits.max_images:
                raise APIError(400, f"the messages hold {len(urls)} images; this server takes at most "
                                    f"{limits.max_images} per request", "messages")
            images = [await off_loop(_decode_image, url, limits.max_image_pixels, i) for i, url in enumerate(urls)]
            # the processor places each image where its part stands, as {"type": "image"} parts
            messages = [{"role": "system" if m.role == "developer" else m.role,
                         "content": [{"type": "text", "text": p.text} if p.type == "text" else {"type": "image"}
                                     for p in m.content] if isinstance(m.content, list) else (m.content or "")}
                        for m in req.messages]
        try:
            if urls:
                ids, pixel_values = await off_loop(render_chat_images, messages, images)
            else:
                ids = await off_loop(render_chat, messages)
        except LmforgeError as e:
            raise APIError(400, str(e), "messages") from None
        # logprobs=true alone asks for the chosen tokens' log-probabilities (OpenAI); top_logprobs adds alternatives
        params = _params(req, (req.top_logprobs or 0) if req.logprobs else None,
                         _max_tokens(req, engine, len(ids), default=None), limits)
        params.steering = steering(req.steering)
        check_thinking(params)
        return await run(request, ids, params, req.stream, _ChatRender(model_name, params.n, tokenizer), pixel_values)

    # The request schemas carry this app's limits, so they are classes made at run time: the handlers'
    # annotations name them directly (a string annotation could not find them).
    completions.__annotations__["req"] = schemas.CompletionRequest
    chat.__annotations__["req"] = schemas.ChatRequest
    app.post("/v1/completions", responses={**STREAMING, **ERRORS}, description=COMPLETIONS_DOC)(completions)
    app.post("/v1/chat/completions", responses={**STREAMING, **ERRORS}, description=CHAT_DOC)(chat)
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
          model_name: str | None = None, shutdown_timeout: float = 5.0,
          steering_vectors: dict[str, SteeringVector] | None = None, limits: ServerLimits | None = None,
          **engine_kwargs: Any) -> None:
    """Serve until SIGTERM/Ctrl-C; then running requests get ``shutdown_timeout`` seconds to finish before they
    are aborted (503, or an error event on a stream) and the process exits. ``steering_vectors``: the registry a
    request's ``"steering": {"name": ..., "scale": ...}`` picks from. ``limits``: per-request and connection
    bounds (default ``ServerLimits()``)."""
    import uvicorn
    from pathlib import Path

    if shutdown_timeout < 0:
        raise LmforgeError(f"shutdown_timeout must be >= 0 seconds, got {shutdown_timeout}")
    engine = Engine(model_path, **engine_kwargs)
    limits = limits or ServerLimits()
    processor = None
    if engine.vision_model is not None:  # a LLaVA-style model: chat requests may carry images
        from lmforge.data.image_processor import load_processor

        processor = load_processor(model_path)
    app = build_app(engine, model_name or Path(model_path).name, api_key, steering_vectors=steering_vectors,
                    limits=limits, processor=processor)

    class _Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            app.state.runner.drain(shutdown_timeout)
            super().handle_exit(sig, frame)

    # uvicorn's own limit is the backstop: past it, it cancels whatever request task still has not answered.
    config = uvicorn.Config(app, host=host, port=port, log_level="info",
                            timeout_graceful_shutdown=shutdown_timeout + 2.0, **uvicorn_settings(limits))
    _Server(config).run()
