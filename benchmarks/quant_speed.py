"""Weight-only quantization on CPU: batch-1 greedy decode tokens/s and held-out perplexity, same weights.

For each model, lmforge float32, bfloat16, int8 (per output channel) and int4 (grouped, zero points) decode
the same prompt, next to transformers float32 and, when ``llama-cpp-python`` is installed, llama.cpp on GGUF
exports of the same weights (Q8_0 and Q4_0; a benchmark-only peer, skipped with a message otherwise). Each is
reported as tokens/s, as a ratio to lmforge float32, and as a fraction of the bandwidth roofline for its *own*
bytes per token (measured read bandwidth / the bytes of weights that variant streams per token).

    python benchmarks/quant_speed.py                     # ~100M Llama (12 x 768) and SmolLM2-135M's shape (30 x 576)
    python benchmarks/quant_speed.py --model PATH        # your own Hugging Face model directory instead
    python benchmarks/quant_speed.py --kernels           # only the kernel sweep behind lmforge.models.quant's choice
    python benchmarks/quant_speed.py --quick             # smoke run

Decode tokens/s is model_speed.py's: (N - 1) / (t(N new tokens) - t(1 new token)), medians of whole ``generate``
calls taking turns between the variants, so prefill cancels out. Random-weight models are built by transformers
(``model_speed.build_checkpoint``). Perplexity is measured on held-out text: the quickstart corpus
(``runs/quickstart/data/stdlib.jsonl``, its last documents, tokenized with ``runs/quickstart/tokenizer``) when that
run exists, else Python standard-library source as UTF-8 bytes. On random weights perplexity sits near the
vocabulary size whatever the format, so the script also reports it for the quickstart's *trained* model
(``runs/quickstart/pretrain``) when present: that row shows what quantization does to a model that has learnt
something.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model_speed import (  # noqa: E402
    build_checkpoint, hf_generate, interleaved_medians, load_both, measure_bandwidth)

SHAPES = {
    "100M (12 x 768)": dict(hidden=768, layers=12, heads=12, kv_heads=4, intermediate=2048, vocab=32000,
                            tie_embeddings=False),
    "deep narrow (30 x 576)": dict(hidden=576, layers=30, heads=9, kv_heads=3, intermediate=1536, vocab=49152,
                                   tie_embeddings=True),
}
QUICK_SHAPES = {"tiny (2 x 64)": dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=512,
                                      tie_embeddings=True)}
QUICKSTART = Path(__file__).resolve().parent.parent / "runs" / "quickstart"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=None, help="a local Hugging Face model directory (default: two "
                   "random Llamas, ~100M and 30 x 576)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--group-size", type=int, default=32, help="int4 group size (32, 64, 128, 256)")
    p.add_argument("--int4-symmetric", action="store_true", help="int4 without zero points")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--ppl-tokens", type=int, default=8192, help="held-out tokens scored per variant")
    p.add_argument("--ppl-window", type=int, default=256)
    p.add_argument("--bandwidth-gib", type=float, default=1.0)
    p.add_argument("--no-hf", action="store_true", help="skip transformers")
    p.add_argument("--no-llama-cpp", action="store_true", help="skip llama.cpp even when installed")
    p.add_argument("--kernels", action="store_true", help="only the kernel sweep (no models)")
    p.add_argument("--kernel-reps", type=int, default=9)
    p.add_argument("--quick", action="store_true", help="a tiny model, few tokens: a smoke run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.new_tokens, args.reps, args.ppl_tokens, args.ppl_window = 8, 1, 256, 64
        args.bandwidth_gib, args.kernel_reps = 0.1, 2
    return args


# ---- the kernel sweep -----------------------------------------------------------------------------------------
def layer_shapes(shape: dict) -> list[tuple[int, int]]:
    """[out, in] of every matrix one decode step multiplies by: the layers' seven, then the LM head."""
    h, ffn = shape["hidden"], shape["intermediate"]
    kv = shape["kv_heads"] * (h // shape["heads"])
    per_layer = [(h, h), (kv, h), (kv, h), (h, h), (ffn, h), (ffn, h), (h, ffn)]
    return per_layer * shape["layers"] + [(shape["vocab"], h)]


def kernel_sweep(shapes: dict[str, dict], reps: int) -> dict:
    """ms per sweep of one decode step's matrix-vector products (batch 1) for each candidate kernel: min and
    median of ``reps`` interleaved repetitions. Weights are random; kernels do not look at the values."""
    from lmforge.models.quant import QuantConfig, QuantizedLinear

    out: dict = {}
    for name, shape in shapes.items():
        mats = layer_shapes(shape)
        gen = torch.Generator().manual_seed(0)
        linears = []
        for n, k in mats:
            lin = torch.nn.Linear(k, n, bias=False)
            with torch.no_grad():
                lin.weight.normal_(0, 0.02, generator=gen)
            linears.append(lin)
        xs = {k: torch.randn(1, k, generator=gen) for k in {k for _, k in mats}}
        variants: dict[str, list] = {"fp32": linears, "bf16": []}
        for lin in linears:
            b = torch.nn.Linear(lin.in_features, lin.out_features, bias=False, dtype=torch.bfloat16)
            with torch.no_grad():
                b.weight.copy_(lin.weight)
            variants["bf16"].append(b)
        int8 = QuantConfig.make("int8")
        variants["int8 (int8pack)"] = [QuantizedLinear.from_linear(lin, int8, "int8pack") for lin in linears]
        variants["int8 (2 x int4, chosen)"] = [QuantizedLinear.from_linear(lin, int8, "int4x2") for lin in linears]
        for g in (32, 64, 128):
            cfg = QuantConfig.make("int4", g, False)
            variants[f"int4 g{g}"] = [QuantizedLinear.from_linear(lin, cfg) for lin in linears]
        xbf = {k: v.bfloat16() for k, v in xs.items()}

        def sweep(mods: list, inputs: dict[int, torch.Tensor]) -> None:
            for m in mods:
                m(inputs[m.in_features])

        fns = {v: (lambda mods=mods, inputs=(xs if v == "fp32" else xbf): sweep(mods, inputs))
               for v, mods in variants.items()}
        with torch.inference_mode():
            for fn in fns.values():
                fn()
            times: dict[str, list[float]] = {v: [] for v in fns}
            for _ in range(reps):
                for v, fn in fns.items():
                    t0 = time.perf_counter()
                    fn()
                    times[v].append(time.perf_counter() - t0)
        params = sum(n * k for n, k in mats)
        out[name] = {"params": params, "ms_min": {v: min(t) * 1e3 for v, t in times.items()},
                     "ms_median": {v: sorted(t)[len(t) // 2] * 1e3 for v, t in times.items()}}
        print(f"kernel sweep, {name}: {len(mats)} matrices, {params / 1e6:.1f}M weights, batch 1 "
              f"(ms per sweep, min / median of {reps}; activations bf16 except fp32)")
        for v in fns:
            print(f"  {v:26s} {out[name]['ms_min'][v]:8.2f} {out[name]['ms_median'][v]:8.2f}")
    return out


# ---- held-out text and perplexity ----------------------------------------------------------------------------
def heldout_tokens(n: int, vocab: int) -> tuple[torch.Tensor, str]:
    """``n`` token ids of held-out text and where they came from (ids always < ``vocab``)."""
    corpus, tok_dir = QUICKSTART / "data" / "stdlib.jsonl", QUICKSTART / "tokenizer"
    if corpus.is_file() and (tok_dir / "tokenizer.json").is_file():
        from lmforge.data.tokenizer import load_tokenizer

        tok = load_tokenizer(tok_dir)
        if tok.vocab_size <= vocab:
            docs = [json.loads(line)["text"] for line in corpus.read_text().splitlines() if line.strip()]
            ids: list[int] = []
            for doc in reversed(docs):  # the last documents: the held-out end of the corpus
                ids.extend(tok.encode(doc))
                if len(ids) >= n:
                    break
            return torch.tensor(ids[:n]), f"quickstart corpus ({corpus}, last documents, quickstart BPE tokenizer)"
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    data = b""
    for file in sorted(stdlib.glob("*.py")):
        data += file.read_bytes()
        if len(data) >= n:
            break
    return torch.tensor(list(data[:n])), f"Python standard library source {stdlib} as UTF-8 bytes"


@torch.inference_mode()
def perplexity(model, tokens: torch.Tensor, window: int, is_hf: bool = False) -> float:
    """exp(mean next-token NLL) over non-overlapping windows of ``window`` tokens."""
    usable = tokens.numel() // window * window
    batch = tokens[:usable].view(-1, window)
    total, count = 0.0, 0
    for rows in batch.split(8):
        logits = model(rows).logits if is_hf else model(rows)
        nll = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), rows[:, 1:].reshape(-1),
                              reduction="sum")
        total, count = total + float(nll), count + rows[:, 1:].numel()
    return math.exp(total / count)


# ---- bytes per token -----------------------------------------------------------------------------------------
def streamed_bytes(model) -> int:
    """Bytes of weights one decode step reads: every parameter and buffer (packed codes and scales included)
    except the input embedding table, of which one row is read, unless the LM head is that same tensor."""
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


# ---- llama.cpp (optional peer) -----------------------------------------------------------------------------
def llama_cpp_rows(path: Path, float_model, prompt: torch.Tensor, n: int, reps: int, threads: int) -> dict:
    """Decode tokens/s of llama.cpp on GGUF exports (Q8_0, Q4_0) of the same weights; {} with a message when
    llama-cpp-python is not installed or cannot run the file."""
    try:
        import llama_cpp
    except ImportError:
        print("  llama.cpp: skipped (pip install llama-cpp-python to compare; benchmark-only peer)")
        return {}
    from lmforge.models.gguf import save_gguf

    rows: dict = {}
    for qtype in ("q8_0", "q4_0"):
        file = path.parent / f"{path.name}.{qtype}.gguf"
        try:
            tokenizer = None
            if (path / "tokenizer.json").is_file():
                from lmforge.models.gguf import _directory_tokenizer

                tokenizer = _directory_tokenizer(path)
            save_gguf(float_model, file, qtype, tokenizer=tokenizer)
            llm = llama_cpp.Llama(model_path=str(file), n_ctx=prompt.shape[1] + n + 8, n_threads=threads,
                                  verbose=False)
            ids = prompt[0].tolist()

            def run(k: int, llm=llm, ids=ids) -> None:
                llm.reset()
                llm.eval(ids)
                for _ in range(k):
                    token = int(llm.sample(temp=0.0))
                    llm.eval([token])

            t = interleaved_medians({k: (lambda k=k: run(k)) for k in (n, 1)}, reps, 1)
            rows[f"llama.cpp {qtype.upper()}"] = {"decode_tok_s": (n - 1) / (t[n] - t[1]),
                                                  "bytes_per_token": file.stat().st_size}
        except Exception as e:  # noqa: BLE001 - an optional peer: report and go on
            print(f"  llama.cpp {qtype}: failed ({type(e).__name__}: {e})")
    return rows


# ---- one model -------------------------------------------------------------------------------------------------
def bench_model(name: str, path: Path, args: argparse.Namespace, bandwidth: float) -> dict:
    from lmforge.models.checkpoint import load_model
    from lmforge.models.generate import generate
    from lmforge.models.quant import QuantConfig

    int4 = QuantConfig.make("int4", args.group_size, True if args.int4_symmetric else None)
    hf, fp32 = load_both(path, torch.float32)
    models = {"lmforge float32": fp32, "lmforge bfloat16": load_model(path, dtype=torch.bfloat16),
              "lmforge int8": load_model(path, quantize="int8"), f"lmforge int4 g{args.group_size}": load_model(
                  path, quantize=int4)}
    cfg = fp32.config
    g = torch.Generator().manual_seed(args.seed + 1)
    prompt = torch.randint(3, cfg.vocab_size, (1, args.prompt_len), generator=g)
    n = args.new_tokens
    runs = {k: (lambda c, m=m: generate(m, prompt, max_new_tokens=c, eos_ids=())) for k, m in models.items()}
    if not args.no_hf:
        runs["transformers float32"] = lambda c: hf_generate(hf, prompt, c, static=False)
    tokens = {k: run(n) for k, run in runs.items()}  # also the warm-up
    calls = {(k, c): (lambda run=run, c=c: run(c)) for k, run in runs.items() for c in (n, 1)}
    t = interleaved_medians(calls, args.reps, 0)
    rows: dict = {}
    for k in runs:
        model = models.get(k, fp32)  # transformers streams the float32 weights
        rows[k] = {"decode_tok_s": (n - 1) / (t[k, n] - t[k, 1]), "bytes_per_token": streamed_bytes(model),
                   "greedy_tokens_equal_float32": bool(torch.equal(tokens[k].cpu(), tokens["lmforge float32"].cpu()))}
    if not args.no_llama_cpp:
        rows.update(llama_cpp_rows(path, fp32, prompt, n, args.reps, args.threads))
    ids, source = heldout_tokens(args.ppl_tokens, cfg.vocab_size)
    for k, row in rows.items():
        if k.startswith("lmforge"):
            row["perplexity"] = perplexity(models[k], ids, args.ppl_window)
        elif k.startswith("transformers"):
            row["perplexity"] = perplexity(hf, ids, args.ppl_window, is_hf=True)
    base = rows["lmforge float32"]
    for row in rows.values():
        row["ratio_vs_lmforge_float32"] = row["decode_tok_s"] / base["decode_tok_s"]
        row["roofline_tok_s"] = bandwidth / row["bytes_per_token"]
        row["roofline_fraction"] = row["decode_tok_s"] / row["roofline_tok_s"]
        if "perplexity" in row:
            row["perplexity_change"] = row["perplexity"] / base["perplexity"] - 1
    params = sum(p.numel() for p in fp32.parameters())
    print(f"\n{name}: {params / 1e6:.1f}M params, hidden {cfg.hidden_size}, {cfg.num_layers} layers, vocab "
          f"{cfg.vocab_size}{', tied' if cfg.tie_embeddings else ''}; {args.threads} threads; perplexity on "
          f"{ids.numel()} tokens of {source}")
    print(f"{'variant':26}{'tok/s':>8}{'vs fp32':>9}{'MB/token':>10}{'roofline':>10}{'of roof':>9}{'ppl':>10}"
          f"{'ppl chg':>9}  greedy = fp32")
    for k, r in rows.items():
        ppl = f"{r['perplexity']:10.3f}{r['perplexity_change']:+8.2%}" if "perplexity" in r else f"{'-':>10}{'-':>9}"
        same = "yes" if r.get("greedy_tokens_equal_float32", True) else "no"
        print(f"{k:26}{r['decode_tok_s']:8.1f}{r['ratio_vs_lmforge_float32']:8.2f}x{r['bytes_per_token'] / 1e6:10.1f}"
              f"{r['roofline_tok_s']:10.1f}{r['roofline_fraction']:9.0%}{ppl}  {same if k in tokens else '-'}")
    return {"params": params, "perplexity_text": source, "rows": rows}


def trained_model_perplexity(args: argparse.Namespace) -> dict | None:
    """Perplexity of the quickstart's trained model in each format (None when that run is absent)."""
    ckpts = sorted((QUICKSTART / "pretrain" / "checkpoints").glob("step-*/model"))
    if not ckpts:
        print("\n(no runs/quickstart/pretrain checkpoint: trained-model perplexity skipped; "
              "`lmforge quickstart` makes one)")
        return None
    from lmforge.models.checkpoint import load_model
    from lmforge.models.quant import QuantConfig

    path = ckpts[-1]
    variants = {"float32": {}, "bfloat16": {"dtype": torch.bfloat16}, "int8": {"quantize": "int8"}}
    for gsize in (32, 64, 128):
        for sym in (False, True):
            variants[f"int4 g{gsize}{' symmetric' if sym else ''}"] = {"quantize": QuantConfig.make("int4", gsize, sym)}
    probe = load_model(path)
    ids, source = heldout_tokens(args.ppl_tokens, probe.config.vocab_size)
    window = min(args.ppl_window, probe.config.max_position_embeddings)
    out = {k: perplexity(load_model(path, **kw), ids, window) for k, kw in variants.items()}
    print(f"\ntrained model {path} ({sum(p.numel() for p in probe.parameters()) / 1e6:.1f}M params): perplexity on "
          f"{ids.numel()} tokens of {source}")
    for k, v in out.items():
        print(f"  {k:24} {v:9.3f}  {v / out['float32'] - 1:+.2%}")
    return {"model": str(path), "perplexity": out}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    shapes = QUICK_SHAPES if args.quick else SHAPES
    results: dict = {"threads": args.threads, "torch": torch.__version__, "group_size": args.group_size}
    if args.kernels:
        results["kernels"] = kernel_sweep(shapes, args.kernel_reps)
    else:
        bandwidth = measure_bandwidth(args.bandwidth_gib)
        results["bandwidth_GBps"] = bandwidth / 1e9
        print(f"memory read bandwidth {bandwidth / 1e9:.1f} GB/s; load average at start {os.getloadavg()[0]:.2f} "
              f"on {os.cpu_count()} cpus", flush=True)
        results["models"] = {}
        if args.model is not None:
            results["models"][str(args.model)] = bench_model(str(args.model), args.model, args, bandwidth)
        else:
            for name, shape in shapes.items():
                with tempfile.TemporaryDirectory() as tmp:
                    ns = argparse.Namespace(**shape, seed=args.seed)
                    build_checkpoint(ns, Path(tmp) / "model")
                    results["models"][name] = bench_model(name, Path(tmp) / "model", args, bandwidth)
        if not args.quick:
            results["trained"] = trained_model_perplexity(args)
    results["loadavg_1min_end"] = os.getloadavg()[0]
    print(f"\n(machine load average at the end: {results['loadavg_1min_end']:.2f} on {os.cpu_count()} cpus)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
        print(f"wrote {args.json}")
    return results


if __name__ == "__main__":
    main()
