"""``lmforge interp <subcommand>``: logit lens, direct logit attribution and activation patching.

Each writes a table (``.md``, ``.csv``, ``.json``) and a heatmap ``.png`` into ``--out``. Another module adds
an ``interp`` subcommand with ``@interp_command(name, help)(add_args)`` on its ``run(args)`` and an import
line in ``_load_subcommands`` below.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lmforge.commands import DEVICE_FLAG, AddArgs, Run, command
from lmforge.errors import LmforgeError
from lmforge.io import atomic_file

INTERP_COMMANDS: dict[str, tuple[str, AddArgs, Run]] = {}


def interp_command(name: str, help: str):
    """Register ``fn(args) -> exit code`` with an ``add_args(parser)`` hook as ``lmforge interp <name>``."""

    def wrap(add_args: AddArgs):
        def register(fn: Run):
            INTERP_COMMANDS[name] = (help, add_args, fn)
            return fn

        return register

    return wrap


def _load_subcommands() -> None:
    """Modules that register ``interp`` subcommands; imported when the parser is built."""


def _interp_args(p: argparse.ArgumentParser) -> None:
    _load_subcommands()
    sub = p.add_subparsers(dest="interp_command", required=True, metavar="SUBCOMMAND")
    for name, (help_text, add_args, fn) in INTERP_COMMANDS.items():
        q = sub.add_parser(name, help=help_text, description=help_text)
        add_args(q)
        q.set_defaults(interp_func=fn)


@command("interp", "interpretability: logit lens, direct logit attribution, activation patching (tables + heatmaps)")(
    _interp_args)
def interp_cmd(args: argparse.Namespace) -> int:
    return args.interp_func(args)


# ---- shared pieces ---------------------------------------------------------------------------------
def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="model directory (config.json, safetensors, tokenizer.json)")
    p.add_argument("--out", required=True, help="directory for the table (.md/.csv/.json) and heatmap (.png)")
    p.add_argument("--device", **DEVICE_FLAG)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--chat", action="store_true",
                   help="render each prompt as a user turn through the chat template (generation prompt added)")


def _load(args: argparse.Namespace):
    import torch

    from lmforge.data.tokenizer import load_tokenizer
    from lmforge.models import load_model

    tokenizer = load_tokenizer(args.model)
    model = load_model(args.model, dtype=getattr(torch, args.dtype), device=args.device).eval()
    return model, tokenizer


def _encode_prompt(tokenizer, text: str, flag: str, chat: bool = False) -> list[int]:
    if chat:
        return tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
    ids = tokenizer.encode(text)
    if not ids:
        raise LmforgeError(f"{flag} encodes to no tokens")
    return ids


def _single_token(tokenizer, text: str, flag: str) -> int:
    """The one token ``text`` is (no BOS); several tokens are an error that shows the split."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) != 1:
        pieces = [tokenizer.decode([i], skip_special_tokens=False) for i in ids]
        raise LmforgeError(f"{flag} {text!r} is {len(ids)} tokens {pieces}, not one; pass a single token "
                           "(mind a leading space, e.g. ' Paris')")
    return ids[0]


def _token_labels(tokenizer, ids: Sequence[int]) -> list[str]:
    return [tokenizer.decode([i], skip_special_tokens=False) for i in ids]


def _markdown(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(v: Any) -> str:
        text = f"{v:.4g}" if isinstance(v, float) else str(v)
        return text.replace("|", "\\|").replace("\n", "\\n")

    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_table(out: Path, stem: str, header: Sequence[str], rows: Sequence[Sequence[Any]],
                extra_json: dict[str, Any] | None = None, preamble: str = "") -> list[Path]:
    """``stem``.md (with ``preamble``), ``stem``.csv and ``stem``.json (rows as records plus ``extra_json``)."""
    paths = [out / f"{stem}.md", out / f"{stem}.csv", out / f"{stem}.json"]
    with atomic_file(paths[0]) as f:
        f.write(preamble + _markdown(header, rows))
    with atomic_file(paths[1]) as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    records = [dict(zip(header, row)) for row in rows]
    with atomic_file(paths[2]) as f:
        json.dump({**(extra_json or {}), "rows": records}, f, indent=2, allow_nan=True)
    return paths


def save_heatmap(values, path: Path, row_labels: Sequence[str], col_labels: Sequence[str], title: str,
                 colorbar: str, centered: bool = False, annotations: Sequence[Sequence[str]] | None = None) -> Path:
    """A [rows, cols] heatmap PNG; ``centered`` uses a diverging map symmetric around 0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    data = np.asarray(values, dtype=float)
    rows, cols = data.shape
    fig, ax = plt.subplots(figsize=(max(6.0, min(2 + 0.6 * cols, 24)), max(3.0, min(1.5 + 0.4 * rows, 18))))
    kwargs: dict[str, Any] = {"cmap": "viridis"}
    if centered:
        finite = data[np.isfinite(data)]
        bound = float(np.abs(finite).max()) if finite.size else 1.0
        kwargs = {"cmap": "RdBu", "vmin": -bound or -1.0, "vmax": bound or 1.0}
    image = ax.imshow(data, aspect="auto", **kwargs)
    ax.set_xticks(range(cols), [str(c) for c in col_labels], rotation=90 if cols > 8 else 0, fontsize=8)
    ax.set_yticks(range(rows), [str(r) for r in row_labels], fontsize=8)
    if annotations is not None and rows * cols <= 400:
        for r in range(rows):
            for c in range(cols):
                ax.text(c, r, annotations[r][c], ha="center", va="center", fontsize=6, color="white")
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, label=colorbar)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path, "wb") as f:
        fig.savefig(f, format="png", dpi=120)
    plt.close(fig)
    return path


def _report(paths: Sequence[Path]) -> None:
    print("wrote " + ", ".join(str(p) for p in paths))


# ---- lens ------------------------------------------------------------------------------------------
def _lens_args(p: argparse.ArgumentParser) -> None:
    _model_args(p)
    p.add_argument("--prompt", required=True, help="prompt text")
    p.add_argument("--target", default=None, help="a token whose probability to follow per layer, e.g. ' Paris'")
    p.add_argument("--top-k", type=int, default=5, help="top tokens kept per layer and position")


@interp_command("lens", "logit lens: each layer's residual stream through the final norm and unembedding")(_lens_args)
def lens_cmd(args: argparse.Namespace) -> int:
    from lmforge.interp.lens import logit_lens

    if args.top_k <= 0:
        raise LmforgeError("--top-k must be positive")
    model, tokenizer = _load(args)
    ids = _encode_prompt(tokenizer, args.prompt, "--prompt", args.chat)
    target = _single_token(tokenizer, args.target, "--target") if args.target is not None else None
    lens = logit_lens(model, ids, target=target, top_k=args.top_k)
    inputs = _token_labels(tokenizer, ids)
    header = ["layer", "position", "input_token", "top_tokens", "top_probs"]
    if target is not None:
        header += ["target_prob", "target_rank"]
    rows = []
    for r, label in enumerate(lens.labels):
        for t, token in enumerate(inputs):
            top = lens.top_ids[r, t].tolist()
            row: list[Any] = [label, t, token, " ".join(repr(s) for s in _token_labels(tokenizer, top)),
                              " ".join(f"{p:.4f}" for p in lens.top_probs[r, t].tolist())]
            if target is not None:
                row += [float(lens.target_probs[r, t]), int(lens.target_ranks[r, t])]
            rows.append(row)
    out = Path(args.out)
    what = f"probability of {args.target!r}" if target is not None else "top-1 probability"
    preamble = (f"# Logit lens\n\nPrompt: {args.prompt!r} ({len(ids)} tokens). Row 'embed' is the input to layer 0, "
                f"'L{{i}}' the output of layer i; the last is the model's prediction.\n\n")
    paths = write_table(out, "lens", header, rows, {"prompt": args.prompt, "target": args.target,
                                                    "layers": lens.labels, "input_tokens": inputs}, preamble)
    heat = lens.target_probs if target is not None else lens.top_probs[..., 0]
    top1 = [[repr(s)[1:-1][:6] for s in _token_labels(tokenizer, lens.top_ids[r, :, 0].tolist())]
            for r in range(len(lens.labels))]
    paths.append(save_heatmap(heat.numpy(), out / "lens.png", lens.labels, [repr(s)[1:-1] for s in inputs],
                              f"logit lens: {what} (cells: top-1 token)", what, annotations=top1))
    _report(paths)
    return 0


# ---- direct logit attribution ------------------------------------------------------------------------
def _answer_args(p: argparse.ArgumentParser, wrong_required: bool = False) -> None:
    p.add_argument("--answer", required=True, help="the correct next token, e.g. ' Paris'")
    p.add_argument("--wrong", required=wrong_required, default=None,
                   help="a competing token: the metric is logit[answer] - logit[wrong]")


def _dla_args(p: argparse.ArgumentParser) -> None:
    _model_args(p)
    p.add_argument("--prompt", required=True, help="prompt text")
    _answer_args(p)
    p.add_argument("--position", type=int, default=-1, help="the position whose next-token logit to attribute")


@interp_command("dla", "direct logit attribution per layer (attention, MLP) and per attention head")(_dla_args)
def dla_cmd(args: argparse.Namespace) -> int:
    from lmforge.interp.lens import LogitAttribution, direct_logit_attribution

    model, tokenizer = _load(args)
    ids = _encode_prompt(tokenizer, args.prompt, "--prompt", args.chat)
    answer = _single_token(tokenizer, args.answer, "--answer")
    wrong = _single_token(tokenizer, args.wrong, "--wrong") if args.wrong is not None else None
    dla = direct_logit_attribution(model, ids, answer, wrong, args.position)
    header = ["component", "layer", "head", "direct_logit"]
    rows: list[list[Any]] = [["embed", "", "", dla.embed]]
    for i in range(dla.layers.shape[0]):
        rows.append(["attn", i, "", float(dla.layers[i, 0])])
        rows += [["head", i, h, float(v)] for h, v in enumerate(dla.heads[i].tolist()) if not math.isnan(v)]
        if dla.attn_bias[i] != 0:
            rows.append(["attn_bias", i, "", float(dla.attn_bias[i])])
        rows.append(["mlp", i, "", float(dla.layers[i, 1])])
    rows.append(["final_norm_bias", "", "", dla.bias])
    target = f"logit[{args.answer!r}]" + (f" - logit[{args.wrong!r}]" if wrong is not None else "")
    summed = dla.embed + float(dla.layers.sum()) + dla.bias
    preamble = (f"# Direct logit attribution\n\nPrompt: {args.prompt!r}, position {dla.position}; {target} = "
                f"{dla.total:.4f} (components sum to {summed:.4f}).\n\n{LogitAttribution.APPROXIMATION}\n\n")
    out = Path(args.out)
    paths = write_table(out, "dla", header, rows, {"prompt": args.prompt, "target": target, "total": dla.total,
                                                   "approximation": LogitAttribution.APPROXIMATION}, preamble)
    n, h = dla.heads.shape
    paths.append(save_heatmap(dla.heads.numpy(), out / "dla.png", [f"L{i}" for i in range(n)],
                              [f"H{j}" for j in range(h)], f"direct logit attribution per head: {target}",
                              "direct logit contribution", centered=True))
    _report(paths)
    return 0


# ---- activation patching -------------------------------------------------------------------------------
def _patch_args(p: argparse.ArgumentParser) -> None:
    from lmforge.interp.patching import HEAD_POINTS, POSITION_POINTS

    _model_args(p)
    p.add_argument("--clean", required=True, help="the clean prompt")
    p.add_argument("--corrupted", required=True, help="the corrupted prompt (same number of tokens)")
    _answer_args(p, wrong_required=True)
    p.add_argument("--what", default="resid_pre", choices=[*POSITION_POINTS, *HEAD_POINTS],
                   help="what to patch: a residual/sub-layer point per layer x position, or attn_head per layer x head")


@interp_command("patch", "activation patching of clean into corrupted runs, metric logit[answer] - logit[wrong]")(
    _patch_args)
def patch_cmd(args: argparse.Namespace) -> int:
    from lmforge.interp.patching import activation_patching, logit_diff_metric, metric_value

    model, tokenizer = _load(args)
    clean = _encode_prompt(tokenizer, args.clean, "--clean", args.chat)
    corrupted = _encode_prompt(tokenizer, args.corrupted, "--corrupted", args.chat)
    answer = _single_token(tokenizer, args.answer, "--answer")
    wrong = _single_token(tokenizer, args.wrong, "--wrong")
    if len(clean) != len(corrupted):
        raise LmforgeError(f"--clean is {len(clean)} tokens and --corrupted {len(corrupted)}; patching needs them "
                           f"token-aligned: {_token_labels(tokenizer, clean)} vs {_token_labels(tokenizer, corrupted)}")
    metric = logit_diff_metric(answer, wrong)
    clean_value, corrupted_value = metric_value(model, clean, metric), metric_value(model, corrupted, metric)
    result = activation_patching(model, clean, corrupted, metric, what=args.what)
    gap = clean_value - corrupted_value
    # Recovered fraction: 0 = as corrupted, 1 = as clean (undefined when the prompts score the same).
    recovered = (result - corrupted_value) / gap if abs(gap) > 1e-12 else result * float("nan")
    n = result.shape[0]
    if args.what == "attn_head":
        cols = [f"H{j}" for j in range(result.shape[1])]
        header = ["layer", "head", "patched_metric", "recovered"]
        rows = [[i, j, float(result[i, j]), float(recovered[i, j])]
                for i in range(n) for j in range(result.shape[1]) if not math.isnan(float(result[i, j]))]
    else:
        tokens = _token_labels(tokenizer, clean)
        cols = [f"{t}:{repr(s)[1:-1]}" for t, s in enumerate(tokens)]
        header = ["layer", "position", "clean_token", "patched_metric", "recovered"]
        rows = [[i, t, tokens[t], float(result[i, t]), float(recovered[i, t])]
                for i in range(n) for t in range(result.shape[1])]
    preamble = (f"# Activation patching ({args.what})\n\nClean {args.clean!r}, corrupted {args.corrupted!r}; metric "
                f"logit[{args.answer!r}] - logit[{args.wrong!r}] at the last position: clean {clean_value:.4f}, "
                f"corrupted {corrupted_value:.4f}. 'recovered' = (patched - corrupted) / (clean - corrupted).\n\n")
    out = Path(args.out)
    paths = write_table(out, f"patch_{args.what}", header, rows,
                        {"what": args.what, "clean": args.clean, "corrupted": args.corrupted,
                         "clean_metric": clean_value, "corrupted_metric": corrupted_value}, preamble)
    paths.append(save_heatmap(recovered.numpy(), out / f"patch_{args.what}.png", [f"L{i}" for i in range(n)], cols,
                              f"activation patching ({args.what}): fraction of the logit difference recovered",
                              "recovered", centered=True))
    _report(paths)
    return 0
