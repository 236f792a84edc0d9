"""``lmforge serve``: the OpenAI-compatible HTTP server."""

from __future__ import annotations

import argparse
import os

from lmforge.commands import DEVICE_FLAG, command


def _serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="HF model directory (with tokenizer.json for text and chat)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("LMFORGE_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: $LMFORGE_API_KEY)")
    p.add_argument("--served-model-name", default=None, help="the model id clients send (default: directory name)")
    p.add_argument("--device", **DEVICE_FLAG)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=512)
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--draft-model", default=None,
                   help="smaller model with the same tokenizer for speculative decoding (HF directory)")
    p.add_argument("--num-speculative-tokens", type=int, default=4, help="draft tokens proposed per step")


@command("serve", "OpenAI-compatible HTTP server (chat, completions, streaming) over the batching engine")(_serve_args)
def serve_cmd(args: argparse.Namespace) -> int:
    from lmforge.serve.server import serve

    serve(args.model, host=args.host, port=args.port, api_key=args.api_key, model_name=args.served_model_name,
          device=args.device, block_size=args.block_size, max_num_seqs=args.max_num_seqs,
          max_num_batched_tokens=args.max_num_batched_tokens, enable_prefix_caching=not args.no_prefix_caching,
          draft_model=args.draft_model, num_speculative_tokens=args.num_speculative_tokens)
    return 0


def _chat_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="HF model directory with a chat template")
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", **DEVICE_FLAG)


@command("chat", "chat with a model in the terminal (its chat template; /reset clears, /quit or Ctrl-D leaves)")(_chat_args)
def chat_cmd(args: argparse.Namespace) -> int:
    import sys

    import torch

    from lmforge.data.tokenizer import load_tokenizer
    from lmforge.errors import LmforgeError
    from lmforge.models import generate_stream, load_model

    tokenizer = load_tokenizer(args.model)
    if tokenizer.chat_template is None:
        raise LmforgeError(f"{args.model} has no chat template; use `lmforge generate` instead")
    model = load_model(args.model, device=args.device)
    start = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(start)
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            sys.stdout.write("\nyou> ")
            sys.stdout.flush()
        line = sys.stdin.readline()
        if not line or line.strip() in ("/quit", "/exit"):
            return 0
        if line.strip() == "/reset":
            messages = list(start)
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line.rstrip("\n")})
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        room = model.config.max_position_embeddings - len(ids)
        if room <= 0:
            print("[the conversation is longer than the model's context; /reset to start over]")
            messages.pop()
            continue
        decoder, reply = tokenizer.incremental_decoder(), []
        sys.stdout.write("model> ")
        for token in generate_stream(model, torch.tensor([ids]), max_new_tokens=min(args.max_new_tokens, room),
                                     temperature=args.temperature, top_p=args.top_p, eos_ids=tokenizer.eos_ids,
                                     seed=args.seed):
            tid = int(token[0])
            if tid in tokenizer.eos_ids:
                break
            reply.append(tid)
            sys.stdout.write(decoder.add(tid))
            sys.stdout.flush()
        sys.stdout.write(decoder.flush() + "\n")
        messages.append({"role": "assistant", "content": tokenizer.decode(reply)})
