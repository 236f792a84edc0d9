"""``lmforge quickstart-reason``: teach the quickstart model to think, then spend test-time compute (CPU).

Starts from the quickstart's SFT checkpoint (``lmforge quickstart`` first; ``--base pretrained`` for its
pretrained one) and multi-digit addition ("What is 47 + 85?", operands of ``--min-digits``..``--max-digits``
digits; held-out problems avoid every addition the quickstart's SFT data showed):
  1. a copy of the tokenizer with ``<think>`` and ``</think>`` as tokens, and the model's embeddings grown
     for them (new rows at the mean) -> OUT/base;
  2. two SFT runs from that base with the same steps, batch and learning rate on the same problems: "think"
     replies ``<think>7 + 5 = 12; 4 + 8 + 1 = 13; carry 1</think>132`` (column by column, right to left, a share of
     them re-deriving the columns after "Wait"), "direct" replies the sum only;
  3. on held-out problems (disjoint from every training problem): greedy accuracy of direct vs think;
     accuracy vs thinking budget (s1 budget forcing: thinking capped at k tokens, natural, and extended with
     "Wait" up to a minimum); majority@N, verifier best-of-N and reward-model best-of-N for N = 1..32 against
     generated tokens, beside the direct model's greedy and majority@N.
The verifier is a process verifier (``verify_addition_trace``): it recomputes the trace's column arithmetic and
checks that the answer is what the trace writes; it never sees the true sum. The reward model is a
Bradley-Terry model (``lmforge rm``) trained on pairs of the think model's samples on *training* problems,
labelled by whether the final number is the true sum (an outcome reward model).
Tables, PNG plots and OUT/summary.json; OUT/report.md puts them on one page.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from lmforge.commands import command
from lmforge.quickstart.pretrain_sft import sft_checkpoint

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
NS = (1, 2, 4, 8, 16, 32)


def _args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", default="runs/quickstart", help="the quickstart's run directory")
    p.add_argument("--out", default=None, help="default: RUN/reason")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's); 1 is several times faster on a busy 2-core machine, "
                        "where threads of one matmul wait on each other")
    p.add_argument("--base", choices=("sft", "pretrained"), default="sft",
                   help="start both SFT runs from the quickstart's SFT checkpoint (default: it already adds one-digit "
                        "numbers and copies operands, the steps of a trace) or its pretrained one")
    p.add_argument("--min-digits", type=int, default=2, help="fewest digits of an operand")
    p.add_argument("--max-digits", type=int, default=2, help="most digits of an operand")
    data = p.add_argument_group("data and training")
    data.add_argument("--train-size", type=int, default=7_500, help="training problems (both SFT runs)")
    data.add_argument("--sft-steps", type=int, default=400, help="steps of each SFT run")
    data.add_argument("--batch-size", type=int, default=64,
                      help="64 x 400 steps: 60.7%% think accuracy in 376 s where 32 x 800 gave 48.7%% in 408 s")
    data.add_argument("--lr", type=float, default=3e-3)
    data.add_argument("--wait-fraction", type=float, default=0.2,
                      help="share of think traces that re-derive the columns after 'Wait'")
    data.add_argument("--rm-prompts", type=int, default=300, help="training problems sampled (8 each) for RM pairs")
    data.add_argument("--rm-steps", type=int, default=150)
    ev = p.add_argument_group("measurement")
    ev.add_argument("--test-size", type=int, default=150, help="held-out problems")
    ev.add_argument("--max-n", type=int, default=32, help="largest N of majority@N / best-of-N (a power of 2)")
    ev.add_argument("--temperature", type=float, default=0.5,
                    help="sampling temperature for the N samples (0.8 samples diverse but 32%% accurate, 0.5: 45%%)")
    ev.add_argument("--caps", default="0,6,12,18",
                    help="forced-short thinking caps (max_thinking_tokens), comma-separated")
    ev.add_argument("--extend", default="36,54,72",
                    help="extended-thinking minimums (min_thinking_tokens, 'Wait' in place of </think>)")


# ---- building the base: tokenizer with thinking delimiters, embeddings grown ---------------------------------
def add_thinking_tokens(tokenizer: Any) -> list[int]:
    """Add ``<think>`` / ``</think>`` to ``tokenizer`` (in place) and return their ids.

    They are *added* tokens (matched before BPE, so each is always one id, as budget forcing needs) but not
    *special* ones, as in Qwen3's tokenizer: decoding skips special tokens by default, which would drop the
    delimiters from every completion's text and glue the trace's last digit onto the answer ("...=8" + "82"
    -> "...=882"), breaking every text-level answer extractor and verifier.
    """
    from tokenizers import AddedToken

    from lmforge.data.synthetic import THINK_END, THINK_START

    missing = [t for t in (THINK_START, THINK_END) if tokenizer.backend.token_to_id(t) is None]
    if missing:
        tokenizer.backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in missing])
    return [tokenizer.backend.token_to_id(THINK_START), tokenizer.backend.token_to_id(THINK_END)]


def build_base(start: Path, out: Path) -> tuple[Path, dict]:
    """The starting model and its tokenizer, with thinking delimiters, saved to ``out``."""
    from lmforge.data.tokenizer import load_tokenizer
    from lmforge.models.checkpoint import load_model, save_model
    from lmforge.models.resize import resize_token_embeddings

    tokenizer = load_tokenizer(start)
    model = load_model(start)
    old = model.config.vocab_size
    ids = add_thinking_tokens(tokenizer)
    resize_token_embeddings(model, max(old, tokenizer.vocab_size))
    save_model(model, out, tokenizer=tokenizer)
    return out, {"vocab_before": old, "vocab_after": model.config.vocab_size, "think_ids": ids}


# ---- SFT --------------------------------------------------------------------------------------------------------
def _sft(base: Path, train_file: Path, out: Path, steps: int, seq_len: int, args: argparse.Namespace) -> Path:
    """One SFT run from ``base`` through the quickstart's recipe; returns the final model directory."""
    from lmforge.train.recipe import load_recipe
    from lmforge.train.run import build_trainer

    cfg = load_recipe(RECIPES / "quickstart_sft.yaml", [
        f"out_dir={out}", f"model.path={base}", f"tokenizer={base}", f"data.train=[{train_file}]",
        f"data.seq_len={seq_len}", f"max_steps={steps}", f"seed={args.seed}", f"batch_size={args.batch_size}",
        f"optim.lr={args.lr}",
        "data.replay.fraction=0",  # the recipe replays the main quickstart's corpus; these traces train alone
    ])
    trainer = build_trainer(cfg)
    print(f"      {out.name}: {trainer.data.describe}")
    return trainer.fit().final_checkpoint / "model"


# ---- completions ------------------------------------------------------------------------------------------------
def chat_prompts(tokenizer: Any, problems: list[tuple[int, int]]) -> list[list[int]]:
    return [tokenizer.apply_chat_template([{"role": "user", "content": f"What is {a} + {b}?"}],
                                          add_generation_prompt=True) for a, b in problems]


def thinking_tokens(token_ids: list[int], think_ids: list[int]) -> int:
    """Tokens between the output's ``<think>`` and its (first) ``</think>``, or to the end if never closed;
    the extension words count (as budget forcing counts them), the delimiters do not."""
    start, end = think_ids
    if start not in token_ids:
        return 0
    i = token_ids.index(start) + 1
    j = token_ids.index(end, i) if end in token_ids[i:] else len(token_ids)
    return j - i


def _answer_of(text: str, think: bool) -> str | None:
    from lmforge.data.synthetic import extract_last_number, thinking_answer

    return thinking_answer(text) if think else extract_last_number(text)


def _greedy(model, tokenizer, prompts, max_tokens: int, **budget) -> list:
    from lmforge.engine import SamplingParams
    from lmforge.engine.complete import complete

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, **budget)
    return [o[0] for o in complete(model, prompts, params, tokenizer, max_num_seqs=1024, max_num_batched_tokens=4096)]


def _accuracy(outs: list, problems: list[tuple[int, int]], think: bool) -> list[float]:
    return [float(_answer_of(o.text, think) == str(a + b)) for o, (a, b) in zip(outs, problems)]


def budget_sweep(model, tokenizer, prompts, problems, think_ids, caps: list[int], mins: list[int],
                 max_tokens: int) -> list[dict]:
    """Greedy accuracy with thinking capped at each of ``caps``, natural, and extended to each of ``mins``."""
    from lmforge.data.synthetic import WAIT

    rows = []
    settings = [("forced", {"max_thinking_tokens": c}) for c in caps] + [("natural", {})]
    settings += [("extended", {"min_thinking_tokens": m, "thinking_extension": WAIT}) for m in mins]
    for kind, budget in settings:
        limit = max(max_tokens, budget.get("min_thinking_tokens", 0) + 32)  # room for the answer after the minimum
        outs = _greedy(model, tokenizer, prompts, limit, **budget)
        correct = _accuracy(outs, problems, think=True)
        used = [thinking_tokens(list(o.token_ids), think_ids) for o in outs]
        waits = [o.text.count(WAIT) for o in outs]
        rows.append({"kind": kind, **budget, "accuracy": sum(correct) / len(correct),
                     "thinking_tokens": sum(used) / len(used), "waits": sum(waits) / len(waits),
                     "generated_tokens": sum(len(o.token_ids) for o in outs) / len(outs), "correct": correct})
    return rows


# ---- N samples: majority, verifier best-of-N, reward-model best-of-N ------------------------------------------
def selection_curves(samples: list[list], problems: list[tuple[int, int]], think: bool, ns: list[int],
                     verifier_scores: list[list[float]] | None = None,
                     rm_scores: list[list[float]] | None = None) -> dict[str, list[dict]]:
    """Accuracy of each selection rule at each N, from ``max(ns)`` samples per problem.

    For N < max(ns) the samples split into max(ns) / N disjoint groups of N (in sampling order) and accuracy
    is averaged over the groups: the same estimate as one group, with less noise. Generated tokens: mean per
    problem over the N samples. Selection uses lmforge.engine.strategies' rules: ``majority_vote`` and
    ``best_index`` (ties: the sample drawn first).
    """
    from lmforge.engine.strategies import best_index, majority_vote

    total = max(ns)
    curves: dict[str, list[dict]] = {"majority": [], "pass": []}
    if verifier_scores is not None:
        curves["verifier"] = []
    if rm_scores is not None:
        curves["rm"] = []
    for n in ns:
        hits: dict[str, float] = {k: 0.0 for k in curves}
        tokens = 0.0
        groups = total // n
        for p, ((a, b), outs) in enumerate(zip(problems, samples)):
            want = str(a + b)
            for g in range(groups):
                idx = range(g * n, (g + 1) * n)
                answers = [_answer_of(outs[i].text, think) for i in idx]
                tokens += sum(len(outs[i].token_ids) for i in idx) / groups
                hits["majority"] += (majority_vote(answers)[0] == want) / groups
                hits["pass"] += (want in answers) / groups  # oracle: some sample is right (pass@N)
                for name, scores in (("verifier", verifier_scores), ("rm", rm_scores)):
                    if scores is not None:
                        best = best_index([scores[p][i] for i in idx])
                        hits[name] += (answers[0 if best is None else best] == want) / groups
        for k, rows in curves.items():
            rows.append({"n": n, "accuracy": hits[k] / len(problems), "generated_tokens": tokens / len(problems)})
    return curves


def _sample(model, tokenizer, prompts, n: int, temperature: float, max_tokens: int, seed: int) -> list[list]:
    from lmforge.engine import SamplingParams
    from lmforge.engine.complete import complete

    # Many sequences per engine step: on a CPU a decode step's fixed cost dominates at small batches.
    return complete(model, prompts, SamplingParams(n=n, temperature=temperature, max_tokens=max_tokens, seed=seed),
                    tokenizer, max_num_seqs=1024, max_num_batched_tokens=4096)


def train_reward_model(policy: Path, tokenizer, problems: list[tuple[int, int]], out: Path,
                       args: argparse.Namespace, max_tokens: int) -> tuple[Path | None, dict]:
    """Bradley-Terry reward model on pairs of the policy's samples on training problems (best vs worst of 8,
    labelled by the true sum), as quickstart-align trains its reward model."""
    import lmforge.align.reward_model  # noqa: F401  (registers the ``rm`` task)
    from lmforge.align.iterative import make_preference_pairs
    from lmforge.align.rejection import RejectionConfig
    from lmforge.align.reward_model import pairwise_accuracy
    from lmforge.align.rewards import exact_number_match
    from lmforge.models.checkpoint import load_model
    from lmforge.train.recipe import load_recipe
    from lmforge.train.run import build_trainer

    records = [{"messages": [{"role": "user", "content": f"What is {a} + {b}?"}], "answer": str(a + b)}
               for a, b in problems]
    pairs = make_preference_pairs(load_model(policy), tokenizer, records, n=8, reward_fn=exact_number_match,
                                  cfg=RejectionConfig(max_new_tokens=max_tokens, temperature=args.temperature,
                                                      seed=args.seed + 7, prompts_per_batch=64),
                                  out_path=out / "pairs.jsonl")
    info: dict[str, Any] = {"pairs": pairs.pairs, "prompts": pairs.prompts, "tied": pairs.tied}
    if pairs.pairs < 10:
        print(f"      only {pairs.pairs} preference pairs (samples all right or all wrong): no reward model")
        return None, info
    cfg = load_recipe(None, [], defaults={
        "task": "rm", "out_dir": str(out / "rm"), "model": {"path": str(policy)},
        "data": {"train": [str(out / "pairs.jsonl")], "val_fraction": 0.2, "seq_len": 2 * max_tokens},
        "seed": args.seed, "eval_every": 0, "save_every": 0, "keep_checkpoints": 1, "progress": False,
        "batch_size": 16, "max_steps": args.rm_steps,
        "optim": {"warmup_steps": max(1, args.rm_steps // 10), "lr": 3e-4}})
    trainer = build_trainer(cfg)
    result = trainer.fit()
    info["heldout_pair_accuracy"] = pairwise_accuracy(trainer.model, trainer.data.val, trainer.data.pad_id)["accuracy"]
    info["heldout_pairs"] = len(trainer.data.val)
    return result.final_checkpoint / "model", info


# ---- report -----------------------------------------------------------------------------------------------------
def _plots(out: Path, sweep: list[dict], curves: dict, direct: dict, think_greedy: float) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for kind, marker in (("forced", "o"), ("natural", "s"), ("extended", "^")):
        rows = [r for r in sweep if r["kind"] == kind]
        ax.plot([r["thinking_tokens"] for r in rows], [100 * r["accuracy"] for r in rows], marker=marker,
                linestyle="-" if kind != "natural" else "none", markersize=8 if kind == "natural" else 6, label=kind)
        for r in rows:
            label = r.get("max_thinking_tokens", r.get("min_thinking_tokens"))
            if label is not None:
                ax.annotate(f"{'≤' if kind == 'forced' else '≥'}{label}", (r["thinking_tokens"], 100 * r["accuracy"]),
                            textcoords="offset points", xytext=(4, -10), fontsize=7)
    ax.axhline(100 * direct["greedy"], color="grey", linestyle="--", label="direct answer (greedy)")
    ax.set_xlabel("mean thinking tokens per problem (greedy)")
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_title("budget forcing: accuracy vs thinking budget")
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(out / "budget.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    names = {"majority": "think: majority@N", "verifier": "think: verifier best-of-N", "rm": "think: RM best-of-N",
             "pass": "think: pass@N (oracle bound)"}
    for key, label in names.items():
        if key in curves["think"]:
            rows = curves["think"][key]
            ax.plot([r["generated_tokens"] for r in rows], [100 * r["accuracy"] for r in rows], marker="o",
                    linestyle=":" if key == "pass" else "-", label=label)
    rows = curves["direct"]["majority"]
    ax.plot([r["generated_tokens"] for r in rows], [100 * r["accuracy"] for r in rows], marker="x", color="grey",
            label="direct: majority@N")
    ax.axhline(100 * think_greedy, color="C0", linestyle="--", linewidth=0.8, label="think: greedy")
    ax.axhline(100 * direct["greedy"], color="grey", linestyle="--", linewidth=0.8, label="direct: greedy")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("generated tokens per problem (N samples, log scale)")
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_title("parallel test-time compute: N = " + ", ".join(str(r["n"]) for r in rows))
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(out / "best_of_n.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths


def _tables(summary: dict) -> str:
    lines = ["| model / setting | accuracy | mean thinking tokens | mean generated tokens |", "| --- | --- | --- | --- |"]
    lines.append(f"| direct, greedy | {summary['direct']['greedy']:.1%} | 0 | "
                 f"{summary['direct']['greedy_tokens']:.1f} |")
    for r in summary["budget"]:
        setting = (f"think, forced ≤{r['max_thinking_tokens']}" if r["kind"] == "forced" else
                   "think, natural (greedy)" if r["kind"] == "natural" else
                   f"think, extended ≥{r['min_thinking_tokens']} ('Wait' ×{r['waits']:.2f})")
        lines.append(f"| {setting} | {r['accuracy']:.1%} | {r['thinking_tokens']:.1f} | {r['generated_tokens']:.1f} |")
    out = "\n".join(lines)
    curves = summary["curves"]
    ns = [r["n"] for r in curves["think"]["majority"]]
    head = "| N | " + " | ".join(str(n) for n in ns) + " |"
    rows = [head, "| --- |" + " --- |" * len(ns)]
    names = [("direct", "majority", "direct: majority@N"), ("think", "majority", "think: majority@N"),
             ("think", "verifier", "think: verifier best-of-N"), ("think", "rm", "think: RM best-of-N"),
             ("think", "pass", "think: pass@N (oracle)")]
    for model, key, label in names:
        if key in curves[model]:
            rows.append(f"| {label} | " + " | ".join(f"{r['accuracy']:.1%}" for r in curves[model][key]) + " |")
    for model in ("direct", "think"):
        rows.append(f"| {model}: generated tokens / problem | "
                    + " | ".join(f"{r['generated_tokens']:.0f}" for r in curves[model]["majority"]) + " |")
    return out + "\n\n" + "\n".join(rows)


# ---- the command --------------------------------------------------------------------------------------------------
def _start_checkpoint(run: Path, which: str) -> Path:
    """The quickstart's SFT checkpoint (from its summary.json) or its last pretraining checkpoint."""
    from lmforge.errors import LmforgeError

    summary = run / "summary.json"
    found = sorted((run / "pretrain" / "checkpoints").glob("step-*/model"))
    if not summary.is_file() or not found:
        raise LmforgeError(f"no finished quickstart run in {run} (summary.json and pretrain/checkpoints/step-*/model): "
                           f"run `lmforge quickstart --out {run}` first")
    if which == "pretrained":
        return found[-1]
    sft = sft_checkpoint(run)
    if not (sft / "config.json").is_file():
        raise LmforgeError(f"{summary} names no SFT checkpoint with a config.json ({sft}); use --base pretrained")
    return sft


def _quickstart_additions(run: Path) -> set[tuple[int, int]]:
    """(a, b) of every "What is a + b?" in the quickstart's SFT data: the SFT base has seen their answers, so
    they stay out of the held-out set."""
    import re

    from lmforge.io import iter_jsonl

    path = run / "data" / "skills_train.jsonl"
    seen: set[tuple[int, int]] = set()
    if path.is_file():
        for _, record in iter_jsonl(path):
            m = re.fullmatch(r"What is (\d+) \+ (\d+)\?", record["messages"][0]["content"])
            if m:
                seen.add((int(m[1]), int(m[2])))
    return seen


@command("quickstart-reason",
         "teach the quickstart model to think (SFT on addition traces), then measure test-time compute (CPU)")(_args)
def quickstart_reason_cmd(args: argparse.Namespace) -> int:
    import torch

    from lmforge.data.synthetic import (
        addition_problems,
        addition_reason_examples,
        verify_addition_trace,
        write_jsonl,
    )
    from lmforge.data.tokenizer import load_tokenizer
    from lmforge.engine.strategies import RewardScorer, VerifierScorer
    from lmforge.errors import LmforgeError
    from lmforge.eval.scoring import bootstrap_stderr
    from lmforge.models.checkpoint import load_model
    from lmforge.models.reward import load_reward_model

    started = time.perf_counter()
    run = Path(args.run)
    start = _start_checkpoint(run, args.base)
    out = Path(args.out) if args.out else run / "reason"
    if args.max_n < 1 or args.max_n & (args.max_n - 1):
        raise LmforgeError(f"--max-n must be a power of 2, got {args.max_n}")
    ns = [n for n in NS if n <= args.max_n] + [n for n in (64, 128, 256) if n <= args.max_n]
    caps = [int(c) for c in args.caps.split(",") if c.strip()]
    mins = [int(m) for m in args.extend.split(",") if m.strip()]
    torch.manual_seed(args.seed)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    timings: dict[str, float] = {}

    # 1. data: the held-out problems are drawn first, then training problems that avoid them
    t = time.perf_counter()
    digits = {"min_digits": args.min_digits, "max_digits": args.max_digits}
    test = addition_problems(args.test_size, seed=10_000 + args.seed, exclude=_quickstart_additions(run), **digits)
    train = addition_problems(args.train_size, seed=20_000 + args.seed, exclude=set(test), **digits)
    data = out / "data"
    write_jsonl(addition_reason_examples(train, "think", seed=args.seed, wait_fraction=args.wait_fraction),
                data / "think_train.jsonl")
    write_jsonl(addition_reason_examples(train, "direct"), data / "direct_train.jsonl")
    write_jsonl(addition_reason_examples(test, "think"), data / "test.jsonl")
    base, base_info = build_base(start, out / "base")
    tokenizer = load_tokenizer(base)
    think_ids = base_info["think_ids"]
    lengths = [len(tokenizer.apply_chat_template(r["messages"]))
               for r in addition_reason_examples(train[:2000], "think", seed=args.seed, wait_fraction=1.0)]
    seq_len = max(lengths) + 8  # the longest (two-pass) trace fits: nothing is truncated
    max_tokens = seq_len  # room for any reply the training data shows, plus slack
    timings["data"] = time.perf_counter() - t
    print(f"[1/5] {len(train)} training and {len(test)} held-out addition problems ({args.min_digits}-{args.max_digits} "
          f"digit operands, disjoint); tokenizer + <think>, </think> (ids {think_ids}); vocabulary "
          f"{base_info['vocab_before']} -> {base_info['vocab_after']} -> {base}")

    # 2. two SFT runs from the same base, same steps and batch: thinking traces vs direct answers
    t = time.perf_counter()
    print(f"[2/5] SFT from the quickstart's {args.base} model {start}, {args.sft_steps} steps x {args.batch_size} each")
    think_dir = _sft(base, data / "think_train.jsonl", out / "sft_think", args.sft_steps, seq_len, args)
    timings["sft_think"] = time.perf_counter() - t
    t = time.perf_counter()
    direct_dir = _sft(base, data / "direct_train.jsonl", out / "sft_direct", args.sft_steps, seq_len, args)
    timings["sft_direct"] = time.perf_counter() - t

    # 3. greedy: direct vs think, and the thinking budget (s1 budget forcing)
    t = time.perf_counter()
    think_model, direct_model = load_model(think_dir), load_model(direct_dir)
    prompts = chat_prompts(tokenizer, test)
    direct_out = _greedy(direct_model, tokenizer, prompts, 16)
    direct_correct = _accuracy(direct_out, test, think=False)
    sweep = budget_sweep(think_model, tokenizer, prompts, test, think_ids, caps, mins, max_tokens)
    natural = next(r for r in sweep if r["kind"] == "natural")
    diffs = [x - y for x, y in zip(natural["correct"], direct_correct)]
    direct = {"greedy": sum(direct_correct) / len(test),
              "greedy_tokens": sum(len(o.token_ids) for o in direct_out) / len(test)}
    gain = {"points": 100 * sum(diffs) / len(diffs), "stderr_points": 100 * bootstrap_stderr(diffs)}
    timings["greedy_and_budget"] = time.perf_counter() - t
    print(f"[3/5] held-out accuracy, greedy, {len(test)} problems: direct {direct['greedy']:.1%}, think "
          f"{natural['accuracy']:.1%} ({gain['points']:+.1f} points, paired s.e. {gain['stderr_points']:.1f}); "
          f"thinking budget:")
    for r in sweep:
        what = (f"forced <= {r['max_thinking_tokens']}" if r["kind"] == "forced" else "natural" if r["kind"] == "natural"
                else f"extended >= {r['min_thinking_tokens']}")
        print(f"        {what:<16} {r['accuracy']:6.1%}   {r['thinking_tokens']:5.1f} thinking tokens, "
              f"{r['waits']:.2f} 'Wait' per reply")

    # 4. reward model on the think model's samples on training problems
    t = time.perf_counter()
    rm_dir, rm_info = train_reward_model(think_dir, tokenizer, train[:args.rm_prompts], out / "rm", args, max_tokens)
    timings["reward_model"] = time.perf_counter() - t
    if rm_dir is not None:
        print(f"[4/5] reward model: {rm_info['pairs']} pairs from {rm_info['prompts']} training problems, "
              f"held-out pair accuracy {rm_info['heldout_pair_accuracy']:.1%} on {rm_info['heldout_pairs']} pairs")

    # 5. N samples per held-out problem; majority, verifier best-of-N, RM best-of-N at every N
    t = time.perf_counter()
    think_samples = [[*s] for s in _sample(think_model, tokenizer, prompts, args.max_n, args.temperature,
                                           max_tokens, args.seed + 1)]
    direct_samples = _sample(direct_model, tokenizer, prompts, args.max_n, args.temperature, 16, args.seed + 1)
    verifier = VerifierScorer(lambda prompt, completion: verify_addition_trace(completion))
    verifier_scores, rm_scores = [], None
    for ids, outs in zip(prompts, think_samples):
        verifier_scores.append(verifier.score_tokens(ids, "", [(o.token_ids, o.text) for o in outs]))
    if rm_dir is not None:
        scorer = RewardScorer(load_reward_model(rm_dir), tokenizer, batch_size=64)
        rm_scores = [scorer.score_tokens(ids, "", [(o.token_ids, o.text) for o in outs])
                     for ids, outs in zip(prompts, think_samples)]
    curves = {"think": selection_curves(think_samples, test, True, ns, verifier_scores, rm_scores),
              "direct": selection_curves(direct_samples, test, False, ns)}
    # How good a judge the process verifier is: of the samples it passes, how many are right, and vice versa.
    flat = [(v, float(_answer_of(o.text, True) == str(a + b))) for (a, b), outs, vs in
            zip(test, think_samples, verifier_scores) for o, v in zip(outs, vs)]
    passed = [c for v, c in flat if v > 0]
    right = [v for v, c in flat if c > 0]
    verifier_info = {"samples": len(flat), "pass_rate": len(passed) / len(flat),
                     "precision": sum(passed) / len(passed) if passed else None,
                     "recall": sum(right) / len(right) if right else None,
                     "sample_accuracy": sum(c for _, c in flat) / len(flat)}
    timings["sampling_and_selection"] = time.perf_counter() - t
    print(f"[5/5] {args.max_n} samples per problem at temperature {args.temperature}; single-sample accuracy "
          f"{verifier_info['sample_accuracy']:.1%}; the verifier passes {verifier_info['pass_rate']:.1%} of samples, "
          f"{verifier_info['precision'] or 0:.1%} of those right (it catches arithmetic slips, not misread digits)")

    summary = {"start": args.base, "start_checkpoint": str(start), "digits": [args.min_digits, args.max_digits], "train_size": len(train),
               "test_size": len(test), "sft_steps": args.sft_steps, "batch_size": args.batch_size,
               "wait_fraction": args.wait_fraction, "temperature": args.temperature, "seq_len": seq_len,
               "base": {**base_info, "path": str(base)}, "think_checkpoint": str(think_dir),
               "direct_checkpoint": str(direct_dir), "direct": direct,
               "think_greedy": natural["accuracy"], "think_vs_direct_gain": gain,
               "budget": [{k: v for k, v in r.items() if k != "correct"} for r in sweep],
               "curves": curves, "reward_model": rm_info, "verifier": verifier_info,
               "timings_s": timings, "minutes": (time.perf_counter() - started) / 60}
    tables = _tables(summary)
    plots = _plots(out, summary["budget"], curves, direct, natural["accuracy"])
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "report.md").write_text(
        f"# quickstart-reason\n\n{len(test)} held-out problems, operands of {args.min_digits}-{args.max_digits} "
        f"digits; SFT {args.sft_steps} steps x {args.batch_size} from the quickstart's {args.base} checkpoint {start}; samples at temperature "
        f"{args.temperature}. Verifier: process verifier (column arithmetic and answer-follows-trace; never the "
        f"true sum). RM: Bradley-Terry on think-model samples of training problems.\n\n{tables}\n\n"
        + "".join(f"![{p.stem}]({p.name})\n" for p in plots))
    print(tables)
    print(f"done in {summary['minutes']:.1f} min; {out / 'summary.json'}, {out / 'report.md'}, "
          + ", ".join(str(p) for p in plots))
    from lmforge.quickstart.report import report_card

    report_card(run)  # the run's card now shows this quickstart's headline numbers too
    print(f"report card of every quickstart on {run}: {run / 'report.md'}")
    return 0
