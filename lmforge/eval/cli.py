"""``lmforge eval``: models × tasks → JSON results and a Markdown table (models side by side)."""

from __future__ import annotations

import argparse
import sys

from lmforge.commands import DEVICE_FLAG, command


def _eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", action="append", required=True, metavar="PATH",
                   help="model directory (repeat to compare models)")
    from lmforge.eval.tasks import builtin_tasks

    p.add_argument("--tasks", required=True,
                   help=f"comma-separated task YAML paths or built-in names ({', '.join(builtin_tasks())})")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N docs of each task")
    p.add_argument("--output", default=None, help="write the JSON results here")
    p.add_argument("--markdown", default=None, help="also write the Markdown table here")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", **DEVICE_FLAG)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--seed", type=int, default=1234, help="bootstrap and sampling seed")
    p.add_argument("--bootstrap-iters", type=int, default=1000)
    p.add_argument("--log-samples", action="store_true", help="keep per-document outputs in the JSON")
    p.add_argument("--task-option", action="append", default=[], metavar="[TASK:]KEY=VALUE",
                   help="override a task field for this run (repeatable; VALUE is YAML): chat=true renders "
                        "prompts through the model's chat template; also system, fewshot, fewshot_seed, "
                        "max_new_tokens, stop, temperature, samples, k, timeout_s, memory_mb. Without TASK: "
                        "every task it applies to. The result is named e.g. larger[chat=true]")


@command("eval", "evaluate models on log-likelihood, generative, perplexity and code tasks")(_eval_args)
def eval_cmd(args: argparse.Namespace) -> int:
    from lmforge.errors import LmforgeError
    from lmforge.eval.runner import evaluate, markdown_table, write_report
    from lmforge.eval.tasks import builtin_tasks, parse_task_options

    names = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not names:
        raise LmforgeError(f"--tasks is empty; built-in tasks: {', '.join(builtin_tasks())}")
    if args.batch_size < 1:
        raise LmforgeError("--batch-size must be >= 1")

    def progress(model: str, task: str, r: dict) -> None:
        shown = ", ".join(f"{k}={v:.4f}" for k, v in r.items()
                          if isinstance(v, float) and not k.endswith("_stderr") and k != "seconds")
        print(f"{model} | {task}: {shown} (n={r['n']}, {r['seconds']:.1f}s)", file=sys.stderr)

    report = evaluate(args.model, names, limit=args.limit, batch_size=args.batch_size, device=args.device,
                      dtype=args.dtype, bootstrap_iters=args.bootstrap_iters, seed=args.seed,
                      log_samples=args.log_samples, progress=progress,
                      task_options=parse_task_options(args.task_option))
    table = markdown_table(report)
    print(table)
    if args.output:
        print(f"results: {write_report(report, args.output)}", file=sys.stderr)
    if args.markdown:
        from lmforge.io import atomic_file

        with atomic_file(args.markdown, "w") as f:
            f.write(table + "\n")
    return 0


def _judge_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--a", required=True, help="JSONL of model A: records with 'prompt' and 'output'")
    p.add_argument("--b", required=True, help="JSONL of model B, same prompts in the same order")
    p.add_argument("--judge-model", help="a local lmforge/HF model directory as the judge")
    p.add_argument("--judge-url", help="an OpenAI-compatible endpoint as the judge, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--judge-name", default="judge", help="model name to send to the endpoint")
    p.add_argument("--api-key", default=None)
    p.add_argument("--output", default=None, help="write per-item preferences and the summary as JSON")


def _read_outputs(path: str) -> list[dict]:
    from pathlib import Path

    from lmforge.errors import LmforgeError
    from lmforge.io import iter_jsonl

    file = Path(path)
    if not file.is_file():
        raise LmforgeError(f"{file} does not exist")
    rows = []
    for where, rec in iter_jsonl(file):
        for field in ("prompt", "output"):
            if not isinstance(rec, dict) or not isinstance(rec.get(field), str):
                raise LmforgeError(f"{where}: needs a string '{field}'")
        rows.append(rec)
    return rows


@command("judge", "pairwise LLM-as-judge of two models' outputs: win rate and length-controlled win rate")(_judge_args)
def judge_cmd(args: argparse.Namespace) -> int:
    import json

    from lmforge.errors import LmforgeError
    from lmforge.eval.judge import EndpointJudge, LogprobJudge, length_controlled_win_rate, pairwise_preferences, win_rate

    if bool(args.judge_model) == bool(args.judge_url):
        raise LmforgeError("give exactly one of --judge-model and --judge-url")
    a, b = _read_outputs(args.a), _read_outputs(args.b)
    if len(a) != len(b) or any(x["prompt"] != y["prompt"] for x, y in zip(a, b)):
        raise LmforgeError(f"{args.a} and {args.b} must hold the same prompts in the same order")
    if args.judge_url:
        judge = EndpointJudge(args.judge_url, args.judge_name, api_key=args.api_key)
    else:
        from lmforge import load_model, load_tokenizer

        judge = LogprobJudge(load_model(args.judge_model), load_tokenizer(args.judge_model))
    prefs = pairwise_preferences(judge, [r["prompt"] for r in a], [r["output"] for r in a], [r["output"] for r in b])
    raw = win_rate(prefs.p)
    lc = length_controlled_win_rate(prefs.p, [len(r["output"]) for r in a], [len(r["output"]) for r in b])
    print(f"A vs B over {len(a)} prompts (both orders): win rate {raw:.1%}, length-controlled {lc:.1%}, "
          f"mean position disagreement {float(prefs.disagreement.mean()):.3f}")
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"win_rate": raw, "length_controlled_win_rate": lc, "p": prefs.p.tolist(),
                       "disagreement": prefs.disagreement.tolist()}, f, indent=2)
    return 0
