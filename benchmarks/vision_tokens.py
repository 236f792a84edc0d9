"""Visual token reduction on the quickstart-vision task: accuracy and prefill time vs the share of image tokens kept.

    lmforge quickstart-vision                          # once: trains the LLaVA this measures (~11 min)
    python benchmarks/vision_tokens.py                 # 100 / 50 / 25 / 10 % of image tokens, 500 held-out questions
    python benchmarks/vision_tokens.py --limit 100 --fractions 1,0.25 --methods hired,fastv@1,fastv@2

Methods, all training-free switches of ``LlavaForConditionalGeneration``:
- HiRED-style (``visual_token_fraction``): each image keeps the tokens its vision tower's class token attends to
  most, in order, so the decoder sees (and the engine stores KV for) fewer positions; ``random`` fills the same
  budget with seeded random tokens (the control that says whether the ranking beats chance);
- FastV (``fastv_keep``; ``fastv@K`` prunes after decoder block K, 2 as in the paper): every block before sees all image
  tokens; the prompt's last token's attention in the block before ranks them and the later blocks see only the kept
  ones (prefill only; the paged engine refuses it);
- ToMe (``visual_token_merge``): similar patch tokens merged (size-weighted averages, proportional attention) inside
  the vision tower until the budget is left at the feature layer.
Accuracy is the quickstart's (first word, exact), per question type too; prefill is the median time of one batched
forward of 50 prompts (vision tower included), every configuration timed in the same interleaved rounds (the random
control is not timed: it costs what HiRED costs). Method B (cross-attention) keeps no image tokens in the decoder's
sequence, so none of these applies to it as written.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, default=Path("runs/quickstart/vision"), help="a quickstart-vision output")
    p.add_argument("--fractions", default="1,0.5,0.25,0.1")
    p.add_argument("--methods", default="hired,random,fastv@1,fastv@2,tome",
                   help="comma-separated: hired, random, fastv@K (FastV after decoder block K), tome")
    p.add_argument("--limit", type=int, default=None, help="first N held-out questions (default all)")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--reps", type=int, default=15, help="interleaved prefill timing rounds")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--accuracy-from", type=Path, default=None,
                   help="a --json of an earlier run on the same data: take its accuracy, only re-time the prefill")
    p.add_argument("--plot", type=Path, default=Path("vision_tokens.png"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from lmforge.data.shapes import QUESTION_TYPES, read_shapes_jsonl, score_answer
    from lmforge.quickstart.vision import vision_answers

    summary = args.run / "summary.json"
    if not summary.is_file():
        raise SystemExit(f"{summary} not found: run `lmforge quickstart-vision` first")
    llava = Path(json.loads(summary.read_text())["checkpoints"]["llava"])
    test = read_shapes_jsonl(args.run / "data" / "test.jsonl")[:args.limit]
    fractions = [float(f) for f in args.fractions.split(",")]
    from lmforge.errors import LmforgeError
    from lmforge.models.llava import LlavaForConditionalGeneration

    earlier = json.loads(args.accuracy_from.read_text())["rows"] if args.accuracy_from else None

    def measure(f: float, method: str, reduction: dict) -> dict:
        if earlier is not None:  # re-time only: the accuracy of greedy answers does not change between runs
            key = next(k for k, v in names.items() if v == method) if method != "all" else "hired"
            row = dict(earlier[key][str(f)])
            row.pop("prefill_s", None)
            return row
        answers, cost = vision_answers(llava, test, args.batch_size, reduction=reduction)
        hits = [score_answer(a, r["answer"]) for a, r in zip(answers, test)]
        by_type = {t: statistics.mean(h for h, r in zip(hits, test) if r["type"] == t) for t in QUESTION_TYPES
                   if any(r["type"] == t for r in test)}
        row = {"accuracy": statistics.mean(hits), "by_type": by_type, **cost}
        print(f"{method:>16} kept {f:>5.0%}: accuracy {row['accuracy']:.1%}  prefill "
              f"{cost['prefill_s_per_batch'] * 1e3:7.1f} ms per batch of {cost['batch_size']}  decoder positions "
              f"{cost['decoder_positions']:.0f}  " + "  ".join(f"{t} {a:.0%}" for t, a in by_type.items()), flush=True)
        return row

    n_image = json.loads((llava / "config.json").read_text()).get("image_seq_length") or 16
    switches = {"hired": lambda f: {"visual_token_fraction": f}, "tome": lambda f: {"visual_token_merge": f}}
    names = {"hired": "HiRED-style", "random": "random (control)", "tome": "ToMe"}
    colours = {"hired": "C0", "random": "C7", "tome": "C2"}
    methods = [m for m in args.methods.split(",") if m]
    for m in methods:
        if m.startswith("fastv@") and m[6:].isdigit():
            switches[m] = lambda f, k=int(m[6:]): {"fastv_keep": f, "fastv_layer": k}
            names[m], colours[m] = f"FastV K={m[6:]}", f"C{1 + 2 * int(m[6:]) % 7}"
    unknown = [m for m in methods if m not in names]
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; choose from hired, random, fastv@K, tome")
    base = measure(1.0, "all", {})
    rows: dict[str, dict[float, dict]] = {}
    for method in methods:
        rows[method] = {}
        for f in fractions:
            if f >= 1:
                rows[method][f] = base
                continue
            if method == "random":  # the HiRED budget, filled by seeded random tokens (the scores replaced)
                ranked = LlavaForConditionalGeneration._token_scores
                g = torch.Generator().manual_seed(0)
                LlavaForConditionalGeneration._token_scores = lambda self, hidden: torch.rand(
                    hidden[0].shape[0], self.config.num_image_tokens, generator=g)
                try:
                    rows[method][f] = measure(f, names[method], {"visual_token_fraction": f})
                finally:
                    LlavaForConditionalGeneration._token_scores = ranked
                continue
            try:
                rows[method][f] = measure(f, names[method], switches[method](f))
            except LmforgeError as e:  # e.g. a ToMe budget the tower's blocks cannot reach
                print(f"{names[method]:>16} kept {f:>5.0%}: not run: {e}", flush=True)
    # Prefill time, apart from the accuracy runs: one model, the same batch, every configuration once per round,
    # rounds interleaved, so a change of machine load hits all of them alike.
    timed = [(m, f) for m, by_f in rows.items() for f in by_f if f < 1 and m != "random"]
    seconds = prefill_seconds(llava, test[:args.batch_size], [{}] + [switches[m](f) for m, f in timed], args.reps)
    base["prefill_s"] = seconds[0]
    for (m, f), sec in zip(timed, seconds[1:]):
        rows[m][f]["prefill_s"] = sec
    print(f"\nVisual token reduction on {llava} ({len(test)} held-out questions, {n_image} image tokens per image, "
          f"{torch.get_num_threads()} threads, load {os.getloadavg()[0]:.1f}):")
    print(f"Prefill: median of {args.reps} interleaved rounds, one batch of {args.batch_size}; all tokens "
          f"{1e3 * base['prefill_s']:.1f} ms.")
    print("| method | image tokens kept | accuracy | prefill vs all tokens | decoder positions (first / last block) |")
    print("| --- | --- | --- | --- | --- |")
    for method, by_f in rows.items():
        for f, r in by_f.items():
            first = r["decoder_positions"]
            last = first - (n_image - max(1, round(n_image * f))) if method.startswith("fastv") and f < 1 else first
            speed = f"{r['prefill_s'] / base['prefill_s']:.2f}x" if "prefill_s" in r else "not timed"
            print(f"| {names[method]} | {f:.0%} | {r['accuracy']:.1%} | {speed} | {first:.0f} / {last:.0f} |")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (a, b) = plt.subplots(1, 2, figsize=(9.5, 3.6))
        for method, by_f in rows.items():
            xs = [100 * f for f in by_f]
            style = "x--" if method == "random" else "o-"
            a.plot(xs, [100 * r["accuracy"] for r in by_f.values()], style, label=names[method], color=colours[method])
            if method != "random" and all("prefill_s" in r for r in by_f.values()):
                b.plot(xs, [1e3 * r["prefill_s"] for r in by_f.values()], style, label=names[method],
                       color=colours[method])
        a.set_xlabel("image tokens kept (%)"), a.set_ylabel("accuracy (%)"), a.legend(fontsize=8)
        b.set_xlabel("image tokens kept (%)"), b.set_ylabel(f"prefill ms / batch of {args.batch_size}")
        b.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"wrote {args.plot}")
    except ImportError:
        print("(matplotlib not installed: no plot)")
    result = {"checkpoint": str(llava), "n": len(test),
              "rows": {m: {str(f): r for f, r in by_f.items()} for m, by_f in rows.items()}}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


def prefill_seconds(model_dir: Path, records: list[dict], configs: list[dict], reps: int) -> list[float]:
    """Median seconds of one batched prefill (vision tower included) of ``records`` under each configuration of
    reduction switches, the configurations interleaved round by round."""
    import time

    from lmforge.data.image_processor import load_image, load_processor
    from lmforge.models.checkpoint import load_model

    model, processor = load_model(model_dir), load_processor(model_dir)
    defaults = {name: getattr(model, name) for config in configs for name in config}
    images = [load_image(r["images"][0]) for r in records]
    batches = []
    for config in configs:
        for name, value in {**defaults, **config}.items():
            setattr(model, name, value)
        processor.tokens_per_image = model.tokens_per_image
        batches.append(processor.apply_chat_template([r["messages"][:1] for r in records], images=images))
    times: list[list[float]] = [[] for _ in configs]
    with torch.inference_mode():
        for rep in range(reps + 1):  # the first round warms up
            for i, (config, batch) in enumerate(zip(configs, batches)):
                for name, value in {**defaults, **config}.items():
                    setattr(model, name, value)
                t = time.perf_counter()
                model(**batch, logits_to_keep=1)
                if rep:
                    times[i].append(time.perf_counter() - t)
    return [statistics.median(t) for t in times]


if __name__ == "__main__":
    main()
