"""``lmforge pretrain`` and ``lmforge sft``, and the command line every training-like command shares
(pretrain, sft, dpo, rm, grpo, ppo, iterative-dpo):

* an optional YAML recipe and ``key=value`` overrides, read by the one typed loader (``train.recipe``);
* the shared flags, declared once (``SHARED``: --model, --prompts, --reward, --out, --seed, --resume, --device);
* ``config_flags``: --flags for config fields, typed and defaulted from the config dataclass.

A flag that sets a config field wins over the recipe and the overrides when it is given, and leaves them
alone when it is not (so its default, shown by --help, is the config's).
"""

from __future__ import annotations

import argparse
import math
import re
import typing
from typing import Any

from lmforge.commands import DEVICE_FLAG, command

SHARED: dict[str, dict[str, Any]] = {
    "model": dict(metavar="PATH", help="the model to start from: an HF directory with its tokenizer"),
    "prompts": dict(metavar="JSONL", help="prompt records: chat 'messages' (and a reference 'answer' for --reward)"),
    "reward": dict(help="a verifier: 'exact_number' (the last number equals the answer), 'regex:PATTERN', or "
                        "'module:function' for your own (completion, answer) -> float"),
    "out": dict(metavar="DIR", help="the run directory"),
    "seed": dict(type=int, default=0, help="random seed"),
    "resume": dict(nargs="?", const=True, default=False, metavar="CHECKPOINT",
                   help="continue from the run's latest checkpoint (or the one given); a key=value after it is an "
                        "override, not a checkpoint (write a checkpoint path with '=' in it as ./PATH)"),
    "device": DEVICE_FLAG,
}


# An override's shape (``max_steps=32``, ``optim.lr=1e-3``): a dotted name, then '='. A path has a '/' or
# starts with '.' before any '=', so ``./runs/a=b`` stays a checkpoint path.
_OVERRIDE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*=")


class _Resume(argparse.Action):
    """``--resume [CHECKPOINT]``: argparse would take a following ``key=value`` as the checkpoint; it is kept
    as an override instead (``resume_overrides``, read by ``split_recipe``) and the run resumes from latest."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        if isinstance(values, str) and _OVERRIDE.match(values):  # a bare --resume gives const (True) here
            # Positionals not yet parsed come after this one on the command line: keep that order.
            first = getattr(namespace, "recipe", None) is None and not getattr(namespace, "overrides", None)
            namespace.resume_overrides = [*(getattr(namespace, "resume_overrides", None) or []), values]
            namespace.resume_overrides_first = first
            values = self.const
        setattr(namespace, self.dest, values)


class _SetsField(argparse.Action):
    """Stores the flag's value and, because it was given, records it for the config field ``key``."""

    def __init__(self, option_strings, dest, key: str, **kwargs) -> None:
        super().__init__(option_strings, dest, **kwargs)
        self.key = key

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        value = self.const if self.nargs == 0 else values
        setattr(namespace, self.dest, value)
        namespace.field_values = {**(getattr(namespace, "field_values", None) or {}), self.key: value}


def shared_flags(p: argparse._ActionsContainer, *names: str,
                 fields: dict[str, str] | None = None, **changes: dict[str, Any]) -> None:
    """Add the ``SHARED`` flags ``names``; ``fields`` maps those that set a config field to its dotted key,
    and ``changes`` adjusts a flag's argparse settings, e.g. ``out={"default": "runs/grpo"}``."""
    for name in names:
        kwargs = {**SHARED[name], **changes.get(name, {})}
        if name in (fields or {}):
            kwargs.update(action=_SetsField, key=fields[name])
        elif name == "resume":
            kwargs["action"] = _Resume
        p.add_argument(f"--{name}", **kwargs)


def config_flags(p: argparse.ArgumentParser, cls: type, helps: dict[str, str | None],
                 defaults: dict[str, Any] | None = None) -> None:
    """A ``--field-name`` flag for each field of the config dataclass ``cls`` named in ``helps`` (with its help
    text), typed as the field and defaulting to ``defaults`` or else the field's own default. A bool field that
    defaults to true is turned off by ``--no-field-name``."""
    hints, base = typing.get_type_hints(cls), cls()
    for name, help_text in helps.items():
        default = (defaults or {}).get(name, getattr(base, name))
        if default is not None and not isinstance(default, bool):
            help_text = f"{help_text + '; ' if help_text else ''}default: %(default)s"
        tp = next((t for t in typing.get_args(hints[name]) if t is not type(None)), hints[name])  # X | None -> X
        flag = name.replace("_", "-")
        if tp is bool:
            p.add_argument(f"--{'no-' if default else ''}{flag}", dest=name, action=_SetsField, key=name, nargs=0,
                           const=not default, default=default, help=help_text)
        else:
            p.add_argument(f"--{flag}", dest=name, action=_SetsField, key=name, type=tp, default=default,
                           help=help_text)


def recipe_args(p: argparse.ArgumentParser, overrides_help: str = "recipe overrides, e.g. optim.lr=1e-3 max_steps=50",
                recipe_help: str = "YAML recipe (see recipes/)") -> None:
    p.add_argument("recipe", nargs="?", help=recipe_help)
    p.add_argument("overrides", nargs="*", metavar="key=value", help=overrides_help)


def split_recipe(args: argparse.Namespace) -> tuple[str | None, list[str]]:
    """(recipe file or None, overrides): a first positional that is an override, not a YAML file, is one; a
    ``key=value`` right after ``--resume`` is one too (``_Resume``), in its place on the command line."""
    recipe, overrides = args.recipe, list(args.overrides)
    if recipe and "=" in recipe and not recipe.endswith((".yaml", ".yml")):
        recipe, overrides = None, [recipe, *overrides]
    after_resume = getattr(args, "resume_overrides", None) or []
    if getattr(args, "resume_overrides_first", False):
        return recipe, [*after_resume, *overrides]
    return recipe, [*overrides, *after_resume]


def load_config(args: argparse.Namespace, cls: type | None = None, defaults: dict[str, Any] | None = None,
                values: dict[str, Any] | None = None) -> Any:
    """The command's config (default ``TrainConfig``), each over the one before: the config's defaults,
    ``defaults``, the recipe file, the key=value overrides, the flags given, and ``values``."""
    from lmforge.train.recipe import TrainConfig, load_recipe

    recipe, overrides = split_recipe(args)
    given = {**(getattr(args, "field_values", None) or {}), **(values or {})}
    return load_recipe(recipe, overrides, defaults, cls or TrainConfig, given)


def _train_args(p: argparse.ArgumentParser) -> None:
    recipe_args(p)
    shared_flags(p, "model", "out", "seed", "device", "resume",
                 fields={"model": "model.path", "out": "out_dir", "seed": "seed", "device": "device"})
    p.add_argument("--lora", action="store_true", help="train LoRA adapters instead of all weights")
    p.add_argument("--dora", action="store_true", help="train DoRA adapters (implies --lora)")


def _run(task: str, args: argparse.Namespace, before=None, after=None) -> int:
    from lmforge.train.run import build_trainer

    values: dict[str, Any] = {"task": task}
    if args.lora or args.dora:
        values["lora.enabled"] = True
    if args.dora:
        values["lora.use_dora"] = True
    trainer = build_trainer(load_config(args, values=values))
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
