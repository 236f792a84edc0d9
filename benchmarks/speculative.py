"""Speculative decoding with a *trained* draft/target pair in the engine: acceptance rate and speed-up vs plain
decoding at batch 1, 4 and 16 (greedy; outputs checked token-identical).

    # build the pair with lmforge's own commands (~20 min on 2 CPU cores), then measure:
    python benchmarks/speculative.py --build runs/spec_pair
    #   = lmforge pretrain recipes/spec_target.yaml out_dir=runs/spec_pair/target
    #     lmforge pretrain recipes/distill_draft.yaml out_dir=runs/spec_pair/draft \
    #         distill.teacher=runs/spec_pair/target/checkpoints/<latest>/model
    # measure an existing pair (model directories, or run directories: their latest checkpoint):
    python benchmarks/speculative.py --target runs/spec_pair/target --draft runs/spec_pair/draft
    python benchmarks/speculative.py --target ... --draft ... --k 2 3 4 5 6 --batches 1 4 16 --repeats 3
    python benchmarks/speculative.py --target runs/spec_pair/target --draft runs/spec_pair/draft --k 3 4 5 \
        --repeats 2 --threads 1        # the run reported in the issue (a 2-core CPU shared with other jobs)

Prompts are windows of ``--prompt-tokens`` tokens from the corpus documents that pretraining held out
(``data.val_fraction`` 0.03, seed 0, as in the recipes: the same per-document hash as ``lmforge.data.pretrain``),
so neither model saw them. Every request generates exactly ``--max-new-tokens`` tokens (``ignore_eos``), greedy.

For every batch size and repeat, plain decoding and speculative decoding at each k run back to back on fresh
engines (the order rotated between repeats), so machine-load drift hits both sides alike; the table reports
medians. Times are whole requests (prefill included). Also printed: the per-forward cost of the target (1 token
and k+1 tokens) and the draft at batch 1, and where a speculative round's time goes (draft proposals, target
forward, the rest: scheduling, acceptance, Python), which is what bounds the speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def model_dir(path: Path) -> Path:
    """A model directory as given, or a training run's latest checkpoint model."""
    if (path / "config.json").is_file():
        return path
    from lmforge.train.checkpoint import latest_checkpoint

    ckpt = latest_checkpoint(path)
    if ckpt is None or not (ckpt / "model" / "config.json").is_file():
        raise SystemExit(f"{path} is neither a model directory nor a run with a checkpoint")
    return ckpt / "model"


def build_pair(out: Path, target_steps: int | None, draft_steps: int | None) -> tuple[Path, Path]:
    """Pretrain the target, then distil the draft from it, with the ``lmforge pretrain`` command."""
    lmforge = [sys.executable, "-m", "lmforge.cli"] if not (Path(sys.executable).parent / "lmforge").exists() \
        else [str(Path(sys.executable).parent / "lmforge")]
    times = {}
    t = time.perf_counter()
    cmd = lmforge + ["pretrain", str(ROOT / "recipes/spec_target.yaml"), f"out_dir={out / 'target'}"]
    if target_steps:
        cmd.append(f"max_steps={target_steps}")
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)
    times["target_s"] = time.perf_counter() - t
    target = model_dir(out / "target")
    t = time.perf_counter()
    cmd = lmforge + ["pretrain", str(ROOT / "recipes/distill_draft.yaml"), f"out_dir={out / 'draft'}",
                     f"distill.teacher={target}"]
    if draft_steps:
        cmd.append(f"max_steps={draft_steps}")
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)
    times["draft_s"] = time.perf_counter() - t
    print(f"built: target {times['target_s']:.0f} s, draft {times['draft_s']:.0f} s", flush=True)
    return target, model_dir(out / "draft")


def heldout_prompts(corpus: Path, tokenizer, n: int, length: int, val_fraction: float, seed: int) -> list[list[int]]:
    """``n`` prompts of ``length`` tokens from the held-out documents, spread over documents and offsets."""
    from lmforge.data.pretrain import _is_val, read_documents

    docs = [d for i, d in enumerate(read_documents([corpus])) if _is_val(i, seed, val_fraction)]
    if not docs:
        raise SystemExit(f"no held-out documents in {corpus} at val_fraction={val_fraction}, seed={seed}")
    encoded = [tokenizer.encode(d, add_special_tokens=False) for d in docs]
    windows: list[list[int]] = []
    offset = 0
    while len(windows) < n:
        added = False
        for ids in encoded:
            if offset + length <= len(ids):
                windows.append(ids[offset:offset + length])
                added = True
                if len(windows) == n:
                    break
        if not added:
            raise SystemExit(f"the held-out documents give only {len(windows)} prompts of {length} tokens")
        offset += 3 * length  # the next window of every document, well apart
    return windows


def run_engine(target, prompts: list[list[int]], max_new: int, draft=None, k: int = 0, profile: bool = False) -> dict:
    from lmforge.engine.engine import Engine
    from lmforge.engine.sequence import SamplingParams

    kw = dict(draft_model=draft, num_speculative_tokens=k) if draft is not None else {}
    engine = Engine(target, max_num_seqs=max(16, len(prompts)), max_num_batched_tokens=1024,
                    kv_cache_bytes=256 << 20, **kw)
    spent = {"draft": 0.0, "target": 0.0, "rounds": 0}
    if profile:  # wrap the instance's methods: time in draft proposals and in the target's forward pass
        def timed(name, fn):
            def wrapper(*a, **kw):
                t = time.perf_counter()
                try:
                    return fn(*a, **kw)
                finally:
                    spent[name] += time.perf_counter() - t
            return wrapper

        engine.runner.run = timed("target", engine.runner.run)
        if engine.drafter is not None:
            engine.drafter.propose = timed("draft", engine.drafter.propose)
    accept = engine._accept

    def counted(*a, **kw):
        spent["rounds"] += 1
        return accept(*a, **kw)

    engine._accept = counted
    params = SamplingParams(temperature=0.0, max_tokens=max_new, ignore_eos=True)
    start = time.perf_counter()
    outs = engine.generate(prompts, params)
    seconds = time.perf_counter() - start
    tokens = [o.outputs[0].token_ids for o in outs]
    return {"seconds": seconds, "tokens": sum(map(len, tokens)), "outputs": tokens, "steps": engine.stats["steps"],
            "proposed": engine.stats["draft_proposed"], "accepted": engine.stats["draft_accepted"], **spent}


@torch.inference_mode()
def forward_cost(model, tokens: int, context: int, reps: int = 60) -> float:
    """Seconds per ModelRunner forward of ``tokens`` new tokens after ``context`` cached ones, one sequence."""
    from lmforge.engine.model_runner import Feed, ModelRunner

    bs = 16
    blocks = -(-(context + tokens) // bs)
    runner = ModelRunner(model, blocks, bs)
    table = list(range(blocks))
    runner.run([Feed([5] * context, 0, table)])
    feed = [Feed([7] * tokens, context, table, tokens)]
    for _ in range(5):
        runner.run(feed)
    t = time.perf_counter()
    for _ in range(reps):
        runner.run(feed)
    return (time.perf_counter() - t) / reps


@torch.inference_mode()
def teacher_forced_agreement(target, draft, windows: list[list[int]]) -> float:
    """Share of positions of held-out text where the draft's argmax equals the target's (both fed the real text):
    the acceptance a greedy draft would see if the target's own output read like the corpus."""
    from lmforge.engine.model_runner import Feed, ModelRunner

    same = total = 0
    for ids in windows:
        blocks = -(-len(ids) // 16)
        best = [ModelRunner(m, blocks, 16).run([Feed(ids, 0, list(range(blocks)), len(ids))]).argmax(-1)
                for m in (target, draft)]
        same += int((best[0] == best[1]).sum())
        total += len(ids)
    return same / total


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", type=Path, help="target model directory (or run directory)")
    p.add_argument("--draft", type=Path, help="draft model directory (or run directory)")
    p.add_argument("--build", type=Path, help="build the pair first, into this directory (e.g. runs/spec_pair)")
    p.add_argument("--target-steps", type=int, help="override max_steps of recipes/spec_target.yaml")
    p.add_argument("--draft-steps", type=int, help="override max_steps of recipes/distill_draft.yaml")
    p.add_argument("--corpus", type=Path, default=ROOT / "runs/quickstart/data/stdlib.jsonl")
    p.add_argument("--tokenizer", type=Path, default=ROOT / "runs/quickstart/tokenizer")
    p.add_argument("--val-fraction", type=float, default=0.03, help="the recipes' data.val_fraction")
    p.add_argument("--seed", type=int, default=0, help="the recipes' seed")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--k", type=int, nargs="+", default=[2, 3, 4, 5, 6], help="draft tokens per round to try")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's); on a CPU shared with other "
                   "jobs, 1 avoids the OpenMP oversubscription stalls that hit both sides at random")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.build is not None:
        args.target, args.draft = build_pair(args.build, args.target_steps, args.draft_steps)
    if args.target is None or args.draft is None:
        p.error("give --target and --draft, or --build DIR")

    from lmforge import load_model
    from lmforge.data.tokenizer import load_tokenizer

    target_dir, draft_dir = model_dir(args.target), model_dir(args.draft)
    target, draft = load_model(target_dir), load_model(draft_dir)
    n_t = sum(x.numel() for x in target.parameters())
    n_d = sum(x.numel() for x in draft.parameters())
    tc, dc = target.config, draft.config
    print(f"target {target_dir}: {tc.num_layers} x {tc.hidden_size}, {n_t / 1e6:.1f}M params")
    print(f"draft  {draft_dir}: {dc.num_layers} x {dc.hidden_size}, {n_d / 1e6:.1f}M params")
    print(f"torch threads {torch.get_num_threads()}, load average at start {os.getloadavg()}")
    tokenizer = load_tokenizer(args.tokenizer)
    prompts = heldout_prompts(args.corpus, tokenizer, max(args.batches), args.prompt_tokens, args.val_fraction,
                              args.seed)
    result: dict = {"target": str(target_dir), "draft": str(draft_dir), "target_params": n_t, "draft_params": n_d,
                    "max_new_tokens": args.max_new_tokens, "prompt_tokens": args.prompt_tokens, "loads": []}

    # per-forward cost at batch 1 (context = prompt + half the generation)
    ctx = args.prompt_tokens + args.max_new_tokens // 2
    cost = {"target_1": forward_cost(target, 1, ctx), "draft_1": forward_cost(draft, 1, ctx)}
    for k in args.k:
        cost[f"target_{k + 1}"] = forward_cost(target, k + 1, ctx)
    result["forward_ms"] = {name: v * 1e3 for name, v in cost.items()}
    print(f"\nforward cost at batch 1 (context {ctx}): target 1 token {cost['target_1'] * 1e3:.2f} ms, draft 1 token "
          f"{cost['draft_1'] * 1e3:.2f} ms (ratio {cost['target_1'] / cost['draft_1']:.1f}x); target verify "
          + ", ".join(f"k+1={k + 1}: {cost[f'target_{k + 1}'] * 1e3:.2f} ms" for k in args.k))

    # the acceptance to expect on natural text, and what it would give at the round costs measured below
    alpha = teacher_forced_agreement(target, draft, heldout_prompts(args.corpus, tokenizer, 16, 256,
                                                                    args.val_fraction, args.seed))
    result["teacher_forced_agreement"] = alpha
    print(f"draft/target top-1 agreement on held-out text (teacher forced, 16 x 256 tokens): {alpha:.1%}")

    # warm-up (allocator, first-call paths), not timed
    run_engine(target, prompts[:1], 8)
    run_engine(target, prompts[:1], 8, draft, args.k[0])

    runs: dict = {}
    for rep in range(args.repeats):
        for b in args.batches:
            variants = [0] + list(args.k)  # 0: plain decoding
            shift = rep % len(variants)
            for k in variants[shift:] + variants[:shift]:
                r = run_engine(target, prompts[:b], args.max_new_tokens, draft if k else None, k, profile=True)
                runs.setdefault((b, k), []).append(r)
            print(f"  batch {b}: " + ", ".join(f"{'plain' if k == 0 else f'k={k}'} {runs[(b, k)][-1]['seconds']:.1f} s"
                                             for k in variants), flush=True)
        result["loads"].append(os.getloadavg())
        print(f"repeat {rep + 1}/{args.repeats} done, load average {os.getloadavg()}", flush=True)

    print(f"\n{len(prompts)} held-out prompts of {args.prompt_tokens} tokens, {args.max_new_tokens} new tokens each, "
          f"greedy; median of {args.repeats} interleaved repeats\n")
    print("| batch | k | plain tok/s | spec tok/s | speed-up | acceptance | tokens/round | identical | "
          "ms/round: draft / target / rest |")
    print("|---:|---:|---:|---:|---:|---:|---:|:---:|---|")
    rows, best = [], {}
    for b in args.batches:
        plain = runs[(b, 0)]
        plain_s = statistics.median(r["seconds"] for r in plain)
        tokens = plain[0]["tokens"]
        for k in args.k:
            spec = runs[(b, k)]
            spec_s = statistics.median(r["seconds"] for r in spec)
            same = all(r["outputs"] == plain[0]["outputs"] for r in spec + plain)
            last = spec[0]
            acc = last["accepted"] / max(last["proposed"], 1)
            rounds = last["rounds"]  # verifications, one per sequence and speculative step
            per_round = (last["accepted"] + rounds) / max(rounds, 1)
            steps = [r["steps"] for r in spec]
            mid = sorted(spec, key=lambda r: r["seconds"])[len(spec) // 2]
            d_ms, t_ms = mid["draft"] / mid["steps"] * 1e3, mid["target"] / mid["steps"] * 1e3
            rest_ms = mid["seconds"] / mid["steps"] * 1e3 - d_ms - t_ms
            row = {"batch": b, "k": k, "plain_tok_s": tokens / plain_s, "spec_tok_s": tokens / spec_s,
                   "speedup": plain_s / spec_s, "acceptance": acc, "tokens_per_round": per_round, "identical": same,
                   "engine_steps": steps[0], "ms_per_step": {"draft": d_ms, "target": t_ms, "rest": rest_ms}}
            rows.append(row)
            if b not in best or row["speedup"] > best[b]["speedup"]:
                best[b] = row
            print(f"| {b} | {k} | {row['plain_tok_s']:.1f} | {row['spec_tok_s']:.1f} | {row['speedup']:.2f}x | "
                  f"{acc:.1%} | {per_round:.2f} | {'yes' if same else 'NO'} | "
                  f"{d_ms:.1f} / {t_ms:.1f} / {rest_ms:.1f} |")
    print(f"\nprojected speed-up at the teacher-forced agreement {alpha:.1%} (tokens per round "
          f"(1 - a^(k+1)) / (1 - a) at the measured ms per round; the greedy outputs above may be easier to guess "
          f"than natural text):")
    for row in rows:
        b, k = row["batch"], row["k"]
        plain_mid = sorted(runs[(b, 0)], key=lambda r: r["seconds"])[len(runs[(b, 0)]) // 2]
        spec_mid = sorted(runs[(b, k)], key=lambda r: r["seconds"])[len(runs[(b, k)]) // 2]
        # per sequence: plain pays one step per token; a speculative step yields tokens_per_round per sequence
        plain_step = plain_mid["seconds"] / plain_mid["steps"]
        spec_step = spec_mid["seconds"] / spec_mid["steps"]
        expect = (1 - alpha ** (k + 1)) / (1 - alpha) if alpha < 1 else k + 1
        row["projected_speedup"] = expect * plain_step / spec_step
        print(f"  batch {b}, k={k}: {expect:.2f} tokens/round -> {row['projected_speedup']:.2f}x")
    for b in args.batches:
        mid = sorted(runs[(b, 0)], key=lambda r: r["seconds"])[len(runs[(b, 0)]) // 2]
        t_ms = mid["target"] / mid["steps"] * 1e3
        print(f"plain, batch {b}: {mid['seconds'] / mid['steps'] * 1e3:.1f} ms/step, of which target forward "
              f"{t_ms:.1f} ms")
    print("\nbest k per batch: " + ", ".join(f"batch {b}: k={r['k']} {r['speedup']:.2f}x" for b, r in best.items()))
    print(f"load average during measurement (after each repeat): {result['loads']}")
    result["rows"], result["best"] = rows, {str(b): r for b, r in best.items()}
    if not all(r["identical"] for r in rows):
        print("ERROR: speculative outputs differ from plain greedy decoding", file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
