"""``lmforge serve``: the OpenAI-compatible HTTP server."""

from __future__ import annotations

import argparse
import os

from lmforge.cli import command


def _serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="HF model directory (with tokenizer.json for text and chat)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("LMFORGE_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: $LMFORGE_API_KEY)")
    p.add_argument("--served-model-name", default=None, help="the model id clients send (default: directory name)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=512)
    p.add_argument("--no-prefix-caching", action="store_true")


@command("serve", "OpenAI-compatible HTTP server (chat, completions, streaming) over the batching engine")(_serve_args)
def serve_cmd(args: argparse.Namespace) -> int:
    from lmforge.serve.server import serve

    serve(args.model, host=args.host, port=args.port, api_key=args.api_key, model_name=args.served_model_name,
          device=args.device, block_size=args.block_size, max_num_seqs=args.max_num_seqs,
          max_num_batched_tokens=args.max_num_batched_tokens, enable_prefix_caching=not args.no_prefix_caching)
    return 0
