"""GRPO with verifiable rewards (Shao et al. 2024; DeepSeek-R1): G samples per prompt, rewards from a plain
Python function, group-normalised advantages, clipped ratio, k3 KL to a frozen reference.

One iteration: sample ``prompts_per_step`` prompts -> ``group_size`` completions each (batched sampling)
-> rewards -> advantages -> ``updates_per_batch`` optimizer steps on those rollouts. Optimiser, schedule,
clipping, metrics.jsonl, plot and the HF checkpoint come from the training engine.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from lmforge.align.losses import grpo_loss, group_advantages, token_logprobs
from lmforge.align.rewards import safe_reward
from lmforge.data.sampler import StepSampler
from lmforge.errors import ConfigError, LmforgeError
from lmforge.models.generate import generate, left_pad
from lmforge.train.objectives import IGNORE_INDEX
from lmforge.train.trainer import MetricsLog, lr_multiplier, plot_metrics

RewardFn = Callable[[str, str], float]


@dataclass
class GRPOConfig:
    steps: int = 40
    prompts_per_step: int = 8
    group_size: int = 8
    max_new_tokens: int = 16
    temperature: float = 1.0
    top_p: float | None = None
    lr: float = 1e-4
    warmup_steps: int = 0
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    clip_eps: float = 0.2
    beta: float = 0.04  # KL(pi || pi_ref) weight (k3 estimator); 0 drops the reference model
    updates_per_batch: int = 1  # > 1 reuses rollouts; the clipped ratio then matters
    scale_advantages: bool = True  # False: Dr. GRPO (centre only)
    seed: int = 0

    def validate(self) -> None:
        for name in ("steps", "prompts_per_step", "group_size", "max_new_tokens", "updates_per_batch"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"GRPO field '{name}' must be positive, got {getattr(self, name)}")
        if self.group_size < 2:
            raise ConfigError("GRPO field 'group_size' must be >= 2: advantages compare samples within a group")
        if self.temperature <= 0:
            raise ConfigError("GRPO field 'temperature' must be > 0: groups need diverse samples")


def _cut_at_eos(row: list[int], eos_ids: list[int]) -> tuple[list[int], bool]:
    for j, t in enumerate(row):
        if t in eos_ids:
            return row[: j + 1], True  # keep the EOS: ending the answer is part of what is learned
    return row, False


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


def _logprobs(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    mask = batch["attention_mask"]
    logits = model(batch["input_ids"], attention_mask=None if bool(mask.all()) else mask)
    return token_logprobs(logits, batch["labels"])


class GRPOTrainer:
    def __init__(self, model, tokenizer, prompts: list[dict], reward_fn: RewardFn, cfg: GRPOConfig,
                 out_dir: str | Path) -> None:
        cfg.validate()
        if not prompts:
            raise LmforgeError("GRPO needs at least one prompt")
        for i, p in enumerate(prompts):
            if "messages" not in p or "answer" not in p:
                raise LmforgeError(f"prompt record {i} needs 'messages' and 'answer'")
        self.model, self.tokenizer, self.prompts, self.reward_fn, self.cfg = model, tokenizer, prompts, reward_fn, cfg
        self.out_dir = Path(out_dir)
        self.reference = copy.deepcopy(model).eval().requires_grad_(False) if cfg.beta > 0 else None
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.99))
        total = cfg.steps * cfg.updates_per_batch
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_multiplier(s, cfg.warmup_steps, total, 1.0))
        self.sampler = StepSampler(len(prompts), cfg.prompts_per_step, seed=cfg.seed, drop_last=False)
        self.encoded = [tokenizer.apply_chat_template(p["messages"], add_generation_prompt=True) for p in prompts]
        self.pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_ids[0]
        self.skipped = 0

    @torch.no_grad()
    def rollout(self, step: int) -> tuple[dict[str, torch.Tensor], torch.Tensor, dict[str, float]]:
        cfg, tok = self.cfg, self.tokenizer
        chosen = self.sampler.indices(step)
        prompts = [self.encoded[i] for i in chosen for _ in range(cfg.group_size)]
        answers = [self.prompts[i]["answer"] for i in chosen for _ in range(cfg.group_size)]
        ids, mask = left_pad(prompts, self.pad_id)
        self.model.eval()
        t0 = time.perf_counter()
        out = generate(self.model, ids, mask, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                       top_p=cfg.top_p, eos_ids=tok.eos_ids, seed=cfg.seed * 100_003 + step)
        rollout_s = time.perf_counter() - t0
        completions, rewards = [], []
        for row, answer in zip(out.tolist(), answers):
            cut, _ = _cut_at_eos(row, tok.eos_ids)
            completions.append(cut)
            outcome = safe_reward(self.reward_fn, tok.decode(cut), answer)
            if outcome.value is None:
                self.skipped += 1
            rewards.append(math.nan if outcome.value is None else outcome.value)
        r = torch.tensor(rewards).view(len(chosen), cfg.group_size)
        # A sample whose reward could not be computed is dropped from its group (zero advantage, no loss).
        valid = torch.isfinite(r)
        filled = torch.where(valid, r, r.nan_to_num(0.0).sum(1, keepdim=True) / valid.sum(1, keepdim=True).clamp(min=1))
        adv = group_advantages(filled, scale=cfg.scale_advantages) * valid
        batch = _sequences(prompts, completions, self.pad_id)
        new_tokens = sum(len(c) for c in completions)
        stats = {"reward": float(r[valid].mean()) if valid.any() else math.nan,
                 "solved_groups": float((r.nan_to_num(0).amax(1) > 0).float().mean()),
                 "completion_len": new_tokens / len(completions), "rollout_tok_s": new_tokens / max(rollout_s, 1e-9)}
        return batch, adv.flatten(), stats

    def update(self, batch, advantages) -> dict[str, float]:
        cfg = self.cfg
        mask = (batch["labels"] != IGNORE_INDEX)
        with torch.no_grad():
            self.model.eval()
            old = _logprobs(self.model, batch)
            ref = _logprobs(self.reference, batch) if self.reference is not None else None
        self.model.train()
        stats = {}
        t0 = time.perf_counter()
        for _ in range(cfg.updates_per_batch):
            logps = _logprobs(self.model, batch)
            loss, clip_frac, kl = grpo_loss(logps, old, ref, advantages, mask, cfg.clip_eps, cfg.beta)
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad],
                                                  cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            stats = {"loss": float(loss.detach()), "kl": float(kl), "clip_fraction": float(clip_frac), "grad_norm": float(norm)}
        tokens = int(batch["attention_mask"].sum()) * cfg.updates_per_batch
        stats["update_tok_s"] = tokens / max(time.perf_counter() - t0, 1e-9)
        return stats

    def fit(self, on_step: Callable[[int, dict], None] | None = None) -> list[dict]:
        from tqdm.auto import tqdm

        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / "grpo_config.json").write_text(json.dumps(asdict(self.cfg), indent=2))
        metrics = MetricsLog(self.out_dir / "metrics.jsonl", keep_until=0, enabled=True)
        history = []
        bar = tqdm(total=self.cfg.steps, desc="grpo", unit="step", dynamic_ncols=True)
        for step in range(self.cfg.steps):
            batch, adv, roll = self.rollout(step)
            upd = self.update(batch, adv)
            record = {"step": step + 1, **{k: round(v, 5) for k, v in {**roll, **upd}.items()},
                      "skipped_rewards": self.skipped}
            metrics.write(record)
            history.append(record)
            bar.update(1)
            bar.set_postfix(reward=f"{roll['reward']:.3f}", kl=f"{upd['kl']:.4f}",
                            rollout_tok_s=f"{roll['rollout_tok_s']:.0f}", update_tok_s=f"{upd['update_tok_s']:.0f}")
            if on_step is not None:
                on_step(step + 1, record)
        bar.close()
        plot_metrics(self.out_dir / "metrics.jsonl", self.out_dir / "loss.png")
        return history
