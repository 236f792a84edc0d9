"""``lmforge sae train|eval|features``: sparse autoencoders on a hook's activations (see ``lmforge.interp.sae``).

Every subcommand reads the model, its tokenizer and a corpus (tokenized once into the same memory-mapped
token cache as pretraining); ``train`` fits on the training split and reports metrics on the held-out split,
``eval`` and ``features`` read the held-out split (the training split when the corpus is too small to have one).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from lmforge.commands import DEVICE_FLAG, command


def _corpus_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="PATH", help="model directory (config.json, safetensors)")
    p.add_argument("--data", required=True, nargs="+", metavar="PATH",
                   help="text files, JSONL/Parquet (a 'text' field) or directories, as for pretraining")
    p.add_argument("--tokenizer", default=None, metavar="PATH", help="tokenizer directory; default: --model")
    p.add_argument("--text-field", default="text", help="JSONL/Parquet field holding the text")
    p.add_argument("--val-fraction", type=float, default=0.05,
                   help="documents held out for evaluation (same split in train, eval and features)")
    p.add_argument("--cache-dir", default=None, metavar="DIR",
                   help="token cache; default: token_cache beside the SAE directory")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per model window; default: %(default)s")
    p.add_argument("--model-batch-size", type=int, default=8, help="windows per forward pass; default: %(default)s")
    p.add_argument("--device", **DEVICE_FLAG)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="the model's dtype (the SAE is float32)")
    p.add_argument("--seed", type=int, default=0)


def _sae_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="sae_command", required=True, metavar="SUBCOMMAND")

    train = sub.add_parser("train", help="train an SAE on activations streamed from the model",
                           description="train an SAE on activations streamed from the model")
    _corpus_flags(train)
    train.add_argument("--hook", required=True, help="hook point, e.g. blocks.2.hook_resid_post")
    train.add_argument("--out", required=True, metavar="DIR", help="SAE directory (cfg.json, sae_weights.safetensors)")
    train.add_argument("--architecture", default="topk", choices=["topk", "jumprelu", "relu"])
    train.add_argument("--d-sae", type=int, default=None, help="number of latents; default: --expansion x width")
    train.add_argument("--expansion", type=int, default=8, help="latents per activation dimension; default: %(default)s")
    train.add_argument("--k", type=int, default=32, help="TopK: active latents per token; default: %(default)s")
    train.add_argument("--steps", type=int, default=2000, help="default: %(default)s")
    train.add_argument("--batch-size", type=int, default=4096, help="activations per step; default: %(default)s")
    train.add_argument("--buffer-tokens", type=int, default=65536,
                       help="shuffle buffer (activations held at once, >= 2 batches); default: %(default)s")
    train.add_argument("--lr", type=float, default=4e-4, help="default: %(default)s")
    train.add_argument("--auxk-coefficient", type=float, default=1 / 32, help="TopK: AuxK weight; default: 1/32")
    train.add_argument("--l1-coefficient", type=float, default=5.0, help="ReLU: L1 weight; default: %(default)s")
    train.add_argument("--l0-coefficient", type=float, default=0.1, help="JumpReLU: L0 weight; default: %(default)s")
    train.add_argument("--jumprelu-bandwidth", type=float, default=0.05, help="JumpReLU: STE width; default: %(default)s")
    train.add_argument("--jumprelu-init-threshold", type=float, default=0.01, help="default: %(default)s")
    train.add_argument("--dead-after-steps", type=int, default=200,
                       help="a latent silent this many steps is dead; default: %(default)s")
    train.add_argument("--resample-every", type=int, default=0,
                       help="ReLU/JumpReLU: resample dead latents every N steps (0: never)")
    train.add_argument("--eval-tokens", type=int, default=32768,
                       help="held-out tokens for the final metrics; default: %(default)s")
    train.add_argument("--log-every", type=int, default=100)

    evaluate = sub.add_parser("eval", help="L0, explained variance, MSE, CE loss recovered, dead latents",
                              description="L0, explained variance, MSE, CE loss recovered, dead latents")
    _corpus_flags(evaluate)
    evaluate.add_argument("--sae", required=True, metavar="DIR", help="SAE directory (SAELens format)")
    evaluate.add_argument("--tokens", type=int, default=32768, help="tokens to evaluate on; default: %(default)s")
    evaluate.add_argument("--json", default=None, metavar="FILE", help="also write the metrics as JSON")

    features = sub.add_parser("features", help="top-activating contexts per latent (JSON and Markdown)",
                              description="top-activating contexts per latent (JSON and Markdown)")
    _corpus_flags(features)
    features.add_argument("--sae", required=True, metavar="DIR", help="SAE directory (SAELens format)")
    features.add_argument("--tokens", type=int, default=65536, help="tokens to scan; default: %(default)s")
    features.add_argument("--latents", default=None, help="comma-separated latent indices; default: the first "
                                                           "--num-latents")
    features.add_argument("--num-latents", type=int, default=32, help="default: %(default)s")
    features.add_argument("--top", type=int, default=10, help="contexts per latent; default: %(default)s")
    features.add_argument("--context", type=int, default=8, help="tokens each side; default: %(default)s")
    features.add_argument("--out", required=True, metavar="FILE", help="JSON output")
    features.add_argument("--markdown", default=None, metavar="FILE", help="Markdown output; default: --out as .md")


@command("sae", "sparse autoencoders on a hook's activations: train, eval, features")(_sae_args)
def sae_cmd(args: argparse.Namespace) -> int:
    from lmforge.errors import LmforgeError

    for name in ("seq_len", "model_batch_size"):
        if getattr(args, name) < 1:
            raise LmforgeError(f"--{name.replace('_', '-')} must be >= 1")
    return {"train": _train, "eval": _eval, "features": _features}[args.sae_command](args)


def _load(args: argparse.Namespace, sae_dir: Path) -> tuple[tuple[Any, Any, Any], Any]:
    """((model, training tokens, held-out tokens or else the training tokens), tokenizer)."""
    import torch

    from lmforge.data.pretrain import build_token_cache
    from lmforge.data.tokenizer import load_tokenizer
    from lmforge.models import load_model

    tokenizer = load_tokenizer(args.tokenizer or args.model)
    model = load_model(args.model, dtype=getattr(torch, args.dtype), device=args.device).eval()
    cache_dir = Path(args.cache_dir) if args.cache_dir else sae_dir.resolve().parent / "token_cache"
    caches = build_token_cache(args.data, tokenizer, cache_dir, val_fraction=args.val_fraction,
                               text_field=args.text_field, seed=args.seed)
    held_out = caches.val if caches.val is not None else caches.train
    if caches.val is None:
        print("no held-out split (corpus too small or --val-fraction 0): metrics use training tokens",
              file=sys.stderr)
    return (model, caches.train, held_out), tokenizer


def _train(args: argparse.Namespace) -> int:
    import torch

    from lmforge.errors import LmforgeError
    from lmforge.interp.sae import (
        SAETrainConfig,
        SparseAutoencoder,
        evaluate_sae,
        hook_width,
        model_activations,
        save_sae,
        shuffled_batches,
        token_batches,
        train_sae,
    )
    from lmforge.io import atomic_file

    out = Path(args.out)
    (model, train_tokens, held_out), _ = _load(args, out)
    width = hook_width(model, args.hook)
    d_sae = args.d_sae or args.expansion * width
    torch.manual_seed(args.seed)
    sae = SparseAutoencoder(width, d_sae, args.architecture, k=args.k if args.architecture == "topk" else None,
                            hook_name=args.hook, model_name=Path(args.model).resolve().name,
                            jumprelu_init_threshold=args.jumprelu_init_threshold,
                            jumprelu_bandwidth=args.jumprelu_bandwidth, device=model.device, seed=args.seed)
    cfg = SAETrainConfig(steps=args.steps, lr=args.lr, auxk_coefficient=args.auxk_coefficient,
                         l1_coefficient=args.l1_coefficient, l0_coefficient=args.l0_coefficient,
                         dead_after_steps=args.dead_after_steps, resample_every=args.resample_every,
                         log_every=args.log_every)
    if args.buffer_tokens < 2 * args.batch_size:
        raise LmforgeError(f"--buffer-tokens ({args.buffer_tokens}) must be at least 2 x --batch-size "
                           f"({args.batch_size})")
    windows = token_batches(train_tokens, args.seq_len, args.model_batch_size, seed=args.seed, repeat=True)
    batches = shuffled_batches(model_activations(model, args.hook, windows), args.batch_size, args.buffer_tokens,
                               seed=args.seed)
    print(f"sae train: {args.architecture} SAE, {width} -> {d_sae} latents at {args.hook}; {args.steps} steps x "
          f"{args.batch_size} activations on {model.device}", file=sys.stderr)

    def progress(r: Any) -> None:
        print(f"step {r.step}/{args.steps}  loss {r.loss:.4f}  mse {r.mse:.4f}  explained var "
              f"{r.explained_variance:.3f}  L0 {r.l0:.1f}  dead {r.dead_latents}", file=sys.stderr)

    result = train_sae(sae, batches, cfg, progress=progress)
    save_sae(sae, out, context_size=args.seq_len, dataset_path=" ".join(map(str, args.data)))
    held_out_batches = token_batches(held_out, args.seq_len, args.model_batch_size, seed=args.seed + 1,
                                     max_tokens=args.eval_tokens)
    metrics = evaluate_sae(model, sae, held_out_batches)
    print(metrics.table())
    report = {"metrics": metrics.as_dict(), "dead_latents_in_training": result.dead_latents(cfg.dead_after_steps),
              "input_scale": result.input_scale, "resampled": result.resampled,
              "history": [vars(r) for r in result.history], "args": {k: v for k, v in vars(args).items()
                                                                     if k != "func"}}
    with atomic_file(out / "metrics.json") as f:
        json.dump(report, f, indent=2, default=str)
    print(f"SAE: {out}/cfg.json + sae_weights.safetensors  metrics: {out}/metrics.json", file=sys.stderr)
    return 0


def _eval(args: argparse.Namespace) -> int:
    from lmforge.interp.sae import evaluate_sae, load_sae, token_batches
    from lmforge.io import atomic_file

    sae_dir = Path(args.sae)
    (model, _, held_out), _ = _load(args, sae_dir)
    sae = load_sae(sae_dir, model=model, device=model.device)
    metrics = evaluate_sae(model, sae, token_batches(held_out, args.seq_len, args.model_batch_size,
                                                     seed=args.seed + 1, max_tokens=args.tokens))
    print(metrics.table())
    if args.json:
        with atomic_file(args.json) as f:
            json.dump(metrics.as_dict(), f, indent=2)
    return 0


def _features(args: argparse.Namespace) -> int:
    from lmforge.errors import LmforgeError
    from lmforge.interp.sae import features_markdown, load_sae, token_batches, top_activating_contexts
    from lmforge.io import atomic_file

    sae_dir = Path(args.sae)
    (model, _, held_out), tokenizer = _load(args, sae_dir)
    sae = load_sae(sae_dir, model=model, device=model.device)
    if args.latents:
        try:
            latents = [int(x) for x in args.latents.split(",") if x.strip()]
        except ValueError:
            raise LmforgeError(f"--latents must be comma-separated integers, got {args.latents!r}") from None
    else:
        latents = list(range(min(args.num_latents, sae.d_sae)))
    if args.top < 1 or args.context < 0:
        raise LmforgeError("--top must be >= 1 and --context >= 0")
    found = top_activating_contexts(
        model, sae, token_batches(held_out, args.seq_len, args.model_batch_size, seed=args.seed + 2,
                                  max_tokens=args.tokens),
        latents=latents, top_n=args.top, context=args.context,
        decode_token=lambda tid: tokenizer.decode([tid], skip_special_tokens=False))
    payload = {"hook_name": sae.hook_name, "sae": str(sae_dir), "tokens_scanned_max": args.tokens,
               "latents": [vars(f) for f in found]}
    with atomic_file(args.out) as f:
        json.dump(payload, f, indent=2, ensure_ascii=False)
    markdown = Path(args.markdown) if args.markdown else Path(args.out).with_suffix(".md")
    with atomic_file(markdown) as f:
        f.write(features_markdown(found, sae.hook_name))
    fired = sum(1 for f in found if f.examples)
    print(f"{fired} of {len(found)} latents fired; contexts: {args.out}  {markdown}", file=sys.stderr)
    return 0
