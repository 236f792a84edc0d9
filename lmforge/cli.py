"""The ``lmforge`` command line. Each subcommand is a thin layer over the Python API."""

from __future__ import annotations

import argparse
import json
import sys
import time

from lmforge.commands import COMMANDS, DEVICE_FLAG, command
from lmforge.errors import LmforgeError


# ---- inspect ----------------------------------------------------------------------------------
def _inspect_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="a Hugging Face model directory")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")


@command("inspect", "show a checkpoint's architecture, size, dtype and context length")(_inspect_args)
def inspect_cmd(args: argparse.Namespace) -> int:
    from lmforge.models.inspect import describe

    info = describe(args.path)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        width = max(len(k) for k in info)
        for key, value in info.items():
            print(f"{key:<{width}}  {value}")
    return 0


# ---- generate ----------------------------------------------------------------------------------
def _generate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model directory (config.json, safetensors, tokenizer.json)")
    p.add_argument("--prompt", required=True, help="prompt text")
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a user turn with the chat template")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", **DEVICE_FLAG)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])


@command("generate", "generate text from a prompt, streaming tokens to the terminal")(_generate_args)
def generate_cmd(args: argparse.Namespace) -> int:
    import torch

    from lmforge.data.tokenizer import load_tokenizer
    from lmforge.models import generate_stream, load_model
    from lmforge.models.generate import default_eos_ids

    if args.max_new_tokens <= 0:
        raise LmforgeError("--max-new-tokens must be positive")
    if args.temperature < 0:
        raise LmforgeError("--temperature must be >= 0")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise LmforgeError("--top-p must be in (0, 1]")
    tokenizer = load_tokenizer(args.model)
    model = load_model(args.model, dtype=getattr(torch, args.dtype), device=args.device)
    if args.chat:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True)
    else:
        ids = tokenizer.encode(args.prompt)
    if not ids:
        raise LmforgeError("the prompt encodes to no tokens")
    limit = model.config.max_position_embeddings
    if len(ids) + args.max_new_tokens > limit:
        raise LmforgeError(f"prompt ({len(ids)} tokens) + --max-new-tokens ({args.max_new_tokens}) "
                           f"exceeds the model's context length {limit}")
    stops = list(dict.fromkeys([*tokenizer.eos_ids, *default_eos_ids(model)]))
    decoder = tokenizer.incremental_decoder()
    if not args.chat:
        sys.stdout.write(args.prompt)
    # The first token comes out of the prompt's forward pass (prefill); each later one is a decode step.
    start = time.perf_counter()
    first = end = start
    steps = 0
    for token in generate_stream(model, torch.tensor([ids]), max_new_tokens=args.max_new_tokens,
                                 temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                 eos_ids=stops, seed=args.seed):
        tid = int(token[0])
        end = time.perf_counter()
        if steps == 0:
            first = end
        steps += 1
        if tid in stops:
            break
        sys.stdout.write(decoder.add(tid))
        sys.stdout.flush()
    sys.stdout.write(decoder.flush() + "\n")
    print(generation_rates(len(ids), first - start, steps, end - first), file=sys.stderr)
    return 0


def generation_rates(prompt_tokens: int, prefill_s: float, new_tokens: int, decode_s: float) -> str:
    """The timing line, prefill and decode apart: the prompt's forward pass (which also yields the first new
    token) in prompt tokens per second, then the one-token decode steps that made the other new tokens."""
    def rate(n: int, s: float) -> str:
        return f"{n / s:.1f} tokens/s" if n and s > 0 else "- tokens/s"

    decoded = max(new_tokens - 1, 0)
    return (f"[prefill: {prompt_tokens} tokens in {prefill_s:.2f}s, {rate(prompt_tokens, prefill_s)}; "
            f"decode: {decoded} tokens in {decode_s:.2f}s, {rate(decoded, decode_s)}; {new_tokens} new tokens]")


# ---- entry point -------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    _load_plugins()
    parser = argparse.ArgumentParser(prog="lmforge", description="Build, train, align, serve and evaluate LLMs.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, add_args, fn) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_args(p)
        p.set_defaults(func=fn)
    return parser


def _load_plugins() -> None:
    """Stages register their own subcommands (``lmforge.commands``) when imported; importing them is cheap
    (heavy imports are inside the commands). Imported in the order ``--help`` lists them."""
    import lmforge.train.cli  # noqa: F401, I001
    import lmforge.align.cli  # noqa: F401
    import lmforge.align.cli_sampling  # noqa: F401
    import lmforge.eval.cli  # noqa: F401
    import lmforge.serve.cli  # noqa: F401
    import lmforge.quickstart.pretrain_sft  # noqa: F401
    import lmforge.quickstart.align  # noqa: F401


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except LmforgeError as e:
        print(f"lmforge {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
