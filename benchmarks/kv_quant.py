"""Quantized KV cache in the engine (KIVI 2/4-bit, int8) vs the float cache, measured in one run.

    python benchmarks/kv_quant.py            # random ~30M Llama + the quickstart SFT model if runs/quickstart exists
    python benchmarks/kv_quant.py --quick    # small model, fewer requests, 50 quickstart problems

Prints:
  1. KV bytes per token for each kv_cache_dtype (all layers; the float staging slots are a fixed extra of
     max_num_seqs blocks, shown separately) and the ratio to the float cache;
  2. at one fixed KV budget (``kv_cache_bytes``): KV blocks, how many sequences of the workload's full length
     fit at once, the most that ran at once, and the throughput (output tok/s) of the same mixed-length
     requests as ``benchmarks/serving.py`` part 1; plus the unconstrained throughput of each dtype (the
     dequantization overhead, no memory pressure);
  3. greedy agreement with the float cache on those random-weight requests (identical outputs, tokens before
     the first divergence);
  4. with runs/quickstart: exact match of the SFT model's greedy answers on the held-out skills problems
     (data/skills_test.jsonl), float vs each quantized cache, at block sizes 16 (the default) and 4 (key groups
     of 4 tokens, so most of these ~25-token prompts are quantized), plus a 3-shot variant whose earlier
     turns put ~60 more tokens of quantized context in front of each question; kivi2 also with KIVI's
     full-precision window of the newest 16 / 32 tokens. Each row says what share of the tokens was really held
     quantized and the tokens per KV byte that bought vs the float cache at those lengths (a window keeps short
     prompts float: its accuracy is bought with bytes, and the row shows how many).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.serving import make_requests

DTYPES = ["auto", "int8", "kivi4", "kivi2"]
QUICKSTART_MODEL = Path("runs/quickstart/sft/checkpoints/step-00001500/model")


def run(model, requests, **kw) -> dict:
    """All requests at t=0, greedy, exactly max_tokens each; throughput and the peak of running sequences."""
    from lmforge.engine import Engine, SamplingParams

    engine = Engine(model, **kw)
    ids = [engine.add_request(p, SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True)) for p, m in requests]
    outputs, peak, produced = {}, 0, 0
    start = time.perf_counter()
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                outputs[out.request_id] = out.outputs[0].token_ids
                produced += len(out.outputs[0].token_ids)
        peak = max(peak, len(engine.scheduler.running))
    seconds = time.perf_counter() - start
    return {"tok_s": produced / seconds, "seconds": seconds, "peak_running": peak,
            "preemptions": engine.scheduler.num_preemptions, "num_blocks": engine.block_manager.num_blocks,
            "kv_bytes": engine.runner.kv_cache_bytes(), "bytes_per_token": engine.kv_bytes_per_token(),
            "outputs": [outputs[i] for i in ids]}


def agreement(a: list[list[int]], b: list[list[int]]) -> tuple[float, float]:
    same = sum(x == y for x, y in zip(a, b)) / len(a)
    prefix = sum(next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), len(x)) for x, y in zip(a, b))
    return same, prefix / sum(len(x) for x in a)


def quickstart_accuracy(limit: int, block_sizes: list[int], residuals: tuple[int, ...] = (16, 32)) -> dict:
    """Exact match per cache dtype (and kivi2 with KIVI's full-precision window of the newest ``residuals``
    tokens), each with the share of the sequences' tokens actually held quantized and the tokens per KV byte
    that bought, relative to the float cache, at these sequences' real lengths."""
    from lmforge.data.synthetic import exact_match_accuracy
    from lmforge.data.tokenizer import load_tokenizer
    from lmforge.engine import Engine, SamplingParams
    from lmforge.io import iter_jsonl
    from lmforge.models.checkpoint import load_model

    model, tok = load_model(QUICKSTART_MODEL), load_tokenizer(QUICKSTART_MODEL)
    run_dir = QUICKSTART_MODEL.parents[3]
    test = [rec for _, rec in iter_jsonl(run_dir / "data" / "skills_test.jsonl")][:limit]
    shots = [rec["messages"] for _, rec in itertools.islice(iter_jsonl(run_dir / "data" / "skills_train.jsonl"), 3)]
    variants = {"0-shot": [r["messages"][:1] for r in test],
                "3-shot": [[m for s in shots for m in s] + r["messages"][:1] for r in test]}
    answers = [r["answer"] for r in test]
    results: dict = {}
    for variant, chats in variants.items():
        prompts = [tok.apply_chat_template(c, add_generation_prompt=True) for c in chats]
        mean_len = sum(map(len, prompts)) / len(prompts)
        for bs in block_sizes:
            if variant == "3-shot" and bs != block_sizes[0]:
                continue  # the long-context variant once, at the default block size
            row: dict = {"mean_prompt_tokens": mean_len}
            ref, float_bpt = None, None
            windows = [(dt, 0) for dt in DTYPES] + [("kivi2", r) for r in residuals if r % bs == 0]
            for dt, residual in windows:
                engine = Engine(model, tokenizer=tok, block_size=bs, num_blocks=4096, max_num_seqs=64,
                                kv_cache_dtype=dt, kv_residual_length=residual)
                outs = engine.generate(prompts, SamplingParams(temperature=0.0, max_tokens=16))
                texts = [o.outputs[0].text for o in outs]
                ids = [o.outputs[0].token_ids for o in outs]
                name = dt if not residual else f"{dt} residual {residual}"
                cell = row[name] = {"exact_match": exact_match_accuracy(texts, answers)}
                bpt = engine.kv_bytes_per_token()
                float_bpt = float_bpt or bpt
                # what these sequences' KV really took at their final length (the last sampled token's KV is never
                # written): every block holds its pool block, quantized or not, and the float-staged tokens (whole
                # blocks within the newest `residual` and the partly filled one) a float slot on top
                lengths = [len(p) + len(i) - 1 for p, i in zip(prompts, ids)]
                quantized = [max(0, n // bs * bs - residual) if dt != "auto" else 0 for n in lengths]
                spent = sum(-(-n // bs) * bs * bpt + (n - q) * float_bpt if dt != "auto" else n * bpt
                            for q, n in zip(quantized, lengths))
                cell["quantized_token_fraction"] = sum(quantized) / sum(lengths)
                cell["tokens_per_kv_byte_vs_float"] = sum(lengths) * float_bpt / spent
                if ref is None:
                    ref = ids
                else:
                    cell["identical"], cell["prefix_agreement"] = agreement(ids, ref)
            results[f"{variant}, block_size {bs}"] = row
    return results


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--requests", type=int, default=48)
    p.add_argument("--budget-seqs", type=int, default=6,
                   help="the fixed KV budget, in float-cache sequences of the workload's full length")
    p.add_argument("--problems", type=int, default=None, help="quickstart skills problems to score (default 200)")
    p.add_argument("--hidden", type=int, default=None, help="random model width (default 512)")
    p.add_argument("--layers", type=int, default=None, help="random model depth (default 8)")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    import transformers

    from lmforge import load_model
    from lmforge.engine.model_runner import ModelRunner

    hidden, layers, vocab = (128, 2, 2048) if args.quick else (512, 8, 8192)
    hidden, layers = args.hidden or hidden, args.layers or layers
    if args.quick:
        args.requests = 16
    if args.problems is None:
        args.problems = 50 if args.quick else 200
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 8 // 3 // 64 * 64,
                                   num_hidden_layers=layers, num_attention_heads=hidden // 64,
                                   num_key_value_heads=max(1, hidden // 256), max_position_embeddings=2048,
                                   tie_word_embeddings=False)
    torch.manual_seed(0)
    tmp = Path(tempfile.mkdtemp(prefix="lmforge-kvq-bench-"))
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp / "m")
    model = load_model(tmp / "m")
    n_params = sum(x.numel() for x in model.parameters())
    results: dict = {"params": n_params, "threads": torch.get_num_threads()}
    print(f"model: random Llama, {n_params / 1e6:.1f}M params, {layers} layers x {cfg.num_key_value_heads} KV heads "
          f"x head_dim 64, float32, {torch.get_num_threads()} threads")

    # 1 + 2. bytes per token; a fixed budget
    bs, max_prompt, max_out = 16, (64 if args.quick else 256), (16 if args.quick else 64)
    reqs = make_requests(args.requests, vocab, 0, 16, max_prompt, 8, max_out)
    seq_blocks = -(-(max_prompt + max_out) // bs)
    budget = args.budget_seqs * seq_blocks * ModelRunner.bytes_per_block(model, bs)
    max_seqs = args.requests
    run(model, reqs[:2])  # warm-up
    print(f"\n1-2. fixed KV budget {budget / 2**20:.1f} MiB (= {args.budget_seqs} float sequences of {max_prompt}+"
          f"{max_out} tokens); {args.requests} requests (prompts 16-{max_prompt}, outputs 8-{max_out}), all at t=0, "
          f"block_size {bs}, max_num_seqs {max_seqs}")
    print(f"{'kv_cache_dtype':>14}{'B/token':>9}{'x float':>8}{'blocks':>8}{'fit':>6}{'peak run':>9}{'preempt':>8}"
          f"{'tok/s':>8}{'tok/s free':>11}{'identical':>10}{'prefix':>8}")
    rows, float_outputs, float_bpt = {}, None, None
    for dt in DTYPES:
        kw = dict(block_size=bs, max_num_seqs=max_seqs, max_num_batched_tokens=512, kv_cache_dtype=dt)
        tight = run(model, reqs, kv_cache_bytes=budget, **kw)
        free = run(model, reqs, num_blocks=max_seqs * seq_blocks + 8, **kw)  # no memory pressure
        if dt == "auto":
            float_outputs, float_bpt = free["outputs"], tight["bytes_per_token"]
        same, prefix = agreement(free["outputs"], float_outputs)
        fit = tight["num_blocks"] // seq_blocks
        row = {"bytes_per_token": tight["bytes_per_token"], "ratio": float_bpt / tight["bytes_per_token"],
               "num_blocks": tight["num_blocks"], "seqs_fit": fit, "peak_running": tight["peak_running"],
               "preemptions": tight["preemptions"], "tok_s_budget": tight["tok_s"], "tok_s_unconstrained": free["tok_s"],
               "kv_bytes_allocated": tight["kv_bytes"], "identical": same, "prefix_agreement": prefix}
        rows[dt] = row
        print(f"{dt:>14}{row['bytes_per_token']:9.0f}{row['ratio']:8.2f}{row['num_blocks']:8d}{fit:6d}"
              f"{row['peak_running']:9d}{row['preemptions']:8d}{row['tok_s_budget']:8.1f}{row['tok_s_unconstrained']:11.1f}"
              f"{same:10.0%}{prefix:8.0%}")
    staging = max_seqs * ModelRunner.bytes_per_block(model, bs)
    print(f"(quantized pools also hold {max_seqs} float staging blocks = {staging / 2**20:.2f} MiB, inside the budget; "
          "'fit' = blocks // blocks per full-length sequence; identical/prefix: greedy outputs vs the float cache, "
          "random weights)")
    results["budget"] = {"bytes": budget, "rows": rows}

    # 4. quickstart task accuracy
    if QUICKSTART_MODEL.is_dir():
        print(f"\n4. quickstart SFT model, {args.problems} held-out skills problems, greedy, exact match (last number)")
        acc = quickstart_accuracy(args.problems, [16, 4])
        for setting, row in acc.items():
            print(f"  {setting} (prompts ~{row['mean_prompt_tokens']:.0f} tokens):")
            for name, cell in row.items():
                if isinstance(cell, dict):
                    same = f"identical {cell['identical']:4.0%}" if "identical" in cell else " " * 14
                    print(f"    {name:22} exact match {cell['exact_match']:6.1%}  {same}  quantized "
                          f"{cell['quantized_token_fraction']:4.0%} of tokens, {cell['tokens_per_kv_byte_vs_float']:.2f}x "
                          "tokens per KV byte vs float")
        results["quickstart"] = acc
    else:
        print("\n4. runs/quickstart not found: no task accuracy (run `lmforge quickstart` first)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
