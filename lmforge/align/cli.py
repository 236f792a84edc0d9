"""``lmforge dpo`` and ``lmforge rm`` (recipes, as ``lmforge sft``), and ``lmforge grpo`` and ``lmforge ppo``
(an optional recipe of GRPOConfig / PPOConfig fields, key=value overrides, and flags for the common ones).

Importing this module registers the ``dpo`` and ``rm`` recipe tasks (``lmforge.align.dpo`` and
``lmforge.align.reward_model`` register them with the training engine when imported).
"""

from __future__ import annotations

import argparse

from lmforge.align.dpo import preference_accuracy
from lmforge.align.grpo import GRPOConfig, GRPOTrainer
from lmforge.align.ppo import PPOConfig, PPOTrainer
from lmforge.align.reward_model import load_reward_model, pairwise_accuracy
from lmforge.commands import command
from lmforge.train.cli import SHARED, _run, _train_args, config_flags, load_config, recipe_args, shared_flags


def _run_with_accuracy(task: str, args: argparse.Namespace, accuracy, what: str, margin: str) -> int:
    """``_run``, reporting held-out ``accuracy(trainer)`` before and after training."""
    def report(trainer, when: str) -> None:
        if trainer.data.val is not None and trainer.dist.main:
            acc = accuracy(trainer)
            print(f"held-out {what} accuracy {when}: {acc['accuracy']:.1%} ({margin} {acc['margin']:+.3f})")

    return _run(task, args, before=lambda t: report(t, "before"), after=lambda t: report(t, "after"))


@command("dpo", "preference optimisation on prompt/chosen/rejected JSONL (DPO, IPO, SimPO, cDPO)")(_train_args)
def dpo_cmd(args: argparse.Namespace) -> int:
    return _run_with_accuracy("dpo", args, lambda t: preference_accuracy(t, t.data.val, t.objective),
                              "preference", "mean reward margin")


@command("rm", "train a reward model (Bradley-Terry) on prompt/chosen/rejected JSONL")(_train_args)
def rm_cmd(args: argparse.Namespace) -> int:
    return _run_with_accuracy("rm", args, lambda t: pairwise_accuracy(t.model, t.data.val, t.data.pad_id),
                              "pairwise", "mean margin")


# ---- grpo and ppo -----------------------------------------------------------------------------------
RL_FLAGS = dict(fields={"seed": "seed", "device": "device"}, model={"required": True}, prompts={"required": True})
GRPO_DEFAULTS = {"prompts_per_step": 16, "lr": 5e-5, "beta": 0.02}  # the command's, where they are not GRPOConfig's


def _grpo_args(p: argparse.ArgumentParser) -> None:
    recipe_args(p, "GRPOConfig overrides, e.g. clip_eps=0.1 top_p=0.95", "YAML recipe of GRPOConfig fields")
    shared_flags(p, "model", "prompts", "reward", "out", "seed", "device", "resume", **RL_FLAGS,
                 reward={"default": "exact_number"}, out={"default": "runs/grpo"})
    config_flags(p, GRPOConfig, {
        "steps": None, "prompts_per_step": None, "group_size": None, "max_new_tokens": None, "temperature": None,
        "lr": None, "beta": "KL weight to the starting policy (k3)",
        "updates_per_batch": "passes over each step's completions",
        "mini_batch_size": "completions per optimizer step (default: all of the step's, one step per pass)"},
        GRPO_DEFAULTS)


def reward_from_spec(spec: str):
    from lmforge.align.rewards import exact_number_match, format_reward
    from lmforge.errors import LmforgeError

    if spec == "exact_number":
        return exact_number_match
    if spec.startswith("regex:"):
        pattern = format_reward(spec[len("regex:"):])
        return lambda completion, answer: pattern(completion, answer)
    if ":" in spec:
        import importlib

        module, _, name = spec.partition(":")
        try:
            return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as e:
            raise LmforgeError(f"--reward {spec}: cannot import ({e})") from None
    raise LmforgeError(f"--reward {spec!r}: use exact_number, regex:PATTERN or module:function")


def _fit_and_save(trainer, args: argparse.Namespace) -> int:
    """The end of ``grpo`` and ``ppo``: run (or resume) to the last step, save the policy (rank 0) and report."""
    from pathlib import Path

    from lmforge.models.checkpoint import save_model

    history = trainer.fit(resume=args.resume)
    if trainer.dist.main:
        final = save_model(trainer.model, Path(args.out) / "model", tokenizer=trainer.tokenizer)
        if history:
            first, last = history[0], history[-1]
            print(f"mean reward {first['reward']:.3f} (step {first['step']}) -> {last['reward']:.3f} "
                  f"(step {last['step']}); {last['skipped_rewards']} samples skipped (reward failed). Model: {final}  "
                  f"metrics: {Path(args.out) / 'metrics.jsonl'}")
        else:
            print(f"nothing to do: the run in {args.out} is already at step {trainer.step}. Model: {final}")
    if trainer.dist.world > 1:
        import torch.distributed as dist

        dist.destroy_process_group()
    return 0


@command("grpo", "GRPO with a verifiable reward on prompts with reference answers")(_grpo_args)
def grpo_cmd(args: argparse.Namespace) -> int:
    from lmforge.data.chat import read_prompt_jsonl
    from lmforge.data.tokenizer import load_tokenizer
    from lmforge.models.checkpoint import load_model

    cfg = load_config(args, GRPOConfig, GRPO_DEFAULTS)  # checked before any model is loaded
    records = read_prompt_jsonl(args.prompts, needs_answer=True)
    model, tokenizer = load_model(args.model), load_tokenizer(args.model)
    trainer = GRPOTrainer(model, tokenizer, records, reward_from_spec(args.reward), cfg, args.out)
    return _fit_and_save(trainer, args)


def _ppo_args(p: argparse.ArgumentParser) -> None:
    recipe_args(p, "PPOConfig overrides, e.g. clip_eps=0.1 value_clip_eps=0.5", "YAML recipe of PPOConfig fields")
    shared_flags(p, "model", "prompts", "out", "seed", "device", "resume", **RL_FLAGS, out={"default": "runs/ppo"})
    how = p.add_mutually_exclusive_group()
    shared_flags(how, "reward", reward={"help": SHARED["reward"]["help"] + " (the default: exact_number)"})
    how.add_argument("--reward-model", default=None, metavar="PATH",
                     help="score prompt + completion with this reward model (from `lmforge rm`; same tokenizer)")
    config_flags(p, PPOConfig, {
        "steps": None, "rollout_batch_size": "completions per step (one per prompt), all processes together",
        "mini_batch_size": "completions per optimizer step", "ppo_epochs": "passes over each rollout batch",
        "max_new_tokens": None, "temperature": None, "lr": None,
        "kl_coef": "per-token KL penalty to the reference (k1)",
        "ref_ema": "EMA rate of the reference toward the policy after each step; 0 freezes it",
        "vf_coef": "value-loss weight", "gamma": None, "lam": "GAE lambda",
        "normalize_advantages": "do not whiten the advantages",
        "truncated_reward": "score of completions without EOS within --max-new-tokens (default: score them as is)",
        "save_every": "checkpoint every N steps (and at the end)"})


@command("ppo", "PPO with a value head, a verifiable reward or a reward model, and a KL-penalised reference")(_ppo_args)
def ppo_cmd(args: argparse.Namespace) -> int:
    from lmforge.data.chat import read_prompt_jsonl
    from lmforge.data.tokenizer import load_tokenizer
    from lmforge.models.checkpoint import load_model

    cfg = load_config(args, PPOConfig)  # checked before any model is loaded: a bad flag fails fast
    if args.reward_model:
        reward = load_reward_model(args.reward_model)
    else:
        reward = reward_from_spec(args.reward or "exact_number")
    records = read_prompt_jsonl(args.prompts, needs_answer=args.reward_model is None)
    model, tokenizer = load_model(args.model), load_tokenizer(args.model)
    trainer = PPOTrainer(model, tokenizer, records, reward, cfg, args.out)
    if trainer.dist.main:
        print(f"ppo: {model.config.model_type} with {sum(p.numel() for p in model.parameters()):,} parameters; "
              f"{len(records)} prompts; {trainer.dist.world} process(es) on {trainer.device}")
    return _fit_and_save(trainer, args)
