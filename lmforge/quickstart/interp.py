"""``lmforge quickstart-interp``: look inside the quickstart's SFT model, on CPU in a few minutes.

Starts from the quickstart's SFT checkpoint (``lmforge quickstart`` first) and one skill, "which is larger,
a or b?" with two-digit a and b whose tens digits differ, so the first answer token (the tens digit of the
larger number) decides the answer. On problems the SFT data never showed:
  1. logit lens: at which layer the answer's tens digit becomes the model's prediction at the last position
     (mean probability and top-1 rate per layer, and one prompt's lens over every position);
  2. activation patching: clean "Which is larger, 23 or 71?" (answer 7) vs corrupted "... 83 or 71?"
     (answer 8), the corruption at a's tens digit only; restoring one clean residual-stream vector at one
     (layer, position), or one attention head's output, shows which carry the comparison (normalised logit
     difference: 0 = corrupted, 1 = clean);
  3. steering: a contrastive (CAA) vector, mean residual of "What is a + b?" prompts minus that of "Which is
     larger" prompts at the last prompt position, added at one layer with a scale while the serving engine
     answers held-out "Which is larger" prompts; the measured behaviour is the rate of replies in the
     addition format ("a + b = c"): a dose-response curve per layer;
  4. a TopK sparse autoencoder on the middle layer's residual stream, trained on activations streamed over
     the model's chat transcripts, with its metrics (L0, explained variance, CE loss recovered on the
     assistant's tokens, dead latents) on the held-out problems and the top-activating contexts of its most
     frequent latents.
Tables, PNG plots and OUT/summary.json; OUT/report.md puts them on one page.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

from lmforge.commands import DEVICE_FLAG, command
from lmforge.quickstart.pretrain_sft import sft_checkpoint


def _args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", default="runs/quickstart", help="the quickstart's run directory")
    p.add_argument("--out", default=None, help="default: RUN/interp")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", **DEVICE_FLAG)
    p.add_argument("--lens-prompts", type=int, default=100, help="held-out problems for the logit lens")
    p.add_argument("--patch-pairs", type=int, default=32, help="clean/corrupted pairs for activation patching")
    p.add_argument("--contrast-pairs", type=int, default=64, help="prompt pairs the steering vector is made from")
    p.add_argument("--steer-prompts", type=int, default=60, help="held-out prompts per steering measurement")
    p.add_argument("--steer-scales", default="0,0.25,0.5,0.75,1,1.25,1.5",
                   help="multiples of the CAA vector (the raw mean difference)")
    p.add_argument("--sae-steps", type=int, default=600)
    p.add_argument("--sae-expansion", type=int, default=4, help="SAE latents per residual dimension")
    p.add_argument("--sae-k", type=int, default=32, help="TopK: active latents per token")
    p.add_argument("--sae-seq-len", type=int, default=128, help="tokens per window the SAE's activations come from")


# ---- problems --------------------------------------------------------------------------------------------
def _prompt(a: int, b: int) -> str:
    return f"Which is larger, {a} or {b}?"


def _pairs(n: int, rng: random.Random, exclude: set[str]) -> list[tuple[int, int]]:
    """``n`` distinct (a, b), both two-digit with different tens digits, whose prompts are not in ``exclude``."""
    out: list[tuple[int, int]] = []
    seen = set(exclude)
    while len(out) < n:
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        if a // 10 != b // 10 and _prompt(a, b) not in seen:
            seen.add(_prompt(a, b))
            out.append((a, b))
    return out


def _corrupt(a: int, b: int, rng: random.Random) -> int:
    """a' with a new tens digit (ones kept) that flips which number is larger, so the answer's tens digit
    changes: the corruption touches one token."""
    if a > b:
        tens = rng.randint(1, b // 10 - 1) if b // 10 > 1 else None
    else:
        tens = rng.randint(b // 10 + 1, 9) if b // 10 < 9 else None
    return -1 if tens is None else 10 * tens + a % 10


# ---- 1. logit lens ---------------------------------------------------------------------------------------
def _lens_study(model, chat, digit, pairs, out: Path) -> dict[str, Any]:
    from lmforge.interp.cli import save_heatmap
    from lmforge.interp.lens import logit_lens

    probs, hits, labels = None, None, []
    for a, b in pairs:
        lens = logit_lens(model, chat(_prompt(a, b)), target=digit[max(a, b) // 10], top_k=1)
        p, hit = lens.target_probs[:, -1], (lens.target_ranks[:, -1] == 0).float()
        probs, hits, labels = (p, hit, lens.labels) if probs is None else (probs + p, hits + hit, labels)
    probs, hits = (probs / len(pairs)).tolist(), (hits / len(pairs)).tolist()
    final = hits[-1]
    emerges = next((labels[i] for i, h in enumerate(hits) if h >= 0.5 * final and final > 0), None)

    # One prompt, every position: where in the prompt does the answer's digit surface?
    a, b = pairs[0]
    ids = chat(_prompt(a, b))
    lens = logit_lens(model, ids, target=digit[max(a, b) // 10], top_k=1)
    tokens = [_token_label(chat.tokenizer, t) for t in ids]
    save_heatmap(lens.target_probs.numpy(), out / "lens.png", lens.labels, tokens,
                 f"logit lens: p('{max(a, b) // 10}') for {_prompt(a, b)!r}", "probability",
                 annotations=[[_token_label(chat.tokenizer, t)[:6] for t in row] for row in lens.top_ids[..., 0]])
    return {"layers": labels, "answer_prob": probs, "answer_top1": hits, "prompts": len(pairs),
            "emerges_at": emerges}


def _token_label(tokenizer, token: int) -> str:
    text = tokenizer.decode([int(token)])
    return repr(text)[1:-1] or f"<{token}>"


# ---- 2. activation patching ------------------------------------------------------------------------------
def _patching_study(model, chat, digit, pairs, rng: random.Random, out: Path) -> dict[str, Any]:
    import torch

    from lmforge.interp.cli import save_heatmap
    from lmforge.interp.patching import activation_patching, metric_value

    clean, corrupted, answer, wrong = [], [], [], []
    for a, b in pairs:
        a2 = _corrupt(a, b, rng)
        if a2 < 10:
            continue
        clean.append(chat(_prompt(a, b)))
        corrupted.append(chat(_prompt(a2, b)))
        answer.append(digit[max(a, b) // 10])
        wrong.append(digit[max(a2, b) // 10])
    clean_ids, corrupted_ids = torch.tensor(clean), torch.tensor(corrupted)
    rows = torch.arange(len(clean))
    answer_t, wrong_t = torch.tensor(answer), torch.tensor(wrong)

    def logit_diff(logits):  # mean over pairs of logit[clean answer] - logit[corrupted answer], last position
        last = logits[:, -1].float()
        return (last[rows, answer_t] - last[rows, wrong_t]).mean()

    clean_value = metric_value(model, clean_ids, logit_diff)
    corrupted_value = metric_value(model, corrupted_ids, logit_diff)
    span = clean_value - corrupted_value

    def normalise(t):
        return (t - corrupted_value) / span

    resid = normalise(activation_patching(model, clean_ids, corrupted_ids, logit_diff, what="resid_pre"))
    heads = normalise(activation_patching(model, clean_ids, corrupted_ids, logit_diff, what="attn_head"))
    tokens = [_token_label(chat.tokenizer, t) for t in clean[0]]
    a_tens = next(i for i, (x, y) in enumerate(zip(clean[0], corrupted[0])) if x != y)
    tokens[a_tens] = "a:tens*"
    layers = [f"L{i}" for i in range(model.config.num_layers)]
    save_heatmap(resid.numpy(), out / "patching_resid.png", layers, tokens,
                 f"patching resid_pre, {len(clean)} pairs (1 = clean answer restored)", "restored fraction",
                 centered=True)
    save_heatmap(heads.numpy(), out / "patching_heads.png", layers, [f"H{h}" for h in range(heads.shape[1])],
                 "patching each head's output (hook_z), all positions", "restored fraction", centered=True,
                 annotations=[[f"{v:.2f}" for v in row] for row in heads.tolist()])
    # Where the information sits, layer by layer: the position whose restoration recovers most.
    carrier = [(layers[i], tokens[int(resid[i].argmax())], float(resid[i].max())) for i in range(len(layers))]
    return {"pairs": len(clean), "clean_logit_diff": clean_value, "corrupted_logit_diff": corrupted_value,
            "tokens": tokens, "corrupted_position": a_tens, "resid_pre": resid.tolist(), "heads": heads.tolist(),
            "best_position_per_layer": carrier}


# ---- 3. steering -----------------------------------------------------------------------------------------
def _is_addition_format(text: str) -> bool:
    return "+" in text or "=" in text


def _steering_study(model, chat, pairs, exclude: set[str], rng: random.Random, scales: list[float],
                    n_contrast: int, out: Path) -> dict[str, Any]:
    from lmforge.data.synthetic import extract_last_number
    from lmforge.engine import SamplingParams
    from lmforge.engine.complete import complete
    from lmforge.interp.steering import Steering, contrastive_vector

    positive, negative = [], []
    while len(positive) < n_contrast:
        x, y = rng.randint(10, 50), rng.randint(10, 50)
        if f"What is {x} + {y}?" not in exclude:
            positive.append(chat(f"What is {x} + {y}?"))
    negative = [chat(_prompt(a, b)) for a, b in _pairs(n_contrast, rng, exclude)]
    n_layers = model.config.num_layers
    vector = contrastive_vector(model, chat.tokenizer, positive, negative, layers=range(n_layers))
    prompts = [chat(_prompt(a, b)) for a, b in pairs]
    answers = [str(max(a, b)) for a, b in pairs]
    curves: dict[str, dict[str, list[float]]] = {}
    for layer in range(n_layers):
        one = type(vector)({layer: vector.directions[layer]}, model_hint=vector.model_hint)
        rates, correct = [], []
        for scale in scales:
            params = SamplingParams(temperature=0.0, max_tokens=10, steering=Steering(one, scale) if scale else None)
            texts = [s[0].text for s in complete(model, prompts, params, chat.tokenizer)]
            rates.append(sum(map(_is_addition_format, texts)) / len(texts))
            correct.append(sum(extract_last_number(t) == a for t, a in zip(texts, answers)) / len(texts))
        curves[f"L{layer}"] = {"addition_format_rate": rates, "larger_accuracy": correct,
                               "vector_norm": float(vector.directions[layer].norm())}
    _plot_dose_response(scales, curves, out / "steering.png")
    best = max(curves, key=lambda k: curves[k]["addition_format_rate"][-1])
    return {"scales": scales, "layers": curves, "best_layer": best, "prompts": len(prompts),
            "contrast_pairs": n_contrast}


def _plot_dose_response(scales: list[float], curves: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lmforge.io import atomic_file

    fig, ax = plt.subplots(figsize=(6, 4))
    for layer, c in curves.items():
        ax.plot(scales, c["addition_format_rate"], marker="o", label=f"{layer}: addition format")
    ax.set_xlabel("scale (x CAA vector)")
    ax.set_ylabel("rate of 'a + b = c' replies")
    ax.set_title("steering 'Which is larger' toward the addition format")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_file(path, "wb") as f:
        fig.savefig(f, format="png", dpi=120)
    plt.close(fig)


# ---- 4. sparse autoencoder -------------------------------------------------------------------------------
def _sae_study(model, tokenizer, run: Path, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from lmforge.data.pretrain import build_token_cache
    from lmforge.interp.sae import (
        SAETrainConfig,
        SparseAutoencoder,
        evaluate_sae,
        features_markdown,
        model_activations,
        save_sae,
        shuffled_batches,
        token_batches,
        top_activating_contexts,
        train_sae,
    )
    from lmforge.io import atomic_file, iter_jsonl

    # The SFT model's own domain: its chat transcripts (it has forgotten much of the pretraining text, so CE on
    # stdlib code would measure that, not the SAE). A deterministic 5% of them is held out for the metrics.
    corpus = out / "sae" / "corpus.jsonl"
    corpus.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(corpus) as f:
        for _, rec in iter_jsonl(run / "data" / "skills_train.jsonl"):
            f.write(json.dumps({"text": tokenizer.apply_chat_template(rec["messages"], tokenize=False)}) + "\n")
    caches = build_token_cache([corpus], tokenizer, out / "sae" / "token_cache", val_fraction=0.05, seed=args.seed)
    held_out = caches.val if caches.val is not None else caches.train
    layer = model.config.num_layers // 2 - 1  # the output of the first half of the stack
    hook = f"blocks.{layer}.hook_resid_post"
    width = model.config.hidden_size
    torch.manual_seed(args.seed)
    sae = SparseAutoencoder(width, args.sae_expansion * width, "topk", k=args.sae_k, hook_name=hook,
                            model_name="quickstart-sft", device=model.device, seed=args.seed)
    windows = token_batches(caches.train, args.sae_seq_len, 16, seed=args.seed, repeat=True)
    batches = shuffled_batches(model_activations(model, hook, windows), 2048, 16384, seed=args.seed)
    result = train_sae(sae, batches, SAETrainConfig(steps=args.sae_steps, log_every=max(args.sae_steps // 4, 1)),
                       progress=lambda r: print(f"  sae step {r.step}: explained var {r.explained_variance:.3f}, "
                                                f"L0 {r.l0:.1f}, dead {r.dead_latents}", file=sys.stderr))
    save_sae(sae, out / "sae", context_size=args.sae_seq_len)
    # Metrics on the held-out problems (skills_test.jsonl): CE on the assistant's tokens only, the tokens
    # the SFT model was trained to produce (its CE on the user's random numbers is large and meaningless).
    test = [rec for _, rec in iter_jsonl(run / "data" / "skills_test.jsonl")]
    metrics = evaluate_sae(model, sae, _assistant_windows(tokenizer, test, args.sae_seq_len, 16))
    # Top contexts of the latents that fire most often on held-out text (dense latents are the readable ones
    # at this scale; the rarest are mostly noise).
    scan = list(token_batches(held_out, args.sae_seq_len, 16, seed=args.seed + 2, max_tokens=16384))
    density = torch.zeros(sae.d_sae)
    with torch.no_grad():
        for batch in scan:
            x = next(model_activations(model, hook, [batch]))
            density += (sae.encode(x.reshape(-1, width)) > 0).float().sum(0).cpu()
    chosen = density.topk(8).indices.tolist()
    features = top_activating_contexts(model, sae, scan, latents=chosen, top_n=5, context=6,
                                       decode_token=lambda t: tokenizer.decode([t]))
    with atomic_file(out / "sae" / "features.md") as f:
        f.write(features_markdown(features, hook))
    return {"hook": hook, "d_sae": sae.d_sae, "k": args.sae_k, "steps": args.sae_steps,
            "metrics": metrics.as_dict(), "table": metrics.table(),
            "train_explained_variance": [r.explained_variance for r in result.history]}


def _assistant_windows(tokenizer, records: list[dict], seq_len: int, batch_size: int):
    """The records' chat transcripts packed end to end into windows {input_ids, labels} [B, seq_len] whose
    labels are the next token where that token is the assistant's, else ignored."""
    import torch

    from lmforge.data.sft import IGNORE_INDEX

    ids: list[int] = []
    targets: list[int] = []
    for rec in records:
        tokens, mask = tokenizer.apply_chat_template(rec["messages"], return_assistant_mask=True)
        ids += tokens
        targets += [t if m else IGNORE_INDEX for t, m in zip(tokens, mask)]
    n = (len(ids) - 1) // seq_len
    inputs = torch.tensor(ids[:n * seq_len]).view(n, seq_len)
    labels = torch.tensor(targets[1:n * seq_len + 1]).view(n, seq_len)
    for i in range(0, n, batch_size):
        yield {"input_ids": inputs[i:i + batch_size], "labels": labels[i:i + batch_size]}


# ---- the command -----------------------------------------------------------------------------------------
class _Chat:
    """Prompt text -> chat-templated token ids (the format the SFT model answers in)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def __call__(self, text: str) -> list[int]:
        return self.tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)


@command("quickstart-interp", "look inside the quickstart's SFT model: logit lens, patching, steering, an SAE (CPU)")(
    _args)
def quickstart_interp_cmd(args: argparse.Namespace) -> int:
    import torch

    from lmforge.data.tokenizer import load_tokenizer
    from lmforge.errors import LmforgeError
    from lmforge.io import iter_jsonl
    from lmforge.models.checkpoint import load_model

    started = time.perf_counter()
    run = Path(args.run)
    sft_dir = sft_checkpoint(run)
    out = Path(args.out) if args.out else run / "interp"
    out.mkdir(parents=True, exist_ok=True)
    try:
        scales = [float(s) for s in args.steer_scales.split(",") if s.strip()]
    except ValueError as e:
        raise LmforgeError(f"--steer-scales must be comma-separated numbers: {e}") from None
    torch.manual_seed(args.seed)
    model = load_model(sft_dir, device=args.device).eval()
    tokenizer = load_tokenizer(sft_dir)
    chat = _Chat(tokenizer)
    digit = {d: tokenizer.encode(str(d))[-1] for d in range(10)}
    if any(len(tokenizer.encode(str(d))) != 1 for d in range(10)):
        raise LmforgeError("this study needs a tokenizer that encodes each digit as one token")
    seen = {rec["messages"][0]["content"] for _, rec in iter_jsonl(run / "data" / "skills_train.jsonl")}
    rng = random.Random(args.seed)
    test = _pairs(args.lens_prompts + args.patch_pairs + args.steer_prompts, rng, seen)
    lens_pairs = test[:args.lens_prompts]
    patch_pairs = test[args.lens_prompts:args.lens_prompts + args.patch_pairs]
    steer_pairs = test[args.lens_prompts + args.patch_pairs:]
    exclude = seen | {_prompt(a, b) for a, b in test}

    results: dict[str, Any] = {"sft_checkpoint": str(sft_dir), "seed": args.seed}
    timings = {}
    t = time.perf_counter()
    results["logit_lens"] = _lens_study(model, chat, digit, lens_pairs, out)
    timings["logit_lens"] = time.perf_counter() - t
    t = time.perf_counter()
    results["patching"] = _patching_study(model, chat, digit, patch_pairs, rng, out)
    timings["patching"] = time.perf_counter() - t
    t = time.perf_counter()
    results["steering"] = _steering_study(model, chat, steer_pairs, exclude, rng, scales, args.contrast_pairs, out)
    timings["steering"] = time.perf_counter() - t
    t = time.perf_counter()
    results["sae"] = _sae_study(model, tokenizer, run, out, args)
    timings["sae"] = time.perf_counter() - t
    results["seconds"] = timings
    results["minutes"] = (time.perf_counter() - started) / 60
    report = _report(results)
    (out / "report.md").write_text(report)
    (out / "summary.json").write_text(json.dumps({k: v for k, v in results.items()}, indent=2))
    print(report)
    print(f"done in {results['minutes']:.1f} min; report: {out / 'report.md'}, summary: {out / 'summary.json'}")
    from lmforge.quickstart.report import report_card

    report_card(run)  # the run's card now shows this quickstart's headline numbers too
    print(f"report card of every quickstart on {run}: {run / 'report.md'}")
    return 0


def _report(r: dict[str, Any]) -> str:
    lens, patch, steer, sae = r["logit_lens"], r["patching"], r["steering"], r["sae"]
    lines = ["# quickstart-interp", "", f"SFT model: `{r['sft_checkpoint']}`", "",
             f"## Logit lens ({lens['prompts']} held-out 'Which is larger, a or b?' prompts)", "",
             "| residual stream after | p(answer's tens digit) | answer is top-1 |", "|---|---|---|"]
    lines += [f"| {name} | {p:.3f} | {h:.0%} |" for name, p, h in zip(lens["layers"], lens["answer_prob"],
                                                                          lens["answer_top1"])]
    lines += ["", f"The answer emerges at **{lens['emerges_at']}** (first layer with at least half the final top-1 "
              "rate). One prompt over every position: `lens.png`.", "",
              f"## Activation patching ({patch['pairs']} pairs; corruption at a's tens digit)", "",
              f"Logit difference clean {patch['clean_logit_diff']:.2f}, corrupted {patch['corrupted_logit_diff']:.2f}."
              " Restoring the clean residual stream (resid_pre) at one position, per layer: the position that "
              "restores most —", "", "| layer | position | restored |", "|---|---|---|"]
    lines += [f"| {layer} | `{pos}` | {v:.2f} |" for layer, pos, v in patch["best_position_per_layer"]]
    lines += ["", "Heatmaps: `patching_resid.png` (layer x position), `patching_heads.png` (layer x head).", "",
              f"## Steering ({steer['prompts']} held-out prompts; CAA vector from {steer['contrast_pairs']} "
              "'What is a + b?' vs 'Which is larger' prompts)", "",
              "Rate of replies in the addition format, by layer and scale:", "",
              "| layer | " + " | ".join(f"x{s:g}" for s in steer["scales"]) + " |",
              "|---|" + "---|" * len(steer["scales"])]
    for layer, c in steer["layers"].items():
        lines.append(f"| {layer} | " + " | ".join(f"{v:.0%}" for v in c["addition_format_rate"]) + " |")
    best = steer["layers"][steer["best_layer"]]
    lines += ["", f"At {steer['best_layer']} the 'which is larger' accuracy goes "
              + " -> ".join(f"{v:.0%}" for v in best["larger_accuracy"]) + " over the same scales. Plot: `steering.png`.",
              "", f"## Sparse autoencoder (TopK, k={sae['k']}, {sae['d_sae']} latents at `{sae['hook']}`, "
              f"{sae['steps']} steps; held-out metrics)", "", sae["table"], "",
              "Top-activating contexts of the 8 most frequent latents: `sae/features.md`.", "",
              f"Run time: {r['minutes']:.1f} min (" + ", ".join(f"{k} {v:.0f} s" for k, v in r["seconds"].items()) + ")."]
    return "\n".join(lines) + "\n"
