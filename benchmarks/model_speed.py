"""lmforge vs transformers on CPU: prefill tokens/s, batch-1 greedy decode tokens/s, decode roofline.

Both libraries run the same random-initialised Llama-architecture checkpoint (saved once by
transformers, loaded by each), the same prompts and the same thread count.

    python benchmarks/model_speed.py                   # ~100M params, float32
    python benchmarks/model_speed.py --quick           # smoke run, < 1 min
    python benchmarks/model_speed.py --dtype bfloat16 --compile --json results.json
    python benchmarks/model_speed.py --model PATH      # your own Hugging Face model directory
    python benchmarks/model_speed.py --hidden 576 --layers 30 --heads 9 --kv-heads 3 --intermediate 1536 \
        --vocab 49152 --tie-embeddings                 # SmolLM2-135M's shape, random weights

``--model PATH`` loads that local directory (config.json + safetensors) with ``lmforge.load_model`` and with
transformers' ``AutoModelForCausalLM.from_pretrained`` (same dtype) instead of building a random Llama; the
shape flags do not apply then. Prompts are random token ids and both sides decode exactly --new-tokens
tokens (EOS is ignored), so the checkpoint's tokenizer and generation config play no part.

Decode tokens/s is measured as (N - 1) / (t(N new tokens) - t(1 new token)), with t the median
wall time of a whole ``generate`` call, so the prompt's prefill cancels out for both libraries.
The roofline is the measured memory-read bandwidth divided by the bytes of weights one decode
step reads (every matrix except the input embedding, of which one row is read).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SHAPE_DEFAULTS = {"hidden": 768, "layers": 12, "heads": 12, "kv-heads": 4, "intermediate": 2048, "vocab": 32000}
QUICK_SHAPE = {"hidden": 256, "layers": 4, "heads": 4, "kv-heads": 2, "intermediate": 512, "vocab": 8000}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    p.add_argument("--model", type=Path, default=None,
                   help="a local Hugging Face model directory to measure instead of a random Llama of the shape flags")
    shape = p.add_argument_group("random model shape (ignored with --model)")
    for flag, default in SHAPE_DEFAULTS.items():
        shape.add_argument(f"--{flag}", type=int, default=None, help=f"default {default}")
    shape.add_argument("--tie-embeddings", action="store_true", help="LM head shares the input embedding")
    p.add_argument("--prefill", default="4x256,1x512", help="comma-separated BATCHxLEN prefill shapes")
    p.add_argument("--prompt-len", type=int, default=32, help="decode prompt length")
    p.add_argument("--new-tokens", type=int, default=128, help="decode: new tokens per generate call")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions (median reported)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--bandwidth-gib", type=float, default=2.0, help="buffer size for the bandwidth probe")
    p.add_argument("--no-static", action="store_true", help="skip transformers' static-cache generate")
    p.add_argument("--compile", action="store_true", help="also time lmforge generate(compile=True)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="small model and few reps: a smoke run")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    args = p.parse_args(argv)
    given = [f"--{f}" for f in SHAPE_DEFAULTS if getattr(args, f.replace("-", "_")) is not None]
    if args.tie_embeddings:
        given.append("--tie-embeddings")
    if args.model is not None and given:
        p.error(f"--model takes the shape from the checkpoint; drop {', '.join(given)}")
    # --quick: a small model (unless --model or a shape flag says otherwise) and few reps
    defaults = QUICK_SHAPE if args.quick else SHAPE_DEFAULTS
    for flag, default in defaults.items():
        if getattr(args, flag.replace("-", "_")) is None:
            setattr(args, flag.replace("-", "_"), default)
    if args.quick:
        args.prefill, args.new_tokens = "2x64,1x128", 32
        args.reps, args.bandwidth_gib = 2, 0.5
    return args


# ---- timing helpers --------------------------------------------------------------------------------
def interleaved_medians(fns: dict, reps: int, warmup: int) -> dict[str, float]:
    """Median wall time of each callable, the callables taking turns rep by rep.

    Taking turns means a burst of background load on the machine hits every contender alike.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def measure_bandwidth(gib: float, reps: int = 5) -> float:
    """Memory-read bandwidth in bytes/s: best of ``reps`` full reductions of a float32 buffer."""
    x = torch.ones(int(gib * 2**30) // 4, dtype=torch.float32)
    x.sum()  # touch every page
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    nbytes = x.numel() * x.element_size()
    del x
    return nbytes / best


def decode_weight_bytes(model) -> int:
    """Bytes of weights one decode step reads: every parameter and buffer (a quantized model's packed codes and
    scales included) except the input embedding table, of which one row is read, unless the LM head is that
    same tensor."""
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    emb = model.model.embed_tokens.weight
    head = model.lm_head  # a QuantizedLinear's .weight would dequantize: test the type first
    if not (isinstance(head, torch.nn.Linear) and head.weight is emb):
        total -= emb.numel() * emb.element_size()
    return total


# ---- the two libraries -----------------------------------------------------------------------------
def build_checkpoint(args: argparse.Namespace, path: Path) -> int:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=4096, tie_word_embeddings=args.tie_embeddings, bos_token_id=1, eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(path)
    return n_params


def load_both(path: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, GenerationConfig

    from lmforge.models.checkpoint import load_model

    try:
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
    except ValueError:  # an architecture without an SDPA implementation: its default attention
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    # Plain greedy decoding of exactly N tokens on both sides: drop the checkpoint's generation defaults
    # (sampling, repetition penalty, EOS ids) so that neither side stops early or does extra work.
    hf.generation_config = GenerationConfig(pad_token_id=0)
    ours = load_model(path, dtype=dtype).eval()
    return hf.eval(), ours


def hf_generate(model, ids: torch.Tensor, n: int, static: bool) -> torch.Tensor:
    extra = {"cache_implementation": "static"} if static else {}
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                         min_new_tokens=n, pad_token_id=0, **extra)
    return out[:, ids.shape[1]:]


# ---- benchmark -----------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    from lmforge.models.generate import generate

    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    dtype = DTYPES[args.dtype]
    g = torch.Generator().manual_seed(args.seed + 1)
    results: dict = {"dtype": args.dtype, "threads": threads, "torch": torch.__version__,
                     "cpu": platform.processor() or platform.machine()}
    import transformers

    results["transformers"] = transformers.__version__

    if args.model is not None:
        hf, ours = load_both(args.model, dtype)
        results["model"] = str(args.model)
        results["params"] = sum(p.numel() for p in ours.parameters())
    else:
        with tempfile.TemporaryDirectory() as tmp:
            results["params"] = build_checkpoint(args, Path(tmp))
            hf, ours = load_both(Path(tmp), dtype)
    cfg = ours.config
    args.vocab = cfg.vocab_size  # prompts draw token ids below it
    results["shape"] = {"model_type": cfg.model_type, "hidden": cfg.hidden_size, "layers": cfg.num_layers,
                        "heads": cfg.num_heads, "kv_heads": cfg.num_kv_heads, "intermediate": cfg.intermediate_size,
                        "vocab": cfg.vocab_size, "tied_embeddings": cfg.tie_embeddings}
    name = f"{args.model} ({cfg.model_type})" if args.model is not None else "Llama (random)"
    print(f"model: {name} {results['params'] / 1e6:.1f}M params, hidden {cfg.hidden_size}, {cfg.num_layers} layers, "
          f"{cfg.num_heads}/{cfg.num_kv_heads} heads, ffn {cfg.intermediate_size}, vocab {cfg.vocab_size}"
          f"{', tied embeddings' if cfg.tie_embeddings else ''}; {args.dtype}; "
          f"torch {torch.__version__} ({threads} threads), transformers {transformers.__version__}", flush=True)

    rows: list[tuple[str, float, float, str]] = []  # name, lmforge, transformers, unit

    # -- prefill: one forward over the prompt batch, logits for the last position only, no cache --
    results["prefill"] = {}
    with torch.inference_mode():
        for shape in args.prefill.split(","):
            b, t_len = (int(v) for v in shape.lower().split("x"))
            ids = torch.randint(3, args.vocab, (b, t_len), generator=g)
            t = interleaved_medians({"ours": lambda: ours(ids, logits_to_keep=1),
                                     "hf": lambda: hf(ids, use_cache=False, logits_to_keep=1)},
                                    args.reps, args.warmup)
            t_ours, t_hf = t["ours"], t["hf"]
            tps_ours, tps_hf = b * t_len / t_ours, b * t_len / t_hf
            results["prefill"][shape] = {"lmforge_tok_s": tps_ours, "transformers_tok_s": tps_hf,
                                         "ratio": tps_ours / tps_hf}
            rows.append((f"prefill {shape} tok/s", tps_ours, tps_hf, ""))
            print(f"  prefill {shape}: lmforge {tps_ours:.0f} tok/s, transformers {tps_hf:.0f} tok/s", flush=True)

    # -- decode: batch-1 greedy, whole generate calls of N and of 1 new tokens --
    n = args.new_tokens
    prompt = torch.randint(3, args.vocab, (1, args.prompt_len), generator=g)

    variants = {"lmforge": lambda k: generate(ours, prompt, max_new_tokens=k),
                "transformers dynamic": lambda k: hf_generate(hf, prompt, k, static=False)}
    if not args.no_static:
        variants["transformers static"] = lambda k: hf_generate(hf, prompt, k, static=True)
    compile_s = None
    if args.compile:
        t0 = time.perf_counter()
        generate(ours, prompt, max_new_tokens=n, compile=True)
        compile_s = time.perf_counter() - t0
        variants["lmforge compiled"] = lambda k: generate(ours, prompt, max_new_tokens=k, compile=True)

    decode: dict = {}
    tokens: dict[str, torch.Tensor] = {}
    for name, run in list(variants.items()):
        try:
            tokens[name] = run(n).cpu()  # also a warmup
        except Exception as exc:  # e.g. a cache implementation this transformers version cannot run on CPU
            print(f"  decode {name}: failed ({type(exc).__name__}: {exc})", flush=True)
            del variants[name]
    calls = {(name, k): (lambda run=run, k=k: run(k)) for name, run in variants.items() for k in (n, 1)}
    t = interleaved_medians(calls, args.reps, max(args.warmup - 1, 0))
    for name in variants:
        rate, e2e = (n - 1) / (t[name, n] - t[name, 1]), n / t[name, n]
        decode[name] = {"decode_tok_s": rate, "end_to_end_tok_s": e2e}
        print(f"  decode {name}: {rate:.1f} tok/s (generate end to end {e2e:.1f} tok/s)", flush=True)
    if compile_s is not None and "lmforge compiled" in decode:
        decode["lmforge compiled"]["first_call_s"] = compile_s
    reference = tokens["lmforge"]
    match = {name: bool(torch.equal(t, reference)) for name, t in tokens.items() if name != "lmforge"}
    results["decode"] = decode
    results["decode_tokens_match"] = match

    # -- memory bandwidth and the decode roofline --
    bandwidth = measure_bandwidth(args.bandwidth_gib)
    weight_bytes = decode_weight_bytes(ours)
    roofline = bandwidth / weight_bytes
    results["bandwidth_GBps"] = bandwidth / 1e9
    results["decode_weight_MB"] = weight_bytes / 1e6
    results["roofline_tok_s"] = roofline

    # -- report --
    hf_names = [k for k in decode if k.startswith("transformers")]
    best_hf = max(hf_names, key=lambda k: decode[k]["decode_tok_s"])
    ours_names = [k for k in decode if k.startswith("lmforge")]
    for name in ours_names:
        rows.append((f"decode b1 tok/s ({name.removeprefix('lmforge').strip() or 'eager'})",
                     decode[name]["decode_tok_s"], decode[best_hf]["decode_tok_s"], best_hf))
    print()
    print(f"{'metric':<32}{'lmforge':>12}{'transformers':>14}{'ratio':>8}")
    for name, a, b, note in rows:
        print(f"{name:<32}{a:>12.1f}{b:>14.1f}{a / b:>7.2f}x" + (f"  (vs {note})" if note else ""))
    for name in hf_names:
        print(f"{'  ' + name + ' decode tok/s':<32}{'':>12}{decode[name]['decode_tok_s']:>14.1f}")
    print()
    print(f"memory read bandwidth {bandwidth / 1e9:.1f} GB/s; decode reads {weight_bytes / 1e6:.0f} MB of weights "
          f"per token -> roofline {roofline:.1f} tok/s")
    for name in list(ours_names) + hf_names:
        frac = decode[name]["decode_tok_s"] / roofline
        decode[name]["roofline_fraction"] = frac
        print(f"  {name}: {frac:.0%} of roofline")
    results["loadavg_1min_end"] = os.getloadavg()[0]
    print(f"(machine load average at the end: {results['loadavg_1min_end']:.2f} on {os.cpu_count()} cpus)")
    if compile_s is not None:
        print(f"lmforge compile=True: first generate call (incl. compilation) {compile_s:.1f} s")
    print("greedy tokens identical to lmforge: " + ", ".join(f"{k}: {'yes' if v else 'NO'}" for k, v in match.items()))
    print()
    for shape, r in results["prefill"].items():
        print(f"prefill {shape} ratio lmforge/transformers: {r['ratio']:.2f}x")
    for name in ours_names:
        ratio = decode[name]["decode_tok_s"] / decode[best_hf]["decode_tok_s"]
        decode[name]["ratio_vs_best_transformers"] = ratio
        print(f"decode ({name}) ratio lmforge/transformers (best: {best_hf}): {ratio:.2f}x")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
        print(f"wrote {args.json}")
    return results


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
