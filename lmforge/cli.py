"""The ``lmforge`` command line. Each subcommand is a thin layer over the Python API."""

from __future__ import annotations

import argparse
import json
import sys
import time

from lmforge.commands import COMMANDS, DEVICE_FLAG, QUANTIZE_FLAG, VISUAL_TOKENS_FLAG, command
from lmforge.errors import LmforgeError
from lmforge.models.thinking import add_thinking_flags, budget_from_args


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
    p.add_argument("--temperature", type=float, default=None,
                   help="0 = greedy; default 0, or 1 with a sampling --strategy (its samples must differ)")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", **DEVICE_FLAG)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--quantize", **QUANTIZE_FLAG)
    p.add_argument("--steer", default=None, metavar="PATH",
                   help="steering vector added to the residual stream (.gguf llama.cpp control vector or .safetensors)")
    p.add_argument("--steer-scale", type=float, default=1.0, help="multiplier for --steer's vector (default 1)")
    p.add_argument("--image", action="append", default=None, metavar="PATH",
                   help="an image for a vision-language (LLaVA) model; repeat for several. The prompt holds one "
                        "image placeholder (e.g. <image>) per image; with --chat the images go before its text "
                        "unless the prompt places them with the placeholder")
    p.add_argument("--visual-tokens", **VISUAL_TOKENS_FLAG)
    add_thinking_flags(p)
    _add_strategy_flags(p)


@command("generate", "generate text from a prompt, streaming tokens to the terminal")(_generate_args)
def generate_cmd(args: argparse.Namespace) -> int:
    import torch

    from lmforge.data.tokenizer import load_tokenizer
    from lmforge.models import generate_stream, load_model
    from lmforge.models.generate import default_eos_ids

    if args.temperature is None:
        args.temperature = 0.0 if args.strategy == "greedy" else 1.0
    if args.max_new_tokens <= 0:
        raise LmforgeError("--max-new-tokens must be positive")
    if args.temperature < 0:
        raise LmforgeError("--temperature must be >= 0")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise LmforgeError("--top-p must be in (0, 1]")
    _check_strategy_args(args)  # before loading anything: a missing --reward-model fails fast
    images = None
    if args.visual_tokens and not args.image:
        raise LmforgeError("--visual-tokens reduces an image's tokens: it needs --image")
    if args.image:
        from lmforge.data.image_processor import load_image

        if args.strategy != "greedy":
            raise LmforgeError(f"--image works with --strategy greedy only, not {args.strategy} (the engine takes "
                               "no images yet)")
        images = [load_image(path) for path in args.image]  # before the model: an unreadable file fails fast
    steering = None
    if args.steer is not None:
        from lmforge.models.steering import Steering, SteeringVector

        steering = Steering(SteeringVector.load(args.steer), args.steer_scale, name=args.steer)  # before the model
    tokenizer = load_tokenizer(args.model)
    thinking = budget_from_args(args, tokenizer, args.max_new_tokens)  # before the model: bad flags fail fast
    model = load_model(args.model, dtype=getattr(torch, args.dtype), device=args.device, quantize=args.quantize)
    from lmforge.models.llava import text_decoder

    if steering is not None:
        steering.vector.check(text_decoder(model), f"steering vector {args.steer}")
    image_inputs: dict = {}
    if images is not None:
        if text_decoder(model) is model:
            raise LmforgeError(f"--image needs a vision-language model (model_type llava or mllama); {args.model} "
                               f"is a text-only {model.config.model_type} model")
        from lmforge.data.image_processor import load_processor

        processor = load_processor(args.model)
        if args.visual_tokens:
            from lmforge.models.llava import set_visual_tokens

            set_visual_tokens(model, args.visual_tokens, processor)
        if args.chat:
            # The images go before the text, unless the prompt places them itself with the image token.
            parts = (args.prompt if processor.image_token in args.prompt else
                     [*({"type": "image"} for _ in images), {"type": "text", "text": args.prompt}])
            batch = processor.apply_chat_template([{"role": "user", "content": parts}], images=images)
        else:
            batch = processor(args.prompt, images)
        ids = batch["input_ids"][0].tolist()
        # pixel_values, and for Mllama its aspect-ratio ids/mask and cross-attention mask
        image_inputs = {name: value for name, value in batch.items() if name not in ("input_ids", "attention_mask")}
    elif args.chat:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True)
    else:
        ids = tokenizer.encode(args.prompt)
    if not ids:
        raise LmforgeError("the prompt encodes to no tokens")
    limit = model.config.max_position_embeddings
    if len(ids) + args.max_new_tokens > limit:
        raise LmforgeError(f"prompt ({len(ids)} tokens) + --max-new-tokens ({args.max_new_tokens}) "
                           f"exceeds the model's context length {limit}")
    if args.strategy != "greedy":
        if thinking is not None:
            raise LmforgeError(f"--strategy {args.strategy} does not support budget forcing (thinking-token flags) yet")
        return _run_strategy(args, text_decoder(model), tokenizer, ids, steering)  # the engine runs the decoder
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
                                 eos_ids=stops, seed=args.seed, steering=steering, thinking_budget=thinking,
                                 **image_inputs):
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


# ---- generate --strategy: test-time compute over the engine (lmforge.engine.strategies) ---------------
def _add_strategy_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("test-time strategies (sampled through the engine; N samples share the prompt's KV)")
    g.add_argument("--strategy", default="greedy",
                   choices=["greedy", "majority", "best-of-n", "weighted-majority", "beam"],
                   help="greedy: stream one completion (default); majority: vote over the answers of --n samples; "
                        "best-of-n: the best-scored of --n; weighted-majority: answers vote with weight exp(score); "
                        "beam: step-level beam search scored at each --step-delimiter")
    g.add_argument("--n", type=int, default=8, help="samples (beam: expansions per beam and step; default 8)")
    g.add_argument("--answer-regex", default=None, metavar="REGEX",
                   help="extracts the answer (last match; group 1 if any) to vote on; default the whole completion")
    g.add_argument("--reward-model", default=None, metavar="PATH", help="reward model directory (`lmforge rm`)")
    g.add_argument("--verifier", default=None, metavar="SPEC",
                   help="score 1/0 instead of a reward model: regex-match:PATTERN (the completion matches) or "
                        "answer:VALUE (the --answer-regex answer equals VALUE)")
    g.add_argument("--beam-width", type=int, default=4, help="beams kept per step (default 4)")
    g.add_argument("--step-delimiter", default="\n", help="beam: text that ends a step (default a newline)")
    g.add_argument("--max-steps", type=int, default=8, help="beam: most steps (default 8); --max-new-tokens "
                                                            "bounds each step")


def _check_strategy_args(args: argparse.Namespace) -> None:
    from lmforge.engine.strategies import NEEDS_SCORER, answer_extractor, parse_verifier

    strategy = args.strategy
    for flag, value in (("--n", args.n), ("--beam-width", args.beam_width), ("--max-steps", args.max_steps)):
        if value < 1:
            raise LmforgeError(f"{flag} must be positive, got {value}")
    if args.reward_model is not None and args.verifier is not None:
        raise LmforgeError("pass --reward-model or --verifier, not both")
    scorer_flag = "--reward-model" if args.reward_model is not None else "--verifier" if args.verifier else None
    if strategy in NEEDS_SCORER and scorer_flag is None:
        raise LmforgeError(f"--strategy {strategy} needs a reward model: pass --reward-model PATH (a reward model "
                           f"saved by `lmforge rm`), or --verifier SPEC")
    if strategy not in NEEDS_SCORER and scorer_flag is not None:
        raise LmforgeError(f"--strategy {strategy} does not score samples; {scorer_flag} needs --strategy "
                           f"best-of-n, weighted-majority or beam")
    if strategy != "greedy" and args.temperature == 0:
        raise LmforgeError(f"--strategy {strategy} with --temperature 0 samples the same completion every time; "
                           "use a temperature > 0")
    extract = answer_extractor(args.answer_regex)  # a bad regex fails here, before the model loads
    if args.verifier is not None:
        parse_verifier(args.verifier, extract)


def _run_strategy(args: argparse.Namespace, model, tokenizer, ids: list[int], steering) -> int:
    from lmforge.engine.sequence import SamplingParams
    from lmforge.engine.strategies import RewardScorer, answer_extractor, parse_verifier, run_strategy

    scorer = None
    if args.reward_model is not None:
        import torch

        from lmforge.models.reward import load_reward_model

        rm = load_reward_model(args.reward_model, dtype=getattr(torch, args.dtype), device=model.device)
        scorer = RewardScorer(rm, tokenizer)
    elif args.verifier is not None:
        scorer = parse_verifier(args.verifier, answer_extractor(args.answer_regex))
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p or 1.0, top_k=args.top_k or 0,
                            seed=args.seed, max_tokens=args.max_new_tokens, steering=steering)
    delimiter = args.step_delimiter.replace("\\n", "\n").replace("\\t", "\t")  # as typed in a shell: \n, \t
    r = run_strategy(args.strategy, model, ids, params, tokenizer, n=args.n, scorer=scorer, extract=args.answer_regex,
                     beam_width=args.beam_width, step_delimiter=delimiter, max_steps=args.max_steps)
    sys.stdout.write(("" if args.chat else args.prompt) + r.text + "\n")
    if args.strategy == "beam":
        what = f"beam of width {args.beam_width} x {args.n} expansions, {len(r.steps)} steps"
    else:
        what = f"{args.strategy} of {len(r.candidates)}"
    voting = args.strategy in ("majority", "weighted-majority")
    found = []
    if voting or args.answer_regex is not None:  # without a regex the "answer" is just the whole text
        found.append(f"answer {r.answer!r}" if r.answer is not None else "no answer extracted")
    if r.votes is not None:
        found.append(f"{r.votes:g} {'votes' if args.strategy == 'majority' else 'total weight'}")
    if r.best.score is not None:
        found.append(f"score {r.best.score:.4g}")
    u = r.usage
    print(f"[{what}: {', '.join(found)}; prompt tokens computed {u.prompt_tokens_computed} of {u.prompt_tokens} "
          f"(the rest from the prefix cache); {u.generated_tokens} tokens generated]", file=sys.stderr)
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
    import lmforge.interp.cli  # noqa: F401
    import lmforge.interp.sae_cli  # noqa: F401
    import lmforge.quickstart.pretrain_sft  # noqa: F401
    import lmforge.quickstart.align  # noqa: F401
    import lmforge.quickstart.interp  # noqa: F401
    import lmforge.models.gguf  # noqa: F401  (export-gguf)
    import lmforge.models.quant  # noqa: F401  (quantize)
    import lmforge.models.compose  # noqa: F401  (build-vlm)
    import lmforge.quickstart.reason  # noqa: F401
    import lmforge.quickstart.vision  # noqa: F401


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
