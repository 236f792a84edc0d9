"""``lmforge dpo``: preference optimisation (DPO, cDPO, IPO, SimPO) with the training engine."""

from __future__ import annotations

import argparse

from lmforge.cli import command
from lmforge.train.cli import _train_args


@command("dpo", "preference optimisation on prompt/chosen/rejected JSONL (DPO, IPO, SimPO, cDPO)")(_train_args)
def dpo_cmd(args: argparse.Namespace) -> int:
    from lmforge.align.dpo import preference_accuracy
    from lmforge.train.cli import _run

    def report(trainer, when: str) -> None:
        if trainer.data.val is not None and trainer.dist.main:
            acc = preference_accuracy(trainer, trainer.data.val, trainer.objective)
            print(f"held-out preference accuracy {when}: {acc['accuracy']:.1%} (mean reward margin {acc['margin']:+.3f})")

    return _run("dpo", args, before=lambda t: report(t, "before"), after=lambda t: report(t, "after"))


@command("rm", "train a reward model (Bradley-Terry) on prompt/chosen/rejected JSONL")(_train_args)
def rm_cmd(args: argparse.Namespace) -> int:
    from lmforge.align.reward_model import pairwise_accuracy
    from lmforge.train.cli import _run

    def report(trainer, when: str) -> None:
        if trainer.data.val is not None and trainer.dist.main:
            acc = pairwise_accuracy(trainer.model, trainer.data.val, trainer.data.pad_id)
            print(f"held-out pairwise accuracy {when}: {acc['accuracy']:.1%} (mean margin {acc['margin']:+.3f})")

    return _run("rm", args, before=lambda t: report(t, "before"), after=lambda t: report(t, "after"))


def _grpo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="policy to start from (HF directory with tokenizer)")
    p.add_argument("--prompts", required=True, help="JSONL records with 'messages' (chat) and 'answer'")
    p.add_argument("--reward", default="exact_number",
                   help="'exact_number' (last number equals the answer) or 'regex:PATTERN' (format check), "
                        "or 'module:function' for your own (completion, answer) -> float")
    p.add_argument("--out", default="runs/grpo")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--prompts-per-step", type=int, default=16)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--beta", type=float, default=0.02, help="KL weight to the starting policy (k3)")
    p.add_argument("--updates-per-batch", type=int, default=1, help="passes over each step's completions")
    p.add_argument("--mini-batch-size", type=int, default=None,
                   help="completions per optimizer step (default: all of the step's, one step per pass)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", nargs="?", const=True, default=False, metavar="CHECKPOINT",
                   help="continue from the run's latest checkpoint in --out (or the one given)")


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
    from lmforge.align.grpo import GRPOConfig, GRPOTrainer
    from lmforge.align.rejection import read_prompt_jsonl
    from lmforge.data.tokenizer import load_tokenizer
    from lmforge.models.checkpoint import load_model

    records = read_prompt_jsonl(args.prompts, needs_answer=True)
    cfg = GRPOConfig(steps=args.steps, prompts_per_step=args.prompts_per_step, group_size=args.group_size,
                     max_new_tokens=args.max_new_tokens, temperature=args.temperature, lr=args.lr, beta=args.beta,
                     updates_per_batch=args.updates_per_batch, mini_batch_size=args.mini_batch_size, seed=args.seed)
    model, tokenizer = load_model(args.model), load_tokenizer(args.model)
    trainer = GRPOTrainer(model, tokenizer, records, reward_from_spec(args.reward), cfg, args.out)
    return _fit_and_save(trainer, args)


# ---- ppo ---------------------------------------------------------------------------------------
def _ppo_args(p: argparse.ArgumentParser) -> None:
    # Defaults are PPOConfig's (a test checks they agree); written out so `lmforge --help` need not import torch.
    p.add_argument("--model", required=True, help="policy to start from (HF directory with tokenizer)")
    p.add_argument("--prompts", required=True,
                   help="JSONL records with 'messages' (chat) and, for --reward, 'answer'")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--reward", default=None,
                     help="verifiable reward: 'exact_number' (the default), 'regex:PATTERN' or 'module:function' "
                          "for your own (completion, answer) -> float")
    how.add_argument("--reward-model", default=None, metavar="PATH",
                     help="score prompt + completion with this reward model (from `lmforge rm`; same tokenizer)")
    p.add_argument("--out", default="runs/ppo")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--rollout-batch-size", type=int, default=64,
                   help="completions per step (one per prompt), all processes together")
    p.add_argument("--mini-batch-size", type=int, default=8, help="completions per optimizer step")
    p.add_argument("--ppo-epochs", type=int, default=2, help="passes over each rollout batch")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--kl-coef", type=float, default=0.05, help="per-token KL penalty to the reference (k1)")
    p.add_argument("--ref-ema", type=float, default=0.99,
                   help="EMA rate of the reference toward the policy after each step; 0 freezes it")
    p.add_argument("--vf-coef", type=float, default=0.1, help="value-loss weight")
    p.add_argument("--gamma", type=float, default=1.0)
    p.add_argument("--lam", type=float, default=0.95, help="GAE lambda")
    p.add_argument("--no-normalize-advantages", action="store_true", help="do not whiten the advantages")
    p.add_argument("--truncated-reward", type=float, default=None,
                   help="score given to completions without EOS within --max-new-tokens (default: score them as is)")
    p.add_argument("--save-every", type=int, default=50, help="checkpoint every N steps (and at the end)")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", nargs="?", const=True, default=False, metavar="CHECKPOINT",
                   help="continue from the run's latest checkpoint in --out (or the one given)")


@command("ppo", "PPO with a value head, a verifiable reward or a reward model, and a KL-penalised reference")(_ppo_args)
def ppo_cmd(args: argparse.Namespace) -> int:
    from lmforge.align.ppo import PPOConfig, PPOTrainer
    from lmforge.align.rejection import read_prompt_jsonl
    from lmforge.align.reward_model import load_reward_model
    from lmforge.data.tokenizer import load_tokenizer
    from lmforge.models.checkpoint import load_model

    if args.reward_model:
        reward = load_reward_model(args.reward_model)
    else:
        reward = reward_from_spec(args.reward or "exact_number")
    records = read_prompt_jsonl(args.prompts, needs_answer=args.reward_model is None)
    cfg = PPOConfig(steps=args.steps, rollout_batch_size=args.rollout_batch_size, mini_batch_size=args.mini_batch_size,
                    ppo_epochs=args.ppo_epochs, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                    lr=args.lr, kl_coef=args.kl_coef, ref_ema=args.ref_ema, vf_coef=args.vf_coef, gamma=args.gamma,
                    lam=args.lam, normalize_advantages=not args.no_normalize_advantages,
                    truncated_reward=args.truncated_reward, save_every=args.save_every, device=args.device,
                    seed=args.seed)
    cfg.validate()  # before loading the model: a bad flag should fail fast
    model, tokenizer = load_model(args.model), load_tokenizer(args.model)
    trainer = PPOTrainer(model, tokenizer, records, reward, cfg, args.out)
    if trainer.dist.main:
        print(f"ppo: {model.config.model_type} with {sum(p.numel() for p in model.parameters()):,} parameters; "
              f"{len(records)} prompts; {trainer.dist.world} process(es) on {trainer.device}")
    return _fit_and_save(trainer, args)
