"""``lmforge quickstart-align``: the quickstart's post-training chapter, on CPU in minutes.

Starts from the quickstart's SFT checkpoint (``lmforge quickstart`` first) and one skill with a checkable
answer ("which is larger, a or b?" by default: the SFT model picks the right tens digit but often copies
the wrong ones digit, so about half its answers are wrong; and unlike two-digit addition the skill has
thousands of problems the SFT data never showed), then compares, on held-out problems that neither SFT nor
RL saw:
  1. GRPO with the exact-answer reward (G samples per prompt, group-normalised advantages, k3 KL);
  2. PPO with the same reward (value head, per-token KL, GAE, whitened advantages, EMA reference);
  3. preference learning: on-policy pairs (best vs worst of n samples, labelled by the verifier) train a
     Bradley-Terry reward model, and DPO (+NLL on the chosen answer, Pang et al. 2024) on the same pairs;
     the DPO policy's greedy answers are then judged against the SFT policy's by that reward model on
     held-out prompts (win rate, ties count half).
Every stage reports greedy held-out accuracy and its paired gain over SFT with a bootstrap standard error;
the summary goes to OUT/summary.json. Nothing is tuned on the held-out set: it is drawn once, disjoint from
every training prompt, and read only for reporting (settings were chosen on seed 1's draw).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from lmforge.commands import command
from lmforge.quickstart.pretrain_sft import greedy_answers, sft_checkpoint


def _args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", default="runs/quickstart", help="the quickstart's run directory")
    p.add_argument("--out", default=None, help="default: RUN/align")
    p.add_argument("--skill", default="larger", help="next | larger | add1 | add2")
    p.add_argument("--test-size", type=int, default=1000, help="held-out problems")
    p.add_argument("--train-size", type=int, default=4000, help="RL / preference prompts (disjoint from the test)")
    p.add_argument("--methods", default="grpo,ppo,dpo", help="comma-separated subset of grpo,ppo,dpo")
    p.add_argument("--seed", type=int, default=0)
    rl = p.add_argument_group("GRPO and PPO (each step: --rollouts samples, 2 passes in minibatches of a quarter)")
    rl.add_argument("--rollouts", type=int, default=128, help="samples per RL step")
    rl.add_argument("--grpo-steps", type=int, default=100)
    rl.add_argument("--group-size", type=int, default=4, help="GRPO samples per prompt")
    rl.add_argument("--grpo-lr", type=float, default=5e-5)
    rl.add_argument("--grpo-beta", type=float, default=0.02, help="GRPO's k3 KL weight")
    rl.add_argument("--ppo-steps", type=int, default=100)
    rl.add_argument("--ppo-lr", type=float, default=5e-5)
    pref = p.add_argument_group("preference learning (reward model + DPO on verifier-labelled on-policy pairs)")
    pref.add_argument("--dpo-prompts", type=int, default=4000, help="prompts sampled (8 each) for pairs")
    pref.add_argument("--rm-steps", type=int, default=600)
    pref.add_argument("--rm-lr", type=float, default=3e-4)
    pref.add_argument("--dpo-steps", type=int, default=300)
    pref.add_argument("--dpo-lr", type=float, default=1e-4)
    pref.add_argument("--dpo-nll", type=float, default=1.0,
                      help="weight of the chosen answer's NLL (DPO+NLL, Pang et al. 2024); 0: plain DPO")


def _problems(skill: str, n: int, seed: int, exclude: set[str]) -> list[dict]:
    """Up to ``n`` distinct problems of ``skill`` whose prompts are not in ``exclude`` (small skills have
    few distinct problems: what 20 draws find)."""
    from lmforge.data.synthetic import skill_examples
    from lmforge.errors import LmforgeError

    out, seen = [], set(exclude)
    for batch_seed in range(seed, seed + 20):
        if len(out) == n:
            break
        for r in skill_examples(4 * n, seed=batch_seed, kinds=(skill,)):
            prompt = r["messages"][0]["content"]
            if prompt not in seen:
                seen.add(prompt)
                out.append(r)
                if len(out) == n:
                    break
    if not out:
        raise LmforgeError(f"no {skill} problems left that the SFT data does not contain")
    return out


def _rl_stage(make_trainer, model, tokenizer, test: list[dict], sft_correct: list[float]) -> dict:
    """Build and run an RL trainer on ``model``, then its held-out accuracy against the SFT model's."""
    t = time.perf_counter()
    trainer = make_trainer()
    history = trainer.fit()
    return {**compare(correct(greedy_answers(model, tokenizer, test), test), sft_correct), "steps": trainer.cfg.steps,
            "minutes": (time.perf_counter() - t) / 60,
            "reward_first": history[0]["reward"], "reward_last": history[-1]["reward"]}


def correct(answers: list[str], records: list[dict]) -> list[float]:
    """1.0 where an answer's last number equals its record's reference answer, per record."""
    from lmforge.data.synthetic import exact_match_accuracy

    return [exact_match_accuracy([a], [r["answer"]]) for a, r in zip(answers, records)]


def compare(after: list[float], before: list[float]) -> dict:
    """Accuracy after, and the paired gain over ``before`` on the same problems with its bootstrap
    standard error (paired: each problem is its own control, so the error is smaller than two
    independent accuracies' would be)."""
    from lmforge.eval.scoring import bootstrap_stderr

    diffs = [a - b for a, b in zip(after, before)]
    return {"accuracy": sum(after) / len(after), "gain": sum(diffs) / len(diffs),
            "gain_stderr": bootstrap_stderr(diffs)}


def _quarter(rows: int) -> int:
    """Minibatch size for ``rows`` samples per step: about a quarter, and dividing ``rows`` exactly."""
    return next(d for d in range(max(1, rows // 4), 0, -1) if rows % d == 0)


def _gain(r: dict) -> str:
    return f"{r['gain'] * 100:+.1f} points, paired s.e. {r['gain_stderr'] * 100:.1f}"


@command("quickstart-align", "post-train the quickstart's SFT model with GRPO, PPO and DPO and compare (CPU)")(_args)
def quickstart_align_cmd(args: argparse.Namespace) -> int:
    from lmforge.align.grpo import GRPOConfig, GRPOTrainer
    from lmforge.align.ppo import PPOConfig, PPOTrainer
    from lmforge.align.rewards import exact_number_match
    from lmforge.data.tokenizer import load_tokenizer
    from lmforge.errors import LmforgeError
    from lmforge.io import iter_jsonl
    from lmforge.models.checkpoint import load_model

    started = time.perf_counter()
    run = Path(args.run)
    sft_dir = sft_checkpoint(run)
    out = Path(args.out) if args.out else run / "align"
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = set(methods) - {"grpo", "ppo", "dpo"}
    if unknown:
        raise LmforgeError(f"--methods: unknown {sorted(unknown)}; choose from grpo, ppo, dpo")

    seen = {rec["messages"][0]["content"] for _, rec in iter_jsonl(run / "data" / "skills_train.jsonl")}
    test = _problems(args.skill, args.test_size, seed=10_000 + args.seed, exclude=seen)
    train = _problems(args.skill, args.train_size, seed=20_000 + args.seed,
                      exclude={r["messages"][0]["content"] for r in test})
    # RL and preference prompts: the user turn only (the reference reply stays out of the prompt).
    train = [{"messages": r["messages"][:1], "answer": r["answer"]} for r in train]
    tokenizer = load_tokenizer(sft_dir)
    results: dict = {"skill": args.skill, "test_size": len(test), "sft_checkpoint": str(sft_dir)}
    sft_answers = greedy_answers(load_model(sft_dir), tokenizer, test)
    sft_correct = correct(sft_answers, test)
    base = sum(sft_correct) / len(test)
    results["sft_accuracy"] = base
    print(f"SFT model {sft_dir}: held-out {args.skill} accuracy {base:.1%} on {len(test)} problems")

    if "grpo" in methods:
        model = load_model(sft_dir)
        prompts_per_step = max(1, args.rollouts // args.group_size)
        cfg = GRPOConfig(steps=args.grpo_steps, prompts_per_step=prompts_per_step,
                         group_size=args.group_size, max_new_tokens=16, temperature=1.0, lr=args.grpo_lr,
                         beta=args.grpo_beta, seed=args.seed, save_every=0, updates_per_batch=2,
                         mini_batch_size=_quarter(prompts_per_step * args.group_size))
        results["grpo"] = _rl_stage(lambda: GRPOTrainer(model, tokenizer, train, exact_number_match, cfg, out / "grpo"),
                                    model, tokenizer, test, sft_correct)
        print(f"GRPO ({cfg.steps} steps x {cfg.prompts_per_step} prompts x {cfg.group_size} samples): "
              f"held-out accuracy {base:.1%} -> {results['grpo']['accuracy']:.1%} ({_gain(results['grpo'])})")

    if "ppo" in methods:
        model = load_model(sft_dir)
        cfg = PPOConfig(steps=args.ppo_steps, rollout_batch_size=args.rollouts, mini_batch_size=_quarter(args.rollouts),
                        ppo_epochs=2, max_new_tokens=16, temperature=1.0, lr=args.ppo_lr, kl_coef=0.02,
                        seed=args.seed, save_every=0, truncated_reward=0.0)
        results["ppo"] = _rl_stage(lambda: PPOTrainer(model, tokenizer, train, exact_number_match, cfg, out / "ppo"),
                                   model, tokenizer, test, sft_correct)
        print(f"PPO ({cfg.steps} steps x {cfg.rollout_batch_size} rollouts): held-out accuracy "
              f"{base:.1%} -> {results['ppo']['accuracy']:.1%} ({_gain(results['ppo'])})")

    if "dpo" in methods:
        results["dpo"] = _preference_stage(sft_dir, tokenizer, train[:args.dpo_prompts], test, sft_answers,
                                           sft_correct, out / "dpo", args)

    results["minutes"] = (time.perf_counter() - started) / 60
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(results, indent=2))
    print(f"\nheld-out {args.skill} accuracy (greedy, {len(test)} problems): SFT {base:.1%}"
          + "".join(f", {m.upper()} {results[m]['accuracy']:.1%}" for m in ("grpo", "ppo", "dpo")
                    if "accuracy" in results.get(m, {}))
          + (f"; DPO vs SFT reward-model win rate {results['dpo']['rm_win_rate']:.1%}" if "rm_win_rate" in
             results.get("dpo", {}) else "")
          + f"\ndone in {results['minutes']:.1f} min; summary: {out / 'summary.json'}")
    from lmforge.quickstart.report import report_card

    report_card(run)  # the run's card now shows this quickstart's headline numbers too
    print(f"report card of every quickstart on {run}: {run / 'report.md'}")
    return 0


def _preference_stage(sft_dir: Path, tokenizer, prompts: list[dict], test: list[dict], sft_answers: list[str],
                      sft_correct: list[float], out: Path, args: argparse.Namespace) -> dict:
    """Verifier-labelled on-policy pairs -> reward model + DPO; judge DPO vs SFT with the reward model."""
    from lmforge.align.iterative import make_preference_pairs
    from lmforge.align.rejection import RejectionConfig, reward_model_scores
    from lmforge.align.reward_model import load_reward_model, pairwise_accuracy
    from lmforge.align.rewards import exact_number_match
    from lmforge.eval.scoring import bootstrap_stderr
    from lmforge.models.checkpoint import load_model
    from lmforge.train.recipe import load_recipe
    from lmforge.train.run import build_trainer

    t = time.perf_counter()
    sft = load_model(sft_dir)
    pairs = make_preference_pairs(sft, tokenizer, prompts, n=8, reward_fn=exact_number_match,
                                  cfg=RejectionConfig(max_new_tokens=16, temperature=1.0, seed=args.seed),
                                  out_path=out / "pairs.jsonl")
    print(f"preference pairs: {pairs.pairs} from {pairs.prompts} prompts ({pairs.tied} tied, "
          f"{pairs.unscorable} unscorable)")
    if pairs.pairs < 10:  # a held-out fifth must leave something to train on
        print("too few preference pairs (the SFT model's samples are all right or all wrong): DPO skipped")
        return {"skipped": f"{pairs.pairs} preference pairs", "pairs": pairs.pairs}
    common = {"model": {"path": str(sft_dir)}, "data": {"train": [str(out / "pairs.jsonl")], "val_fraction": 0.2,
                                                        "seq_len": 128},
              "seed": args.seed, "eval_every": 0, "save_every": 0, "keep_checkpoints": 1, "progress": False,
              "batch_size": 16}
    rm_cfg = load_recipe(None, [], defaults={
        **common, "task": "rm", "out_dir": str(out / "rm"), "max_steps": args.rm_steps,
        "optim": {"warmup_steps": args.rm_steps // 10, "lr": args.rm_lr}})
    rm_trainer = build_trainer(rm_cfg)
    rm_result = rm_trainer.fit()
    rm_acc = pairwise_accuracy(rm_trainer.model, rm_trainer.data.val, rm_trainer.data.pad_id)["accuracy"]
    rm = load_reward_model(rm_result.final_checkpoint / "model").eval()
    print(f"reward model: held-out pairwise accuracy {rm_acc:.1%} on {len(rm_trainer.data.val)} pairs")

    dpo_cfg = load_recipe(None, [], defaults={
        **common, "task": "dpo", "out_dir": str(out / "policy"), "max_steps": args.dpo_steps,
        "optim": {"warmup_steps": 0, "lr": args.dpo_lr}, "preference": {"nll_weight": args.dpo_nll}})
    dpo_result = build_trainer(dpo_cfg).fit()
    dpo = load_model(dpo_result.final_checkpoint / "model")

    dpo_answers = greedy_answers(dpo, tokenizer, test)
    result = compare(correct(dpo_answers, test), sft_correct)
    wins = []  # per problem: 1 DPO's answer scores higher, 0 lower, 0.5 same answer or tie
    for rec, a, b in zip(test, sft_answers, dpo_answers):
        if a == b:
            wins.append(0.5)
            continue
        s_sft, s_dpo = reward_model_scores(rm, tokenizer, rec["messages"][:1], [a, b])
        wins.append(1.0 if s_dpo > s_sft else 0.5 if s_dpo == s_sft else 0.0)
    win_rate = sum(wins) / len(wins)
    # Unchanged answers are ties by construction and pull the win rate to 50%: also report it over the
    # answers DPO changed, where the reward model actually has to choose.
    decided = [w for w, a, b in zip(wins, sft_answers, dpo_answers) if a != b]
    changed_win_rate = sum(decided) / len(decided) if decided else 0.5
    win_se, changed_se = bootstrap_stderr(wins), bootstrap_stderr(decided)
    print(f"DPO{'+NLL' if args.dpo_nll else ''} ({args.dpo_steps} steps on {pairs.pairs} pairs): held-out accuracy "
          f"{sum(sft_correct) / len(test):.1%} -> {result['accuracy']:.1%} ({_gain(result)})")
    print(f"reward-model win rate, DPO vs SFT: {win_rate:.1%} (s.e. {win_se * 100:.1f}); "
          f"on the {len(decided)} of {len(test)} answers DPO changed: {changed_win_rate:.1%} "
          f"(s.e. {changed_se * 100:.1f})")
    return {**result, "pairs": pairs.pairs, "rm_heldout_pair_accuracy": rm_acc, "rm_win_rate": win_rate,
            "rm_win_rate_stderr": win_se, "answers_changed": len(decided),
            "rm_win_rate_changed": changed_win_rate, "rm_win_rate_changed_stderr": changed_se,
            "minutes": (time.perf_counter() - t) / 60}
