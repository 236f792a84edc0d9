"""``lmforge eval``: models × tasks → JSON results and a Markdown table (models side by side)."""

from __future__ import annotations

import argparse
import sys

from lmforge.cli import command


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
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--seed", type=int, default=1234, help="bootstrap and sampling seed")
    p.add_argument("--bootstrap-iters", type=int, default=1000)
    p.add_argument("--log-samples", action="store_true", help="keep per-document outputs in the JSON")


@command("eval", "evaluate models on log-likelihood, generative, perplexity and code tasks")(_eval_args)
def eval_cmd(args: argparse.Namespace) -> int:
    from lmforge.errors import LmforgeError
    from lmforge.eval.runner import evaluate, markdown_table, write_report
    from lmforge.eval.tasks import builtin_tasks

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
                      log_samples=args.log_samples, progress=progress)
    table = markdown_table(report)
    print(table)
    if args.output:
        print(f"results: {write_report(report, args.output)}", file=sys.stderr)
    if args.markdown:
        from lmforge.io import atomic_file

        with atomic_file(args.markdown, "w") as f:
            f.write(table + "\n")
    return 0
