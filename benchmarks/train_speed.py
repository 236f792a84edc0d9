"""Training throughput and peak memory: lmforge vs transformers on the same weights, batch and sequence length.

Both run the same plain loop (forward, next-token cross-entropy, backward, fused AdamW step) on a
random-initialised Llama-architecture model saved once with transformers and loaded by each side.
Each side runs in a forked child process so its peak resident memory can be measured cleanly; both
children start from the same parent state, in one run of this script.

    python benchmarks/train_speed.py            # ~28M parameters, batch 8 x 256 tokens, CPU
    python benchmarks/train_speed.py --quick    # a smoke run
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def run_side(side: str, model_dir: str, batch: torch.Tensor, steps: int, warmup: int, checkpointing: bool,
             queue: mp.Queue) -> None:
    torch.manual_seed(0)
    base = rss_mb()
    if side == "lmforge":
        from lmforge import load_model
        from lmforge.train.objectives import token_cross_entropy

        model = load_model(model_dir).train()
        model.gradient_checkpointing = checkpointing

        def loss_fn(ids):
            logits = model(ids[:, :-1])
            return token_cross_entropy(logits, ids[:, 1:]) / ids[:, 1:].numel()
    else:
        import transformers

        model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa",
                                                                  dtype=torch.float32).train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

        def loss_fn(ids):
            return model(input_ids=ids, labels=ids).loss  # transformers shifts labels inside

    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    times, losses = [], []
    for step in range(warmup + steps):
        t = time.perf_counter()
        loss = loss_fn(batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step >= warmup:
            times.append(time.perf_counter() - t)
        losses.append(float(loss))
    tokens = batch[:, :-1].numel()
    queue.put({"side": side, "tokens_per_s": tokens / statistics.median(times), "step_s": statistics.median(times),
               "peak_rss_mb": peak_rss_mb(), "rss_before_mb": base, "losses": losses})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vocab", type=int, default=16384)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing on both sides")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args()
    if args.quick:
        args.hidden, args.layers, args.vocab, args.batch, args.seq, args.steps, args.warmup = 128, 2, 2048, 4, 64, 3, 1

    import transformers

    config = transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=int(args.hidden * 8 / 3 / 64 + 1) * 64,
        num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64, num_key_value_heads=max(1, args.hidden // 256),
        max_position_embeddings=max(512, args.seq), tie_word_embeddings=False)
    torch.manual_seed(0)
    tmp = tempfile.mkdtemp(prefix="lmforge-train-bench-")
    hf = transformers.LlamaForCausalLM(config)
    n_params = sum(p.numel() for p in hf.parameters())
    hf.save_pretrained(tmp)
    del hf
    batch = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=torch.Generator().manual_seed(1))

    ctx = mp.get_context("fork")
    results = {}
    for side in ("transformers", "lmforge"):
        q = ctx.Queue()
        proc = ctx.Process(target=run_side, args=(side, tmp, batch, args.steps, args.warmup, args.checkpointing, q))
        proc.start()
        results[side] = q.get()
        proc.join()
    ours, theirs = results["lmforge"], results["transformers"]
    same = max(abs(a - b) for a, b in zip(ours["losses"], theirs["losses"]))
    print(f"model: Llama-architecture, {n_params / 1e6:.1f}M parameters (random init), float32, "
          f"batch {args.batch} x {args.seq} tokens, fused AdamW, {torch.get_num_threads()} threads, "
          f"activation checkpointing {'on' if args.checkpointing else 'off'}")
    print(f"{'':14}{'tokens/s':>12}{'step (s)':>10}{'peak RSS (MB)':>15}")
    for side in ("transformers", "lmforge"):
        r = results[side]
        print(f"{side:14}{r['tokens_per_s']:12,.0f}{r['step_s']:10.3f}{r['peak_rss_mb']:15,.0f}")
    print(f"max |loss difference| over {len(ours['losses'])} steps: {same:.2e} (same weights, same batch)")
    speed = ours["tokens_per_s"] / theirs["tokens_per_s"]
    memory = ours["peak_rss_mb"] / theirs["peak_rss_mb"]
    print(f"training throughput ratio lmforge/transformers: {speed:.2f}x")
    print(f"peak memory ratio lmforge/transformers: {memory:.2f}x")
    if args.json:
        args.json.write_text(json.dumps({"params": n_params, "args": vars(args) | {"json": str(args.json)},
                                         "results": results, "speed_ratio": speed, "memory_ratio": memory}, indent=2))


if __name__ == "__main__":
    main()
