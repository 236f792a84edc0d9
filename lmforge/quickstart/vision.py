"""``lmforge quickstart-vision``: Method A (LLaVA: image tokens in the text) against Method B (gated cross-attention,
Llama 3.2 Vision) on the same decoder, data and training budget — NVLM's comparison in miniature, on a CPU.

1. data: drawn shapes with questions whose answers only the image holds (``lmforge.data.shapes``), answers balanced
   within each question type so that a model that never sees the image scores chance;
2. models: the main quickstart's SFT decoder with a fresh small ViT, joined both ways (``lmforge.models.compose``);
3. training, the same steps and batch for each (``recipes/vision_*.yaml``): Method A in LLaVA's two stages
   (projector alignment with the decoder frozen, then projector + decoder), Method B's cross-attention layers and
   projector with the decoder frozen, and a text-only baseline (the decoder on the questions without images). No
   pretrained vision tower exists offline, so the tower trains from scratch in both methods;
4. held-out accuracy per question type beside chance, the decoder positions each method spends on an image and the
   measured prefill time; summary.json, report.md and the run's report card.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

from lmforge.commands import command
from lmforge.errors import LmforgeError
from lmforge.quickstart.pretrain_sft import RECIPES, sft_checkpoint


def _args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", default="runs/quickstart", help="the main quickstart's run directory (its SFT model "
                                                             "is the decoder)")
    p.add_argument("--out", default=None, help="output directory (default RUN/vision)")
    p.add_argument("--train-size", type=int, default=6000, help="training examples (image + question + answer)")
    p.add_argument("--test-size", type=int, default=500, help="held-out examples")
    p.add_argument("--image-size", type=int, default=48)
    p.add_argument("--patch-size", type=int, default=12)
    p.add_argument("--vision-hidden", type=int, default=128)
    p.add_argument("--vision-layers", type=int, default=3, help="vision tower blocks (Mllama's: all but one local, "
                                                                 "then one gated global)")
    p.add_argument("--tower-steps", type=int, default=800, help="vision tower pretraining steps (per method)")
    p.add_argument("--tower-scenes", type=int, default=4000, help="drawn scenes for the tower's pretraining")
    p.add_argument("--tower-lr", type=float, default=2e-3)
    p.add_argument("--steps", type=int, default=800, help="training steps per method (Method A: split over its "
                                                          "two stages)")
    p.add_argument("--stage1-fraction", type=float, default=0.25, help="share of Method A's steps in stage 1")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate of Method A's stages and the text-only model")
    p.add_argument("--cross-lr", type=float, default=3e-3,
                   help="learning rate of Method B (its cross-attention layers are new, their gates start shut)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="training precision; auto: bf16 autocast where the CPU multiplies bf16 in hardware")


# ---- training ---------------------------------------------------------------------------------------------------
def _train(recipe: str, model: Path, data: Path, out: Path, steps: int, trainable: list[str],
           args: argparse.Namespace, seq_len: int | None = None, lr: float | None = None) -> tuple[Path, float]:
    """One SFT run of ``recipe`` from ``model``; returns the final model directory and the seconds it took."""
    from lmforge.train.recipe import load_recipe
    from lmforge.train.run import build_trainer

    overrides = [f"out_dir={out}", f"model.path={model}", f"tokenizer={model}", f"data.train=[{data}]",
                 "data.val_fraction=0", f"max_steps={steps}", f"seed={args.seed}", f"batch_size={args.batch_size}",
                 f"optim.lr={lr or args.lr}", f"optim.warmup_steps={min(20, steps // 10)}",
                 f"precision={args.precision}", f"model.trainable={json.dumps(trainable)}"]
    if seq_len is not None:
        overrides.append(f"data.seq_len={seq_len}")
    if recipe == "quickstart_sft.yaml":
        overrides.append("data.replay.fraction=0")  # the questions alone: the baseline learns their prior
    t = time.perf_counter()
    trainer = build_trainer(load_recipe(RECIPES / recipe, overrides))
    print(f"      {out.name}: {trainer.data.describe}; training {sum(p.numel() for p in trainer.model.parameters() if p.requires_grad):,} parameters")
    final = trainer.fit().final_checkpoint / "model"
    return final, time.perf_counter() - t


def _text_only(records: list[dict[str, Any]], path: Path) -> Path:
    """The questions without their images: what a model that never sees the image learns from."""
    from lmforge.io import atomic_file

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path, "w") as f:
        for r in records:
            f.write(json.dumps({"messages": [{"role": "user", "content": _question(r)}, r["messages"][1]]}) + "\n")
    return path


# ---- the vision tower ---------------------------------------------------------------------------------------------
def _tower(model) -> Any:
    return model.vision_tower if hasattr(model, "vision_tower") else model.vision_model


def _patch_features(model, inputs: dict[str, Any]) -> Any:
    """[images, patches, width]: what the projector reads per patch (LLaVA's selected layers; Mllama's encoder
    output with the intermediate layers), class token left out."""
    if hasattr(model, "vision_features"):
        return model.vision_features(inputs["pixel_values"])
    features = model.vision_model(inputs["pixel_values"], inputs["aspect_ratio_ids"], inputs["aspect_ratio_mask"])
    return features[:, 0, 0, 1:]  # one image of one tile per row; token 0 is the class token


def _image_inputs(image_processor, images: list) -> dict[str, Any]:
    if hasattr(image_processor, "max_image_tiles"):  # Mllama's: rows of images, each cut into tiles
        inputs = image_processor([[image] for image in images])
        inputs.pop("num_tiles")
        return inputs
    return {"pixel_values": image_processor(images)}


def pretrain_tower(model, image_processor, patch_size: int, scenes: int, steps: int, batch_size: int, lr: float,
                   seed: int, image_size: int) -> dict[str, float]:
    """Train the vision tower of ``model`` in place to say, per patch, which colour and shape cover it (two linear
    heads over the features the projector reads; ``lmforge.data.shapes.patch_labels``) on drawn scenes of its own
    random stream: the stand-in for a pretrained CLIP encoder, which cannot be downloaded here. Then the projector's
    input is standardised on held-out scenes (``standardize_projector_input``). Returns held-out per-patch accuracy
    on the patches that an object covers."""
    import random

    import torch
    import torch.nn.functional as F
    from torch import nn

    from lmforge.data.shapes import COLOURS, SHAPES, make_example, patch_labels

    rng = random.Random(f"lmforge-shapes-tower-{seed}")
    examples = [make_example(rng, image_size) for _ in range(scenes + scenes // 10)]
    inputs = _image_inputs(image_processor, [ex.image for ex in examples])
    labels = [patch_labels(ex, patch_size) for ex in examples]
    colours = torch.tensor([c for c, _ in labels])
    shapes = torch.tensor([s for _, s in labels])
    torch.manual_seed(seed)
    with torch.no_grad():
        width = _patch_features(model, {k: v[:1] for k, v in inputs.items()}).shape[-1]
    heads = nn.ModuleList([nn.Linear(width, len(COLOURS) + 1), nn.Linear(width, len(SHAPES) + 1)])
    tower = _tower(model)
    params = [*tower.parameters(), *heads.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for step in range(steps):
        rows = torch.randint(0, scenes, (batch_size,), generator=g)
        features = _patch_features(model, {k: v[rows] for k, v in inputs.items()})
        loss = (F.cross_entropy(heads[0](features).flatten(0, 1), colours[rows].flatten())
                + F.cross_entropy(heads[1](features).flatten(0, 1), shapes[rows].flatten()))
        for group in optimizer.param_groups:  # linear warmup over the first tenth, then constant
            group["lr"] = lr * min(1.0, (step + 1) / max(1, steps // 10))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    model.eval()
    held_out = slice(scenes, None)
    with torch.no_grad():
        features = _patch_features(model, {k: v[held_out] for k, v in inputs.items()})
        covered = colours[held_out] > 0
        colour_ok = (heads[0](features).argmax(-1) == colours[held_out])[covered]
        shape_ok = (heads[1](features).argmax(-1) == shapes[held_out])[covered]
    standardize_projector_input(model, {k: v[held_out] for k, v in inputs.items()})
    return {"colour": colour_ok.float().mean().item(), "shape": shape_ok.float().mean().item(),
            "final_loss": loss.item(), "scenes": scenes, "steps": steps}


def standardize_projector_input(model, inputs: dict[str, Any]) -> None:
    """Fold a per-dimension standardisation of the projector's input into its first linear layer, measured on
    ``images``: ``W x + b`` becomes ``W ((x - mean) / std) + b``. A ViT's hidden states share a large
    image-independent component (here ~60% of their norm), which the projector would otherwise pass on as a
    near-constant input dominating the image's content; a data-dependent initialisation (as LSUV), the checkpoint
    format unchanged. ``inputs``: the image processor's tensors for the images to measure on."""
    import torch

    with torch.no_grad():
        features = _patch_features(model, inputs).flatten(0, -2).float()
        mean, std = features.mean(0), features.std(0).clamp_min(1e-6)
        projector = model.multi_modal_projector
        first = projector.linear_1 if hasattr(projector, "linear_1") else projector
        weight = first.weight / std
        first.bias.sub_(weight @ mean)
        first.weight.copy_(weight)


# ---- evaluation -------------------------------------------------------------------------------------------------
def _question(record: dict[str, Any]) -> str:
    return "".join(p["text"] for p in record["messages"][0]["content"] if p["type"] == "text")


def vision_answers(model_dir: Path, records: list[dict[str, Any]], batch_size: int = 50,
                   max_new_tokens: int = 4,
                   reduction: dict[str, float] | None = None) -> tuple[list[str], dict[str, float]]:
    """Greedy answers of a vision-language model to each record's image and question, and its cost: decoder
    positions per example and the median prefill seconds per batch (the vision encoder included).
    ``reduction``: a LLaVA's visual token reduction switches set on the model (``LlavaForConditionalGeneration``:
    ``visual_token_fraction``, ``visual_token_merge``, ``fastv_keep`` / ``fastv_layer``)."""
    import torch

    from lmforge.data.image_processor import load_image, load_processor
    from lmforge.models.checkpoint import load_model
    from lmforge.models.generate import default_eos_ids, generate

    model, processor = load_model(model_dir), load_processor(model_dir)
    for name, value in (reduction or {}).items():
        if not hasattr(model, name):
            raise LmforgeError(f"{type(model).__name__} has no visual token reduction switch {name!r}")
        setattr(model, name, value)
    if reduction:
        processor.tokens_per_image = model.tokens_per_image
    stops = list(dict.fromkeys([*processor.tokenizer.eos_ids, *default_eos_ids(model)]))
    answers, prefill, positions = [], [], []
    for i in range(0, len(records), batch_size):
        chunk = records[i:i + batch_size]
        chats = [r["messages"][:1] for r in chunk]  # the user turn: the question and the image, in the data's order
        batch = processor.apply_chat_template(chats, images=[load_image(r["images"][0]) for r in chunk])
        positions += batch["attention_mask"].sum(-1).tolist()
        with torch.inference_mode():
            t = time.perf_counter()
            model(**batch, logits_to_keep=1)
            prefill.append(time.perf_counter() - t)
        out = generate(model, batch.pop("input_ids"), batch.pop("attention_mask"), max_new_tokens=max_new_tokens,
                       eos_ids=stops, **batch)
        answers += [processor.decode([t for t in row.tolist() if t not in stops]) for row in out]
    cost = {"decoder_positions": statistics.mean(positions), "prefill_s_per_batch": statistics.median(prefill),
            "batch_size": batch_size}
    return answers, cost


def text_answers(model_dir: Path, records: list[dict[str, Any]]) -> list[str]:
    from lmforge.data.tokenizer import load_tokenizer
    from lmforge.models.checkpoint import load_model
    from lmforge.quickstart.pretrain_sft import greedy_answers

    text = [{"messages": [{"role": "user", "content": _question(r)}]} for r in records]
    return greedy_answers(load_model(model_dir), load_tokenizer(model_dir), text, max_new_tokens=4)


def accuracy_by_type(answers: list[str], records: list[dict[str, Any]]) -> dict[str, float]:
    from lmforge.data.shapes import QUESTION_TYPES, score_answer

    out = {}
    for kind in QUESTION_TYPES:
        pairs = [(a, r["answer"]) for a, r in zip(answers, records) if r["type"] == kind]
        if pairs:
            out[kind] = sum(score_answer(a, ref) for a, ref in pairs) / len(pairs)
    out["all"] = sum(score_answer(a, r["answer"]) for a, r in zip(answers, records)) / len(records)
    return out


def _table(summary: dict[str, Any]) -> str:
    from lmforge.data.shapes import QUESTION_TYPES

    acc = summary["accuracy"]
    columns = [("chance", "chance"), ("text only", "text_only"), ("A: LLaVA", "llava"),
               ("B: cross-attention", "cross_attention")]
    lines = ["| question type | " + " | ".join(name for name, _ in columns) + " |",
             "| --- |" + " ---: |" * len(columns)]
    for kind in [*QUESTION_TYPES, "all"]:
        if kind in acc["llava"]:
            lines.append(f"| {kind} | " + " | ".join(f"{acc[key][kind]:.1%}" for _, key in columns) + " |")
    cost = summary["cost"]
    lines += ["", "| | A: LLaVA | B: cross-attention |", "| --- | ---: | ---: |",
              f"| image tokens in the decoder's sequence | {summary['image_tokens']['llava']} | 0 (1 placeholder) |",
              f"| image states cross-attended | 0 | {summary['image_tokens']['cross_attention']} |",
              f"| decoder positions per example | {cost['llava']['decoder_positions']:.1f} | "
              f"{cost['cross_attention']['decoder_positions']:.1f} |",
              f"| prefill ms per batch of {cost['llava']['batch_size']} | "
              f"{1000 * cost['llava']['prefill_s_per_batch']:.0f} | "
              f"{1000 * cost['cross_attention']['prefill_s_per_batch']:.0f} |",
              f"| training minutes ({summary['steps']} steps x {summary['batch_size']}) | "
              f"{summary['train_s']['llava'] / 60:.1f} | {summary['train_s']['cross_attention'] / 60:.1f} |",
              f"| parameters (vision + connector + decoder) | {summary['parameters']['llava']:,} | "
              f"{summary['parameters']['cross_attention']:,} |"]
    return "\n".join(lines)


@command("quickstart-vision", "train a LLaVA (image tokens) and a cross-attention vision model on drawn shapes and "
                              "compare them (CPU, ~15 min)")(_args)
def quickstart_vision_cmd(args: argparse.Namespace) -> int:
    import torch

    from lmforge.data.shapes import QUESTION_TYPES, chance, read_shapes_jsonl, write_shapes_dataset
    from lmforge.errors import LmforgeError
    from lmforge.models.checkpoint import load_model
    from lmforge.data.image_processor import ImageProcessor, MllamaImageProcessor
    from lmforge.models.compose import (PlaceholderTokenizerFiles, compose_llava, compose_mllama,
                                        image_processor_config, save_composed)

    started = time.perf_counter()
    run = Path(args.run)
    decoder_dir = sft_checkpoint(run)
    out = Path(args.out) if args.out else run / "vision"
    torch.manual_seed(args.seed)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.steps < 2 or not 0 < args.stage1_fraction < 1:
        raise LmforgeError(f"--steps must be at least 2 and --stage1-fraction in (0, 1) (Method A runs two stages), got "
                           f"{args.steps} and {args.stage1_fraction}")
    if args.vision_layers < 2:
        raise LmforgeError(f"--vision-layers must be at least 2 (Mllama's tower: local layers, then one global), "
                           f"got {args.vision_layers}")

    # 1. data
    paths = write_shapes_dataset(out / "data", args.train_size, args.test_size, image_size=args.image_size,
                                 seed=args.seed)
    train_records, test = read_shapes_jsonl(paths["train"]), read_shapes_jsonl(paths["test"])
    text_train = _text_only(train_records, out / "data" / "train_text_only.jsonl")
    print(f"[1/4] {len(train_records)} training and {len(test)} held-out drawn scenes ({args.image_size}x"
          f"{args.image_size}), {len(QUESTION_TYPES)} question types -> {out / 'data'}")

    # 2. the two models around the quickstart's decoder
    vision = dict(image_size=args.image_size, patch_size=args.patch_size, vision_hidden=args.vision_hidden,
                  seed=args.seed)
    blocks = {"llava": dict(vision_layers=args.vision_layers),  # the same number of ViT blocks in both towers
              "cross_attention": dict(vision_layers=args.vision_layers - 1, vision_global_layers=1)}
    decoder = load_model(decoder_dir)
    built, configs, parameters, tower_accuracy, timings = {}, {}, {}, {}, {}
    for name, compose, token in (("llava", compose_llava, "<image>"), ("cross_attention", compose_mllama, "<|image|>")):
        t = time.perf_counter()
        tokenizer = PlaceholderTokenizerFiles(decoder_dir, token)  # the placeholder: one new id past the vocabulary
        model = compose(decoder, image_token_id=tokenizer.token_id, **vision, **blocks[name])
        processor_config = image_processor_config(model)
        image_processor = (MllamaImageProcessor if name == "cross_attention" else ImageProcessor).from_dict(
            processor_config)
        tower_accuracy[name] = pretrain_tower(model, image_processor, args.patch_size, args.tower_scenes, args.tower_steps,
                                              64, args.tower_lr, args.seed, args.image_size)
        built[name] = save_composed(model, out / f"{name}_init", tokenizer)
        configs[name], parameters[name] = model.config, sum(p.numel() for p in model.parameters())  # training keeps both
        timings[f"{name}_tower_s"] = time.perf_counter() - t
    image_tokens = {"llava": configs["llava"].num_image_tokens,
                    "cross_attention": configs["cross_attention"].tokens_per_tile}
    print(f"[2/4] decoder {decoder_dir} ({sum(p.numel() for p in decoder.parameters()):,} parameters) + a "
          f"{args.vision_layers}-layer ViT of width {args.vision_hidden}, pretrained {args.tower_steps} steps to name "
          "each patch's colour and shape (held-out patches: LLaVA's CLIP tower "
          f"{tower_accuracy['llava']['colour']:.0%} colour / {tower_accuracy['llava']['shape']:.0%} shape, Mllama's "
          f"tiled tower {tower_accuracy['cross_attention']['colour']:.0%} / "
          f"{tower_accuracy['cross_attention']['shape']:.0%}); Method A feeds {image_tokens['llava']} image tokens into "
          f"the decoder's sequence, Method B cross-attends to {image_tokens['cross_attention']} image states")
    del decoder

    # 3. training: the same steps and batch for each
    stage1 = min(max(1, round(args.steps * args.stage1_fraction)), args.steps - 1)
    seq_len = 64 + image_tokens["llava"]
    print(f"[3/4] training, {args.steps} steps x {args.batch_size} each")
    a1, t1 = _train("vision_llava_stage1.yaml", built["llava"], paths["train"], out / "llava_stage1", stage1,
                    ["multi_modal_projector.*"], args, seq_len)
    a2, t2 = _train("vision_llava_stage2.yaml", a1, paths["train"], out / "llava_stage2", args.steps - stage1,
                    ["multi_modal_projector.*", "language_model.*"], args, seq_len)
    cross_layers = configs["cross_attention"].text.cross_attention_layers
    b, tb = _train("vision_cross_attention.yaml", built["cross_attention"], paths["train"], out / "cross_attention",
                   args.steps, ["multi_modal_projector.*", *(f"language_model.model.layers.{i}.*" for i in cross_layers)],
                   args, 64, lr=args.cross_lr)
    c, tc = _train("quickstart_sft.yaml", decoder_dir, text_train, out / "text_only", args.steps, [], args, 64)

    # 4. held-out accuracy and cost
    answers, cost = {}, {}
    answers["llava"], cost["llava"] = vision_answers(a2, test)
    answers["cross_attention"], cost["cross_attention"] = vision_answers(b, test)
    answers["text_only"] = text_answers(c, test)
    accuracy = {name: accuracy_by_type(a, test) for name, a in answers.items()}
    kinds = [k for k in QUESTION_TYPES if any(r["type"] == k for r in test)]
    accuracy["chance"] = {k: chance(k) for k in kinds}
    accuracy["chance"]["all"] = sum(chance(r["type"]) for r in test) / len(test)
    summary = {
        "decoder": str(decoder_dir), "train_size": len(train_records), "test_size": len(test),
        "image_size": args.image_size, "patch_size": args.patch_size, "steps": args.steps, "stage1_steps": stage1,
        "batch_size": args.batch_size, "seed": args.seed, "threads": torch.get_num_threads(),
        "image_tokens": image_tokens, "tower": tower_accuracy, "accuracy": accuracy, "cost": cost,
        "train_s": {"llava": t1 + t2, "cross_attention": tb, "text_only": tc}, "tower_s": timings,
        "parameters": parameters,
        "checkpoints": {"llava": str(a2), "cross_attention": str(b), "text_only": str(c)},
        "minutes": (time.perf_counter() - started) / 60,
    }
    table = _table(summary)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "report.md").write_text(
        f"# quickstart-vision\n\n{len(test)} held-out scenes; {args.steps} training steps x {args.batch_size} per "
        f"model on {len(train_records)} examples; decoder: the quickstart's SFT model {decoder_dir}.\n\n{table}\n")
    print(f"[4/4] held-out accuracy ({len(test)} scenes)\n{table}")
    first = test[0]
    print(f"done in {summary['minutes']:.1f} min; {out / 'summary.json'}, {out / 'report.md'}\ntry:\n"
          f"  lmforge generate {a2} --chat --image {first['images'][0]} --prompt \"{_question(first)}<image>\"")
    from lmforge.quickstart.report import report_card

    report_card(run)
    return 0
