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
    p.add_argument("--seed", type=int, default=0)


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


@command("grpo", "GRPO with a verifiable reward on prompts with reference answers")(_grpo_args)
def grpo_cmd(args: argparse.Namespace) -> int:
    from pathlib import Path

    from lmforge.align.grpo import GRPOConfig, GRPOTrainer
    from lmforge.data.tokenizer import load_tokenizer
    from lmforge.errors import LmforgeError
    from lmforge.io import iter_jsonl
    from lmforge.models.checkpoint import load_model, save_model

    path = Path(args.prompts)
    if not path.is_file():
        raise LmforgeError(f"prompt file {path} does not exist")
    records = []
    for where, rec in iter_jsonl(path):
        if not isinstance(rec, dict) or "messages" not in rec or "answer" not in rec:
            raise LmforgeError(f"{where}: needs 'messages' and 'answer'")
        # Prompt = the conversation up to (not including) the final assistant turn, if any.
        msgs = rec["messages"]
        if msgs and msgs[-1].get("role") == "assistant":
            msgs = msgs[:-1]
        records.append({"messages": msgs, "answer": str(rec["answer"])})
    cfg = GRPOConfig(steps=args.steps, prompts_per_step=args.prompts_per_step, group_size=args.group_size,
                     max_new_tokens=args.max_new_tokens, temperature=args.temperature, lr=args.lr, beta=args.beta,
                     seed=args.seed)
    model, tokenizer = load_model(args.model), load_tokenizer(args.model)
    trainer = GRPOTrainer(model, tokenizer, records, reward_from_spec(args.reward), cfg, args.out)
    history = trainer.fit()
    final = save_model(model, Path(args.out) / "model", tokenizer=tokenizer)
    first, last = history[0]["reward"], history[-1]["reward"]
    print(f"mean reward {first:.3f} (step 1) -> {last:.3f} (step {len(history)}); "
          f"{trainer.skipped} samples skipped (reward failed). Model: {final}")
    return 0
