"""``ServerLimits``: every per-request bound of the HTTP server, in one place.

A light module (no FastAPI, no torch) so ``lmforge serve`` can build its flags from it at start-up; the
server's request schemas, its guard middleware and its uvicorn settings all read the same object.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any

from lmforge.errors import LmforgeError


def _limit(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class ServerLimits:
    """Every per-request bound of the server, in one place: ``lmforge serve`` has a flag per field
    (``--max-body-bytes`` ...), the request schemas (and so /openapi.json) carry them, and ``serve`` passes
    the connection ones to uvicorn."""

    max_body_bytes: int = _limit(4 << 20, "request bodies larger than this are refused with a 413 before parsing")
    max_messages: int = _limit(1024, "most messages in a chat request (and text parts in one message)")
    max_prompt_chars: int = _limit(1_000_000, "most characters in a prompt, or in all messages' content together "
                                              "(also the most token ids in a prompt given as ids)")
    max_images: int = _limit(4, "most images in a chat request (image_url parts; vision-language models only)")
    max_image_pixels: int = _limit(4096 * 4096, "largest image, in pixels (width x height), checked before it is "
                                                "decoded")
    max_stop: int = _limit(16, "most stop strings in a request")
    max_stop_chars: int = _limit(256, "longest stop string, in characters")
    max_schema_bytes: int = _limit(32 << 10, "largest JSON schema (compact JSON) or guided_regex, in bytes")
    max_n: int = _limit(16, "most samples per request (n)")
    grammar_timeout_s: float = _limit(10.0, "a grammar that takes longer to compile fails the request with a 400 "
                                            "(the compile runs off the engine's thread)")
    template_timeout_s: float = _limit(5.0, "a chat template that renders for longer fails the request with a 400")
    tokenizer_threads: int = _limit(2, "threads that render chat templates and tokenize prompts (off the event "
                                       "loop)")
    max_concurrent_requests: int = _limit(512, "requests in flight at once; more get a 429 (/health and /metrics "
                                               "are exempt)")
    max_connections: int = _limit(1024, "open connections (uvicorn's limit_concurrency): past it, uvicorn "
                                        "answers 503")
    body_timeout_s: float = _limit(30.0, "a request body not fully received this long after its headers gets "
                                         "a 408")
    header_timeout_s: float = _limit(10.0, "a connection that has not sent a complete request head this long "
                                           "after connecting (or after its previous response) is closed")
    keep_alive_s: int = _limit(5, "idle keep-alive connections are closed after this many seconds")
    max_header_bytes: int = _limit(16 << 10, "largest request head (request line + headers); larger closes the "
                                             "connection with a 400")

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise LmforgeError(f"server limit {f.name} must be a positive number, got {value!r}")


def add_limit_flags(parser: argparse.ArgumentParser) -> None:
    """One ``--field-name`` flag per ServerLimits field, with its default and help."""
    group = parser.add_argument_group("request limits (each bounds what one request or client can cost)")
    for f in dataclasses.fields(ServerLimits):
        group.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default,
                           metavar="N" if isinstance(f.default, int) else "SECONDS",
                           help=f"{f.metadata['help']} (default {f.default:,})")


def limits_from_args(args: argparse.Namespace) -> ServerLimits:
    return ServerLimits(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ServerLimits)})
