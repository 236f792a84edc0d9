"""Where batch-1 greedy decode time goes: lmforge vs transformers, same weights, on CPU.

    python benchmarks/decode_profile.py                      # random Llama of SmolLM2-135M's shape, float32
    python benchmarks/decode_profile.py --model PATH         # your own Hugging Face model directory
    python benchmarks/decode_profile.py --threads 2 --json profile.json

Two measurements, both per decoded token:
  1. wall time, without a profiler: (t(N new tokens) - t(1 new token)) / (N - 1), medians of whole ``generate``
     calls taking turns between the libraries (as ``model_speed.py`` measures it);
  2. a ``torch.profiler`` trace of N decode steps (the prompt's prefill excluded), each top-level aten op put in a
     bucket by what it is (matmuls, the LM head apart) or by the library function that called it (norms,
     RoPE, KV cache, ...). "outside ops" is the step's wall time under the profiler minus the time inside
     top-level ops: Python, module calls, the dispatcher before an op starts. Op times come from a plain trace;
     the callers from a second, identical run traced with Python stacks. The profiler still adds a few
     microseconds per op (the profiled step is slower than (1)), mostly to the small ops and "outside ops".
Read the fractions: they are robust to background load, the milliseconds are not. The roofline is
model_speed.py's: measured read bandwidth / bytes of weights one decode step reads.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import json
import os
import re
import sys
import tempfile
from collections import defaultdict
from functools import lru_cache
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model_speed import (  # noqa: E402
    DTYPES, build_checkpoint, decode_weight_bytes, hf_generate, interleaved_medians, load_both, measure_bandwidth)

SMOLLM2_135M = {"hidden": 576, "layers": 30, "heads": 9, "kv_heads": 3, "intermediate": 1536, "vocab": 49152}
MATMUL_OPS = {"aten::linear", "aten::matmul", "aten::mm", "aten::addmm", "aten::bmm",
              "aten::_weight_int4pack_mm_for_cpu", "aten::_weight_int8pack_mm"}  # the last two: lmforge.models.quant
ATTENTION_OPS = {"aten::scaled_dot_product_attention"}
BUCKETS = ["matmul (layers)", "matmul (LM head)", "attention (SDPA)", "KV cache writes + slot bookkeeping", "norms", "RoPE",
           "MLP activation", "residual adds, views, sampling, other ops", "outside ops (Python, dispatch)"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=None, help="a local HF model directory (default: random SmolLM2-135M shape)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--quantize", choices=["int8", "int4"], default=None,
                   help="lmforge's weight-only quantization (int4: group 32); transformers stays in --dtype")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--reps", type=int, default=5, help="timed repetitions of the wall-time measurement")
    p.add_argument("--profile-steps", type=int, default=32, help="decode steps under the profiler")
    p.add_argument("--no-hf", action="store_true", help="profile lmforge only")
    p.add_argument("--bandwidth-gib", type=float, default=1.0, help="buffer size for the bandwidth probe")
    p.add_argument("--verbose", action="store_true", help="also list the biggest callers in each bucket")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None)
    return p.parse_args(argv)


# ---- attributing an op to the library function that called it ---------------------------------------------
FRAME = re.compile(r"^((?:lmforge|transformers)/\S+\.py)\((\d+)\): (\S+)$")  # python-tracer event names


@lru_cache(maxsize=None)
def _qualnames(relpath: str) -> dict[int, str]:
    """def line -> Class.function for a module file given relative to its import root."""
    for root in sys.path:
        file = Path(root or ".") / relpath
        if file.is_file():
            break
    else:
        return {}
    out: dict[int, str] = {}

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                if not isinstance(child, ast.ClassDef):
                    out[child.lineno] = prefix + child.name
                    # decorated functions: the tracer may report the decorator's line
                    for dec in child.decorator_list:
                        out.setdefault(dec.lineno, prefix + child.name)
                visit(child, f"{prefix}{child.name}.")

    visit(ast.parse(file.read_text()), "")
    return out


def caller(event) -> str:
    """The innermost lmforge / transformers function above an op, as ``file.py:Class.function``."""
    parent = event.cpu_parent
    while parent is not None:
        m = FRAME.match(parent.name)
        if m:
            path, line, func = m.group(1), int(m.group(2)), m.group(3)
            return f"{Path(path).name}:{_qualnames(path).get(line, func)}"
        parent = parent.cpu_parent
    return "?"


def bucket(event, vocab: int) -> str:
    name, where = event.name, caller(event).lower()
    if name in MATMUL_OPS:
        shapes = [s for s in (event.input_shapes or []) if s]
        return "matmul (LM head)" if any(vocab in s for s in shapes) else "matmul (layers)"
    if name in ATTENTION_OPS or "_scaled_dot_product" in name or "sdpa" in where:
        return "attention (SDPA)"
    if name == "aten::index_copy_" or "cache" in where or "attend" in where:
        return "KV cache writes + slot bookkeeping"
    if "norm" in where:
        return "norms"
    if "rope" in where or "rotary" in where or "rotate_half" in where:
        return "RoPE"
    if "mlp" in where or name in {"aten::silu", "aten::gelu"}:
        return "MLP activation"
    return "residual adds, views, sampling, other ops"


def top_level_ops(events) -> list:
    """aten ops not called from inside another aten op."""
    out = []
    for e in events:
        if not e.name.startswith("aten::"):
            continue
        parent = e.cpu_parent
        while parent is not None and not parent.name.startswith("aten::"):
            parent = parent.cpu_parent
        if parent is None:
            out.append(e)
    return out


# ---- the two decode loops under the profiler --------------------------------------------------------------
def lmforge_steps(model, prompt: torch.Tensor, steps: int):
    cache = model.new_cache(1, prompt.shape[1] + steps + 1)
    logits = model(prompt, cache=cache, logits_to_keep=1)[:, -1]

    def run() -> None:
        nonlocal logits
        for _ in range(steps):
            with torch.profiler.record_function("decode_step"):
                logits = model.decode_step(logits.argmax(-1), cache)

    return run


def hf_steps(model, prompt: torch.Tensor, steps: int):
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    # newer transformers renamed past_key_values to cache (the old name warns)
    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    out = model(prompt, use_cache=True, logits_to_keep=1, **{key: cache})
    state = {"logits": out.logits[:, -1], "pos": prompt.shape[1]}

    def run() -> None:
        for _ in range(steps):
            with torch.profiler.record_function("decode_step"):
                token = state["logits"].argmax(-1, keepdim=True)
                pos = torch.tensor([state["pos"]])
                out = model(token, use_cache=True, cache_position=pos, logits_to_keep=1, **{key: cache})
                state["logits"], state["pos"] = out.logits[:, -1], state["pos"] + 1

    return run


def _trace(make_run, detailed: bool):
    """(decode_step events, top-level aten ops inside them) of one profiled run of the loop."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch.inference_mode():
        run = make_run()
        with torch_profile(activities=[ProfilerActivity.CPU], record_shapes=detailed, with_stack=detailed) as prof:
            run()
    events = prof.events()
    steps = [e for e in events if e.name == "decode_step"]
    spans = [(s.time_range.start, s.time_range.end) for s in steps]
    ops = [e for e in top_level_ops(events) if any(a <= e.time_range.start <= b for a, b in spans)]
    ops.sort(key=lambda e: e.time_range.start)
    return steps, ops


def profile(make_run, steps: int, vocab: int) -> dict:
    """Op times from a plain trace; each op's bucket from a second, identical run traced with Python stacks
    and shapes (which cost far more per op than the op-only trace, so their times are not used)."""
    step_events, ops = _trace(make_run, detailed=False)
    _, detailed = _trace(make_run, detailed=True)
    if [e.name for e in ops] != [e.name for e in detailed]:
        raise RuntimeError("the two profiled runs executed different op sequences")
    wall_us = sum(e.cpu_time_total for e in step_events)
    sums: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    callers: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for timed, described in zip(ops, detailed):
        b = bucket(described, vocab)
        sums[b] += timed.cpu_time_total
        counts[b] += 1
        callers[b][f"{caller(described)} {described.name}"] += timed.cpu_time_total / steps / 1e3
    sums["outside ops (Python, dispatch)"] = wall_us - sum(sums.values())
    return {"profiled_ms_per_step": wall_us / steps / 1e3, "ops_per_step": len(ops) / steps,
            "ms": {b: sums[b] / steps / 1e3 for b in BUCKETS},
            "fraction": {b: sums[b] / wall_us for b in BUCKETS},
            "ops": {b: counts[b] / steps for b in BUCKETS if counts[b]},
            "callers_ms": {b: dict(sorted(c.items(), key=lambda kv: -kv[1])[:8]) for b, c in callers.items()}}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    from lmforge.models.generate import generate

    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    if args.model is not None:
        hf, ours = load_both(args.model, dtype)
    else:
        shape = argparse.Namespace(**SMOLLM2_135M, tie_embeddings=True, seed=args.seed)
        with tempfile.TemporaryDirectory() as tmp:
            build_checkpoint(shape, Path(tmp))
            hf, ours = load_both(Path(tmp), dtype)
    if args.quantize:
        from lmforge.models.quant import quantize_model

        quantize_model(ours, args.quantize)
    cfg = ours.config
    print(f"model: {args.model or 'random Llama'}, {sum(p.numel() for p in ours.parameters()) / 1e6:.1f}M params, "
          f"hidden {cfg.hidden_size}, {cfg.num_layers} layers, {cfg.num_heads}/{cfg.num_kv_heads} heads, "
          f"ffn {cfg.intermediate_size}, vocab {cfg.vocab_size}{', tied' if cfg.tie_embeddings else ''}; "
          f"{args.dtype}{', lmforge ' + args.quantize if args.quantize else ''}, {torch.get_num_threads()} threads",
          flush=True)
    g = torch.Generator().manual_seed(args.seed + 1)
    prompt = torch.randint(3, cfg.vocab_size, (1, args.prompt_len), generator=g)
    n = args.new_tokens

    libs = {"lmforge": (lambda k: generate(ours, prompt, max_new_tokens=k), lmforge_steps, ours)}
    if not args.no_hf:
        libs["transformers"] = (lambda k: hf_generate(hf, prompt, k, static=False), hf_steps, hf)
    with torch.inference_mode():
        calls = {(name, k): (lambda f=f, k=k: f(k)) for name, (f, _, _) in libs.items() for k in (n, 1)}
        t = interleaved_medians(calls, args.reps, 1)
    results: dict = {"threads": torch.get_num_threads(), "dtype": args.dtype, "libraries": {}}
    for name, (_, steps_fn, model) in libs.items():
        with torch.inference_mode():
            steps_fn(model, prompt, args.profile_steps)()  # warm-up of the profiled loop
        prof = profile(lambda: steps_fn(model, prompt, args.profile_steps), args.profile_steps, cfg.vocab_size)
        prof["ms_per_token"] = (t[name, n] - t[name, 1]) / (n - 1) * 1e3
        results["libraries"][name] = prof
    bandwidth = measure_bandwidth(args.bandwidth_gib)
    weight_bytes = decode_weight_bytes(ours)
    lm_head_bytes = sum(t.numel() * t.element_size() for t in [*ours.lm_head.parameters(), *ours.lm_head.buffers()])
    roofline = bandwidth / weight_bytes
    results.update(bandwidth_GBps=bandwidth / 1e9, decode_weight_MB=weight_bytes / 1e6, roofline_tok_s=roofline)

    names = list(results["libraries"])
    libs_out = results["libraries"]
    print(f"\nbatch-1 greedy decode, {args.profile_steps} steps under torch.profiler, per step "
          f"(top-level aten ops, inclusive time)")
    print(f"{'':46}" + "".join(f"{n:>26}" for n in names))
    for b in BUCKETS:
        cells = []
        for name in names:
            r = libs_out[name]
            ops = r["ops"].get(b)
            cells.append(f"{r['ms'][b]:6.2f} ms {r['fraction'][b]:4.0%}" + (f" {ops:5.0f} ops" if ops else " " * 9))
        print(f"{b:46}" + "".join(f"{c:>26}" for c in cells))
    print(f"{'total under the profiler':46}" + "".join(
        f"{libs_out[n]['profiled_ms_per_step']:6.2f} ms {libs_out[n]['ops_per_step']:10.0f} ops".rjust(26) for n in names))
    print(f"{'wall per token, no profiler (median)':46}" + "".join(
        f"{libs_out[n]['ms_per_token']:6.2f} ms {1e3 / libs_out[n]['ms_per_token']:8.1f} tok/s".rjust(26) for n in names))
    print(f"\nmemory read bandwidth {bandwidth / 1e9:.1f} GB/s; decode reads {weight_bytes / 1e6:.0f} MB of weights "
          f"per token (LM head {lm_head_bytes / 1e6:.0f} MB) -> roofline {roofline:.1f} tok/s")
    for name in names:
        r = libs_out[name]
        r["roofline_fraction"] = 1e3 / r["ms_per_token"] / roofline
        layer_gbps = (weight_bytes - lm_head_bytes) / (r["ms"]["matmul (layers)"] / 1e3) / 1e9
        head_gbps = lm_head_bytes / (r["ms"]["matmul (LM head)"] / 1e3) / 1e9
        rest_ms = r["profiled_ms_per_step"] - r["ms"]["matmul (layers)"] - r["ms"]["matmul (LM head)"]
        print(f"  {name}: {r['roofline_fraction']:.0%} of roofline; layer matmuls stream {layer_gbps:.1f} GB/s, "
              f"LM head {head_gbps:.1f} GB/s; everything but the matmuls {rest_ms:.2f} ms per step "
              f"({rest_ms / cfg.num_layers * 1e3:.0f} us per layer, profiler overhead included)")
    if args.verbose:
        for name in names:
            print(f"\n{name}: biggest callers per bucket (ms per step)")
            for b, callers in libs_out[name]["callers_ms"].items():
                print(f"  {b}: " + "; ".join(f"{k} {v:.2f}" for k, v in callers.items()))
    print(f"(machine load average at the end: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cpus)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
        print(f"wrote {args.json}")
    return results


if __name__ == "__main__":
    main()
