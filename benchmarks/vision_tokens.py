"""Visual token reduction on the quickstart-vision task: accuracy and prefill time vs the share of image tokens kept.

    lmforge quickstart-vision                          # once: trains the LLaVA this measures (~11 min)
    python benchmarks/vision_tokens.py                 # 100 / 50 / 25 / 10 % of image tokens, 500 held-out questions
    python benchmarks/vision_tokens.py --limit 100 --fractions 1,0.25

Method: HiRED-style, training-free (``LlavaForConditionalGeneration.visual_token_fraction``): each image keeps the
tokens its vision tower's class token attends to most, in their original order, so the decoder sees (and the
engine stores KV for) fewer positions; a control fills the same budget with seeded random tokens. Accuracy is the quickstart's (first word, exact), per question type too;
prefill is the median time of one batched forward over the prompts (vision tower and scoring included), same
batches for every fraction, interleaved runs. Not measured here: FastV (pruning inside the decoder) and ToMe
(merging inside the vision tower) are not built; Method B (cross-attention) keeps no image tokens in the decoder's
sequence, so a token budget does not apply to it as written.
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
    p.add_argument("--limit", type=int, default=None, help="first N held-out questions (default all)")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, default=None)
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
    from lmforge.models.llava import LlavaForConditionalGeneration

    def measure(f: float, method: str) -> dict:
        answers, cost = vision_answers(llava, test, args.batch_size, visual_token_fraction=f)
        hits = [score_answer(a, r["answer"]) for a, r in zip(answers, test)]
        by_type = {t: statistics.mean(h for h, r in zip(hits, test) if r["type"] == t) for t in QUESTION_TYPES
                   if any(r["type"] == t for r in test)}
        row = {"accuracy": statistics.mean(hits), "by_type": by_type, **cost}
        print(f"{method:>8} kept {f:>5.0%}: accuracy {row['accuracy']:.1%}  prefill "
              f"{cost['prefill_s_per_batch'] * 1e3:7.1f} ms per batch of {cost['batch_size']}  decoder positions "
              f"{cost['decoder_positions']:.0f}  " + "  ".join(f"{t} {a:.0%}" for t, a in by_type.items()), flush=True)
        return row

    rows: dict[float, dict] = {f: measure(f, "HiRED") for f in fractions}
    # The control: the same budget filled by seeded random tokens (the scores replaced), which says whether the
    # class token's attention picks better tokens than chance.
    ranked = LlavaForConditionalGeneration._token_scores
    g = torch.Generator().manual_seed(0)
    LlavaForConditionalGeneration._token_scores = lambda self, hidden: torch.rand(
        hidden[0].shape[0], self.config.num_image_tokens, generator=g)
    try:
        random_rows = {f: measure(f, "random") for f in fractions if f < 1}
    finally:
        LlavaForConditionalGeneration._token_scores = ranked
    base = rows[fractions[0]]
    print(f"\nHiRED-style budget on {llava} ({len(test)} held-out questions, {torch.get_num_threads()} threads, load "
          f"{os.getloadavg()[0]:.1f}):")
    print("| image tokens kept | accuracy | random tokens kept (control) | prefill vs 100% | decoder positions |")
    print("| --- | --- | --- | --- | --- |")
    for f, r in rows.items():
        control = f"{random_rows[f]['accuracy']:.1%}" if f in random_rows else "-"
        print(f"| {f:.0%} | {r['accuracy']:.1%} | {control} | "
              f"{r['prefill_s_per_batch'] / base['prefill_s_per_batch']:.2f}x | {r['decoder_positions']:.0f} |")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.4))
        xs = [100 * f for f in rows]
        a.plot(xs, [100 * r["accuracy"] for r in rows.values()], "o-", label="HiRED-style (LLaVA)")
        a.plot([100 * f for f in random_rows], [100 * r["accuracy"] for r in random_rows.values()], "x--",
               label="random tokens (control)")
        a.set_xlabel("image tokens kept (%)"), a.set_ylabel("accuracy (%)"), a.legend()
        b.plot(xs, [1e3 * r["prefill_s_per_batch"] for r in rows.values()], "o-")
        b.set_xlabel("image tokens kept (%)"), b.set_ylabel(f"prefill ms / batch of {args.batch_size}")
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"wrote {args.plot}")
    except ImportError:
        print("(matplotlib not installed: no plot)")
    result = {"checkpoint": str(llava), "n": len(test), "rows": {str(k): v for k, v in rows.items()},
              "random_rows": {str(k): v for k, v in random_rows.items()}}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
