"""``lmforge rejection-sample`` (best-of-N answers -> SFT chat JSONL) and ``lmforge iterative-dpo``."""

from __future__ import annotations

import argparse

from lmforge.commands import command
from lmforge.train.cli import recipe_args, shared_flags, split_recipe

# --loss names -> (preference.loss_type, default label smoothing); cDPO is DPO with label smoothing.
LOSSES = {"dpo": ("sigmoid", 0.0), "ipo": ("ipo", 0.0), "simpo": ("simpo", 0.0), "cdpo": ("sigmoid", 0.1)}


def _sampling_args(p: argparse.ArgumentParser) -> None:
    shared_flags(p, "model", "prompts", "reward", "seed", "device", model={"required": True},
                 prompts={"required": True, "help": "JSONL records with 'messages' (a chat prompt; a final assistant "
                                                    "turn is dropped) and an optional reference 'answer' for --reward"})
    p.add_argument("--reward-model", metavar="PATH", help="a reward model directory (from `lmforge rm`)")
    p.add_argument("--n", type=int, default=8, help="answers sampled per prompt")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--prompts-per-batch", type=int, default=8, help="prompts per generate call (each gives n rows)")


def _sampling(args: argparse.Namespace):
    """(prompt records, reward_fn or None, RejectionConfig), all checked before any model is loaded."""
    from lmforge.align.cli import reward_from_spec
    from lmforge.align.rejection import RejectionConfig
    from lmforge.data.chat import read_prompt_jsonl
    from lmforge.errors import LmforgeError

    if (args.reward is None) == (args.reward_model is None):
        raise LmforgeError("give exactly one of --reward (a verifier) and --reward-model (a trained reward model)")
    reward_fn = reward_from_spec(args.reward) if args.reward is not None else None
    cfg = RejectionConfig(n=args.n, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                          top_k=args.top_k, top_p=args.top_p, threshold=getattr(args, "threshold", None),
                          prompts_per_batch=args.prompts_per_batch, seed=args.seed)
    cfg.validate()
    return read_prompt_jsonl(args.prompts), reward_fn, cfg


def _load_reward_model(args: argparse.Namespace, device):
    from lmforge.models.reward import load_reward_model

    return load_reward_model(args.reward_model, device=device) if args.reward_model else None


def _rejection_args(p: argparse.ArgumentParser) -> None:
    _sampling_args(p)
    shared_flags(p, "out", out={"required": True, "metavar": "JSONL",
                                "help": "SFT chat JSONL to write (read by `lmforge sft`)"})
    p.add_argument("--threshold", type=float, default=None, help="drop prompts whose best score is below this")


@command("rejection-sample", "best-of-N answers, scored by a verifier or reward model, as SFT data")(_rejection_args)
def rejection_sample_cmd(args: argparse.Namespace) -> int:
    from lmforge.align.rejection import rejection_sample
    from lmforge.data.tokenizer import load_tokenizer
    from lmforge.models.checkpoint import load_model
    from lmforge.models.device import pick_device

    records, reward_fn, cfg = _sampling(args)
    device = pick_device(args.device)
    model, tokenizer = load_model(args.model, device=device), load_tokenizer(args.model)
    stats = rejection_sample(model, tokenizer, records, args.out, cfg, reward_fn=reward_fn,
                             reward_model=_load_reward_model(args, device))
    print(f"kept {stats.kept} of {stats.prompts} prompts ({stats.below_threshold} below the threshold, "
          f"{stats.unscorable} unscorable; {stats.skipped_samples} of {stats.prompts * cfg.n} samples had no score); "
          f"mean best score {stats.mean_best_score:.3f}. Wrote {args.out}")
    return 0


def _iterative_args(p: argparse.ArgumentParser) -> None:
    _sampling_args(p)
    recipe_args(p, "recipe overrides for each round's DPO run, e.g. batch_size=4 data.val_fraction=0.1",
                "YAML recipe for each round's DPO run (its model, data and out_dir are the round's)")
    shared_flags(p, "out", out={"default": "runs/iterative-dpo", "help": "the run directory (round_1/, round_2/, ...)"})
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps-per-round", type=int, default=20, help="DPO optimizer steps per round")
    p.add_argument("--loss", choices=sorted(LOSSES), default="dpo",
                   help="dpo (sigmoid), ipo, simpo (reference-free) or cdpo (DPO with label smoothing)")
    p.add_argument("--beta", type=float, default=None, help="default: the recipe's preference.beta (0.1)")
    p.add_argument("--label-smoothing", type=float, default=None, help="cdpo's assumed label noise (default 0.1)")
    p.add_argument("--nll-weight", type=float, default=None,
                   help="add the chosen answer's per-token NLL with this weight (DPO+NLL, Pang et al. 2024; "
                        "1.0 there); default: the recipe's preference.nll_weight (0)")
    p.add_argument("--lr", type=float, default=None,
                   help="default: the recipe's optim.lr; pretrained models usually want 1e-6 to 1e-5")
    p.add_argument("--batch-size", type=int, default=None, help="pairs per micro-batch (default: the recipe's)")
    p.add_argument("--eval-prompts", default=None, help="JSONL prompts to report the mean reward on after each round")


@command("iterative-dpo", "rounds of on-policy pairs (verifier or reward model labels), then DPO")(_iterative_args)
def iterative_dpo_cmd(args: argparse.Namespace) -> int:
    from lmforge.align.iterative import iterative_dpo
    from lmforge.data.chat import read_prompt_jsonl
    from lmforge.errors import LmforgeError
    from lmforge.models.device import pick_device

    records, reward_fn, cfg = _sampling(args)
    eval_records = read_prompt_jsonl(args.eval_prompts) if args.eval_prompts else None
    loss_type, smoothing = LOSSES[args.loss]
    if args.label_smoothing is not None:
        if args.loss != "cdpo":
            raise LmforgeError("--label-smoothing applies to --loss cdpo only")
        smoothing = args.label_smoothing
    # Explicit options go after the free-form overrides, so they win.
    recipe, overrides = split_recipe(args)
    overrides += [f"preference.loss_type={loss_type}", f"preference.label_smoothing={smoothing}"]
    for key, value in (("preference.beta", args.beta), ("preference.nll_weight", args.nll_weight),
                       ("optim.lr", args.lr), ("batch_size", args.batch_size)):
        if value is not None:
            overrides.append(f"{key}={value}")
    history = iterative_dpo(args.model, records, args.rounds, args.out, reward_fn=reward_fn,
                            reward_model=_load_reward_model(args, pick_device(args.device)), n=args.n, sampling=cfg,
                            steps_per_round=args.steps_per_round, recipe=recipe, overrides=overrides,
                            eval_prompts=eval_records,
                            device=args.device)
    last = history[-1]
    print(f"{len(history)} round(s) done; final policy: {last.model}")
    return 0
