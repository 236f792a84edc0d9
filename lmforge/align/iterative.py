"""Iterative (online) DPO: sample answers from the current policy, label them, train DPO on them, repeat.

Round ``r`` (Xu et al. 2023, "Some things are more CRINGE than others"; Yuan et al. 2024, "Self-Rewarding
Language Models"):

1. sample ``n`` answers per prompt from the round ``r-1`` policy and score them with a verifier
   (``reward_fn(completion, answer)``) or a ``RewardModel`` -- ``rejection.best_of_n`` does both;
2. pair the best answer (chosen) with the worst (rejected) -> ``out/round_r/pairs.jsonl``;
3. run DPO on those pairs with the training engine, exactly as ``lmforge dpo`` does (a ``TrainConfig`` with
   ``task="dpo"`` through ``build_trainer``). The run starts from the round ``r-1`` policy and caches its
   log-probs as the reference, so each round's reference is the previous round's policy;
4. the trained policy is ``out/round_r/model``, the round's numbers ``out/round_r/stats.json``.

A round whose ``stats.json`` and ``model/`` exist is reused, so an interrupted run continues where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from lmforge.align.rejection import PromptResult, RejectionConfig, best_of_n
from lmforge.align.rewards import RewardFn
from lmforge.data.chat import read_prompt_jsonl
from lmforge.data.synthetic import write_jsonl
from lmforge.errors import LmforgeError
from lmforge.io import atomic_directory, atomic_file
from lmforge.models.model import Transformer
from lmforge.models.reward import RewardModel


def _mean(xs: Sequence[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


# ---- on-policy preference pairs ---------------------------------------------------------------------
@dataclass
class PairStats:
    prompts: int = 0
    pairs: int = 0
    tied: int = 0  # every scored answer got the same score: nothing to prefer
    unscorable: int = 0  # fewer than two answers could be scored (reward failed or NaN, empty answers)
    skipped_samples: int = 0  # answers without a score
    mean_score: float | None = None  # over every scored answer: the policy's on-policy reward
    mean_chosen: float | None = None
    mean_rejected: float | None = None
    records: list[dict] = field(default_factory=list, repr=False)  # the preference JSONL records

    def summary(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "records"}


def pairs_from_results(results: Sequence[PromptResult]) -> PairStats:
    """Best-vs-worst preference records from scored samples (``PromptResult.scores``: None = unusable).

    An empty answer is never used (on either side: the preference format has no empty completions).
    Prompts with fewer than two scored answers, or whose best and worst tie, give no pair and are counted.
    """
    stats = PairStats(prompts=len(results))
    all_scores, chosen, rejected = [], [], []
    for r in results:
        scored = [(s, i) for i, s in enumerate(r.scores) if s is not None and r.completions[i].strip()]
        stats.skipped_samples += len(r.scores) - len(scored)
        all_scores += [s for s, _ in scored]
        if len(scored) < 2:
            stats.unscorable += 1
            continue
        # max/min keep the first of equal scores: the same tie rule as best_of_n.
        (best, b), (worst, w) = max(scored, key=lambda x: x[0]), min(scored, key=lambda x: x[0])
        if best == worst or r.completions[b].strip() == r.completions[w].strip():
            stats.tied += 1
            continue
        stats.records.append({"prompt": list(r.messages),
                              "chosen": [{"role": "assistant", "content": r.completions[b]}],
                              "rejected": [{"role": "assistant", "content": r.completions[w]}],
                              "chosen_score": best, "rejected_score": worst})
        chosen.append(best)
        rejected.append(worst)
    stats.pairs = len(stats.records)
    stats.mean_score, stats.mean_chosen, stats.mean_rejected = _mean(all_scores), _mean(chosen), _mean(rejected)
    return stats


def make_preference_pairs(model: Transformer, tokenizer, records: Sequence[dict], n: int = 8,
                          reward_fn: RewardFn | None = None, reward_model: RewardModel | None = None, *,
                          cfg: RejectionConfig | None = None, out_path: str | Path | None = None) -> PairStats:
    """Sample ``n`` answers per prompt record ``{"messages", "answer"?}`` from ``model``, score them with
    exactly one of ``reward_fn`` (given the record's ``answer``) and ``reward_model``, and pair best with
    worst. ``cfg`` sets the sampling (its ``n`` and ``threshold`` are ignored). With ``out_path`` the pairs
    are written there atomically as preference JSONL (chat format) that ``lmforge dpo`` reads."""
    cfg = dataclasses.replace(cfg or RejectionConfig(), n=n, threshold=None)
    stats = pairs_from_results(best_of_n(model, tokenizer, records, cfg, reward_fn, reward_model).results)
    if out_path is not None:
        write_jsonl(stats.records, out_path)
    return stats


def policy_reward(model: Transformer, tokenizer, records: Sequence[dict], cfg: RejectionConfig,
                  reward_fn: RewardFn | None = None, reward_model: RewardModel | None = None) -> float | None:
    """Mean score of ``cfg.n`` sampled answers per prompt (None when nothing could be scored)."""
    results = best_of_n(model, tokenizer, records, dataclasses.replace(cfg, threshold=None), reward_fn,
                        reward_model).results
    return _mean([s for r in results for s in r.scores if s is not None])


# ---- the rounds ---------------------------------------------------------------------------------------
@dataclass
class RoundStats:
    round: int
    pairs: dict  # PairStats.summary() of the pairs this round trained on
    first_loss: float | None = None
    last_loss: float | None = None
    heldout_accuracy: float | None = None  # DPO implicit-reward accuracy on held-out pairs (data.val_fraction > 0)
    eval_reward: float | None = None  # mean reward of the new policy's samples on the eval prompts
    model: str | None = None  # the policy this round produced


def _dpo_config(policy: Path, pairs: Path, run_dir: Path, steps: int, n_pairs: int, seed: int, device: str,
                recipe: str | Path | None, overrides: Sequence[str]):
    from lmforge.models.checkpoint import read_config
    from lmforge.train.recipe import load_recipe

    # Generation already had to fit the context, so the whole context is a safe default length.
    seq_len = min(read_config(policy).max_position_embeddings, 2048)
    defaults = {"data": {"val_fraction": 0.0, "seq_len": seq_len}, "max_steps": steps, "optim": {"warmup_steps": 0},
                "seed": seed, "device": device, "eval_every": 0, "save_every": 0, "keep_checkpoints": 1,
                "plot": False, "progress": False}
    # What makes it this round's run, whatever the recipe says:
    rounds = {"task": "dpo", "out_dir": str(run_dir), "model.path": str(policy), "data.train": [str(pairs)]}
    cfg = load_recipe(recipe, list(overrides), defaults=defaults, values=rounds)
    # A round may make fewer pairs than a batch; the engine needs at least one full batch.
    n_train = n_pairs if cfg.data.val else n_pairs - int(n_pairs * cfg.data.val_fraction)
    cfg.batch_size = max(1, min(cfg.batch_size, n_train))
    return cfg


def iterative_dpo(model_dir: str | Path, prompts: Sequence[dict] | str | Path, rounds: int, out_dir: str | Path, *,
                  reward_fn: RewardFn | None = None, reward_model: RewardModel | None = None, n: int = 8,
                  sampling: RejectionConfig | None = None, steps_per_round: int = 20,
                  recipe: str | Path | None = None, overrides: Sequence[str] = (),
                  eval_prompts: Sequence[dict] | None = None, device: str = "auto",
                  log: Callable[[str], None] = print) -> list[RoundStats]:
    """Run ``rounds`` rounds of sample -> label -> DPO from ``model_dir``; return each round's stats.

    ``prompts`` are records ``{"messages", "answer"?}`` or a JSONL file of them. ``recipe`` (a YAML file) and
    ``overrides`` (``key=value`` strings) configure the DPO runs (``preference.loss_type=ipo``,
    ``optim.lr=1e-6``, ``batch_size=4``, ...); each round sets its own model, data and directory.
    ``eval_prompts``: also report the mean reward on them before and after each round.
    A round without a single usable pair ends the run early (there is nothing to train on).
    """
    from lmforge.align.dpo import preference_accuracy
    from lmforge.data.tokenizer import load_tokenizer
    from lmforge.models.checkpoint import load_model
    from lmforge.models.device import pick_device
    from lmforge.train.run import build_trainer

    if rounds <= 0 or steps_per_round <= 0:
        raise LmforgeError(f"iterative DPO needs rounds > 0 and steps per round > 0, "
                           f"got {rounds} and {steps_per_round}")
    if (reward_fn is None) == (reward_model is None):
        raise LmforgeError("iterative DPO needs exactly one of reward_fn (a verifier) and reward_model")
    records = read_prompt_jsonl(prompts) if isinstance(prompts, (str, Path)) else list(prompts)
    sampling = sampling or RejectionConfig()
    # The same seed every evaluation, so rounds are compared on the same random draws.
    eval_cfg = dataclasses.replace(sampling, n=n, seed=sampling.seed + 99_991)
    out, policy = Path(out_dir), Path(model_dir)
    # Check the recipe overrides now, not after the first round's sampling.
    _dpo_config(policy, out / "pairs.jsonl", out, steps_per_round, 1, 0, device, recipe, overrides)
    tokenizer = load_tokenizer(policy)
    torch_device = pick_device(device)

    def evaluate(path: Path) -> float | None:
        return policy_reward(load_model(path, device=torch_device), tokenizer, eval_prompts, eval_cfg, reward_fn,
                             reward_model) if eval_prompts else None

    history: list[RoundStats] = []
    start_reward = evaluate(policy)
    if start_reward is not None:
        log(f"round 0: eval reward {start_reward:.3f}")
    for r in range(1, rounds + 1):
        rdir = out / f"round_{r}"
        if (rdir / "stats.json").is_file() and (rdir / "model").is_dir():  # finished by an earlier run
            history.append(RoundStats(**json.loads((rdir / "stats.json").read_text())))
            policy = rdir / "model"
            log(f"round {r}: already done, reusing {policy}")
            continue
        model = load_model(policy, device=torch_device)
        pairs = make_preference_pairs(model, tokenizer, records, n, reward_fn, reward_model,
                                      cfg=dataclasses.replace(sampling, seed=sampling.seed + r),
                                      out_path=rdir / "pairs.jsonl")
        del model
        stats = RoundStats(round=r, pairs=pairs.summary())
        log(f"round {r}: {pairs.pairs} pairs from {pairs.prompts} prompts ({pairs.tied} tied, {pairs.unscorable} "
            f"unscorable, {pairs.skipped_samples} samples skipped); mean score {_fmt(pairs.mean_score)}, "
            f"chosen {_fmt(pairs.mean_chosen)} vs rejected {_fmt(pairs.mean_rejected)}")
        if pairs.pairs == 0:
            if r == 1:
                raise LmforgeError("round 1 made no preference pairs: every prompt tied or could not be scored; "
                                   "sample more answers (n), raise the temperature or use a finer-grained reward")
            log(f"round {r}: nothing to train on; stopping with {policy} as the final policy")
            break
        cfg = _dpo_config(policy, rdir / "pairs.jsonl", rdir / "train", steps_per_round, pairs.pairs,
                          seed=sampling.seed + r, device=device, recipe=recipe, overrides=overrides)
        trainer = build_trainer(cfg)  # caches the round r-1 policy's log-probs: the reference
        result = trainer.fit()
        if trainer.data.val is not None:
            stats.heldout_accuracy = preference_accuracy(trainer, trainer.data.val, trainer.objective)["accuracy"]
        del trainer
        with atomic_directory(rdir / "model") as tmp:  # the final checkpoint's HF model (LoRA merged)
            shutil.copytree(result.final_checkpoint / "model", tmp, dirs_exist_ok=True)
        policy = rdir / "model"
        stats.first_loss, stats.last_loss, stats.model = result.losses[0], result.losses[-1], str(policy)
        stats.eval_reward = evaluate(policy)
        with atomic_file(rdir / "stats.json") as f:  # written last: its presence marks the round as done
            json.dump(dataclasses.asdict(stats), f, indent=2)
        history.append(stats)
        log(f"round {r}: DPO loss {stats.first_loss:.4f} -> {stats.last_loss:.4f}"
            + (f", held-out accuracy {stats.heldout_accuracy:.1%}" if stats.heldout_accuracy is not None else "")
            + (f", eval reward {stats.eval_reward:.3f}" if stats.eval_reward is not None else "")
            + f"; policy {policy}")
    return history


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


__all__ = ["PairStats", "RoundStats", "iterative_dpo", "make_preference_pairs", "pairs_from_results", "policy_reward"]
