"""``lmforge serve``: the OpenAI-compatible HTTP server."""

from __future__ import annotations

import argparse
import os

from lmforge.commands import DEVICE_FLAG, QUANTIZE_FLAG, VISUAL_TOKENS_FLAG, command
from lmforge.models.thinking import add_thinking_flags, budget_from_args
from lmforge.serve.limits import add_limit_flags, limits_from_args


def _serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="HF model directory (with tokenizer.json for text and chat)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("LMFORGE_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: $LMFORGE_API_KEY)")
    p.add_argument("--served-model-name", default=None, help="the model id clients send (default: directory name)")
    p.add_argument("--device", **DEVICE_FLAG)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="weights and KV cache dtype (default float32)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=512)
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "kivi2", "kivi4", "int8"],
                   help="KV cache storage: auto (the --dtype), kivi2/kivi4 (KIVI: keys per channel, values per "
                        "token, 2/4 bits) or int8 (per token); see lmforge.engine.kv_quant")
    p.add_argument("--kv-residual-length", type=int, default=0, metavar="TOKENS",
                   help="with a quantized KV cache: full blocks of recent tokens kept in full precision besides "
                        "the partly filled one (a multiple of --block-size; default 0)")
    p.add_argument("--no-packed-weights", action="store_true",
                   help="on a CPU with float32 weights the linears get a oneDNN-packed copy (decode steps of several "
                        "requests 1.1-1.7x faster per matmul, one more copy of the weights in memory); this turns "
                        "it off")
    p.add_argument("--draft-model", default=None,
                   help="smaller model with the same tokenizer for speculative decoding (HF directory)")
    p.add_argument("--num-speculative-tokens", type=int, default=4, help="draft tokens proposed per step")
    p.add_argument("--shutdown-timeout", type=float, default=5.0, metavar="SECONDS",
                   help="on SIGTERM/Ctrl-C, running requests get this long to finish, then are aborted (503) and "
                        "the server exits (default 5)")
    p.add_argument("--steering-vector", action="append", default=[], metavar="NAME=PATH",
                   help="register a steering vector (.gguf llama.cpp control vector or .safetensors) that requests "
                        "pick with \"steering\": {\"name\": NAME, \"scale\": S}; repeatable")
    add_limit_flags(p)  # --max-body-bytes, --max-messages, ... (lmforge.serve.limits.ServerLimits)


@command("serve", "OpenAI-compatible HTTP server (chat, completions, streaming) over the batching engine")(_serve_args)
def serve_cmd(args: argparse.Namespace) -> int:
    import torch

    from lmforge.serve.server import serve

    steering_vectors = steering_registry(args.steering_vector)
    serve(args.model, host=args.host, port=args.port, api_key=args.api_key, model_name=args.served_model_name,
          device=args.device, block_size=args.block_size, max_num_seqs=args.max_num_seqs,
          max_num_batched_tokens=args.max_num_batched_tokens, enable_prefix_caching=not args.no_prefix_caching,
          draft_model=args.draft_model, num_speculative_tokens=args.num_speculative_tokens,
          kv_cache_dtype=args.kv_cache_dtype, kv_residual_length=args.kv_residual_length,
          packed_weights=False if args.no_packed_weights else None, dtype=getattr(torch, args.dtype),
          shutdown_timeout=args.shutdown_timeout,
          steering_vectors=steering_vectors, limits=limits_from_args(args))
    return 0


def steering_registry(specs: list[str]) -> dict:
    """``NAME=PATH`` flags -> {name: SteeringVector}, read before the model loads so a bad file fails fast."""
    from lmforge.errors import LmforgeError
    from lmforge.models.steering import SteeringVector

    registry = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name.strip() or not path:
            raise LmforgeError(f"--steering-vector takes NAME=PATH, got {spec!r}")
        if name.strip() in registry:
            raise LmforgeError(f"--steering-vector: the name {name.strip()!r} is given twice")
        registry[name.strip()] = SteeringVector.load(path)
    return registry


def _chat_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="HF model directory with a chat template")
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", **DEVICE_FLAG)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--quantize", **QUANTIZE_FLAG)
    p.add_argument("--image", action="append", default=None, metavar="PATH",
                   help="an image for a vision-language model (model_type llava or mllama), sent with your first "
                        "message (before its text); repeat for several. In the chat, /image PATH attaches one to "
                        "your next message")
    p.add_argument("--visual-tokens", **VISUAL_TOKENS_FLAG)
    add_thinking_flags(p)


def _text_only_error(what: str, model_type: str | None) -> str:
    kind = f"a text-only {model_type} model" if model_type else "a text-only model"
    return (f"{what} needs a vision-language model (model_type llava or mllama); this is {kind}, which takes "
            "no images")


@command("chat", "chat with a model in the terminal (its chat template; /image PATH attaches an image to your next "
                 "message, for vision-language models; /reset clears the conversation and its images; Ctrl-C stops "
                 "a reply; /quit, Ctrl-D or Ctrl-C at the prompt leaves)")(_chat_args)
def chat_cmd(args: argparse.Namespace) -> int:
    import sys

    import torch

    from lmforge.data.tokenizer import load_tokenizer
    from lmforge.errors import LmforgeError
    from lmforge.models import load_model

    tokenizer = load_tokenizer(args.model)
    if tokenizer.chat_template is None:
        raise LmforgeError(f"{args.model} has no chat template; use `lmforge generate` instead")
    thinking = budget_from_args(args, tokenizer, args.max_new_tokens)
    images = None
    if args.image:
        from lmforge.data.image_processor import load_image
        from lmforge.models.checkpoint import config_model_type
        from lmforge.models.vision import VISION_LANGUAGE_MODEL_TYPES

        model_type = config_model_type(args.model)
        if model_type is not None and model_type not in VISION_LANGUAGE_MODEL_TYPES:  # before the weights load
            raise LmforgeError(_text_only_error("--image", model_type) + f" ({args.model})")
        images = [load_image(path) for path in args.image]  # before the model: an unreadable file fails fast
    model = load_model(args.model, dtype=getattr(torch, args.dtype), device=args.device, quantize=args.quantize)
    processor = None
    if images is not None or _is_vision_model(model):
        processor = _chat_processor(model, args.model, required=images is not None)
    if args.visual_tokens:
        from lmforge.models.llava import set_visual_tokens

        set_visual_tokens(model, args.visual_tokens, processor)
    return chat_loop(model, tokenizer, read=_read_terminal if sys.stdin.isatty() else _read_piped,
                     system=args.system, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                     top_p=args.top_p, seed=args.seed, thinking_budget=thinking, processor=processor, images=images)


def _is_vision_model(model) -> bool:
    from lmforge.models.llava import text_decoder

    return text_decoder(model) is not model


def _chat_processor(model, path, required: bool):
    """The processor of a vision-language model at ``path`` (None when it does not load and no image is needed
    yet: the chat runs text-only and ``/image`` says why)."""
    import sys

    from lmforge.errors import LmforgeError

    if not _is_vision_model(model):
        raise LmforgeError(_text_only_error("--image", getattr(model.config, "model_type", None)) + f" ({path})")
    from lmforge.data.image_processor import load_processor

    try:
        return load_processor(path)
    except LmforgeError as e:
        if required:
            raise
        print(f"note: images are off in this chat: {e}", file=sys.stderr)
        return None


def _read_terminal(prompt: str) -> str:
    print()
    return input(prompt)


def _read_piped(prompt: str) -> str:
    """``input`` for piped stdin: no prompt shown, EOFError at the end."""
    import sys

    line = sys.stdin.readline()
    if not line:
        raise EOFError
    return line.rstrip("\n")


def chat_loop(model, tokenizer, read=input, out=None, system: str | None = None, max_new_tokens: int = 256,
              temperature: float = 0.7, top_p: float | None = 0.95, seed: int | None = None,
              thinking_budget=None, processor=None, images=None) -> int:
    """The terminal chat. ``read(prompt)`` returns the next line as ``input`` does (EOFError on Ctrl-D,
    KeyboardInterrupt on Ctrl-C); replies go to ``out`` (default stdout). Ctrl-C during a reply stops it and
    returns to the prompt (the words shown stay in the conversation); Ctrl-D or Ctrl-C at the prompt, /quit
    or /exit leave with 0. ``thinking_budget``: a ``lmforge.models.thinking.ThinkingBudget`` for every reply.

    Images (a vision-language model): ``processor`` is its ``lmforge.data.image_processor.load_processor``;
    ``images`` (PIL images or paths) go with the first user message, and a line ``/image PATH`` attaches one to
    the next. A message with images is kept as content parts (the images before its text); every turn renders
    the whole conversation, all its images included, through the processor. /reset clears the images too."""
    import sys

    import torch

    from lmforge.errors import LmforgeError
    from lmforge.models import generate_stream
    from lmforge.models.generate import default_eos_ids

    out = out or sys.stdout
    if images and processor is None:
        raise LmforgeError(_no_images_reason(model))
    stops = list(dict.fromkeys([*tokenizer.eos_ids, *default_eos_ids(model)]))
    start = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    pending = list(images or ())  # images for the next user message
    while True:
        try:
            line = read("you> ")
        except (EOFError, KeyboardInterrupt):
            out.write("\n")  # leave the shell's prompt on a line of its own
            out.flush()
            return 0
        if line.strip() in ("/quit", "/exit"):
            return 0
        if line.strip() == "/reset":
            messages = list(start)
            pending = []
            continue
        if line.strip() == "/image" or line.strip().startswith("/image "):
            image = _attach_image(line.strip()[len("/image"):], model, processor, out)
            if image is not None:
                pending.append(image)
            continue
        if not line.strip():
            continue
        if pending:
            parts = [*({"type": "image", "image": image} for image in pending), {"type": "text", "text": line}]
            messages.append({"role": "user", "content": parts})
        else:
            messages.append({"role": "user", "content": line})
        n_images = len(pending)
        pending = []
        image_inputs: dict = {}
        if processor is not None and _has_images(messages):
            try:  # the images' tensors, and the ids with each image placeholder expanded (LLaVA)
                batch = processor.apply_chat_template(messages, add_generation_prompt=True)
            except LmforgeError as e:
                out.write(f"[{e}; the message was dropped]\n")
                messages.pop()
                continue
            ids = batch["input_ids"][0].tolist()
            image_inputs = {name: value for name, value in batch.items()
                            if name not in ("input_ids", "attention_mask")}
        else:
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        dropped = f" (its {n_images} image(s) too)" if n_images else ""
        room = model.config.max_position_embeddings - len(ids)
        if room <= 0:
            out.write("[the conversation is longer than the model's context; /reset to start over]\n"
                      if not image_inputs else
                      f"[the conversation ({len(ids)} tokens with its images) is longer than the model's context "
                      f"({model.config.max_position_embeddings}); the message was dropped{dropped}; /reset to "
                      "start over]\n")
            messages.pop()
            continue
        if thinking_budget is not None and max(thinking_budget.max_tokens or 0, thinking_budget.min_tokens) >= room:
            out.write(f"[the context has room for only {room} new tokens, not more than the thinking budget; "
                      "/reset to start over]\n")
            messages.pop()
            continue
        decoder, reply, stopped = tokenizer.incremental_decoder(), [], False
        out.write("model> ")
        out.flush()
        stream = generate_stream(model, torch.tensor([ids]), max_new_tokens=min(max_new_tokens, room),
                                 temperature=temperature, top_p=top_p, eos_ids=stops, seed=seed,
                                 thinking_budget=thinking_budget, **image_inputs)
        try:
            for token in stream:
                tid = int(token[0])
                if tid in stops:
                    break
                reply.append(tid)
                out.write(decoder.add(tid))
                out.flush()
            out.write(decoder.flush() + "\n")
        except KeyboardInterrupt:
            stopped = True
            out.write(decoder.flush() + " [stopped]\n")
        finally:
            stream.close()
        out.flush()
        if stopped and not reply:
            messages.pop()  # stopped before a word: forget the question too, so the turns still alternate
        else:
            messages.append({"role": "assistant", "content": tokenizer.decode(reply)})


def _has_images(messages) -> bool:
    return any(isinstance(m["content"], list) and any(part.get("type") == "image" for part in m["content"])
               for m in messages)


def _no_images_reason(model) -> str:
    if not _is_vision_model(model):
        return _text_only_error("an image", getattr(model.config, "model_type", None))
    return "this model's image processor is not loaded (does its directory have a preprocessor_config.json?)"


def _attach_image(arg: str, model, processor, out):
    """``/image PATH``: the image, or None after a one-line message saying why not (the chat goes on)."""
    import os

    from lmforge.errors import LmforgeError

    path = arg.strip()
    if len(path) >= 2 and path[0] == path[-1] and path[0] in "'\"":  # a dropped-in path often comes quoted
        path = path[1:-1]
    if not path:
        out.write("[/image takes a file: /image PATH]\n")
        return None
    if processor is None:
        out.write(f"[/image {path}: {_no_images_reason(model)}]\n")
        return None
    from lmforge.data.image_processor import load_image

    try:
        image = load_image(os.path.expanduser(path))
    except LmforgeError as e:
        out.write(f"[/image: {e}]\n")
        return None
    out.write(f"[image {path} goes with your next message]\n")
    out.flush()
    return image
