"""``lmforge pretrain`` and ``lmforge sft``: a recipe, optional key=value overrides, optional --resume."""

from __future__ import annotations

import argparse
import math

from lmforge.cli import command


def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", nargs="?", help="YAML recipe (see recipes/)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides, e.g. optim.lr=1e-3 max_steps=50")
    p.add_argument("--resume", nargs="?", const=True, default=False, metavar="CHECKPOINT",
                   help="continue from the run's latest checkpoint (or the one given)")
    p.add_argument("--lora", action="store_true", help="train LoRA adapters instead of all weights")
    p.add_argument("--dora", action="store_true", help="train DoRA adapters (implies --lora)")


def _run(task: str, args: argparse.Namespace, before=None, after=None) -> int:
    from lmforge.train.recipe import load_recipe
    from lmforge.train.run import build_trainer

    overrides = list(args.overrides)
    recipe = args.recipe
    if recipe and "=" in recipe and not recipe.endswith((".yaml", ".yml")):
        overrides.insert(0, recipe)  # no recipe file, only overrides
        recipe = None
    overrides.insert(0, f"task={task}")
    if args.lora or args.dora:
        overrides.append("lora.enabled=true")
    if args.dora:
        overrides.append("lora.use_dora=true")
    cfg = load_recipe(recipe, overrides)
    trainer = build_trainer(cfg)
    if trainer.dist.main:
        n_train = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        n_all = sum(p.numel() for p in trainer.model.parameters())
        print(f"{task}: {trainer.model.config.model_type} with {n_all:,} parameters ({n_train:,} trainable); "
              f"{trainer.data.describe}; {trainer.dist.world} process(es) on {trainer.device}")
    if before is not None:
        before(trainer)
    result = trainer.fit(resume=args.resume)
    if after is not None:
        after(trainer)
    if trainer.dist.main:
        if result.val_loss is not None:
            print(f"validation loss {result.val_loss:.4f} (perplexity {math.exp(min(result.val_loss, 50)):.2f})")
        print(f"checkpoint: {result.final_checkpoint}/model  metrics: {result.run_dir}/metrics.jsonl  "
              f"plot: {result.run_dir}/loss.png")
    return 0


@command("pretrain", "pretrain (or continue pretraining) a model on local text")(_train_args)
def pretrain_cmd(args: argparse.Namespace) -> int:
    return _run("pretrain", args)


@command("sft", "supervised finetuning on chat JSONL (loss on assistant tokens only)")(_train_args)
def sft_cmd(args: argparse.Namespace) -> int:
    return _run("sft", args)
