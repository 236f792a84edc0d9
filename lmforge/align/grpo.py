"""GRPO with verifiable rewards (Shao et al. 2024; DeepSeek-R1): G samples per prompt, rewards from a plain
Python function, group-normalised advantages, clipped ratio, k3 KL to a frozen reference.

One iteration: sample ``prompts_per_step`` prompts -> ``group_size`` completions each (batched sampling)
-> rewards -> advantages -> ``updates_per_batch`` passes over those rollouts, one optimizer step per
``mini_batch_size`` completions (default: the whole batch). The loop itself --
optimiser, schedule, clipping, metrics.jsonl, plot, checkpoints, resume, torchrun -- is the shared
on-policy loop in ``lmforge.align.rl``; this file holds only GRPO's rollout and loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from lmforge.align.losses import group_advantages, grpo_loss, scatter_at, token_logprobs_at
from lmforge.align.rewards import RewardFn
from lmforge.align.rl import OnPolicyTrainer, RLConfig, Rollout
from lmforge.data.sft import IGNORE_INDEX
from lmforge.errors import ConfigError
from lmforge.models.model import KVCache, Transformer


@dataclass
class GRPOConfig(RLConfig):
    steps: int = 40
    prompts_per_step: int = 8
    group_size: int = 8
    max_new_tokens: int = 16
    temperature: float = 1.0
    top_p: float | None = None
    lr: float = 1e-4
    clip_eps: float = 0.2
    beta: float = 0.04  # KL(pi || pi_ref) weight (k3 estimator); 0 drops the reference model
    updates_per_batch: int = 1  # passes over each rollout batch; > 1 reuses rollouts (the clipped ratio matters)
    mini_batch_size: int | None = None  # completions per optimizer step; None: the whole batch, one step a pass
    scale_advantages: bool = True  # False: Dr. GRPO (centre only)

    def validate(self) -> None:
        for name in ("prompts_per_step", "group_size", "updates_per_batch"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"GRPO field '{name}' must be positive, got {getattr(self, name)}")
        if not self.clip_eps > 0:
            raise ConfigError(f"GRPO field 'clip_eps' must be > 0, got {self.clip_eps}")
        if self.beta < 0:
            raise ConfigError(f"GRPO field 'beta' must be >= 0, got {self.beta}")
        if self.group_size < 2:
            raise ConfigError("GRPO field 'group_size' must be >= 2: advantages compare samples within a group")
        rows = self.prompts_per_step * self.group_size
        if self.mini_batch_size is not None and (self.mini_batch_size <= 0 or rows % self.mini_batch_size):
            raise ConfigError(f"GRPO field 'mini_batch_size' ({self.mini_batch_size}) must be positive and divide "
                              f"prompts_per_step * group_size ({rows})")
        super().validate()


def _sequences(prompts: list[list[int]], completions: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded prompt+completion rows with labels on the completion tokens only."""
    rows = [p + c for p, c in zip(prompts, completions)]
    width = max(len(r) for r in rows) - 1
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, (p, r) in enumerate(zip(prompts, rows)):
        n = len(r) - 1
        ids[i, :n] = torch.tensor(r[:-1])
        mask[i, :n] = 1
        labels[i, len(p) - 1:n] = torch.tensor(r[len(p):])
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


class GRPOTrainer(OnPolicyTrainer):
    """GRPO on ``prompts`` (records with chat ``messages`` and a reference ``answer``) scored by ``reward_fn``.

    ``fit(resume=...)`` runs it (see ``OnPolicyTrainer``); ``skipped`` counts samples whose reward failed.
    """

    name = "grpo"

    def __init__(self, model, tokenizer, prompts: list[dict], reward_fn: RewardFn, cfg: GRPOConfig,
                 out_dir: str | Path) -> None:
        cfg.validate()
        super().__init__(model, tokenizer, prompts, cfg, out_dir, prompts_per_step=cfg.prompts_per_step,
                         reference=cfg.beta > 0, epochs=cfg.updates_per_batch,
                         minibatch=cfg.mini_batch_size)
        self.reward_fn = reward_fn

    @torch.no_grad()
    def rollout(self, step: int) -> Rollout:
        cfg = self.cfg
        chosen, prompts, answers = self.prompts_of(step, repeat=cfg.group_size)
        completions, _, rollout_s = self.sample(prompts, step)
        r = self.rewards_from_fn(self.reward_fn, completions, answers).view(len(chosen), cfg.group_size)
        # A sample whose reward could not be computed is dropped from its group (zero advantage, no loss).
        valid = torch.isfinite(r)
        filled = torch.where(valid, r, r.nan_to_num(0.0).sum(1, keepdim=True) / valid.sum(1, keepdim=True).clamp(min=1))
        adv = group_advantages(filled, scale=cfg.scale_advantages) * valid
        batch = self.to_device(_sequences(prompts, completions, self.pad_id))
        # The sampling policy's and the reference's log-probs, fixed for all updates on this batch. With a single
        # optimizer step per rollout the sampling policy is the one being updated, unchanged until that step:
        # ``objective`` takes its log-probs (detached) from the update's own forward instead of a second one.
        if not self.single_update:
            batch["old_logps"] = self.group_logprobs(batch, self.model, prompts, completions)
        if self.reference is not None:
            batch["ref_logps"] = self.group_logprobs(batch, self.reference, prompts, completions)
        new_tokens = sum(len(c) for c in completions)
        stats = {"reward": float(r[valid].mean()) if valid.any() else math.nan,
                 "solved_groups": float((r.nan_to_num(0).amax(1) > 0).float().mean()),
                 "completion_len": new_tokens / len(completions), "rollout_tok_s": new_tokens / max(rollout_s, 1e-9)}
        return Rollout(batch, adv.flatten().to(self.device), stats)

    @property
    def single_update(self) -> bool:
        """One optimizer step per rollout (one pass, one minibatch): the policy that sampled is the one updated."""
        rows = self.prompts_per_rank * self.cfg.group_size
        return self.epochs == 1 and (self.minibatch is None or self.minibatch >= rows)

    def completion_logprobs(self, batch: dict[str, torch.Tensor], module) -> torch.Tensor:
        """``module``'s log-probs of the completion tokens ``[B, T]`` (0 elsewhere); the LM head runs on them only."""
        labels = batch["labels"]
        return token_logprobs_at(self.forward_rows(batch, module, logits_to_keep=labels != IGNORE_INDEX), labels)

    def group_logprobs(self, batch: dict[str, torch.Tensor], module, prompts: list[list[int]],
                       completions: list[list[int]]) -> torch.Tensor:
        """``completion_logprobs`` computing each group's prompt once (no gradients): the prompts (left-padded)
        fill a KV cache, its rows are repeated ``group_size`` times, and the completions run on it. A group's G
        rows share a prompt of ~30 tokens and their completions are a few tokens each, so the full-row forward
        spent most of its work on G copies of the prompt. Falls back to the full rows for a wrapped module
        (DDP/FSDP) or a group of one."""
        g = self.cfg.group_size
        if g == 1 or type(module) is not Transformer or not completions:
            return self.completion_logprobs(batch, module)
        unique = prompts[::g]
        width, longest = max(len(p) for p in unique), max(len(c) for c in completions)
        if longest == 0:
            return torch.zeros(batch["labels"].shape, device=self.device)
        ids = torch.full((len(unique), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(unique):
            ids[i, width - len(p):], mask[i, width - len(p):] = torch.tensor(p), 1
        # Under autocast the projections (so the stored keys/values) come out in the autocast dtype.
        cache = KVCache(module.config, len(unique), width + longest, self.device, self.harness.autocast or module.dtype)
        first = self.harness.forward({"input_ids": ids, "attention_mask": mask}, module, cache=cache,
                                     logits_to_keep=1)[:, -1]  # [P, vocab]: each completion's first token
        cache.repeat_rows(g)
        comp = torch.full((len(completions), longest), self.pad_id, dtype=torch.long)
        real = torch.zeros_like(comp, dtype=torch.bool)
        for i, c in enumerate(completions):
            comp[i, :len(c)], real[i, :len(c)] = torch.tensor(c, dtype=torch.long), True
        comp_logps = torch.zeros(comp.shape, device=self.device)
        rows = real[:, 0].nonzero().flatten()
        comp_logps[rows, 0] = -F.cross_entropy(first.float().repeat_interleave(g, 0)[rows.to(self.device)],
                                               comp[rows, 0].to(self.device), reduction="none")
        if longest > 1:
            keep = real[:, 1:]  # position j of the completion predicts its token j + 1
            logits = self.harness.forward({"input_ids": comp[:, :-1], "attention_mask": real[:, :-1].long()},
                                          module, cache=cache, logits_to_keep=keep)
            comp_logps[:, 1:][keep.to(self.device)] = -F.cross_entropy(
                logits.float(), comp[:, 1:][keep].to(self.device), reduction="none")
        # Row by row, a completion's tokens are its labels in order (``_sequences``): the same row-major order.
        return scatter_at(comp_logps[real.to(self.device)], batch["labels"] != IGNORE_INDEX)

    def forward_kwargs(self, minibatch: dict[str, torch.Tensor]) -> dict[str, Any]:
        return {"logits_to_keep": minibatch["labels"] != IGNORE_INDEX}  # logits [N, vocab] on the completions

    def objective(self, logits: torch.Tensor, minibatch: dict[str, torch.Tensor]
                  ) -> tuple[torch.Tensor, dict[str, Any]]:
        cfg = self.cfg
        logps = token_logprobs_at(logits, minibatch["labels"])
        mask = minibatch["labels"] != IGNORE_INDEX
        old = minibatch.get("old_logps")
        loss, clip_frac, kl = grpo_loss(logps, logps.detach() if old is None else old, minibatch.get("ref_logps"),
                                        minibatch["advantages"], mask, cfg.clip_eps, cfg.beta)
        return loss, {"loss": loss.detach(), "kl": kl, "clip_fraction": clip_frac}
