"""``lmforge quickstart``: the whole lifecycle on a laptop CPU in about ten minutes, nothing downloaded.

1. corpus: the Python standard library's own source (present wherever Python is);
2. a byte-level BPE tokenizer trained on it;
3. a small Llama-architecture model pretrained on it, held-out perplexity reported before and after;
4. SFT on generated arithmetic chats with checkable answers, 20% of the mix replayed pretraining text (so the
   model keeps its language modelling), accuracy reported before and after;
5. ``lmforge eval`` of both checkpoints, and a report card (RUN/report.md, RUN/report.json): every stage's figure
   before -> after beside the range several seeds gave (``benchmarks/quickstart_seeds.py``);
6. an HF-format checkpoint and the ``lmforge generate`` command to try it.
"""

from __future__ import annotations

import argparse
import json
import math
import sysconfig
import time
from pathlib import Path

from lmforge.commands import command

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def _args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/quickstart", help="run directory")
    p.add_argument("--corpus-mb", type=float, default=6.0, help="megabytes of stdlib source to use")
    p.add_argument("--pretrain-steps", type=int, default=300)
    p.add_argument("--sft-steps", type=int, default=1500)
    p.add_argument("--test-size", type=int, default=200, help="held-out arithmetic problems")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-tasks", default="arithmetic_chat,larger,stdlib_heldout", help="built-in eval tasks")
    p.add_argument("--eval-limit", type=int, default=100, help="documents per eval task")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's). The figures depend on it: the float summation order "
                        "changes with the thread count, and with it the training trajectory")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="training precision; auto: bf16 autocast where the CPU multiplies bf16 in hardware "
                        "(AVX512-BF16/AMX), else float32")
    p.add_argument("--replay", type=float, default=None,
                   help="share of SFT items that are pretraining windows (default: the SFT recipe's, 0.2); replay "
                        "keeps the model's language modelling, 0 turns it off")


def stdlib_corpus(max_bytes: int) -> list[Path]:
    """Sorted stdlib .py files (tests and vendored packages skipped) up to ``max_bytes`` in total."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = ("test", "tests", "idlelib", "site-packages", "lib2to3", "__pycache__", "ensurepip", "pydoc_data")
    files, total = [], 0
    for f in sorted(root.rglob("*.py")):
        if any(part in skip for part in f.relative_to(root).parts):
            continue
        size = f.stat().st_size
        if size < 500 or size > 400_000:
            continue
        files.append(f)
        total += size
        if total >= max_bytes:
            break
    return files


def _write_corpus(files: list[Path], path: Path) -> None:
    from lmforge.io import atomic_file

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path, "w") as f:
        for file in files:
            f.write(json.dumps({"text": file.read_text(encoding="utf-8", errors="replace"),
                                "source": file.name}) + "\n")


def sft_checkpoint(run: Path) -> Path:
    """The SFT checkpoint a finished ``lmforge quickstart`` run names in its summary.json (the later quickstarts
    start from it)."""
    from lmforge.errors import LmforgeError

    summary = run / "summary.json"
    if not summary.is_file():
        raise LmforgeError(f"{summary} not found: run `lmforge quickstart --out {run}` first")
    checkpoint = json.loads(summary.read_text()).get("checkpoint")
    if not checkpoint:
        raise LmforgeError(f"{summary} names no SFT checkpoint: run `lmforge quickstart --out {run}` again")
    return Path(checkpoint)


def greedy_answers(model, tokenizer, records: list[dict], max_new_tokens: int = 16) -> list[str]:
    """Greedy replies to each record's first user turn, cut at EOS."""
    from lmforge.engine import SamplingParams
    from lmforge.engine.complete import complete

    prompts = [tokenizer.apply_chat_template(r["messages"][:1], add_generation_prompt=True) for r in records]
    outs = complete(model, prompts, SamplingParams(temperature=0.0, max_tokens=max_new_tokens), tokenizer)
    return [samples[0].text for samples in outs]


def answer_accuracy(model_dir: Path, records: list[dict], max_new_tokens: int = 16) -> float:
    """Greedy answers to the user turns, scored by the last number against the reference."""
    from lmforge.data.synthetic import exact_match_accuracy
    from lmforge.data.tokenizer import load_tokenizer
    from lmforge.models.checkpoint import load_model

    model, tokenizer = load_model(model_dir), load_tokenizer(model_dir)  # its eos ids include <|im_end|>
    completions = greedy_answers(model, tokenizer, records, max_new_tokens)
    return exact_match_accuracy(completions, [r["answer"] for r in records])


SKILL_NAMES = {"next": "successor of a number", "larger": "larger of two numbers", "add1": "one-digit addition",
               "add2": "two-digit addition with carries", "all": "all"}


def accuracy_by_skill(model_dir: Path, records: list[dict]) -> dict[str, float]:
    kinds = sorted({r["kind"] for r in records}, key=list(SKILL_NAMES).index)
    out = {k: answer_accuracy(model_dir, [r for r in records if r["kind"] == k]) for k in kinds}
    out["all"] = sum(out[k] * sum(r["kind"] == k for r in records) for k in kinds) / len(records)
    return out


@command("quickstart", "train a tokenizer and a small model on local text, finetune and evaluate it (CPU, ~10 min)")(_args)
def quickstart_cmd(args: argparse.Namespace) -> int:
    import torch

    from lmforge.data.synthetic import skill_examples, write_jsonl
    from lmforge.data.tokenizer import train_bpe_tokenizer
    from lmforge.io import atomic_file
    from lmforge.train.recipe import load_recipe
    from lmforge.train.run import build_trainer

    started = time.perf_counter()
    out = Path(args.out)
    data_dir = out / "data"
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    precision = args.precision
    if precision == "auto":
        from lmforge.train.harness import native_bf16_cpu

        precision = "bf16" if native_bf16_cpu() and not torch.cuda.is_available() else "fp32"
    torch.manual_seed(args.seed)

    # 1-2. corpus and tokenizer
    files = stdlib_corpus(int(args.corpus_mb * 1e6))
    corpus = data_dir / "stdlib.jsonl"
    _write_corpus(files, corpus)
    print(f"[1/5] corpus: {len(files)} files of Python's standard library "
          f"({sum(f.stat().st_size for f in files) / 1e6:.1f} MB) -> {corpus}")
    t = time.perf_counter()
    tokenizer = train_bpe_tokenizer([str(f) for f in files], vocab_size=args.vocab_size)
    tokenizer.save(out / "tokenizer")
    print(f"[2/5] byte-level BPE tokenizer, {tokenizer.vocab_size} tokens, trained in {time.perf_counter() - t:.1f}s "
          f"-> {out / 'tokenizer'}")

    # 3. pretraining
    pre_cfg = load_recipe(RECIPES / "quickstart_pretrain.yaml", [
        f"out_dir={out / 'pretrain'}", f"tokenizer={out / 'tokenizer'}", f"data.train=[{corpus}]",
        f"data.cache_dir={out / 'token_cache'}", f"max_steps={args.pretrain_steps}", f"seed={args.seed}",
        f"model.config.vocab_size={tokenizer.vocab_size}", f"precision={precision}",
    ])
    trainer = build_trainer(pre_cfg)
    print(f"[3/5] pretraining a {trainer.model.config.num_params() / 1e6:.1f}M-parameter Llama on {trainer.data.describe} "
          f"({precision}, {threads} thread{'s' * (threads > 1)})")
    result = trainer.fit()
    before = result.initial_val_loss
    print(f"      held-out perplexity: {math.exp(before):.1f} -> {math.exp(result.val_loss):.2f}  "
          f"(loss curve: {result.run_dir / 'loss.png'})")
    pretrained = result.final_checkpoint / "model"

    # 4. SFT on generated numeric skills with checkable answers
    examples = skill_examples(20_000 + args.test_size, seed=args.seed)
    test, train = examples[: args.test_size], examples[args.test_size:]
    write_jsonl(train, data_dir / "skills_train.jsonl")
    write_jsonl(test, data_dir / "skills_test.jsonl")
    acc_before = accuracy_by_skill(pretrained, test)
    sft_cfg = load_recipe(RECIPES / "quickstart_sft.yaml", [
        f"out_dir={out / 'sft'}", f"model.path={pretrained}", f"tokenizer={out / 'tokenizer'}",
        f"data.train=[{data_dir / 'skills_train.jsonl'}]", f"max_steps={args.sft_steps}", f"seed={args.seed}",
        f"precision={precision}", f"data.cache_dir={out / 'token_cache'}",
        # replay the pretraining run's own training split: same sources, held-out share and seed -> same cache
        f"data.replay.train=[{corpus}]", f"data.replay.val_fraction={pre_cfg.data.val_fraction}",
        *([f"data.replay.fraction={args.replay}"] if args.replay is not None else []),
    ])
    sft = build_trainer(sft_cfg)
    print(f"[4/5] SFT on {sft.data.describe}; held-out accuracy before: {acc_before['all']:.1%}")
    sft_result = sft.fit()
    final = sft_result.final_checkpoint / "model"
    acc_after = accuracy_by_skill(final, test)
    print(f"      held-out accuracy on {len(test)} problems, before -> after SFT:")
    for kind in acc_after:
        print(f"        {kind:<8} {acc_before[kind]:6.1%} -> {acc_after[kind]:6.1%}   {SKILL_NAMES.get(kind, '')}")

    # 5. evaluation table of the checkpoints, side by side
    from lmforge.eval.runner import evaluate, markdown_table, write_report

    report = evaluate([str(pretrained), str(final)], list(args.eval_tasks.split(",")), limit=args.eval_limit)
    write_report(report, out / "eval.json")
    print("      evaluation (lmforge eval), pretrained vs SFT:\n" + markdown_table(report))

    # 6. summary and report card
    summary = {"corpus_files": len(files), "seed": args.seed, "threads": threads, "precision": precision,
               "replay_fraction": sft_cfg.data.replay.fraction, "pretrain_val_ppl_before": math.exp(before),
               "pretrain_val_ppl_after": math.exp(result.val_loss), "sft_accuracy_before": acc_before,
               "sft_accuracy_after": acc_after, "checkpoint": str(final),
               "minutes": (time.perf_counter() - started) / 60}
    bpb = {name: report["results"][str(path)].get("stdlib_heldout", {}).get("bits_per_byte")
           for name, path in (("pretrained", pretrained), ("sft", final))}
    if None not in bpb.values():
        summary["stdlib_bits_per_byte"] = bpb
    with atomic_file(out / "summary.json", "w") as f:
        f.write(json.dumps(summary, indent=2))
    from lmforge.quickstart.report import report_card

    card = report_card(out)
    print("\n" + card["markdown"])
    print(f"[5/5] done in {summary['minutes']:.1f} min. Report card: {out / 'report.md'}. Checkpoint (HF format): {final}\n"
          f"      try it:  lmforge generate --model {final} --chat --prompt 'What number comes after 41?' --max-new-tokens 8\n"
          f"      or:      lmforge generate --model {final} --prompt 'def parse_args(' --max-new-tokens 60 "
          f"--temperature 0.7 --top-p 0.9 --seed 0")
    return 0
