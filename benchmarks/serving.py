"""Serving on CPU: lmforge's engine vs transformers `generate` with static padded batches, same weights.

    python benchmarks/serving.py            # ~100M Llama, 32 mixed-length requests (a few minutes)
    python benchmarks/serving.py --quick    # small model, smoke run
    python benchmarks/serving.py --model PATH   # your own Hugging Face model directory (float32)

``--model PATH`` loads that local directory with ``lmforge.load_model`` and transformers'
``AutoModelForCausalLM.from_pretrained`` instead of building a random Llama (--hidden/--layers/--vocab do not
apply); prompts are still random token ids and EOS is ignored. The draft for part 3 stays a random Llama with
the checkpoint's vocabulary, a quarter of its width and a sixth of its depth.

Prints, measured in this one run:
  1. throughput (output tokens/s) and time-to-first-token p50/p99 for 32 requests that all arrive at t=0:
     the engine (continuous batching, chunked prefill) vs transformers `generate` over static batches of
     --hf-batch requests in arrival order (a batch runs until its longest request is done); the engine twice,
     on the dense weights and on oneDNN-packed ones (``lmforge.models.packed``, what `lmforge serve` and
     ``Engine(path)`` run on a CPU), each one's ratio to the baseline; parts 2 and 3 run packed;
  2. the prefix cache's gain when every request shares a 512-token system prompt;
  3. speculative decoding in the engine with a smaller draft model, at concurrency 1 and 4 (greedy, output
     checked identical to plain decoding); random weights never agree, so this is the overhead bound, and
     the speed-up at a given acceptance rate is projected from the round cost measured here.
Random weights never emit EOS on purpose, so every request generates exactly its max_tokens on both sides.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    k = min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))
    return values[k]


def make_requests(n: int, vocab: int, seed: int, min_prompt: int, max_prompt: int, min_out: int, max_out: int):
    rng = random.Random(seed)
    return [([rng.randrange(3, vocab) for _ in range(rng.randint(min_prompt, max_prompt))], rng.randint(min_out, max_out))
            for _ in range(n)]


def run_engine(model, requests, keep_outputs: bool = False, **engine_kwargs) -> dict:
    from lmforge.engine.engine import Engine
    from lmforge.engine.sequence import SamplingParams

    engine = Engine(model, **engine_kwargs)
    outputs = {}
    start = time.perf_counter()
    ids = {}
    for prompt, max_tokens in requests:
        rid = engine.add_request(prompt, SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True))
        ids[rid] = max_tokens
    first: dict[str, float] = {}
    produced = 0
    while engine.has_unfinished():
        for out in engine.step():
            now = time.perf_counter() - start
            if out.outputs[0].token_ids and out.request_id not in first:
                first[out.request_id] = now
            if out.finished:
                produced += len(out.outputs[0].token_ids)
                outputs[out.request_id] = out.outputs[0].token_ids
    total = time.perf_counter() - start
    result = {"seconds": total, "tokens": produced, "tok_s": produced / total, "ttft": list(first.values()),
              "computed_tokens": engine.stats["computed_tokens"], "draft_proposed": engine.stats["draft_proposed"],
              "draft_accepted": engine.stats["draft_accepted"]}
    if keep_outputs:
        result["outputs"] = [outputs[k] for k in sorted(outputs, key=int)]
    return result


def run_hf(hf, requests, batch_size: int) -> dict:
    from transformers.generation.streamers import BaseStreamer

    class FirstToken(BaseStreamer):
        def __init__(self) -> None:
            self.calls, self.t = 0, None

        def put(self, value) -> None:
            self.calls += 1
            if self.calls == 2 and self.t is None:  # call 1 is the prompt, call 2 the first new token
                self.t = time.perf_counter()

        def end(self) -> None:
            pass

    start = time.perf_counter()
    ttft, produced = [], 0
    for b in range(0, len(requests), batch_size):
        chunk = requests[b:b + batch_size]
        width = max(len(p) for p, _ in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, (p, _) in enumerate(chunk):
            ids[row, width - len(p):] = torch.tensor(p)
            mask[row, width - len(p):] = 1
        longest = max(m for _, m in chunk)
        streamer = FirstToken()
        with torch.inference_mode():
            hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=longest, min_new_tokens=longest,
                        do_sample=False, streamer=streamer, pad_token_id=0)
        ttft += [streamer.t - start] * len(chunk)
        produced += sum(m for _, m in chunk)  # useful tokens; the batch computed len(chunk) * longest
    total = time.perf_counter() - start
    return {"seconds": total, "tokens": produced, "tok_s": produced / total, "ttft": ttft}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=None,
                   help="a local Hugging Face model directory to serve instead of a random Llama")
    p.add_argument("--hidden", type=int, default=None, help="random model width (default 768)")
    p.add_argument("--layers", type=int, default=None, help="random model depth (default 12)")
    p.add_argument("--vocab", type=int, default=None, help="random model vocabulary (default 32000)")
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--hf-batch", type=int, default=8)
    p.add_argument("--max-out", type=int, default=64)
    p.add_argument("--prefix", type=int, default=512, help="shared system-prompt tokens for the prefix-cache test")
    p.add_argument("--spec-k", type=int, default=4, help="draft tokens per speculative round")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    shape_flags = [f"--{k}" for k in ("hidden", "layers", "vocab") if getattr(args, k) is not None]
    if args.model is not None and shape_flags:
        p.error(f"--model takes the shape from the checkpoint; drop {', '.join(shape_flags)}")
    for k, full, quick in (("hidden", 768, 128), ("layers", 12, 2), ("vocab", 32000, 2048)):
        if getattr(args, k) is None:
            setattr(args, k, quick if args.quick else full)
    if args.quick:
        args.requests, args.max_out, args.prefix = 12, 16, 128

    import transformers

    from lmforge import load_model
    from lmforge.models.packed import pack_linears

    def llama(hidden: int, layers: int, seed: int):
        cfg = transformers.LlamaConfig(vocab_size=args.vocab, hidden_size=hidden, intermediate_size=hidden * 8 // 3 // 64 * 64,
                                       num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                                       num_key_value_heads=max(1, hidden // 256), max_position_embeddings=2048,
                                       tie_word_embeddings=False)
        torch.manual_seed(seed)
        m = transformers.LlamaForCausalLM(cfg).eval()
        m.generation_config.eos_token_id = None
        return m

    tmp = Path(tempfile.mkdtemp(prefix="lmforge-serve-bench-"))
    if args.model is not None:
        ours = load_model(args.model)
        hf = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
        # greedy, exactly max_tokens per request: none of the checkpoint's sampling / EOS defaults
        hf.generation_config = transformers.GenerationConfig(pad_token_id=0)
        args.hidden, args.layers, args.vocab = ours.config.hidden_size, ours.config.num_layers, ours.config.vocab_size
        what = f"{args.model} ({ours.config.model_type})"
    else:
        hf = llama(args.hidden, args.layers, 0)
        hf.save_pretrained(tmp / "target")
        ours = load_model(tmp / "target")
        what = "Llama-architecture (random)"
    n_params = sum(x.numel() for x in hf.parameters())
    results: dict = {"params": n_params, "threads": torch.get_num_threads(),
                     "model": str(args.model) if args.model is not None else None}
    print(f"target: {what}, {n_params / 1e6:.1f}M params, float32, {torch.get_num_threads()} threads")

    # 1. mixed-length requests, all at t=0
    max_prompt = 256 if not args.quick else 64
    reqs = make_requests(args.requests, args.vocab, 0, 16, max_prompt, 8, args.max_out)
    dense = ours
    ours = load_model(args.model if args.model is not None else tmp / "target")
    pack_linears(ours)  # what `lmforge serve` runs on a CPU; parts 2 and 3 use it too
    for model in (dense, ours):
        run_engine(model, reqs[:2], max_num_batched_tokens=512)  # warm-up (allocator, first-call paths), not timed
    run_hf(hf, reqs[:2], 2)
    eng_dense = run_engine(dense, reqs, max_num_batched_tokens=512, max_num_seqs=args.requests)
    ref = run_hf(hf, reqs, args.hf_batch)
    eng = run_engine(ours, reqs, max_num_batched_tokens=512, max_num_seqs=args.requests)
    results["mixed"] = {"lmforge": {k: v for k, v in eng.items() if k != "ttft"},
                        "lmforge_dense_weights": {k: v for k, v in eng_dense.items() if k != "ttft"},
                        "transformers": {k: v for k, v in ref.items() if k != "ttft"}}
    print(f"\n1. {args.requests} mixed-length requests (prompts 16-{max_prompt}, outputs 8-{args.max_out} tokens), all at t=0")
    print(f"{'':34}{'out tok/s':>10}{'TTFT p50':>10}{'TTFT p99':>10}{'total s':>9}{'vs static':>10}")
    for name, r in (("lmforge engine, packed weights", eng), ("lmforge engine, dense weights", eng_dense),
                    (f"transformers, batches of {args.hf_batch}", ref)):
        print(f"{name:34}{r['tok_s']:10.1f}{pct(r['ttft'], 50):10.2f}{pct(r['ttft'], 99):10.2f}{r['seconds']:9.1f}"
              f"{r['tok_s'] / ref['tok_s']:9.2f}x")
    speed = eng["tok_s"] / ref["tok_s"]
    results["mixed"]["throughput_ratio"] = speed
    results["mixed"]["throughput_ratio_dense_weights"] = eng_dense["tok_s"] / ref["tok_s"]
    results["mixed"]["ttft_p50_ratio"] = pct(ref["ttft"], 50) / pct(eng["ttft"], 50)
    results["mixed"]["ttft_p99_ratio"] = pct(ref["ttft"], 99) / pct(eng["ttft"], 99)
    same = (run_engine(ours, reqs[:4], keep_outputs=True)["outputs"]
            == run_engine(dense, reqs[:4], keep_outputs=True)["outputs"])
    results["mixed"]["packed_outputs_identical"] = same
    print(f"throughput ratio lmforge (packed)/transformers: {speed:.2f}x (dense weights "
          f"{results['mixed']['throughput_ratio_dense_weights']:.2f}x); TTFT p50 "
          f"{results['mixed']['ttft_p50_ratio']:.2f}x lower, p99 {results['mixed']['ttft_p99_ratio']:.2f}x lower; packed vs dense greedy outputs identical "
          f"on 4 requests: {same}")

    # 2. shared system prompt
    rng = random.Random(1)
    system = [rng.randrange(3, args.vocab) for _ in range(args.prefix)]
    shared = [(system + p, m) for p, m in make_requests(args.requests // 2, args.vocab, 2, 8, 32, 16, 16)]
    off = run_engine(ours, shared, enable_prefix_caching=False, max_num_batched_tokens=512)
    on = run_engine(ours, shared, enable_prefix_caching=True, max_num_batched_tokens=512)
    results["prefix"] = {"off": {k: v for k, v in off.items() if k != "ttft"}, "on": {k: v for k, v in on.items() if k != "ttft"}}
    print(f"\n2. {len(shared)} requests sharing a {args.prefix}-token system prompt (16 new tokens each)")
    for name, r in (("prefix cache off", off), ("prefix cache on", on)):
        print(f"{name:28}{r['tok_s']:10.1f}{pct(r['ttft'], 50):10.2f}{pct(r['ttft'], 99):10.2f}{r['seconds']:9.1f}"
              f"   computed tokens {r['computed_tokens']}")
    results["prefix"]["gain"] = off["seconds"] / on["seconds"]
    print(f"prefix cache speed-up: {results['prefix']['gain']:.2f}x")

    # 3. speculative decoding in the engine, greedy, at low concurrency (where decoding is memory-bound)
    draft_hidden, draft_layers = max(64, args.hidden // 4), max(1, args.layers // 6)
    draft_hf = llama(draft_hidden, draft_layers, 1)
    draft_hf.save_pretrained(tmp / "draft")
    draft = load_model(tmp / "draft")
    pack_linears(draft)
    k = args.spec_k
    print(f"\n3. speculative decoding in the engine (greedy, k={k}), draft {draft_layers} layer(s) x {draft_hidden} "
          f"({sum(x.numel() for x in draft_hf.parameters()) / 1e6:.1f}M params), {args.max_out} tokens per request")
    print(f"{'concurrency':>12}{'plain tok/s':>12}{'spec tok/s':>11}{'speed-up':>9}{'accept':>8}  identical"
          f"   projected speed-up at acceptance 50% / 70% / 90%")
    results["speculative"] = {}
    for conc in (1, 4):
        reqs_spec = [(p, args.max_out) for p, _ in reqs[:conc]]
        run_engine(ours, reqs_spec[:1], draft_model=draft, num_speculative_tokens=k)  # warm-up
        plain_r = run_engine(ours, reqs_spec, keep_outputs=True)
        spec_r = run_engine(ours, reqs_spec, keep_outputs=True, draft_model=draft, num_speculative_tokens=k)
        same = plain_r["outputs"] == spec_r["outputs"]
        accept = spec_r["draft_accepted"] / max(spec_r["draft_proposed"], 1)
        ratio = spec_r["tok_s"] / plain_r["tok_s"]
        # Random weights never agree (acceptance ~0), so every round here costs k draft steps + one (k+1)-token
        # verification and yields one token. A draft accepted at rate a yields (1 - a^(k+1)) / (1 - a) tokens
        # for about the same round cost: the projection scales the measured round cost by that.
        projected = {a: ratio * (1 - a ** (k + 1)) / (1 - a) for a in (0.5, 0.7, 0.9)}
        results["speculative"][f"concurrency {conc}"] = {
            "plain_tok_s": plain_r["tok_s"], "spec_tok_s": spec_r["tok_s"], "speedup": ratio,
            "acceptance_rate": accept, "identical": same, "projected": projected}
        print(f"{conc:12d}{plain_r['tok_s']:12.1f}{spec_r['tok_s']:11.1f}{ratio:8.2f}x{accept:8.1%}  {str(same):9}"
              f"   {' / '.join(f'{v:.2f}x' for v in projected.values())}")
    print("   (random weights: the draft never agrees, so the measured row is the overhead bound; the projection "
          "assumes the round cost measured here)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
