"""Weight-only quantization on CPU: batch-1 greedy decode tokens/s and held-out perplexity, same weights.

For each model, lmforge float32, bfloat16, int8 (per output channel) and int4 (grouped, zero points) decode
the same prompt, next to transformers float32 and, when ``llama-cpp-python`` is installed, llama.cpp on GGUF
exports of the same weights (Q8_0 and Q4_0; a benchmark-only peer, skipped with a message otherwise). lmforge
also runs those very GGUF files with ``quantize="keep"`` (their blocks on its kernels), so the llama.cpp rows
have an lmforge row of the same bytes beside them. Each is
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
    build_checkpoint, decode_weight_bytes, hf_generate, interleaved_medians, load_both, measure_bandwidth)

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
    p.add_argument("--compile", action="store_true",
                   help="also float32 and int4 with generate(compile=True) (each compiles for a minute or two first)")
    p.add_argument("--no-gguf", action="store_true", help="skip the GGUF exports (llama.cpp and lmforge keep rows)")
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


# ---- GGUF exports: llama.cpp (optional peer) and lmforge's quantize="keep" on the same files --------------------
GGUF_TYPES = ("q8_0", "q4_0")


def export_gguf_files(path: Path, float_model, out_dir: Path) -> dict[str, Path]:
    """The model exported with ``lmforge export-gguf``'s writer as Q8_0 and Q4_0 (every matrix, LM head included).
    A random-weight checkpoint has no tokenizer and llama.cpp loads no file without one: it gets a small byte-level
    BPE (the exporter pads the token list to the model's vocabulary); decode speed does not depend on it."""
    from lmforge.data.tokenizer import train_bpe_tokenizer
    from lmforge.errors import LmforgeError
    from lmforge.models.gguf import _directory_tokenizer, save_gguf

    if (path / "tokenizer.json").is_file():
        tokenizer = _directory_tokenizer(path)
    elif float_model.config.vocab_size < 300:
        print(f"  GGUF rows skipped: no tokenizer.json, and a vocabulary of {float_model.config.vocab_size} is too "
              "small for a stand-in byte-level BPE")
        return {}
    else:
        text = Path(json.__file__).read_text(encoding="utf-8")  # any text: a stdlib module
        tokenizer = train_bpe_tokenizer([text], min(512, float_model.config.vocab_size), min_frequency=1)
    files = {}
    for q in GGUF_TYPES:
        try:
            files[q] = save_gguf(float_model, out_dir / f"{path.name}.{q}.gguf", q, tokenizer=tokenizer)
        except LmforgeError as e:  # e.g. a model GGUF cannot describe: those rows are skipped, the rest runs
            print(f"  GGUF {q} rows skipped: {e}")
    return files


def llama_cpp_runs(files: dict[str, Path], prompt: torch.Tensor, n: int, threads: int) -> dict:
    """{row name: run(k) -> the k greedy tokens} for llama.cpp on each file; {} with a message when
    llama-cpp-python is not installed or cannot load a file."""
    try:
        import llama_cpp
    except ImportError:
        print("  llama.cpp: skipped (pip install llama-cpp-python to compare; benchmark-only peer)")
        return {}
    runs: dict = {}
    ids = prompt[0].tolist()
    for qtype, file in files.items():
        try:
            llm = llama_cpp.Llama(model_path=str(file), n_ctx=prompt.shape[1] + n + 8, n_threads=threads,
                                  n_threads_batch=threads, verbose=False)
        except Exception as e:  # noqa: BLE001 - an optional peer: report and go on
            print(f"  llama.cpp {qtype}: failed to load ({type(e).__name__}: {e})")
            continue

        def run(k: int, llm=llm) -> torch.Tensor:
            llm.reset()
            llm.eval(ids)
            out = []
            for _ in range(k):
                token = int(llm.sample(temp=0.0))
                out.append(token)
                llm.eval([token])
            return torch.tensor([out])  # the new tokens, as lmforge's and transformers' runs return them

        runs[f"llama.cpp {qtype.upper()}"] = run
    return runs


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
    gguf_dir = tempfile.TemporaryDirectory()
    files = {} if args.no_gguf else export_gguf_files(path, fp32, Path(gguf_dir.name))
    for qtype, file in files.items():  # the very bytes llama.cpp runs, on lmforge's kernels
        models[f"lmforge {qtype.upper()} keep"] = load_model(file, quantize="keep")
    cfg = fp32.config
    g = torch.Generator().manual_seed(args.seed + 1)
    prompt = torch.randint(3, cfg.vocab_size, (1, args.prompt_len), generator=g)
    n = args.new_tokens
    runs = {k: (lambda c, m=m: generate(m, prompt, max_new_tokens=c, eos_ids=())) for k, m in models.items()}
    if args.compile:  # the per-token work outside the matmuls, fused by Inductor (first call compiles)
        for k in ("lmforge float32", f"lmforge int4 g{args.group_size}"):
            models[f"{k} compiled"] = models[k]
            runs[f"{k} compiled"] = lambda c, m=models[k]: generate(m, prompt, max_new_tokens=c, eos_ids=(),
                                                                    compile=True)
    if not args.no_hf:
        runs["transformers float32"] = lambda c: hf_generate(hf, prompt, c, static=False)
    if not args.no_llama_cpp:
        runs.update(llama_cpp_runs(files, prompt, n, args.threads))
    tokens = {k: run(n) for k, run in runs.items()}  # also the warm-up
    calls = {(k, c): (lambda run=run, c=c: run(c)) for k, run in runs.items() for c in (n, 1)}
    t = interleaved_medians(calls, args.reps, 0)
    rows: dict = {}
    for k in runs:
        if k.startswith("llama.cpp"):
            size = files[k.split()[-1].lower()].stat().st_size
            emb = fp32.model.embed_tokens.weight
            # the file less the input embedding table it reads one row of (unless that table is also the head)
            streamed = size if cfg.tie_embeddings else size - emb.numel() * size / sum(
                p.numel() for p in fp32.parameters())
            rows[k] = {"bytes_per_token": int(streamed)}
        else:
            rows[k] = {"bytes_per_token": decode_weight_bytes(models.get(k, fp32))}  # transformers streams float32
        rows[k]["decode_tok_s"] = (n - 1) / (t[k, n] - t[k, 1])
        rows[k]["greedy_tokens_equal_float32"] = bool(torch.equal(tokens[k].cpu(), tokens["lmforge float32"].cpu()))
    ids, source = heldout_tokens(args.ppl_tokens, cfg.vocab_size)
    for k, row in rows.items():
        if k.endswith(" compiled"):  # the same weights as its eager row
            row["perplexity"] = rows[k.removesuffix(" compiled")]["perplexity"]
        elif k.startswith("lmforge"):
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
    gguf_dir.cleanup()
    params = sum(p.numel() for p in fp32.parameters())
    print(f"\n{name}: {params / 1e6:.1f}M params, hidden {cfg.hidden_size}, {cfg.num_layers} layers, vocab "
          f"{cfg.vocab_size}{', tied' if cfg.tie_embeddings else ''}; {args.threads} threads; perplexity on "
          f"{ids.numel()} tokens of {source}")
    print(f"{'variant':26}{'tok/s':>8}{'vs fp32':>9}{'MB/token':>10}{'roofline':>10}{'of roof':>9}{'ppl':>10}"
          f"{'ppl chg':>9}  greedy = fp32")
    for k, r in rows.items():
        ppl = f"{r['perplexity']:10.3f}{r['perplexity_change']:+8.2%}" if "perplexity" in r else f"{'-':>10}{'-':>9}"
        same = "yes" if r["greedy_tokens_equal_float32"] else "no"
        print(f"{k:26}{r['decode_tok_s']:8.1f}{r['ratio_vs_lmforge_float32']:8.2f}x{r['bytes_per_token'] / 1e6:10.1f}"
              f"{r['roofline_tok_s']:10.1f}{r['roofline_fraction']:9.0%}{ppl}  {same}")
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
