"""PPO for language models (Schulman et al. 2017; Ouyang et al. 2022), with the practices that Xu et al. 2024
("Is DPO Superior to PPO for LLM Alignment?") found to matter, each a switch that is on by default:

* advantage normalisation (``normalize_advantages``): advantages whitened over the rollout's completion
  tokens (under torchrun, over each rank's share of them);
* large rollout batches (``rollout_batch_size`` >> ``mini_batch_size``): many completions per step, several
  minibatch updates on them; set ``rollout_batch_size = mini_batch_size`` to turn it off;
* an EMA reference (``ref_ema``): the KL anchor follows the policy slowly, ``ref <- ema*ref + (1-ema)*policy``
  after every step, instead of holding it at the start; 0 or None freezes it.

One step: sample one completion per prompt -> score it (a verifiable reward function, or a RewardModel on
prompt + completion) -> token rewards: ``-kl_coef * (log pi - log pi_ref)`` (k1) on every completion token,
plus the score on the last one -> GAE (gamma, lam) with the value head's estimates -> ``ppo_epochs`` passes
of clipped policy + clipped value loss over shuffled minibatches. The loop (optimiser, checkpoints, resume,
metrics, torchrun) is ``lmforge.align.rl``.

Value head: a scalar linear head on the policy's final hidden states, sharing its trunk (as TRL's
``AutoModelForCausalLMWithValueHead``). A separate critic (initialised from the policy or the reward model)
is the other common choice and keeps value-loss gradients out of the policy, but costs one more full model
plus its optimizer state; with the head zero-initialised, values start at 0 and the trunk sees no value
gradient until the head has learned something, and ``vf_coef`` bounds its pull after that.

Truncated completions (no EOS within ``max_new_tokens``) are scored like any other by default and counted in
the ``truncated`` metric; ``truncated_reward`` (e.g. -1 or 0) replaces their score instead -- the usual
choice with a reward model, which was never trained on cut-off answers.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmforge.align.grpo import _sequences
from lmforge.align.losses import (gae, kl_penalty, masked_mean, ppo_policy_loss, ppo_value_loss, scatter_at,
                                  token_logprobs_at, whiten)
from lmforge.align.rewards import RewardFn
from lmforge.align.rl import OnPolicyTrainer, RLConfig, Rollout
from lmforge.data.sft import IGNORE_INDEX
from lmforge.errors import ConfigError, LmforgeError
from lmforge.models.model import Transformer
from lmforge.models.reward import RewardModel

logger = logging.getLogger(__name__)


@dataclass
class PPOConfig(RLConfig):
    steps: int = 100
    rollout_batch_size: int = 64  # prompts (one completion each) per step, all processes together
    mini_batch_size: int = 8  # completions per optimizer step
    ppo_epochs: int = 2  # passes over each rollout batch
    max_new_tokens: int = 32
    lr: float = 1e-5
    clip_eps: float = 0.2  # policy ratio clip
    value_clip_eps: float = 0.2  # value clip around the rollout's values
    vf_coef: float = 0.1  # value-loss weight in the shared-trunk loss
    gamma: float = 1.0
    lam: float = 0.95
    kl_coef: float = 0.05  # per-token k1 penalty in the rewards; 0 drops the reference model
    normalize_advantages: bool = True
    ref_ema: float | None = 0.99  # 0/None: frozen reference
    truncated_reward: float | None = None  # score for completions without EOS; None: score them as they are

    def validate(self) -> None:
        for name in ("rollout_batch_size", "mini_batch_size", "ppo_epochs"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"PPO field '{name}' must be positive, got {getattr(self, name)}")
        if self.rollout_batch_size % self.mini_batch_size:
            raise ConfigError(f"PPO field 'rollout_batch_size' ({self.rollout_batch_size}) must be a multiple of "
                              f"'mini_batch_size' ({self.mini_batch_size})")
        for name in ("clip_eps", "value_clip_eps"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"PPO field '{name}' must be > 0, got {getattr(self, name)}")
        for name in ("vf_coef", "kl_coef"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"PPO field '{name}' must be >= 0, got {getattr(self, name)}")
        for name in ("gamma", "lam"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"PPO field '{name}' must be in [0, 1], got {getattr(self, name)}")
        if self.ref_ema is not None and not 0 <= self.ref_ema < 1:
            raise ConfigError(f"PPO field 'ref_ema' must be in [0, 1) (0 or None: frozen reference), "
                              f"got {self.ref_ema}")
        if self.truncated_reward is not None and not math.isfinite(self.truncated_reward):
            raise ConfigError(f"PPO field 'truncated_reward' must be a finite number or None, "
                              f"got {self.truncated_reward}")
        super().validate()


class PolicyWithValue(nn.Module):
    """The policy plus a scalar value head on its final hidden states: ``forward`` -> (logits, values [B, T]).

    One module so DDP all-reduces the head's gradients with the policy's."""

    def __init__(self, policy: Transformer) -> None:
        super().__init__()
        self.policy = policy
        self.value_head = nn.Linear(policy.config.hidden_size, 1, device=policy.device)
        # Zero init: V = 0 at first, and no value gradient reaches the shared trunk until the head learns.
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                logits_to_keep: int | torch.Tensor = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """``logits_to_keep`` as the policy's (a [B, T] boolean mask: logits [N, vocab] and values [N] there)."""
        hidden = self.policy(input_ids, attention_mask, return_hidden=True, logits_to_keep=logits_to_keep)
        return self.policy.unembed(hidden), self.value_head(hidden.float()).squeeze(-1)  # values in float32 whatever the model dtype


def _explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var(R - V) / Var(R) over the completion tokens: 1 = perfect critic, 0 = no better than a constant.
    Undefined for constant returns; logged as 0 then, so metrics stay finite."""
    var_r = masked_mean((returns - masked_mean(returns, mask)) ** 2, mask)
    if float(var_r) < 1e-12:
        return 0.0
    diff = returns - values
    return float(1 - masked_mean((diff - masked_mean(diff, mask)) ** 2, mask) / var_r)


class PPOTrainer(OnPolicyTrainer):
    """PPO on ``prompts`` (records with chat ``messages``, plus ``answer`` for a reward function).

    ``reward``: a verifiable reward ``fn(completion_text, answer) -> float`` (called through ``safe_reward``:
    a raise or NaN skips that sample, counted in ``skipped``), or a ``RewardModel`` that scores prompt +
    completion tokens (it must share the policy's tokenizer). ``fit(resume=...)`` runs it.
    """

    name = "ppo"

    def __init__(self, model: Transformer, tokenizer: Any, prompts: list[dict], reward: RewardFn | RewardModel,
                 cfg: PPOConfig, out_dir: str | Path) -> None:
        cfg.validate()
        self.reward_model = reward if isinstance(reward, RewardModel) else None
        if self.reward_model is None and not callable(reward):
            raise LmforgeError(f"PPO reward must be a function (completion, answer) -> float or a RewardModel, "
                               f"got {type(reward).__name__}")
        if self.reward_model is not None and self.reward_model.config.vocab_size != model.config.vocab_size:
            raise LmforgeError(f"the reward model's vocabulary ({self.reward_model.config.vocab_size}) differs from "
                               f"the policy's ({model.config.vocab_size}); it must share the policy's tokenizer")
        self.reward_fn = None if self.reward_model is not None else reward
        module = PolicyWithValue(model)
        super().__init__(model, tokenizer, prompts, cfg, out_dir, prompts_per_step=cfg.rollout_batch_size,
                         module=module, extra_modules={"value_head": module.value_head},
                         reference=cfg.kl_coef > 0, ref_ema=cfg.ref_ema, epochs=cfg.ppo_epochs,
                         minibatch=cfg.mini_batch_size, needs_answer=self.reward_model is None)
        if self.reward_model is not None:
            self.reward_model.to(self.device).eval().requires_grad_(False)

    @torch.no_grad()
    def score(self, prompts: list[list[int]], completions: list[list[int]], answers: list[str | None],
              truncated: list[bool]) -> torch.Tensor:
        """Sequence rewards ``[B]``; NaN marks a sample to skip (its reward could not be computed)."""
        cfg = self.cfg
        replace = cfg.truncated_reward is not None
        if self.reward_model is None:
            scores = self.rewards_from_fn(self.reward_fn, completions, answers, skip=truncated if replace else None)
        else:
            rows = [p + c for p, c in zip(prompts, completions)]
            width = max(len(r) for r in rows)
            ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, r in enumerate(rows):
                ids[i, :len(r)], mask[i, :len(r)] = torch.tensor(r), 1
            scores = self.reward_model.score(ids, mask).float().cpu()
            bad = ~torch.isfinite(scores)
            if bad.any():
                logger.warning("skipping %d samples: the reward model returned a non-finite score", int(bad.sum()))
                self.skipped += int(bad.sum())
        if replace:
            scores = torch.where(torch.tensor(truncated), torch.tensor(cfg.truncated_reward), scores)
        return scores

    @torch.no_grad()
    def rollout(self, step: int) -> Rollout:
        cfg = self.cfg
        _, prompts, answers = self.prompts_of(step)
        completions, ended, rollout_s = self.sample(prompts, step)
        truncated = [not e for e in ended]
        scores = self.score(prompts, completions, answers, truncated)
        valid = torch.isfinite(scores)
        batch = _sequences(prompts, completions, self.pad_id)
        batch["labels"][~valid] = IGNORE_INDEX  # a skipped sample is no training data at all: no token of it counts
        batch = self.to_device(batch)
        labels = batch["labels"]
        mask = labels != IGNORE_INDEX
        self.module.eval()
        # Logits and values on the completion tokens only (the LM head skips the prompt and the padding).
        logits, values = self.forward_rows(batch, self.module, logits_to_keep=mask)
        logps = token_logprobs_at(logits, labels)
        values = scatter_at(values, mask)
        del logits
        if self.reference is not None:
            ref_logps = token_logprobs_at(self.forward_rows(batch, self.reference, logits_to_keep=mask), labels)
        else:
            ref_logps = logps
        kl = torch.where(mask, kl_penalty(logps, ref_logps, "k1"), torch.zeros_like(logps))
        rewards = -cfg.kl_coef * kl
        # The sequence's score lands on its last completion token (the EOS, if it ended).
        positions = torch.arange(mask.shape[1], device=mask.device)
        last = (mask * positions).argmax(-1)
        rows = torch.arange(mask.shape[0], device=mask.device)
        rewards[rows, last] += torch.where(valid, scores, torch.zeros_like(scores)).to(rewards.device)
        advantages, returns = gae(rewards, values, mask, cfg.gamma, cfg.lam)
        if cfg.normalize_advantages:
            advantages = whiten(advantages, mask)
        batch.update(old_logps=logps, old_values=values, returns=returns)
        new_tokens = sum(len(c) for c in completions)
        stats = {"reward": float(scores[valid].mean()) if valid.any() else math.nan,
                 "kl": float(masked_mean(kl, mask)),
                 "truncated": sum(truncated) / len(truncated),
                 "completion_len": new_tokens / len(completions),
                 "explained_variance": _explained_variance(values, returns, mask),
                 "rollout_tok_s": new_tokens / max(rollout_s, 1e-9)}
        return Rollout(batch, advantages, stats)

    def forward_kwargs(self, minibatch: dict[str, torch.Tensor]) -> dict[str, Any]:
        return {"logits_to_keep": minibatch["labels"] != IGNORE_INDEX}  # logits and values on the completions

    def objective(self, outputs: tuple[torch.Tensor, torch.Tensor], mb: dict[str, torch.Tensor]
                  ) -> tuple[torch.Tensor, dict[str, Any]]:
        cfg = self.cfg
        logits, values = outputs
        logps = token_logprobs_at(logits, mb["labels"])
        mask = mb["labels"] != IGNORE_INDEX
        values = scatter_at(values, mask)
        policy_loss, clip_frac, approx_kl = ppo_policy_loss(logps, mb["old_logps"], mb["advantages"], mask,
                                                            cfg.clip_eps)
        value_loss = ppo_value_loss(values, mb["old_values"], mb["returns"], mask, cfg.value_clip_eps)
        loss = policy_loss + cfg.vf_coef * value_loss
        return loss, {"loss": loss.detach(), "policy_loss": policy_loss.detach(), "value_loss": value_loss.detach(),
                      "clip_fraction": clip_frac, "approx_kl": approx_kl}


__all__ = ["PPOConfig", "PPOTrainer", "PolicyWithValue"]
